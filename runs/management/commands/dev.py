"""Run the whole of Dex on this machine: `manage.py dev [--port 8000] [--workers 2]`.

1. Settings have already started (or found running) the embedded Postgres and Redis if DATABASE_URL /
   REDIS_URL aren't set; `embedded.started` says which of them this process started.
2. Refuse to start if the port is taken; migrate; make sure the dev login exists: a superuser `admin` whose
   password is generated once and kept in `<data dir>/dev-login.txt` (put in every group there is); print it.
3. Start the children of `children()` — web (daphne), worker (Celery, serving the default queue and every
   queue a registered task names), scheduler, and, when no LLM provider is configured, the local LLM server
   (`llm_server`, on a free port) — each in its own session, with the resolved DATABASE_URL,
   REDIS_URL and CELERY_BROKER_URL (and DEX_LLM_PROVIDERS pointing at that local server) in its
   environment, and print the URL.
4. Supervise (dexweb/supervisor.py): every line a child writes is printed as `name | line`; a child that
   dies is restarted after a back-off that doubles while it keeps dying young; an embedded Postgres or Redis
   that dies is started again (and says so); every child dies with this process, even a SIGKILLed one.
5. On Ctrl-C or SIGTERM: SIGTERM each child's process group, SIGKILL the groups still there after the grace
   period (a second Ctrl-C skips it), then stop the embedded servers this process started — ones that were
   already running are left running.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from dexweb import embedded
from dexweb.supervisor import ChildSpec, Supervisor, Watch
from runs.ai.providers import real_provider_configured
from runs.sdk.registry import registry

DEV_USERNAME = "admin"


def children(*, port: int, workers: int, queues: list[str], llm_port: int | None = None) -> list[ChildSpec]:
    """The processes `manage.py dev` runs; adding one is adding a line."""
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "dexweb"]
    manage = [python, str(settings.BASE_DIR / "manage.py")]
    return [
        ChildSpec("web", [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "dexweb.asgi:application"]),
        ChildSpec("worker", [*celery, "worker", "-c", str(workers), "-Q", ",".join(queues), "-l", "info"]),
        ChildSpec("scheduler", [*manage, "scheduler"]),
        *([ChildSpec("llm", [*manage, "llm_server", "--port", str(llm_port)])] if llm_port else []),
    ]


def task_queues() -> list[str]:
    """The default queue and every queue a registered task names: the one dev worker serves them all."""
    registry.autodiscover()
    return sorted({settings.DEX_DEFAULT_QUEUE, *(task.queue for task in registry.all() if task.queue)})


def child_env(*, llm_port: int | None = None) -> dict[str, str]:
    """The children use the servers this process resolved, never start their own."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.DATABASE_URL,
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "PYTHONUNBUFFERED": "1",
    }
    if llm_port:
        local = {"kind": "openai", "base_url": f"http://127.0.0.1:{llm_port}/v1", "models": ["*"]}
        env["DEX_LLM_PROVIDERS"] = json.dumps({"local": local})
    return env


def llm_port_pick() -> int | None:
    """Where the local LLM server should listen (a free port), or None when a real provider is configured."""
    if real_provider_configured():
        return None
    return free_port()


def embedded_watches() -> list[Watch]:
    """The embedded servers this session runs on (none when DATABASE_URL / REDIS_URL name real ones)."""
    watches = []
    if not os.environ.get("DATABASE_URL"):
        watches.append(Watch("postgres", embedded.postgres_running, embedded.postgres_url))
    if not os.environ.get("REDIS_URL"):
        watches.append(Watch("redis", embedded.redis_running, embedded.redis_url))
    return watches


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dev_login_ensure() -> str:
    """Make sure `admin` exists, is a superuser and has the password in dev-login.txt; return the password."""
    path = embedded.data_dir() / "dev-login.txt"
    password = path.read_text().strip() if path.exists() else ""
    if not password:
        password = secrets.token_urlsafe(12)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(password + "\n")
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(username=DEV_USERNAME)
    if created or not (user.is_superuser and user.is_staff and user.is_active and user.check_password(password)):
        user.is_superuser = user.is_staff = user.is_active = True
        user.set_password(password)
        user.save()
    user.groups.add(*Group.objects.all())
    return password


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as daphne binds: TIME_WAIT is no conflict
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Command(BaseCommand):
    help = "Run Dex locally: migrate, ensure a dev login, and supervise web, worker and scheduler."
    requires_system_checks: list[str] = []  # web and worker run the checks themselves

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000).")
        parser.add_argument("--workers", type=int, default=2, help="Celery worker concurrency (default 2).")

    def handle(self, *args: Any, port: int, workers: int, **options: Any) -> None:
        # Until the supervisor takes over, SIGTERM unwinds like Ctrl-C, through the `finally` below.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            self.run(port=port, workers=workers, verbosity=options["verbosity"])
        except KeyboardInterrupt:
            pass
        finally:
            connections.close_all()
            self.stop_embedded()

    def run(self, *, port: int, workers: int, verbosity: int) -> None:
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        if not port_free(port):
            raise CommandError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
        call_command("migrate", interactive=False, verbosity=verbosity)
        password = dev_login_ensure()
        connections.close_all()  # the children have their own; don't hold one open for the whole session

        llm_port = llm_port_pick()
        specs = children(port=port, workers=workers, queues=task_queues(), llm_port=llm_port)
        supervisor = Supervisor(
            specs, env=child_env(llm_port=llm_port), cwd=settings.BASE_DIR, watches=embedded_watches()
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, supervisor.request_stop)
        self.stdout.write(f"Agents: {', '.join(t.id for t in registry.all()) or 'none registered'}")
        if llm_port:
            self.stdout.write(f"LLM: no provider configured; models answered by http://127.0.0.1:{llm_port}/v1")
        try:
            supervisor.start()
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nDex is running at http://127.0.0.1:{port}/  (Ctrl-C stops it)\n"
                    f"Dev login: {DEV_USERNAME} / {password}\n"
                )
            )
            supervisor.run()
        finally:
            supervisor.stop()

    def stop_embedded(self) -> None:
        for name, stop in (("redis", embedded.redis_stop), ("postgres", embedded.postgres_stop)):
            if name not in embedded.started:
                continue
            try:
                stop()
            except Exception as exc:  # report it and go on to the other server
                self.stderr.write(f"could not stop the embedded {name}: {exc}")
            else:
                self.stdout.write(f"stopped the embedded {name}")
