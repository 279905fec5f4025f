"""Hand-written SQL for the hot path: one task transition, and the offers of a publish.

Why: on the hot path the Django ORM spent more time building and compiling queries than
the database spent running them (py-spy, see bench/README.md). These statements are
fixed, so they are built once per database connection (:class:`Statements`). Values go
to the driver as the model fields' own ``get_db_prep_save`` gives them, and come back
through the same converters the ORM's compiler applies (assignments, which the task's
query aggregates as JSON, are built from their plain values), so rows read here equal
rows read by the ORM, on SQLite and PostgreSQL alike; tests compare them.

They run on the driver's own cursor (:meth:`Statements.cursor`), not Django's wrapper:
the wrapper's per-statement work (rewriting ``%s`` to ``?`` with a regular expression on
SQLite, error translation, execute wrappers) cost a tenth of a transition. Errors are
still Django's (``IntegrityError``), but these statements are not in
``connection.queries`` or seen by execute wrappers.

Call :func:`load_task` and :func:`write_transition` as :func:`taskhub.services.transition`
does: inside ``transaction.atomic()`` where transitions lock on read (SQLite), outside
one, or in a savepoint, where they do not (PostgreSQL, see :func:`write_transition`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from .core.states import TERMINAL_TASK_STATUSES
from .models import Assignment, Credential, Instance, Subscription, TaskEvent, TaskRecord

# In the model's field order, which TaskRecord.from_db expects; "payload" comes after
# "publisher_instance" and is read only for offers.
TASK_FIELDS = (
    "id", "action", "publisher_id", "publisher_name", "publisher_instance", "payload_size", "status", "result",
    "has_result", "failure_reason", "failure_detail", "attempt", "progress", "pickup_timeout", "complete_timeout",
    "pickup_deadline", "complete_deadline", "deadline", "version", "created_at", "started_at", "finished_at",
    "watched",
)  # fmt: skip
TASK_ALL_FIELDS = (*TASK_FIELDS[:5], "payload", *TASK_FIELDS[5:])
_PAYLOAD_INDEX = TASK_ALL_FIELDS.index("payload")
ASSIGNMENT_FIELDS = ("id", "task_id", "service", "instance", "attempt", "state", "detail", "created_at", "updated_at")
EVENT_FIELDS = ("task_id", "kind", "service", "instance", "attempt", "data", "created_at")


class AssignmentRow(NamedTuple):
    """An assignment as a transition reads it: the columns the core needs, no model.

    A task offered to 20 services is loaded by each of their 20 returns; building 20
    model instances each time was the costliest step of those transitions (py-spy).
    """

    pk: int
    service: str
    instance: uuid.UUID | None
    attempt: int
    state: str
    detail: str
    #: The channel of the instance that holds it, while that instance is connected.
    channel: str | None


# A JSON array of rows, per vendor: with it, a task's query brings its assignments along.
_JSON_ROWS = {"postgresql": "json_agg(json_build_array({}))", "sqlite": "json_group_array(json_array({}))"}
_TERMINAL = sorted(status.value for status in TERMINAL_TASK_STATUSES)

Prep = Callable[[Any], Any]
_UNSET = object()

# Field types whose values of this exact Python type reach the driver unchanged.
_NATIVE: dict[str, type] = {"CharField": str, "TextField": str, "FloatField": float, "BooleanField": bool}
# Integer field types: an int goes through the backend's integer adapter only.
_INTEGERS = frozenset(
    {"IntegerField", "PositiveIntegerField", "BigIntegerField", "BigAutoField", "AutoField", "SmallIntegerField"}
)


def _max_params(conn: BaseDatabaseWrapper) -> int:
    if conn.vendor == "sqlite":
        conn.ensure_connection()
        return int(conn.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    # PostgreSQL's protocol counts a statement's parameters in 16 bits; so does MySQL's.
    return int(conn.features.max_query_params or 65535)


def _field(model: type[Model], name: str) -> Field[Any, Any]:
    field = model._meta.get_field(name.removesuffix("_id") if name.endswith("_id") else name)
    assert isinstance(field, Field)
    return field


class _Reader:
    """Turns a row of ``names`` into Python values, with the ORM compiler's converters."""

    def __init__(self, conn: BaseDatabaseWrapper, columns: Sequence[tuple[str, type[Model], str]]) -> None:
        self.conn = conn
        self.columns = []
        for name, model, field_name in columns:
            col = _field(model, field_name).get_col(model._meta.db_table)
            converters = conn.ops.get_db_converters(col) + col.get_db_converters(conn)
            self.columns.append((name, col, converters))

    def __call__(self, row: Sequence[Any]) -> dict[str, Any]:
        return dict(zip((name for name, _, _ in self.columns), self.values(row), strict=True))

    def values(self, row: Sequence[Any]) -> list[Any]:
        """The row's values, converted, in column order."""
        values = []
        conn = self.conn
        for value, (_, col, converters) in zip(row, self.columns, strict=True):
            for convert in converters:
                value = convert(value, col, conn)
            values.append(value)
        return values


