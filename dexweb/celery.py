"""The Celery app. A message is only a wake-up ("look at run X"); Postgres is the record (ENGINE.md)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dexweb.settings")

app = Celery("dexweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Celery's Django fixup closes the database connection before and after every task unless this is set: a
# new Postgres connection per run. Keep it (runs.tasks drops a broken or aged one, as Django's requests do).
app.conf.CELERY_DB_REUSE_MAX = 1_000_000
app.autodiscover_tasks(["runs"])
