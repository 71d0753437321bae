"""Scoped api keys with expiry."""

import django.contrib.postgres.fields
from django.db import migrations, models

import runs.models


class Migration(migrations.Migration):
    dependencies = [("runs", "0010_retention")]

    operations = [
        # The default gives keys made before scopes existed every scope: nothing that worked stops working.
        migrations.AddField(
            model_name="apikey",
            name="scopes",
            field=django.contrib.postgres.fields.ArrayField(
                base_field=models.CharField(
                    choices=[
                        ("read", "Read tasks and runs (and stream a run's events)"),
                        ("trigger", "Start runs"),
                        ("events", "Send events and complete waitpoints"),
                        ("operate", "Cancel, retry and replay runs"),
                    ],
                    max_length=16,
                ),
                default=runs.models.apikey_all_scopes,
                size=None,
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="expires_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
