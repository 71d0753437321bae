from django.apps import AppConfig
from django.conf import settings


class RunsConfig(AppConfig):
    name = "runs"
    verbose_name = "Dex runs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The layers above the engine plug into its hooks here (runs.engine.hooks), so the engine imports none
        # of them. Imported in ready(): models must be loaded first.
        from runs import tasks
        from runs.ai import steps as ai_steps
        from runs.engine import hooks
        from runs.ops import alerts
        from runs.sdk.registry import registry

        tasks.connect()
        hooks.on_run_settled(alerts.alerts_run_settled)
        hooks.set_ai_factory(ai_steps.AIContext, ai_steps.AsyncAIContext)
        registry.autodiscover()
        if settings.DEX_OTEL:
            # Only now is OpenTelemetry imported: with the OTEL_* variables unset, tracing costs nothing.
            from runs.integrations import otel

            otel.install()
