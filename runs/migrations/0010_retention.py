"""Retention and large-output offload."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("runs", "0009_alerts")]

    operations = []
