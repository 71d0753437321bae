"""Inspect, stop or wipe the embedded Postgres and Redis under `.dex/` (or `DEX_DATA_DIR`).

- `status`: the data directory, and for each server whether it runs, its pid and its URL.
- `stop`: stop both (a fast Postgres shutdown; Redis saves its data first). The next command that needs
  them starts them again.
- `reset`: stop both and delete the data directory: every run, step, user and API key is lost. Asks first
  unless `--noinput` (no answer counts as no).

manage.py sets DEX_EMBEDDED_AUTOSTART=0 for this command, so settings don't start the servers it inspects.
With DATABASE_URL and REDIS_URL set, Dex does not use the embedded servers; this command still manages them.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from dexweb import embedded


class Command(BaseCommand):
    help = "Show the status of, stop, or reset (delete) the embedded Postgres and Redis."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("action", choices=["status", "stop", "reset"])
        parser.add_argument(
            "--noinput", "--no-input", action="store_false", dest="interactive", help="Reset without asking."
        )

    def handle(self, *args: Any, action: str, interactive: bool = True, **options: Any) -> None:
        getattr(self, f"handle_{action}")(interactive=interactive)

    def handle_status(self, **_: Any) -> None:
        self.stdout.write(f"data directory: {embedded.data_dir()}")
        pg = embedded.postgres_info()
        if pg is None:
            self.stdout.write("postgres: stopped")
        else:
            self.stdout.write(f"postgres: running (pid {pg.pid}) {embedded.postgres_url()}")
        redis_pid = embedded.redis_pid()
        if redis_pid is None:
            self.stdout.write("redis:    stopped")
        else:
            self.stdout.write(f"redis:    running (pid {redis_pid}) {embedded.redis_url()}")

    def handle_stop(self, **_: Any) -> None:
        stopped = embedded.stop_all()
        self.stdout.write(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")

    def handle_reset(self, *, interactive: bool) -> None:
        path = embedded.data_dir()
        if interactive:
            try:
                answer = input(f"Delete {path} (every run, user and API key in the embedded database)? [y/N] ")
            except EOFError:  # no terminal to ask
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("reset cancelled")
        embedded.reset()
        self.stdout.write(f"deleted {path}")
