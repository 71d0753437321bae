from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Dex agents"

    def ready(self) -> None:
        from runs.sdk.registry import registry

        registry.autodiscover()