class Statements:
    """The hot path's SQL and value adapters for one database connection.

    Built on first use and kept on the connection wrapper (see :func:`statements`): the
    converters are bound to the connection, so the cache lives and dies with it.
    """

    def __init__(self, conn: BaseDatabaseWrapper) -> None:
        q = self.quote = conn.ops.quote_name
        self.conn = conn
        self.task, self.assignment = q(TaskRecord._meta.db_table), q(Assignment._meta.db_table)
        # The publisher's channel comes along while its instance is connected. On
        # PostgreSQL only the task's row is locked (the instance's may be missing).
        lock = ""
        if conn.features.has_select_for_update_of:
            lock = " FOR UPDATE OF t"
        elif conn.features.has_select_for_update:
            lock = " FOR UPDATE"
        inst = q(Instance._meta.db_table)
        self.qmark = conn.vendor == "sqlite"
        self.task_names = {False: TASK_FIELDS, True: TASK_ALL_FIELDS}
        self.select_task = {
            with_payload: self.sql(
                f"SELECT {self.columns(TaskRecord, names, 't')}, "
                f"pi.{q('channel_name')} FROM {self.task} t "
                f"LEFT JOIN {inst} pi ON t.{q('publisher_instance')} = pi.{q('id')} WHERE t.{q('id')} = %s{lock}"
            )
            for with_payload, names in self.task_names.items()
        }
        self.read_task = {
            with_payload: _Reader(
                conn, [*((n, TaskRecord, n) for n in names), ("publisher_channel", Instance, "channel_name")]
            )
            for with_payload, names in self.task_names.items()
        }
        loaded = [(n, "id" if n == "pk" else n) for n in AssignmentRow._fields[:-1]]
        assignments = (
            f"SELECT {self.columns(Assignment, [f for _, f in loaded], 'a')}, i.{q('channel_name')} "
            f"FROM {self.assignment} a LEFT JOIN {inst} i ON a.{q('instance')} = i.{q('id')} "
            f"WHERE a.{q('task_id')} = %s"
        )
        order = f" ORDER BY a.{q('id')}"
        self.select_assignments = self.sql(assignments + order)
        self.select_own_assignments = self.sql(f"{assignments} AND a.{q('service')} = %s{order}")
        # One query for the task and its assignments where the database aggregates JSON:
        # one network round trip less per transition on PostgreSQL. With a service, a
        # finished task brings that service's assignments only (see load_task).
        agg = _JSON_ROWS.get(conn.vendor)
        self.select_task_joined: dict[tuple[bool, bool, bool], str] = {}
        if agg is not None:
            columns = f"{self.columns(Assignment, [f for _, f in loaded], 'a')}, i.{q('channel_name')}"
            own = f" AND (a.{q('service')} = %s OR t.{q('status')} NOT IN ({', '.join(['%s'] * len(_TERMINAL))}))"
            for with_payload, names in self.task_names.items():
                for mine in (False, True):
                    for locked in (False, True):
                        self.select_task_joined[with_payload, mine, locked] = self.sql(
                            f"SELECT {self.columns(TaskRecord, names, 't')}, pi.{q('channel_name')}, "
                            f"(SELECT {agg.format(columns)} FROM {self.assignment} a "
                            f"LEFT JOIN {inst} i ON a.{q('instance')} = i.{q('id')} "
                            f"WHERE a.{q('task_id')} = t.{q('id')}{own if mine else ''}) "
                            f"FROM {self.task} t LEFT JOIN {inst} pi ON t.{q('publisher_instance')} = pi.{q('id')} "
                            f"WHERE t.{q('id')} = %s{lock if locked else ''}"
                        )
        self.read_assignment = _Reader(
            conn, [*((n, Assignment, f) for n, f in loaded), ("channel", Instance, "channel_name")]
        )
        self.update_assignment = self.sql(
            f"UPDATE {self.assignment} SET {q('state')} = %s, {q('detail')} = %s, {q('updated_at')} = %s "
            f"WHERE {q('id')} = %s"
        )
        sub, cred = (q(m._meta.db_table) for m in (Subscription, Credential))
        self.live_subscribers = self.sql(
            f"SELECT i.{q('id')}, i.{q('channel_name')}, c.{q('id')}, c.{q('name')}, c.{q('sub_permissions')} "
            f"FROM {sub} s JOIN {inst} i ON s.{q('instance_id')} = i.{q('id')} "
            f"JOIN {cred} c ON i.{q('credential_id')} = c.{q('id')} "
            f"WHERE s.{q('action')} = %s AND i.{q('lease_expires_at')} > %s AND c.{q('is_active')} = %s "
            f"ORDER BY CASE WHEN i.{q('last_assigned_at')} IS NULL THEN 0 ELSE 1 END, "
            f"i.{q('last_assigned_at')}, i.{q('connected_at')}"
        )
        self.read_subscriber = _Reader(
            conn,
            [
                ("instance", Instance, "id"),
                ("channel_name", Instance, "channel_name"),
                ("credential_id", Credential, "id"),
                ("name", Credential, "name"),
                ("sub_permissions", Credential, "sub_permissions"),
            ],
        )
        self.instance_table = inst
        #: Whether a transition's writes go as one statement (:meth:`combined`).
        self.combines = conn.vendor == "postgresql"
        #: Whether transitions read without a lock and write in one fenced statement,
        #: outside a transaction (see :func:`write_transition`); else they lock on read.
        self.optimistic = self.combines
        # On PostgreSQL, the types of the values an ``INSERT ... SELECT`` carries: unlike
        # in ``VALUES`` of an ``INSERT``, the server cannot infer them from the columns.
        self._casts: dict[tuple[type[Model], str], str] = {}
        #: Most parameters one statement may carry: wider inserts go in batches.
        self.max_params = _max_params(conn)
        self._prep: dict[tuple[type[Model], str], Prep] = {}
        self._variants: dict[tuple[Any, ...], str] = {}

    def sql(self, text: str) -> str:
        """``text`` with the driver's own placeholders (``?`` on SQLite)."""
        return text.replace("%s", "?") if self.qmark else text

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        """The driver's cursor, its errors translated to Django's; use inside ``atomic()``."""
        conn = self.conn
        conn.ensure_connection()
        with conn.wrap_database_errors:
            if self.qmark:
                cursor = conn.connection.cursor()
            elif conn.vendor == "postgresql":
                from . import pgcursor

                cursor = pgcursor.cursor(conn)
            else:
                cursor = conn.create_cursor()
            try:
                yield cursor
            finally:
                cursor.close()

    def columns(self, model: type[Model], names: Sequence[str], alias: str = "") -> str:
        """The fields' quoted column names, each prefixed with ``alias.`` if given."""
        prefix = f"{alias}." if alias else ""
        return ", ".join(prefix + self.quote(str(_field(model, n).column)) for n in names)

    def prep(self, model: type[Model], name: str) -> Prep:
        """The field's ``get_db_prep_save`` bound to this connection, with a shortcut for
        the values the hot path passes (see :meth:`_shortcut`)."""
        key = (model, name)
        if key not in self._prep:
            field = _field(model, name)
            slow = functools.partial(field.get_db_prep_save, connection=self.conn)
            self._prep[key] = self._shortcut(field.get_internal_type(), slow) or slow
        return self._prep[key]

    def _shortcut(self, kind: str, slow: Prep) -> Prep | None:
        """What the field would give for its common value, without its machinery.

        A transition prepares some twenty datetimes and UUIDs, and Django's path for
        each (``get_prep_value``, the backend's adapter, ``make_naive``, settings look-ups)
        was a tenth of the services layer's CPU. Each shortcut gives exactly what the
        field gives (a test compares them) and hands anything else to the field.
        """
        native = _NATIVE.get(kind)
        if native is not None:
            # A value of the field's own Python type reaches the driver unchanged.
            return lambda value: value if type(value) is native else slow(value)
        if kind in _INTEGERS:
            # What the backend makes of an int: itself, or psycopg's Int4 and Int8 on
            # PostgreSQL, which keep a prepared statement's parameter types stable.
            wrap = type(self.conn.ops.adapt_integerfield_value(1, kind))
            if wrap is int:
                return lambda value: value if type(value) is int else slow(value)
            return lambda value: wrap(value) if type(value) is int else slow(value)
        if kind == "UUIDField":
            if self.conn.features.has_native_uuid_field:
                return lambda value: value if type(value) is uuid.UUID else slow(value)
            return lambda value: value.hex if type(value) is uuid.UUID else slow(value)
        tz = self.conn.timezone  # None without USE_TZ: naive datetimes, no shortcut
        if kind == "DateTimeField" and tz is not None:
            if self.conn.vendor == "postgresql":  # psycopg adapts aware datetimes itself
                return lambda value: value if type(value) is datetime and value.tzinfo is not None else slow(value)
            if self.conn.vendor == "sqlite":  # naive text in the connection's time zone
                return lambda value: (
                    str(value.replace(tzinfo=None)) if type(value) is datetime and value.tzinfo is tz else slow(value)
                )
        return None

    def _variant(self, key: tuple[Any, ...], build: Callable[[], str]) -> str:
        """A statement whose shape depends on ``key`` (columns, row count), built once."""
        if key not in self._variants:
            self._variants[key] = self.sql(build())
        return self._variants[key]

    def update_task(self, names: tuple[str, ...]) -> str:
        q = self.quote
        return self._variant(
            ("update_task", names),
            lambda: (
                f"UPDATE {self.task} SET {', '.join(f'{q(str(_field(TaskRecord, n).column))} = %s' for n in names)} "
                f"WHERE {q('id')} = %s AND {q('version')} = %s"
            ),
        )

    def insert(self, model: type[Model], names: tuple[str, ...], rows: int, *, gated: bool = False) -> str:
        """A multi-row insert; ``gated``, it inserts only if the fence ``w0`` found its row
        (:meth:`fenced`), and its values carry their types."""
        if not gated:
            placeholders = "(" + ", ".join(["%s"] * len(names)) + ")"
            return self._variant(
                ("insert", model, names, rows),
                lambda: (
                    f"INSERT INTO {self.quote(model._meta.db_table)} ({self.columns(model, names)}) "
                    f"VALUES {', '.join([placeholders] * rows)}"
                ),
            )
        typed = "(" + ", ".join(f"%s{self.cast(model, n)}" for n in names) + ")"
        return self._variant(
            ("insert gated", model, names, rows),
            lambda: (
                f"INSERT INTO {self.quote(model._meta.db_table)} ({self.columns(model, names)}) "
                f"SELECT * FROM (VALUES {', '.join([typed] * rows)}) v WHERE EXISTS (SELECT 1 FROM w0)"
            ),
        )

    def cast(self, model: type[Model], name: str) -> str:
        """``::type`` for a value of the field where the statement gives it no type (in
        ``SELECT`` rather than ``INSERT ... VALUES``); none for text, which is what a value
        of unknown type becomes, so that a too long one still fails as the column says."""
        key = (model, name)
        if key not in self._casts:
            field = _field(model, name)
            text = field.get_internal_type() in ("CharField", "TextField")
            self._casts[key] = "" if text else f"::{field.db_type(self.conn)}"
        return self._casts[key]

    def combined(self, steps: list[tuple[str, list[Any]]], counted: int | None) -> tuple[str, list[Any]]:
        """One statement that runs ``steps`` as data-modifying CTEs (PostgreSQL), and its
        parameters; it returns the row count of step ``counted`` (1 if ``None``).

        psycopg's cost is per statement (~0.1 ms of CPU, and a network round trip): a
        transition's writes were three or more. Every CTE runs to completion whether or
        not the query reads it, all on one snapshot; the steps write different rows.
        """
        texts = tuple(sql for sql, _ in steps)

        def build() -> str:
            ctes = ", ".join(f"w{i} AS ({sql}{' RETURNING 1' if i == counted else ''})" for i, sql in enumerate(texts))
            return f"WITH {ctes} SELECT {'1' if counted is None else f'(SELECT count(*) FROM w{counted})'}"

        return self._variant(("combined", texts, counted), build), [p for _, params in steps for p in params]

    def fenced(self, fence: str, by_task: bool, steps: tuple[str, ...]) -> str:
        """One statement (PostgreSQL, outside a transaction): the ``fence`` as CTE ``w0``,
        then ``steps`` that each write only if ``w0`` found its row (they say so with
        ``EXISTS (SELECT 1 FROM w0)``).

        Its one result row says that the fence held: for a fence on the task's row
        (``by_task``), the task's ``watched`` flag and its publisher's channel as they are
        now; otherwise the fence's row count. No row: the fence found nothing (the version
        moved on), and nothing was written. A data-modifying CTE runs once and to the end
        whether or not the query reads it; the steps see the fence's rows through its
        ``RETURNING``, which is why they wait for it.
        """
        q = self.quote

        def build() -> str:
            ctes = ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate((fence, *steps)))
            if by_task:
                tail = (
                    f"SELECT w0.{q('watched')}, pi.{q('channel_name')} FROM w0 "
                    f"LEFT JOIN {self.instance_table} pi ON pi.{q('id')} = w0.{q('publisher_instance')}"
                )
            else:
                tail = "SELECT count(*) FROM w0 HAVING count(*) > 0"
            return f"WITH {ctes} {tail}"

        return self._variant(("fenced", fence, by_task, steps), build)

    def fence_task(self, names: tuple[str, ...]) -> str:
        """The task's update as a fence: only at the version read, returning what
        :meth:`fenced` reports."""
        q = self.quote
        return self._variant(
            ("fence_task", names),
            lambda: f"{self.update_task(names)} RETURNING {q('watched')}, {q('publisher_instance')}",
        )

    def fence_exists(self) -> str:
        """A fence that only finds the task's row (a write of events alone)."""
        q = self.quote
        return self._variant(("fence_exists",), lambda: f"SELECT 1 FROM {self.task} WHERE {q('id')} = %s")

    def update_assignment_text(self, gated: bool) -> str:
        """An assignment's update; ``gated``, it writes only if the fence ``w0`` held."""
        if not gated:
            return self.update_assignment
        return self._variant(
            ("update_assignment gated",), lambda: f"{self.update_assignment} AND EXISTS (SELECT 1 FROM w0)"
        )

    def mark_assigned(self, count: int, *, gated: bool = False) -> str:
        q = self.quote
        return self._variant(
            ("mark_assigned", count, gated),
            lambda: (
                f"UPDATE {self.instance_table} SET {q('last_assigned_at')} = %s "
                f"WHERE {q('id')} IN ({', '.join(['%s'] * count)})"
                + (" AND EXISTS (SELECT 1 FROM w0)" if gated else "")
            ),
        )


