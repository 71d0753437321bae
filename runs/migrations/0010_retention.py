"""Retention and large-output offload: Run.output and Step.output become runs.offload.OutputField, a JSONField
whose large values live in the "dex_outputs" storage (the column stays jsonb: no SQL changes), and an index of
finished runs by finish time for pruning."""

from django.db import migrations, models

import runs.offload


class Migration(migrations.Migration):
    dependencies = [("runs", "0009_alerts")]

    operations = [
        migrations.AlterField(
            model_name="run",
            name="output",
            field=runs.offload.OutputField(blank=True, null=True, run_attname="id"),
        ),
        migrations.AlterField(
            model_name="step",
            name="output",
            field=runs.offload.OutputField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=models.Q(("status__in", ["completed", "failed", "canceled", "timed_out"])),
                fields=["finished_at"],
                name="run_finished_idx",
            ),
        ),
    ]
