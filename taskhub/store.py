"""Hand-written SQL for the hot path: one task transition, and the offers of a publish.

Why: on the hot path the Django ORM spent more time building and compiling queries than
the database spent running them (py-spy, see bench/README.md). These statements are
fixed, so they are written once. Values go through the model fields' own
``get_db_prep_save`` and come back through the same converters the ORM's compiler
applies, so rows read here equal rows read by the ORM, on SQLite and PostgreSQL alike.

Every function must be called inside the caller's ``transaction.atomic()``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Field, Model

from .models import Assignment, Credential, Instance, Subscription, TaskEvent, TaskRecord

TASK_FIELDS = (
    "id", "action", "publisher_id", "publisher_name", "payload_size", "status", "result", "has_result",
    "failure_reason", "failure_detail", "attempt", "progress", "pickup_timeout", "complete_timeout",
    "pickup_deadline", "complete_deadline", "deadline", "version", "created_at", "started_at", "finished_at",
)  # fmt: skip
ASSIGNMENT_FIELDS = ("id", "task_id", "service", "instance", "attempt", "state", "detail", "created_at", "updated_at")
EVENT_FIELDS = ("task_id", "kind", "service", "instance", "attempt", "data", "created_at")

Converter = Callable[[Any, Any, Any], Any]


def _field(model: type[Model], name: str) -> Field[Any, Any]:
    field = model._meta.get_field(name.removesuffix("_id") if name.endswith("_id") else name)
    assert isinstance(field, Field)
    return field


def _table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _columns(model: type[Model], names: Iterable[str], prefix: str = "") -> str:
    return ", ".join(prefix + connection.ops.quote_name(str(_field(model, n).column)) for n in names)


def _prep(model: type[Model], name: str, value: Any) -> Any:
    return _field(model, name).get_db_prep_save(value, connection)


def _reader(model: type[Model], names: tuple[str, ...]) -> list[Any]:
    """Per column: the expression and the converters the ORM's compiler would apply."""
    # Cached on the connection wrapper itself (converters are bound to it), so the cache
    # lives and dies with the connection instead of keeping it alive.
    wrapper = connections[DEFAULT_DB_ALIAS]
    per_connection: dict[tuple[type[Model], tuple[str, ...]], list[Any]] = wrapper.__dict__.setdefault(
        "_taskhub_readers", {}
    )
    key = (model, names)
    if key not in per_connection:
        columns = []
        for name in names:
            col = _field(model, name).get_col(model._meta.db_table)
            converters = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
            columns.append((col, converters))
        per_connection[key] = columns
    return per_connection[key]


def _read(model: type[Model], names: tuple[str, ...], row: Sequence[Any]) -> dict[str, Any]:
    values = {}
    for name, value, (col, converters) in zip(names, row, _reader(model, names), strict=True):
        for convert in converters:
            value = convert(value, col, connection)
        values[name] = value
    return values


def load_task(task_id: uuid.UUID | str, *, with_payload: bool = False) -> tuple[TaskRecord, list[Assignment]] | None:
    """The task (locked on PostgreSQL) and its assignments, or ``None``.

    The payload, which can be large, is loaded only ``with_payload`` (for offers);
    otherwise ``record.payload`` is ``None``.
    """
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    try:
        pk = _prep(TaskRecord, "id", uuid.UUID(str(task_id)))
    except ValueError:
        return None
    names = (*TASK_FIELDS, "payload") if with_payload else TASK_FIELDS
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {_columns(TaskRecord, names)} FROM {_table(TaskRecord)} "
            f"WHERE {connection.ops.quote_name('id')} = %s{lock}",
            [pk],
        )
        row = cursor.fetchone()
        if row is None:
            return None
        record = TaskRecord(**_read(TaskRecord, names, row))
        record._state.adding = False
        cursor.execute(
            f"SELECT {_columns(Assignment, ASSIGNMENT_FIELDS)} FROM {_table(Assignment)} "
            f"WHERE {connection.ops.quote_name('task_id')} = %s ORDER BY {connection.ops.quote_name('id')}",
            [pk],
        )
        rows = [Assignment(**_read(Assignment, ASSIGNMENT_FIELDS, r)) for r in cursor.fetchall()]
    return record, rows


