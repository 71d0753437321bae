"""Serve the local OpenAI-compatible LLM server: `manage.py llm_server [--port 8090] [--script rules.json]`.

Answers deterministically and injects faults on request; see runs/ai/testserver.py for the rules. Point Dex
at it with DEX_LLM_PROVIDERS='{"local": {"kind": "openai", "base_url": "http://127.0.0.1:8090/v1"}}' (the
default when no provider key is configured; `manage.py dev` starts it then).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from runs.ai.testserver import LLMServer, load_script


class Command(BaseCommand):
    help = "Run the local OpenAI-compatible LLM server (deterministic answers, fault injection)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--port", type=int, default=8090, help="Port on --host (default 8090).")
        parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
        parser.add_argument("--script", help="A JSON file of rules to answer with before the default rules.")

    def handle(self, *args: Any, port: int, host: str, script: str | None, **options: Any) -> None:
        try:
            rules = load_script(script) if script else None
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot read the script {script}: {exc}") from exc
        try:
            server = LLMServer((host, port), script=rules, verbose=options["verbosity"] > 1)
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.stdout.write(f"LLM server listening at {server.base_url} (OpenAI- and Anthropic-compatible)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