def statements() -> Statements:
    """The statements of this thread's default connection."""
    conn = connections[DEFAULT_DB_ALIAS]
    found: Statements | None = conn.__dict__.get("_taskhub_statements")
    if found is None:
        found = conn.__dict__["_taskhub_statements"] = Statements(conn)
    return found


class LoadedTask(NamedTuple):
    """A task as a transition reads it."""

    record: TaskRecord
    assignments: list[AssignmentRow]
    #: The channel of the instance that published the task, while it is connected.
    publisher_channel: str | None


def load_task(
    task_id: uuid.UUID | str, *, with_payload: bool = False, service: str | None = None, lock: bool = True
) -> LoadedTask | None:
    """The task and its assignments, or ``None``.

    ``lock`` locks the task's row on PostgreSQL until the caller's transaction ends; a
    transition that reads without it must fence its write (:func:`write_transition`).
    The payload, which can be large, is loaded only ``with_payload`` (for offers);
    otherwise ``record.payload`` is ``None``. With ``service``, a finished task comes with
    that service's assignments only: what a service does to a finished task (a late
    return) concerns its own, and each of a fan-out's late returns read every row.
    """
    st = statements()
    try:
        pk = st.prep(TaskRecord, "id")(uuid.UUID(str(task_id)))
    except ValueError:
        return None
    joined = st.select_task_joined.get((with_payload, service is not None, lock))
    with st.cursor() as cursor:
        if joined is not None:
            cursor.execute(joined, [pk] if service is None else [service, *_TERMINAL, pk])
        else:
            cursor.execute(st.select_task[with_payload], [pk])
        row = cursor.fetchone()
        if row is None:
            return None
        values = st.read_task[with_payload].values(row if joined is None else row[:-1])
        publisher_channel = values.pop()
        if not with_payload:
            values.insert(_PAYLOAD_INDEX, None)
        # Positional, in field order: the fast path of Model.__init__.
        record = TaskRecord.from_db(st.conn.alias, TASK_ALL_FIELDS, values)
        if joined is not None:
            return LoadedTask(record, _assignment_rows(row[-1]), publisher_channel)
        if service is not None and record.status in TERMINAL_TASK_STATUSES:
            cursor.execute(st.select_own_assignments, [pk, service])
        else:
            cursor.execute(st.select_assignments, [pk])
        read = st.read_assignment.values
        return LoadedTask(record, [AssignmentRow._make(read(r)) for r in cursor.fetchall()], publisher_channel)


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


