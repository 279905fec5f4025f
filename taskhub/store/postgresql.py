"""The PostgreSQL backend: reads without a lock, one fenced statement per write.

A transition reads its task with one statement and no lock, and writes with one more,
outside a transaction (:attr:`Store.optimistic`): BEGIN, ``SELECT ... FOR UPDATE``, the
write and COMMIT were four round trips, this is two. The write's first step, CTE ``w0``,
is its *fence*: the task's update at the version read (every transition of a running
task moves the version, since its decision read the other services' assignments too),
or, for a write that leaves the task's row alone (a late return on a finished task,
whose assignments are all final), the task's row still being there. Every other step is
a data-modifying CTE that writes only ``WHERE EXISTS (SELECT 1 FROM w0)``, so either all
of it happens or none. The statement reads back the task's ``watched`` flag and its
publisher's channel as they are when it writes, and the new events' ids.

Statements run on a cursor that binds values on the server and prepares each statement
once per connection (:func:`cursor`): Django's cursors quote values into the text in
Python, and the server parsed and planned each statement anew.

Imported only when the database is PostgreSQL, so SQLite installs need no psycopg.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import register_tzloader
from django.db.models import Field
from psycopg import Cursor, adapters
from psycopg.pq import Format

from taskhub.conf import conf
from taskhub.models import Instance, TaskEvent, TaskRecord

from . import schema
from .base import Changes, Written
from .sql import SqlStore, Step

_TIMESTAMPTZ_OID = adapters.types["timestamptz"].oid
_GATE = " AND EXISTS (SELECT 1 FROM w0)"


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
    assert raw is not None, "the connection is open"
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


class PostgresStore(SqlStore):
    aggregate = "json_agg(json_build_array({}))"
    optimistic = True

    def __init__(self, conn: BaseDatabaseWrapper) -> None:
        super().__init__(conn)
        self._casts: dict[Field[Any, Any], str] = {}

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        conn = self.conn
        conn.ensure_connection()
        with conn.wrap_database_errors:
            found = cursor(conn)
            try:
                yield found
            finally:
                found.close()

    def cast(self, field: Field[Any, Any]) -> str:
        """``::type`` for a value where the statement gives it no type (in ``SELECT``
        rather than ``INSERT ... VALUES``); none for text, which is what a value of
        unknown type becomes, so that a too long one still fails as the column says."""
        found = self._casts.get(field)
        if found is None:
            text = field.get_internal_type() in ("CharField", "TextField")
            found = self._casts[field] = "" if text else f"::{field.db_type(self.conn)}"
        return found

    def gated(self, step: Step) -> Step:
        """``step`` as a step of a fenced statement: it writes only if the fence ``w0`` held."""
        model = step.model
        if model is None:  # an UPDATE ... WHERE
            return step._replace(text=self.statement(("gated", step.text), lambda: step.text + _GATE))

        def build() -> str:
            # The insert's VALUES as a SELECT, which the gate can filter; such values carry
            # no column types, hence the casts.
            fields = schema.table(model).inserted
            typed = "(" + ", ".join(f"%s{self.cast(f)}" for f in fields) + ")"
            returning = f" RETURNING {self.column(model, 'id')}" if step.returning else ""
            return (
                f"INSERT INTO {self.quote(schema.table(model).name)} ({self.columns(fields)}) "
                f"SELECT * FROM (VALUES {', '.join([typed] * step.rows)}) v WHERE EXISTS (SELECT 1 FROM w0){returning}"
            )

        return step._replace(text=self.statement(("gated insert", model, step.rows, step.returning), build))

    def write_transition(self, changes: Changes) -> Written | None:
        task = self.task_step(changes)
        steps, inserts_of_events = self.other_steps(changes)
        every = (*([task] if task else []), *steps, *inserts_of_events)
        fits = sum(len(step.params) for step in every) <= self.max_params
        if changes.fields is None:
            assert task is not None
            written = self._insert(task, steps, inserts_of_events, fits)
            changes.record._state.adding = False
            return written
        if task is None:  # leave the task's row alone: the fence is the row being there
            pk = self.values.named(TaskRecord, "id")(changes.record.pk)
            fence = Step(self.statement(("fence_exists",), self._fence_exists), [pk])
        else:
            fence = Step(self.statement(("fence", task.text), lambda: self._fence_task(task.text)), task.params)
        return self._fenced(fence, task is not None, steps, inserts_of_events, fits)

    def _fence_exists(self) -> str:
        return f"SELECT 1 FROM {self.quote(schema.tasks().name)} WHERE {self.column(TaskRecord, 'id')} = %s"

    def _fence_task(self, update: str) -> str:
        c = self.column
        return f"{update} RETURNING {c(TaskRecord, 'watched')}, {c(TaskRecord, 'publisher_instance')}"

    def _fenced(
        self, fence: Step, by_task: bool, steps: list[Step], inserts_of_events: list[Step], fits: bool
    ) -> Written | None:
        """The fence as ``w0`` and every other step gated by it, in one statement (or, over
        the parameter limit, the fence and then the rest in a transaction)."""
        if not fits:
            with transaction.atomic(using=self.conn.alias), self.cursor() as cur:
                cur.execute(self._with_tail((fence.text,), by_task, ()), fence.params)
                row = cur.fetchone()
                if row is None:
                    return None
                for step in steps:
                    cur.execute(step.text, step.params)
                ids = self._run_returning(cur, inserts_of_events)
            return self._written(row, by_task, ids)
        gated = [self.gated(step) for step in (*steps, *inserts_of_events)]
        texts = (fence.text, *(step.text for step in gated))
        events = tuple(range(1 + len(steps), len(texts)))
        params = [*fence.params, *(p for step in gated for p in step.params)]
        with self.cursor() as cur:
            cur.execute(self._with_tail(texts, by_task, events), params)
            row = cur.fetchone()
        if row is None:
            return None  # the fence did not hold: nothing was written
        return self._written(row, by_task, tuple(sorted(row[-1] or ())) if events else ())

    def _with_tail(self, texts: tuple[str, ...], by_task: bool, events: tuple[int, ...]) -> str:
        """``WITH w0 AS (...), w1 AS (...) SELECT ...``: one row when the fence ``w0`` held,
        with the watched flag and publisher's channel (``by_task``) and the events' ids."""

        def build() -> str:
            q, ctes = self.quote, ", ".join(f"w{i} AS ({text})" for i, text in enumerate(texts))
            ids = ", " + self._ids_of(events) if events else ""
            if by_task:
                publisher = schema.join(TaskRecord, "publisher_instance")
                return (
                    f"WITH {ctes} SELECT w0.{self.column(TaskRecord, 'watched')}, "
                    f"pi.{self.column(Instance, 'channel_name')}{ids} FROM w0 "
                    f"LEFT JOIN {q(publisher.target.name)} pi ON pi.{q(publisher.remote)} = w0.{q(publisher.local)}"
                )
            return f"WITH {ctes} SELECT count(*){ids} FROM w0 HAVING count(*) > 0"

        return self.statement(("with_tail", texts, by_task, events), build)

    @staticmethod
    def _written(row: tuple[Any, ...], by_task: bool, ids: tuple[int, ...]) -> Written:
        if by_task:
            return Written(event_ids=ids, fresh=True, watched=bool(row[0]), publisher_channel=row[1])
        return Written(event_ids=ids)

    def _insert(self, task: Step, steps: list[Step], inserts_of_events: list[Step], fits: bool) -> Written:
        """A new task, as one statement whose steps are CTEs; its insert is its own fence
        (a taken id fails it)."""
        if not fits:
            with transaction.atomic(using=self.conn.alias), self.cursor() as cur:
                for step in (task, *steps):
                    cur.execute(step.text, step.params)
                return Written(event_ids=self._run_returning(cur, inserts_of_events))
        all_steps = (task, *steps, *inserts_of_events)
        texts = tuple(step.text for step in all_steps)
        events = tuple(range(1 + len(steps), len(all_steps)))

        def build() -> str:
            ctes = ", ".join(f"w{i} AS ({text})" for i, text in enumerate(texts))
            return f"WITH {ctes} SELECT {self._ids_of(events) if events else 'NULL'}"

        with self.cursor() as cur:
            cur.execute(self.statement(("insert_task", texts), build), [p for step in all_steps for p in step.params])
            row = cur.fetchone()
        return Written(event_ids=tuple(sorted(row[0] or ())))

    @staticmethod
    def _run_returning(cur: Any, inserts: list[Step]) -> tuple[int, ...]:
        ids: list[int] = []
        for step in inserts:
            cur.execute(step.text, step.params)
            ids += (row[0] for row in cur.fetchall())
        return tuple(sorted(ids))

    def _ids_of(self, ctes: tuple[int, ...]) -> str:
        """An array of the event ids the inserts ``ctes`` returned."""
        pk = self.column(TaskEvent, "id")
        return "ARRAY(" + " UNION ALL ".join(f"SELECT {pk} FROM w{i}" for i in ctes) + ")"
