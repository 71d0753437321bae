"""The project's agents folder is loaded as `dex_agents` (runs/sdk/registry.py), no longer as `agents`: pending
approval waitpoints name their form by import path, so the old paths move with it."""

from django.db import migrations
from django.db.models import F, Value
from django.db.models.functions import Concat, Substr


def forward(apps, schema_editor):
    Waitpoint = apps.get_model("runs", "Waitpoint")
    Waitpoint.objects.filter(form__startswith="agents.").update(
        form=Concat(Value("dex_"), F("form"))
    )


def backward(apps, schema_editor):
    Waitpoint = apps.get_model("runs", "Waitpoint")
    Waitpoint.objects.filter(form__startswith="dex_agents.").update(form=Substr(F("form"), 5))


class Migration(migrations.Migration):
    dependencies = [("runs", "0011_security")]
    operations = [migrations.RunPython(forward, backward)]
