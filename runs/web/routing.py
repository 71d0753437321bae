"""Websocket URLs (DESIGN.md §6): the run list and one run's page."""

from __future__ import annotations

from django.urls import path

from runs.web import consumers

websocket_urlpatterns = [
    path("ws/runs/", consumers.RunListConsumer.as_asgi(), name="ws-runs"),
    path("ws/runs/<uuid:run_id>/", consumers.RunDetailConsumer.as_asgi(), name="ws-run"),
]
