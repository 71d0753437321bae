"""`manage.py scheduler`, unchanged, with every statement it sends to Postgres logged to a file.

    python bench/scheduler_probe.py LOGFILE

The log is written below Django, at psycopg's `Cursor.execute`/`executemany` (what Django's cursors and
psycopg's `Connection.execute` all go through), so it holds every statement of the process: Django's own
connection set-up included, not only the ORM's. One line per statement: `<unix time>\\t<statement>`, flushed
at once, so the bench can count the statements of any window while the scheduler runs. Used by the `parked`
scenario to count an idle scheduler's queries (Postgres has no per-backend statement counter, and
pg_stat_statements is not loaded on the embedded server).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ comes first on sys.path, where bench/agents.py would shadow the OpenAI Agents SDK.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _install(log_path: str) -> None:
    import psycopg

    out = open(log_path, "a", buffering=1)  # noqa: SIM115  (open for the life of the process)

    def logged(method):
        def wrapper(self, query, *args, **kwargs):
            text = query if isinstance(query, str) else getattr(query, "as_string", lambda _c: str(query))(self)
            out.write(f"{time.time():.6f}\t{' '.join(str(text).split())}\n")
            return method(self, query, *args, **kwargs)

        return wrapper

    psycopg.Cursor.execute = logged(psycopg.Cursor.execute)
    psycopg.Cursor.executemany = logged(psycopg.Cursor.executemany)


def main() -> None:
    _install(sys.argv[1])
    import django

    django.setup()
    from django.core.management import call_command

    call_command("scheduler")


if __name__ == "__main__":
    main()