#: A step's SQL text: plain, or (``True``) as a step gated by the fence of one fenced
#: statement (:meth:`Statements.fenced`). Built only for the way it runs.
Text = Callable[[bool], str]


class Written(NamedTuple):
    """A transition's write that held. A fenced write (PostgreSQL) read back the task's
    ``watched`` flag and its publisher's channel as they were when it wrote (``fresh``);
    otherwise the values loaded under the lock still hold."""

    fresh: bool = False
    watched: bool = False
    publisher_channel: str | None = None


def write_transition(
    record: TaskRecord,
    fields: dict[str, Any] | None,
    assignment_updates: list[tuple[int, str, str]],
    new_assignments: list[dict[str, Any]],
    events: list[dict[str, Any]],
    now: datetime,
    assigned: list[uuid.UUID],
) -> Written | None:
    """Write one transition: the task, its assignments and its events.

    ``fields`` are the task's changed columns, written with ``UPDATE ... WHERE id = ...
    AND version = <record.version>``; empty, the task's row is left alone; ``None``
    inserts ``record`` instead, payload included. ``assignment_updates`` are ``(pk,
    state, detail)``; ``new_assignments`` dicts with the fields of
    :data:`ASSIGNMENT_FIELDS` but ``id``; ``events`` dicts with those of
    :data:`EVENT_FIELDS`. ``assigned`` instances were just given the task: their
    ``last_assigned_at`` becomes ``now``.

    Where transitions lock on read (SQLite, under its IMMEDIATE transaction's write
    lock), the statements run in the caller's transaction. Where they do not
    (PostgreSQL, :attr:`Statements.optimistic`), the write is *fenced*: the task's update
    at the version read, which every transition of a running task makes; or, leaving
    the task's row alone (a finished task, whose assignments are all final: a late
    return writes its event only), the task's row still being there. The rest is written
    only if the fence held, all in one statement (:meth:`Statements.fenced`), so that it
    needs no transaction. An insert is its own fence (a taken id fails it).

    Returns ``None`` when the fence did not hold (the caller's transaction, if any, must
    roll back whatever else was written), else :class:`Written`.

    Raises:
        IntegrityError: an inserted task's id is taken.
    """
    st = statements()
    fenced = st.optimistic and fields is not None
    # The steps, in order: each statement's text (plain, or gated by the fence when it
    # is a step of one fenced statement) and its parameters. The first one's row count
    # says whether the task was written (``counted``) or the fence held.
    steps: list[tuple[Text, list[Any]]] = []
    counted: int | None = None
    updated_at = st.prep(Assignment, "updated_at")(now)
    pk = st.prep(TaskRecord, "id")(record.pk)
    if fields is None:
        names = st.task_names[True]
        steps.append(
            (lambda gated: st.insert(TaskRecord, names, 1), [st.prep(TaskRecord, n)(getattr(record, n)) for n in names])
        )
    elif fields:
        names = tuple(fields)
        params = [st.prep(TaskRecord, n)(fields[n]) for n in names] + [pk, record.version]
        counted = 0
        steps.append((lambda gated: st.fence_task(names) if gated else st.update_task(names), params))
    elif fenced:
        counted = 0
        steps.append((lambda gated: st.fence_exists(), [pk]))
    steps += [
        (st.update_assignment_text, [state, detail, updated_at, apk]) for apk, state, detail in assignment_updates
    ]
    steps += _insert_many(st, Assignment, ASSIGNMENT_FIELDS[1:], new_assignments)
    steps += _insert_many(st, TaskEvent, EVENT_FIELDS, events)
    if assigned:
        prep_id = st.prep(Instance, "id")
        params = [st.prep(Instance, "last_assigned_at")(now), *(prep_id(i) for i in assigned)]
        steps.append((lambda gated: st.mark_assigned(len(assigned), gated=gated), params))
    fits = sum(len(params) for _, params in steps) <= st.max_params
    with st.cursor() as cursor:
        if fenced:
            (fence, fence_params), rest = steps[0], steps[1:]
            if fits:
                sql = st.fenced(fence(True), bool(fields), tuple(text(True) for text, _ in rest))
                cursor.execute(sql, [*fence_params, *(p for _, params in rest for p in params)])
                row = cursor.fetchone()
            else:
                # Too many values for one statement: the fence, then the rest, in a transaction.
                with transaction.atomic(using=st.conn.alias):
                    cursor.execute(st.fenced(fence(True), bool(fields), ()), fence_params)
                    row = cursor.fetchone()
                    if row is not None:
                        for text, params in rest:
                            cursor.execute(text(False), params)
            if row is None:
                return None  # the fence did not hold: nothing was written
            written = Written(True, bool(row[0]), row[1]) if fields else Written()
        elif st.combines and len(steps) > 1 and fits:
            cursor.execute(*st.combined([(text(False), params) for text, params in steps], counted))
            if counted is not None and not cursor.fetchone()[0]:
                return None  # the transaction rolls back what the other steps wrote
            written = Written()
        else:
            for i, (text, params) in enumerate(steps):
                cursor.execute(text(False), params)
                if i == counted and not cursor.rowcount:
                    return None
            written = Written()
    if fields is None:
        record._state.adding = False
    return written


