"""The SQLite backend: the shared statements, run one after the other under the lock.

SQLite has one writer at a time, and the hub's transactions are IMMEDIATE (they take the
write lock when they begin): a transition's read and write run in one transaction that
nothing else can write in between, so the write needs no fence beyond the version.

The statements run on the sqlite3 cursor itself: Django's wrapper rewrote ``%s`` to ``?``
with a regular expression on every statement, which cost a tenth of a transition. Errors
are still Django's (``IntegrityError``), but these statements are not in
``connection.queries``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from .base import Changes, Written
from .sql import SqlStore


class SqliteStore(SqlStore):
    aggregate = "json_group_array(json_array({}))"

    def parameter_limit(self) -> int:
        self.conn.ensure_connection()
        return int(self.conn.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))

    def sql(self, text: str) -> str:
        return text.replace("%s", "?")

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        conn = self.conn
        conn.ensure_connection()
        with conn.wrap_database_errors:
            cursor = conn.connection.cursor()
            try:
                yield cursor
            finally:
                cursor.close()

    def write_transition(self, changes: Changes) -> Written | None:
        task = self.task_step(changes)
        steps, inserts_of_events = self.other_steps(changes)
        ids: list[int] = []
        with self.cursor() as cursor:
            if task is not None:
                cursor.execute(task.text, task.params)
                if changes.fields is not None and not cursor.rowcount:
                    return None  # the version moved on
            for step in steps:
                cursor.execute(step.text, step.params)
            for step in inserts_of_events:
                cursor.execute(step.text, step.params)
                ids += (row[0] for row in cursor.fetchall())
        if changes.fields is None:
            changes.record._state.adding = False
        # One statement's ids are consecutive, in the order of its rows.
        return Written(event_ids=tuple(sorted(ids)))