def update_task(record: TaskRecord, fields: dict[str, Any]) -> bool:
    """``UPDATE ... WHERE id = ... AND version = <record.version>``; whether it matched."""
    names = list(fields)
    assignments = ", ".join(f"{connection.ops.quote_name(str(_field(TaskRecord, n).column))} = %s" for n in names)
    params = [_prep(TaskRecord, n, fields[n]) for n in names]
    params += [_prep(TaskRecord, "id", record.pk), record.version]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_table(TaskRecord)} SET {assignments} "
            f"WHERE {connection.ops.quote_name('id')} = %s AND {connection.ops.quote_name('version')} = %s",
            params,
        )
        return bool(cursor.rowcount)


def insert_task(record: TaskRecord) -> None:
    """Insert a new task row, payload included.

    Raises:
        IntegrityError: the id is taken.
    """
    names = (*TASK_FIELDS, "payload")
    params = [_prep(TaskRecord, n, getattr(record, n)) for n in names]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_table(TaskRecord)} ({_columns(TaskRecord, names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))})",
            params,
        )
    record._state.adding = False


def _insert_many(model: type[Model], names: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    placeholders = "(" + ", ".join(["%s"] * len(names)) + ")"
    params = [_prep(model, n, row[n]) for row in rows for n in names]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_table(model)} ({_columns(model, names)}) VALUES {', '.join([placeholders] * len(rows))}",
            params,
        )


def insert_assignments(rows: list[dict[str, Any]]) -> None:
    """Insert new assignments: dicts with the fields of :data:`ASSIGNMENT_FIELDS` but ``id``."""
    _insert_many(Assignment, ASSIGNMENT_FIELDS[1:], rows)


def update_assignment(pk: int, state: str, detail: str, now: datetime) -> None:
    q = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_table(Assignment)} SET {q('state')} = %s, {q('detail')} = %s, {q('updated_at')} = %s "
            f"WHERE {q('id')} = %s",
            [state, detail, _prep(Assignment, "updated_at", now), pk],
        )


def insert_events(rows: list[dict[str, Any]]) -> None:
    """Append events: dicts with the fields of :data:`EVENT_FIELDS`."""
    _insert_many(TaskEvent, EVENT_FIELDS, rows)


def live_subscribers(action: str, now: datetime) -> list[dict[str, Any]]:
    """Live instances subscribed to ``action``, least recently assigned first.

    Each: ``instance`` (id), ``channel_name``, ``credential_id``, ``name`` (the
    service) and ``sub_permissions``.
    """
    q = connection.ops.quote_name
    sub, inst, cred = _table(Subscription), _table(Instance), _table(Credential)
    sql = (
        f"SELECT i.{q('id')}, i.{q('channel_name')}, c.{q('id')}, c.{q('name')}, c.{q('sub_permissions')} "
        f"FROM {sub} s JOIN {inst} i ON s.{q('instance_id')} = i.{q('id')} "
        f"JOIN {cred} c ON i.{q('credential_id')} = c.{q('id')} "
        f"WHERE s.{q('action')} = %s AND i.{q('lease_expires_at')} > %s AND c.{q('is_active')} = %s "
        f"ORDER BY CASE WHEN i.{q('last_assigned_at')} IS NULL THEN 0 ELSE 1 END, "
        f"i.{q('last_assigned_at')}, i.{q('connected_at')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [action, _prep(Instance, "lease_expires_at", now), True])
        found = cursor.fetchall()
    out = []
    for instance_id, channel_name, credential_id, name, permissions in found:
        instance = _read(Instance, ("id",), (instance_id,))["id"]
        permissions = _read(Credential, ("sub_permissions",), (permissions,))["sub_permissions"]
        out.append({"instance": instance, "channel_name": channel_name, "credential_id": credential_id,
                    "name": name, "sub_permissions": permissions})  # fmt: skip
    return out


def mark_assigned(instance_ids: list[uuid.UUID], now: datetime) -> None:
    """Set ``last_assigned_at`` of the instances just given a task."""
    if not instance_ids:
        return
    q = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_table(Instance)} SET {q('last_assigned_at')} = %s "
            f"WHERE {q('id')} IN ({', '.join(['%s'] * len(instance_ids))})",
            [_prep(Instance, "last_assigned_at", now), *(_prep(Instance, "id", i) for i in instance_ids)],
        )