def _insert_many(
    st: Statements, model: type[Model], names: tuple[str, ...], rows: list[dict[str, Any]]
) -> list[tuple[Text, list[Any]]]:
    """The statements (as :data:`Text`) and parameters that insert ``rows``, as many rows
    in each as the database's parameter limit allows."""
    per_statement = max(1, st.max_params // len(names))
    if len(rows) > per_statement:
        return [
            step
            for start in range(0, len(rows), per_statement)
            for step in _insert_many(st, model, names, rows[start : start + per_statement])
        ]
    if not rows:
        return []
    preps = [st.prep(model, n) for n in names]
    # Rows of one transition share objects (the task id, ``now``): prepare each once.
    # A fan-out to 20 services writes 41 rows, and preparing a datetime or a UUID is
    # the costliest step of such an insert.
    previous: list[tuple[Any, Any]] = [(_UNSET, None)] * len(names)
    params = []
    for row in rows:
        for i, (name, prep) in enumerate(zip(names, preps, strict=True)):
            value = row[name]
            last, prepared = previous[i]
            if value is not last:
                prepared = prep(value)
                previous[i] = (value, prepared)
            params.append(prepared)
    count = len(rows)
    return [(lambda gated: st.insert(model, names, count, gated=gated), params)]


def live_subscribers(action: str, now: datetime) -> list[dict[str, Any]]:
    """Live instances subscribed to ``action``, least recently assigned first.

    Each: ``instance`` (id), ``channel_name``, ``credential_id``, ``name`` (the
    service) and ``sub_permissions``.
    """
    st = statements()
    with st.cursor() as cursor:
        cursor.execute(st.live_subscribers, [action, st.prep(Instance, "lease_expires_at")(now), True])
        return [st.read_subscriber(row) for row in cursor.fetchall()]
