"""Statements the fast backends share, their text derived from the models' ``_meta``.

Why SQL and not the ORM on the hot path: building and compiling the ORM's queries cost
more than running them. These statements depend only on the models and the connection,
so each is built once per connection (:meth:`SqlStore.statement`) from the tables of
:mod:`taskhub.store.schema`, and runs on the driver's own cursor. Values go in through
the fields' own preparation and come back through the ORM's converters
(:mod:`taskhub.store.values`).

A task is read with its assignments in one query: the database aggregates them as a JSON
array (``aggregate``), which saved a round trip per transition on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from taskhub.core.states import HELD_ASSIGNMENT_STATES
from taskhub.models import Assignment, Credential, Instance, Subscription, TaskEvent, TaskRecord

from . import schema
from .base import TERMINAL, AssignmentRow, Changes, LoadedTask, Store, Subscriber
from .values import Reader, Values

_UNSET = object()

#: What an assignment row brings to a transition, in :class:`AssignmentRow` order (its
#: last field, the channel, comes from the instance).
_ASSIGNMENT_COLUMNS = ("id", "service", "instance", "attempt", "state", "detail")
#: The states in which an instance holds an assignment (what its concurrency counts).
HELD = sorted(state.value for state in HELD_ASSIGNMENT_STATES)


class Step(NamedTuple):
    """One statement of a write: its text, its parameters, and for an insert its model."""

    text: str
    params: list[Any]
    #: For an insert: its model, how many rows, and whether it returns their ids.
    model: type[Model] | None = None
    rows: int = 0
    returning: bool = False


class SqlStore(Store):
    """The statements and values of one connection; a subclass runs them."""

    #: The database's JSON aggregate of rows, around the columns' list.
    aggregate = ""

    def __init__(self, conn: BaseDatabaseWrapper) -> None:
        self.conn = conn
        self.values = Values(conn)
        self.quote = conn.ops.quote_name
        self._statements: dict[tuple[Any, ...], str] = {}
        self._preps: dict[type[Model], list[Any]] = {}
        self._task_preps: dict[str, Any] = {}
        #: Most parameters one statement may carry: wider inserts go in batches.
        self.max_params = self.parameter_limit()

    # -- what a subclass provides ----------------------------------------------------------

    def parameter_limit(self) -> int:
        return int(self.conn.features.max_query_params or 65535)

    def sql(self, text: str) -> str:
        """``text`` with the driver's placeholders (``%s`` here)."""
        return text

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        """The driver's cursor, its errors translated to Django's."""
        conn = self.conn
        conn.ensure_connection()
        with conn.wrap_database_errors:
            cursor = conn.create_cursor()
            try:
                yield cursor
            finally:
                cursor.close()

    # -- statement text ------------------------------------------------------------------

    def statement(self, key: tuple[Any, ...], build: Callable[[], str]) -> str:
        """The statement ``key`` names, built on first use."""
        found = self._statements.get(key)
        if found is None:
            found = self._statements[key] = self.sql(build())
        return found

    def columns(self, fields: Sequence[Field[Any, Any]], alias: str = "") -> str:
        prefix = f"{alias}." if alias else ""
        return ", ".join(prefix + self.quote(str(f.column)) for f in fields)

    def column(self, model: type[Model], name: str) -> str:
        return self.quote(str(_field(model, name).column))

    def _select_task(self, with_payload: bool, own: bool, locked: bool) -> str:
        q, tasks = self.quote, schema.tasks()
        payload = _field(TaskRecord, "payload")
        task_columns = ", ".join(
            f"t.{q(str(f.column))}" if with_payload or f is not payload else "NULL" for f in tasks.fields
        )
        publisher = schema.join(TaskRecord, "publisher_instance")
        by_instance = schema.join(Assignment, "instance")
        of_task = schema.join(Assignment, "task")
        channel = self.column(Instance, "channel_name")
        rows = self.aggregate.format(
            self.columns([_field(Assignment, n) for n in _ASSIGNMENT_COLUMNS], "a") + f", i.{channel}"
        )
        mine = ""
        if own:
            terminal = ", ".join(["%s"] * len(TERMINAL))
            service, status = self.column(Assignment, "service"), self.column(TaskRecord, "status")
            mine = f" AND (a.{service} = %s OR t.{status} NOT IN ({terminal}))"
        return (
            f"SELECT {task_columns}, pi.{channel}, "
            f"(SELECT {rows} FROM {q(schema.assignments().name)} a "
            f"LEFT JOIN {q(by_instance.target.name)} i ON a.{q(by_instance.local)} = i.{q(by_instance.remote)} "
            f"WHERE a.{q(of_task.local)} = t.{q(of_task.remote)}{mine}) "
            f"FROM {q(tasks.name)} t "
            f"LEFT JOIN {q(publisher.target.name)} pi ON t.{q(publisher.local)} = pi.{q(publisher.remote)} "
            f"WHERE t.{self.column(TaskRecord, 'id')} = %s{self.lock_clause() if locked else ''}"
        )

    def lock_clause(self) -> str:
        """What locks the task's row (only the task's: the publisher's may be missing)."""
        features = self.conn.features
        if features.has_select_for_update_of:
            return " FOR UPDATE OF t"
        return " FOR UPDATE" if features.has_select_for_update else ""

    def update_task(self, attnames: tuple[str, ...]) -> str:
        tasks = schema.tasks()
        return self.statement(
            ("update_task", attnames),
            lambda: (
                f"UPDATE {self.quote(tasks.name)} SET "
                + ", ".join(f"{self.quote(str(tasks.field(n).column))} = %s" for n in attnames)
                + f" WHERE {self.column(TaskRecord, 'id')} = %s AND {self.column(TaskRecord, 'version')} = %s"
            ),
        )

    def update_assignment(self) -> str:
        c = self.column
        return self.statement(
            ("update_assignment",),
            lambda: (
                f"UPDATE {self.quote(schema.assignments().name)} SET {c(Assignment, 'state')} = %s, "
                f"{c(Assignment, 'detail')} = %s, {c(Assignment, 'instance')} = %s, {c(Assignment, 'updated_at')} = %s "
                f"WHERE {c(Assignment, 'id')} = %s"
            ),
        )

    def insert(self, model: type[Model], rows: int, *, returning: bool = False) -> str:
        """A multi-row insert of every column an insert writes; ``returning`` the new ids."""
        table = schema.table(model)
        fields = table.inserted
        placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
        tail = f" RETURNING {self.column(model, 'id')}" if returning else ""
        return self.statement(
            ("insert", model, rows, returning),
            lambda: (
                f"INSERT INTO {self.quote(table.name)} ({self.columns(fields)}) "
                f"VALUES {', '.join([placeholders] * rows)}{tail}"
            ),
        )

    def mark_assigned(self, count: int) -> str:
        c = self.column
        return self.statement(
            ("mark_assigned", count),
            lambda: (
                f"UPDATE {self.quote(schema.instances().name)} SET {c(Instance, 'last_assigned_at')} = %s "
                f"WHERE {c(Instance, 'id')} IN ({', '.join(['%s'] * count)})"
            ),
        )

    # -- reads -----------------------------------------------------------------------------

    def load_task(
        self, task_id: uuid.UUID | str, *, with_payload: bool = False, service: str | None = None, lock: bool = True
    ) -> LoadedTask | None:
        pk = self.parse_id(task_id)
        if pk is None:
            return None
        own = service is not None
        text = self.statement(
            ("select_task", with_payload, own, lock), lambda: self._select_task(with_payload, own, lock)
        )
        prepared_pk = self.values.named(TaskRecord, "id")(pk)
        with self.cursor() as cursor:
            cursor.execute(text, [prepared_pk] if not own else [service, *TERMINAL, prepared_pk])
            row = cursor.fetchone()
        if row is None:
            return None
        values = self._task_reader()(row[:-1])
        publisher_channel = values.pop()
        # Positional, in field order: the fast path of Model.__init__.
        record = TaskRecord.from_db(self.conn.alias, schema.tasks().attnames, values)
        return LoadedTask(record, _assignment_rows(row[-1]), publisher_channel)

    def _task_reader(self) -> Reader:
        reader: Reader | None = getattr(self, "_reader", None)
        if reader is None:
            reader = self._reader = Reader(self.conn, [*schema.tasks().fields, _field(Instance, "channel_name")])
        return reader

    def live_subscribers(self, action: str, now: datetime) -> list[Subscriber]:
        text = self.statement(("live_subscribers",), self._select_subscribers)
        lease = self.values.named(Instance, "lease_expires_at")(now)
        with self.cursor() as cursor:
            cursor.execute(text, [*HELD, action, lease, True])  # the count's states come first
            rows = cursor.fetchall()
        read = getattr(self, "_subscriber_reader", None)
        if read is None:
            fields = [_field(Instance, n) for n in ("id", "channel_name")]
            fields += [_field(Credential, n) for n in ("id", "name")]
            read = self._subscriber_reader = Reader(self.conn, fields)
        return [Subscriber._make([*read(row[:-3]), _patterns(row[-3]), bool(row[-2]), bool(row[-1])]) for row in rows]

    def _select_subscribers(self) -> str:
        q, c = self.quote, self.column
        by_instance = schema.join(Subscription, "instance")
        by_credential = schema.join(Instance, "credential")
        last = f"i.{c(Instance, 'last_assigned_at')}"
        held_by = schema.join(Assignment, "instance")
        concurrency = f"i.{c(Instance, 'concurrency')}"
        held = (
            f"SELECT count(*) FROM {q(schema.assignments().name)} a WHERE a.{q(held_by.local)} = i.{q(held_by.remote)} "
            f"AND a.{c(Assignment, 'state')} IN ({', '.join(['%s'] * len(HELD))})"
        )
        return (
            f"SELECT i.{c(Instance, 'id')}, i.{c(Instance, 'channel_name')}, c.{c(Credential, 'id')}, "
            f"c.{c(Credential, 'name')}, c.{c(Credential, 'sub_permissions')}, "
            f"CASE WHEN {concurrency} IS NULL THEN 0 WHEN ({held}) >= {concurrency} THEN 1 ELSE 0 END, "
            f"CASE WHEN {concurrency} IS NULL THEN 0 ELSE 1 END "
            f"FROM {q(schema.subscriptions().name)} s "
            f"JOIN {q(by_instance.target.name)} i ON s.{q(by_instance.local)} = i.{q(by_instance.remote)} "
            f"JOIN {q(by_credential.target.name)} c ON i.{q(by_credential.local)} = c.{q(by_credential.remote)} "
            f"WHERE s.{c(Subscription, 'action')} = %s AND i.{c(Instance, 'lease_expires_at')} > %s "
            f"AND c.{c(Credential, 'is_active')} = %s AND i.{c(Instance, 'detached_at')} IS NULL "
            f"ORDER BY CASE WHEN {last} IS NULL THEN 0 ELSE 1 END, {last}, i.{c(Instance, 'connected_at')}"
        )

    # -- the steps of a write ---------------------------------------------------------------

    def task_params(self, record: TaskRecord) -> list[Any]:
        """An inserted task's values, every column's, in the table's order."""
        tasks = schema.tasks()
        preps = self._preps.get(TaskRecord)
        if preps is None:
            preps = self._preps[TaskRecord] = [self.values.prep(f) for f in tasks.inserted]
        return [
            prep(f.pre_save(record, True) if f.attname in tasks.pre_saved else getattr(record, f.attname))
            for f, prep in zip(tasks.inserted, preps, strict=True)
        ]

    def inserts(self, model: type[Model], rows: list[dict[str, Any]], *, returning: bool = False) -> list[Step]:
        """The statements and parameters that insert ``rows`` (by attribute name; a column a
        row does not name gets its default), as many in each as the parameter limit allows."""
        if not rows:
            return []
        table = schema.table(model)
        fields = table.inserted
        per_statement = max(1, self.max_params // len(fields))
        if len(rows) > per_statement:
            return [
                step
                for start in range(0, len(rows), per_statement)
                for step in self.inserts(model, rows[start : start + per_statement], returning=returning)
            ]
        preps = self._preps.get(model)
        if preps is None:
            preps = self._preps[model] = [self.values.prep(f) for f in fields]
        # Rows of one transition share objects (the task id, ``now``): prepare each once.
        # A fan-out to 20 services writes 41 rows, and preparing a datetime or a UUID is
        # the costliest step of such an insert.
        previous: list[tuple[Any, Any]] = [(_UNSET, None)] * len(fields)
        params = []
        pre_saved = table.pre_saved
        for row in rows:
            for i, (f, prep) in enumerate(zip(fields, preps, strict=True)):
                name = f.attname
                value = row[name] if name in row and name not in pre_saved else table.value(row, f)
                last, prepared = previous[i]
                if value is not last:
                    prepared = prep(value)
                    previous[i] = (value, prepared)
                params.append(prepared)
        return [Step(self.insert(model, len(rows), returning=returning), params, model, len(rows), returning)]

    def task_step(self, changes: Changes) -> Step | None:
        """The task's insert or its update at the version read; ``None`` to leave it alone."""
        record = changes.record
        if changes.fields is None:
            return Step(self.insert(TaskRecord, 1), self.task_params(record), TaskRecord, 1)
        if not changes.fields:
            return None
        names = tuple(changes.fields)
        preps = self._task_preps
        if not preps:
            preps.update((f.attname, self.values.prep(f)) for f in schema.tasks().fields)
        params = [preps[n](value) for n, value in changes.fields.items()]
        params += [preps["id"](record.pk), preps["version"](record.version)]
        return Step(self.update_task(names), params)

    def other_steps(self, changes: Changes) -> tuple[list[Step], list[Step]]:
        """``(steps before the events, the events' inserts)``; the rest of the write after the task's step."""
        prep = self.values.named
        now_at = prep(Assignment, "updated_at")(changes.now)
        prep_pk, prep_instance = prep(Assignment, "id"), prep(Assignment, "instance_id")
        update = self.update_assignment()
        steps = [
            Step(update, [state, detail, prep_instance(instance), now_at, prep_pk(pk)])
            for pk, state, detail, instance in changes.assignment_updates
        ]
        steps += self.inserts(Assignment, changes.new_assignments)
        if changes.assigned:
            prep_id = prep(Instance, "id")
            at = prep(Instance, "last_assigned_at")(changes.now)
            steps.append(Step(self.mark_assigned(len(changes.assigned)), [at, *(prep_id(i) for i in changes.assigned)]))
        return steps, self.inserts(TaskEvent, changes.events, returning=True)


@functools.lru_cache(maxsize=1024)
def _parsed(stored: str) -> tuple[str, ...]:
    return tuple(json.loads(stored))


def _patterns(stored: str | list[str]) -> tuple[str, ...]:
    """A credential's patterns from their column (JSON text; a list where the driver
    parses it), parsed once per text: every publish reads them for each subscriber, and
    they seldom change."""
    return _parsed(stored) if isinstance(stored, str) else tuple(stored)


@functools.cache
def _field(model: type[Model], name: str) -> Field[Any, Any]:
    field = model._meta.get_field(name)
    assert isinstance(field, Field), f"{model.__name__}.{name} is not a concrete field"
    return field


def _assignment_rows(aggregated: str | list[list[Any]] | None) -> list[AssignmentRow]:
    """Assignment rows from the JSON array the task's query aggregated, by id.

    SQLite gives the array as text; PostgreSQL as a list, or ``NULL`` for no rows.
    """
    found: list[list[Any]] = json.loads(aggregated) if isinstance(aggregated, str) else aggregated or []
    rows = [
        AssignmentRow(pk, service, None if instance is None else uuid.UUID(instance), attempt, state, detail, channel)
        for pk, service, instance, attempt, state, detail, channel in found
    ]
    rows.sort()
    return rows
