"""Flow control: concurrency, rate limits, debounce, priority, queues (runs/flow.py)."""

from django.db import migrations, models
from django.db.models import Q


class Migration(migrations.Migration):
    dependencies = [("runs", "0007_step_ai_index")]

    operations = [
        migrations.AddField(
            model_name="run",
            name="concurrency_key_value",
            field=models.CharField(blank=True, max_length=255, null=True),
        ),
        migrations.AddField(
            model_name="run",
            name="rate_key_value",
            field=models.CharField(blank=True, max_length=255, null=True),
        ),
        migrations.AddField(
            model_name="run",
            name="debounce_key_value",
            field=models.CharField(blank=True, max_length=255, null=True),
        ),
        migrations.AddField(
            model_name="run",
            name="status_reason",
            field=models.CharField(blank=True, default="", max_length=300),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=Q(concurrency_key_value__isnull=False, status__in=["queued", "running"]),
                fields=["task_id", "concurrency_key_value", "status", "-priority", "id"],
                name="run_concurrency_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=Q(rate_key_value__isnull=False, status="queued"),
                fields=["task_id", "rate_key_value", "-priority", "id"],
                name="run_rate_queued_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=Q(rate_key_value__isnull=False),
                fields=["task_id", "rate_key_value", "started_at"],
                name="run_rate_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=Q(debounce_key_value__isnull=False, status="delayed"),
                fields=["task_id", "debounce_key_value"],
                name="run_debounce_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(condition=Q(status="queued"), fields=["wake_at"], name="run_throttled_idx"),
        ),
    ]
