"""Task transitions: the core's decisions applied to the database, each exactly once.

:func:`transition` is the one way a task changes. It loads the task with its assignments
(:mod:`taskhub.store`), maps them onto the core's :class:`~taskhub.core.machine.Task`,
lets a ``decide`` function of the core mutate it and return events, and writes back what
changed at the version it read. If another transition (on another connection or hub
process) wrote in between, the write changes nothing and the decision is taken again on
the fresh row; so concurrent transitions of one task each happen once
(``tests/test_races.py``). Where the store reads without a lock (PostgreSQL), a task that
keeps moving is read under the lock after a few tries, so that no transition starves.

The mapping between the model and the core is derived: the core's task fields that are
also the model's columns are read and written by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from django.db import transaction

from taskhub import metrics
from taskhub.conf import conf
from taskhub.core import machine
from taskhub.core.codes import RELAYED_KINDS, EventKind
from taskhub.core.errors import UnknownTask
from taskhub.core.states import TERMINAL_TASK_STATUSES, AssignmentState, TaskStatus
from taskhub.models import TaskRecord
from taskhub.store import AssignmentRow, Changes, Store, Written, get_store

from .routing import Notice, listeners, notices_for

MAX_TRANSITION_RETRIES = 10
#: Tries of a transition that reads without a lock (PostgreSQL) before it locks.
OPTIMISTIC_ATTEMPTS = 3

#: The core's task fields that are columns of the model, read and written by name.
#: ``id``, ``status`` and ``assignments`` are converted; the core's other fields
#: (``retry_cap``, ``jitter``) are set from settings and chance on every load.
CORE_COLUMNS = tuple(
    f.name
    for f in dataclasses.fields(machine.Task)
    if f.name not in ("id", "status", "assignments") and f.name in {g.attname for g in TaskRecord._meta.concrete_fields}
)

Decide = Callable[[machine.Task], list[machine.Event]]


class Conflict(Exception):
    """Another transition changed the task between our read and our write."""


def load(record: TaskRecord, rows: Sequence[AssignmentRow]) -> machine.Task:
    """The core's view of a loaded task."""
    return machine.Task(
        id=str(record.id),
        status=TaskStatus(record.status),
        assignments=[
            machine.Assignment(
                a.service, str(a.instance) if a.instance else None, a.attempt, AssignmentState(a.state), a.detail
            )
            for a in rows
        ],
        retry_cap=conf.RETRY_BACKOFF_MAX,
        jitter=random.random(),
        **{name: getattr(record, name) for name in CORE_COLUMNS},
    )


def changed_columns(
    record: TaskRecord, task: machine.Task, events: Sequence[machine.Event], now: datetime, *, optimistic: bool
) -> dict[str, Any]:
    """The task's columns this transition changes, by attribute name.

    Only what changed: an unchanged indexed column still costs its indexes' pages
    (SQLite rewrites the entries of every column in SET; PostgreSQL cannot update in
    place). The version orders relays (a connection hears each once) and fences writes.
    Under a lock on read, a transition that changes no column and relays nothing (a late
    return) leaves the row alone: no other transition can slip in between. Without one
    (``optimistic``), every transition of a running task moves the version, since its
    decision read the other services' assignments too; on a finished task a service's
    transition concerns its own rows only, which fence it.
    """
    fields = {name: getattr(task, name) for name in CORE_COLUMNS}
    fields["status"] = task.status.value
    fields["deadline"] = machine.next_deadline(task)
    if record.started_at is None and task.status is not TaskStatus.PENDING:
        fields["started_at"] = now
    # When the task last finished: a task retried on request runs again, unfinished.
    if not task.finished:
        fields["finished_at"] = None
    elif record.finished_at is None or record.status not in TERMINAL_TASK_STATUSES:
        fields["finished_at"] = now
    fields = {name: value for name, value in fields.items() if getattr(record, name) != value}
    relays = any(e.kind in RELAYED_KINDS for e in events)
    if fields or relays or (optimistic and record.status not in TERMINAL_TASK_STATUSES):
        fields["version"] = record.version + 1
    if relays:
        fields["relayed_version"] = fields["version"]
    return fields


