"""Flow control: concurrency, rate limits, debounce, priority, queues."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("runs", "0007_step_ai_index")]

    operations = []
