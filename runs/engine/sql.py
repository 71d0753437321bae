"""The cursor the engine's hot statements run on: the claim, a step's fenced write (and the park, settle and
heartbeat that share it), the scheduler's tick.

They run again and again with new parameters, so they are worth preparing: Postgres plans a ~20-line fenced
statement once per connection instead of on every step. Django's cursors bind parameters on the client (the
query text changes with every call, so nothing can be prepared); this one binds them on the server, and psycopg
prepares a statement the second time a connection runs it. It is still Django's cursor wrapper, so query
logging and counting see it.

Behind a pooler in transaction mode a prepared statement may land on another server connection
(DEX_DB_POOLER=transaction, PgBouncer before 1.21): then the hot statements run on Django's ordinary cursor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection

# psycopg prepares a query on its (n+1)-th execution on a connection: one-off statement texts are not prepared.
PREPARE_THRESHOLD = 1


def prepared_statements() -> bool:
    return settings.DEX_DB_POOLER != "transaction"


@contextmanager
def hot_cursor() -> Iterator[Any]:
    """A cursor for a statement the engine runs on every step (see the module docstring)."""
    if not prepared_statements():
        with connection.cursor() as cur:
            yield cur
        return
    connection.ensure_connection()
    raw_connection = connection.connection
    # Only server-side-binding cursors prepare, so this leaves Django's own queries as they are.
    raw_connection.prepare_threshold = PREPARE_THRESHOLD
    raw = psycopg.Cursor(raw_connection)
    cursor = connection.make_debug_cursor(raw) if connection.queries_logged else connection.make_cursor(raw)
    with cursor:
        yield cursor