def changes_of(
    record: TaskRecord,
    task: machine.Task,
    events: Sequence[machine.Event],
    now: datetime,
    rows: Sequence[AssignmentRow],
    fields: dict[str, Any] | None,
    ref: str = "",
) -> Changes:
    """The rows a transition writes: ``fields`` of the task (``None``: insert it), its
    new and changed assignments, its events (each with ``ref``, the client command that
    caused them), and the instances it was offered to."""
    existing = {(a.service, a.attempt): a for a in rows}
    changes = Changes(record, fields, now)
    # An instance's id appears in its assignment, its event and its mark: parse it once
    # (a fan-out to 20 services names 20 instances three times each).
    ids: dict[str, uuid.UUID] = {}

    def instance_id(text: str | None) -> uuid.UUID | None:
        if not text:
            return None
        found = ids.get(text)
        if found is None:
            found = ids[text] = uuid.UUID(text)
        return found

    for a in task.assignments:
        if not a.changed:
            continue
        row = existing.get((a.service, a.attempt))
        if row is None:
            changes.new_assignments.append(
                {
                    "task_id": record.pk,
                    "service": a.service,
                    "instance_id": instance_id(a.instance),
                    "attempt": a.attempt,
                    "state": a.state.value,
                    "detail": a.detail,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        else:
            changes.assignment_updates.append((row.pk, a.state.value, a.detail, instance_id(a.instance)))
    changes.events = [
        {
            "task_id": record.pk,
            "kind": e.kind.value,
            "service": e.service,
            "instance": instance_id(e.instance),
            "attempt": e.attempt,
            "data": e.data,
            "ref": ref,
            "created_at": now,
        }
        for e in events
    ]
    # The instances offered the task (its start events) were just assigned one.
    changes.assigned = [ids[e.instance] for e in events if e.kind is EventKind.START and e.instance]
    return changes


def write_new(
    store: Store, record: TaskRecord, task: machine.Task, events: Sequence[machine.Event], now: datetime
) -> Written:
    """Insert a new task with its first events and assignments.

    Raises:
        IntegrityError: the task's id is taken.
    """
    for name in CORE_COLUMNS:
        setattr(record, name, getattr(task, name))
    record.status, record.deadline = task.status.value, machine.next_deadline(task)
    if task.status is not TaskStatus.PENDING:
        record.started_at = now
    written = store.write_transition(changes_of(record, task, events, now, [], None))
    assert written is not None, "an insert is its own fence"
    metrics.observe(record, task, events, now)
    return written


def transition(
    task_id: uuid.UUID | str,
    decide: Decide,
    now: datetime,
    channels: dict[str, str] | None = None,
    *,
    with_payload: bool = False,
    sender: str | None = None,
    service: str | None = None,
    ref: str = "",
    lock: bool = False,
) -> list[Notice]:
    """Apply one decision of the core to a task, once, whatever other processes do.

    ``decide`` gets the loaded task, mutates it and returns the events; if it raises,
    nothing is written and the exception propagates. A decision with no events that
    changes columns (a deadline) is written too. ``channels`` (instance id to channel
    name) are those of the instances a ``decide`` may offer the task to. ``sender`` is
    the channel of the connection whose command this is (see
    :func:`~taskhub.services.routing.listeners`), ``service`` the service that sent it
    (on a finished task, ``decide`` then sees that service's assignments only), and
    ``ref`` the command's ref, recorded with its events. With ``lock``, ``decide`` runs
    inside a transaction that holds the task's lock, whatever the store: for a decision
    that reads other rows under their locks (an instance's room, see
    :func:`~taskhub.services.dispatch.full`).

    Returns:
        What to tell whom once it is written.

    Raises:
        UnknownTask: no such task.
        ProtocolError: whatever ``decide`` raises.
    """
    store = get_store()
    for attempt in range(MAX_TRANSITION_RETRIES):
        # Without a lock on read, a busy task can keep moving on: after a few fences that
        # did not hold, wait for it under the lock instead.
        locked = lock or not store.optimistic or attempt >= OPTIMISTIC_ATTEMPTS
        try:
            with unit_of_work(store, lock=locked):
                loaded = store.load_task(task_id, with_payload=with_payload, service=service, lock=locked)
                if loaded is None:
                    raise UnknownTask(f"no task {task_id}")
                record, rows, publisher_channel = loaded
                task = load(record, rows)
                events = decide(task)
                fields = changed_columns(record, task, events, now, optimistic=store.optimistic)
                if not events and not fields.keys() - {"version"}:
                    return []
                written = store.write_transition(changes_of(record, task, events, now, rows, fields, ref))
                if written is None:
                    raise Conflict(record.pk)
        except Conflict:
            continue
        metrics.observe(record, task, events, now)  # once per transition written, before record moves on
        prev = record.relayed_version
        for name, value in fields.items():
            setattr(record, name, value)
        if written.fresh:
            record.watched, publisher_channel = written.watched, written.publisher_channel
        listening = listeners(publisher_channel, rows, task, events, sender)
        return notices_for(record, events, written.event_ids, channels or {}, listening, prev=prev)
    raise RuntimeError(f"task {task_id}: gave up after {MAX_TRANSITION_RETRIES} conflicting updates")


def unit_of_work(store: Store, *, lock: bool = True) -> contextlib.AbstractContextManager[Any]:
    """What a transition's (or a publish's) statements run in.

    ``transaction.atomic()`` where transitions lock on read, or when ``lock``. Without a
    lock (PostgreSQL), each of its two statements stands alone and the write is fenced,
    so no transaction is needed, and its BEGIN and COMMIT would be two more round trips;
    inside a caller's transaction it is a savepoint still, so that an error leaves that
    transaction usable.
    """
    if lock or not store.optimistic or transaction.get_connection().in_atomic_block:
        return transaction.atomic()
    return contextlib.nullcontext()
