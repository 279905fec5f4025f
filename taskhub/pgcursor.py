"""The hot path's cursor on PostgreSQL: server-side binding, statements prepared once.

Django's own cursors bind values on the client (psycopg's ``ClientCursor``): psycopg
quotes every value into the statement's text in Python, and the server parses and plans
every statement anew. For the hot path's fixed statements (:mod:`taskhub.store`) that cost
more than running them: with values sent apart from the text and each statement prepared
on first use per connection, the services layer's round trip (three transitions) went from
11–14 to 7.5–9 ms of wall time (bench/README.md).

Imported only when the database is PostgreSQL, so SQLite installs need no psycopg.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import register_tzloader
from psycopg import Cursor, adapters
from psycopg.pq import Format

from .conf import conf

_TIMESTAMPTZ_OID = adapters.types["timestamptz"].oid


class PreparedCursor(Cursor[Any]):
    """A server-binding cursor whose ``execute`` prepares the statement (or not) as told."""

    prepare: bool = True

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        return super().execute(query, params, prepare=self.prepare if prepare is None else prepare, binary=binary)


def cursor(conn: BaseDatabaseWrapper) -> PreparedCursor:
    """A cursor on ``conn``'s open psycopg connection, reading values as Django's do.

    Statements are prepared unless ``TASKHUB_PREPARED_STATEMENTS`` is false (for a pooler
    that cannot carry prepared statements, such as PgBouncer in transaction mode before 1.21).
    """
    raw = conn.connection
    assert raw is not None, "call inside atomic(): the connection is open"
    found = PreparedCursor(raw)
    found.prepare = bool(conf.PREPARED_STATEMENTS)
    if found.prepare and raw.prepare_threshold is None:
        # Django turns preparing off for the connection (its own cursors bind on the
        # client and never prepare); psycopg prepares nothing while it is None.
        raw.prepare_threshold = 0
    # As Django's create_cursor: timestamps in the connection's time zone.
    loader = raw.adapters.get_loader(_TIMESTAMPTZ_OID, Format.TEXT)
    if conn.timezone != getattr(loader, "timezone", None):
        register_tzloader(conn.timezone, found)
    return found
