"""The hub's operations on the database: the sans-I/O core applied to the ORM.

Every function here is synchronous: its writes run in ``transaction.atomic()``, or, for
a task's transitions on PostgreSQL, as one fenced statement each (:func:`unit_of_work`).
Call them from async code on the hub's database threads (:func:`taskhub.db.run`), as the
consumer and the sweeper do.

Functions that change tasks return :data:`Notice` lists: what to send on the channel
layer *after* the transaction committed. A lost notice is recovered from the database.

A task transition loads the task, lets :mod:`taskhub.core.machine` decide, and writes
back with ``UPDATE ... WHERE version = <loaded version>``; if another process got there
first the transition is retried on the fresh row, so every transition happens once
(``tests/test_races.py``).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction

from . import store
from .auth import verify_key
from .conf import conf
from .core import machine
from .core.actions import permits
from .core.errors import AuthenticationFailed, InvalidMessage, PermissionDenied, UnknownTask
from .core.messages import MISSING, Drop, Fail, Pickup, Pub, Return, Update, encoded_size
from .core.states import ACTIVE_ASSIGNMENT_STATES, TERMINAL_TASK_STATUSES, AssignmentState, TaskStatus
from .models import Assignment, Credential, Instance, Subscription, TaskRecord

log = logging.getLogger(__name__)

# ("channel", channel_name, layer message) or ("group", group_name, layer message).
Notice = tuple[str, str, dict[str, Any]]

MAX_TRANSITION_RETRIES = 10
#: Attempts of a transition that read without a lock (PostgreSQL) before it locks.
OPTIMISTIC_ATTEMPTS = 3
DISPATCH_BATCH = 200


class Conflict(Exception):
    """Another process changed the task between our read and our write."""


def task_group(task_id: str | uuid.UUID) -> str:
    """The channel-layer group of everyone following a task (caller and services)."""
    return f"taskhub.task.{uuid.UUID(str(task_id)).hex}"


def check_size(value: Any, what: str) -> int:
    """Return the encoded size of ``value``.

    Raises:
        InvalidMessage: ``payload_too_large`` over ``TASKHUB_MAX_PAYLOAD_SIZE``.
    """
    size = encoded_size(value)
    if size > conf.MAX_PAYLOAD_SIZE:
        raise InvalidMessage(
            f"{what} of {size} bytes is over the limit of {conf.MAX_PAYLOAD_SIZE} bytes", "payload_too_large"
        )
    return size


# -- credentials and instances ------------------------------------------------------------


def authenticate(name: str, key: str) -> Credential:
    """Return the active credential for ``name`` and ``key``.

    Raises:
        AuthenticationFailed: ``authentication_failed`` for an unknown name or a wrong key
            (the same answer for both), ``credential_disabled`` for a disabled one.
    """
    credential = Credential.objects.filter(name=name).first()
    if credential is None or not verify_key(key, credential.key_hash):
        raise AuthenticationFailed("invalid name or key")
    if not credential.is_active:
        raise AuthenticationFailed(f"credential {name!r} is disabled", "credential_disabled")
    return credential


def register_instance(
    credential: Credential, channel_name: str, process: str, remote_addr: str, now: datetime
) -> Instance:
    """Take one of the credential's instance slots, counted across all hub processes.

    Raises:
        AuthenticationFailed: ``too_many_instances`` when every slot has a live lease.
    """
    with transaction.atomic():
        # Locks the credential row (PostgreSQL) so racing connects count one at a time;
        # SQLite's IMMEDIATE transactions serialise them anyway.
        locked = Credential.objects.select_for_update().get(pk=credential.pk)
        live = Instance.objects.filter(credential=locked, lease_expires_at__gt=now).count()
        if live >= locked.max_instances:
            raise AuthenticationFailed(
                f"{credential.name} already has {live} live instance(s) of {locked.max_instances} allowed",
                "too_many_instances",
            )
        return Instance.objects.create(
            credential=locked,
            channel_name=channel_name,
            process=process,
            remote_addr=remote_addr[:100],
            connected_at=now,
            lease_expires_at=now + timedelta(seconds=conf.INSTANCE_LEASE),
        )


def disconnect(instance_id: uuid.UUID, now: datetime) -> list[Notice]:
    """The instance is gone: its active assignments are lost, its slot is freed."""
    notices: list[Notice] = []
    task_ids = (
        Assignment.objects.filter(instance=instance_id, state__in=ACTIVE_ASSIGNMENT_STATES)
        .values_list("task_id", flat=True)
        .distinct()
    )
    for task_id in list(task_ids):
        notices += transition(task_id, lambda task: machine.lose_instance(task, str(instance_id), now), now)
    Instance.objects.filter(pk=instance_id).delete()
    return notices


# -- task transitions ---------------------------------------------------------------------


def _load(record: TaskRecord, rows: list[store.AssignmentRow]) -> machine.Task:
    return machine.Task(
        id=str(record.id),
        status=TaskStatus(record.status),
        attempt=record.attempt,
        pickup_timeout=record.pickup_timeout,
        complete_timeout=record.complete_timeout,
        pickup_deadline=record.pickup_deadline,
        complete_deadline=record.complete_deadline,
        failure_reason=record.failure_reason,
        failure_detail=record.failure_detail,
        has_result=record.has_result,
        result=record.result,
        progress=record.progress,
        assignments=[
            machine.Assignment(
                a.service, str(a.instance) if a.instance else None, a.attempt, AssignmentState(a.state), a.detail
            )
            for a in rows
        ],
    )


def _save(
    record: TaskRecord,
    task: machine.Task,
    events: list[machine.Event],
    now: datetime,
    rows: list[store.AssignmentRow],
    *,
    created: bool = False,
) -> store.Written:
    """Write the task's new state, its changed assignments and its events.

    ``rows`` are the assignment rows the task was loaded with. Raises :class:`Conflict`
    when another process changed the task since it was read.
    """
    fields: dict[str, Any] = {
        "status": task.status.value,
        "attempt": task.attempt,
        "pickup_deadline": task.pickup_deadline,
        "complete_deadline": task.complete_deadline,
        "deadline": machine.next_deadline(task),
        "failure_reason": task.failure_reason,
        "failure_detail": task.failure_detail,
        "has_result": task.has_result,
        "result": task.result,
        "progress": task.progress,
    }
    if record.started_at is None and task.status is not TaskStatus.PENDING:
        fields["started_at"] = now
    if task.finished and record.finished_at is None:
        fields["finished_at"] = now
    if created:
        for name, value in fields.items():
            setattr(record, name, value)
    else:
        # Only what changed: an unchanged indexed column still costs its indexes' pages
        # (SQLite rewrites the entries of every column in SET; PostgreSQL cannot update
        # in place). A late return or an update changes one or two columns.
        fields = {name: value for name, value in fields.items() if getattr(record, name) != value}
        # The version orders relays (a connection hears each once) and fences writes.
        # Under a lock on read (SQLite), a transition that changes no column and relays
        # nothing (a late return) leaves the row alone: no other transition can slip in
        # between. Without one (PostgreSQL), every transition of a running task moves the
        # version, since its decision read the other services' assignments too; on a
        # finished task a service's transition concerns its own rows only, which fence it.
        bump = fields or any(e.kind in RELAYED_EVENTS for e in events)
        if bump or (store.statements().optimistic and record.status not in TERMINAL_TASK_STATUSES):
            fields["version"] = record.version + 1
    existing = {(a.service, a.attempt): a for a in rows}
    new, updated = [], []
    for a in task.assignments:
        if not a.changed:
            continue
        row = existing.get((a.service, a.attempt))
        if row is None:
            new.append(
                {
                    "task_id": record.pk,
                    "service": a.service,
                    "instance": uuid.UUID(a.instance) if a.instance else None,
                    "attempt": a.attempt,
                    "state": a.state.value,
                    "detail": a.detail,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        else:
            updated.append((row.pk, a.state.value, a.detail))
    event_rows = [
        {
            "task_id": record.pk,
            "kind": e.kind,
            "service": e.service,
            "instance": uuid.UUID(e.instance) if e.instance else None,
            "attempt": e.attempt,
            "data": e.data,
            "created_at": now,
        }
        for e in events
    ]
    # The instances offered the task (its start events) were just assigned one.
    assigned = [uuid.UUID(e.instance) for e in events if e.kind == "start" and e.instance]
    written = store.write_transition(record, None if created else fields, updated, new, event_rows, now, assigned)
    if written is None:
        raise Conflict(record.pk)
    if not created:
        for name, value in fields.items():
            setattr(record, name, value)
    return written


def transition(
    task_id: uuid.UUID | str,
    decide: Callable[[machine.Task], list[machine.Event]],
    now: datetime,
    channels: dict[str, str] | None = None,
    *,
    with_payload: bool = False,
    sender: str | None = None,
    service: str | None = None,
) -> list[Notice]:
    """Apply one decision of the core to a task, once, whatever other processes do.

    ``decide`` gets the loaded task, mutates it and returns the events; if it raises,
    nothing is written and the exception propagates. A ``decide`` that offers the task
    fills ``channels`` (instance id to channel name) for the offers' notices. ``sender``
    is the channel of the connection whose command this is (see :func:`listeners`), and
    ``service`` the service that sent it: on a finished task, ``decide`` then sees that
    service's assignments only (:func:`store.load_task`).

    Raises:
        UnknownTask: no such task.
        ProtocolError: whatever ``decide`` raises.
    """
    optimistic = store.statements().optimistic
    for attempt in range(MAX_TRANSITION_RETRIES):
        # Without a lock on read, a busy task can keep moving on: after a few fences that
        # did not hold, wait for it under the lock instead.
        lock = not optimistic or attempt >= OPTIMISTIC_ATTEMPTS
        try:
            with unit_of_work(lock=lock):
                loaded = store.load_task(task_id, with_payload=with_payload, service=service, lock=lock)
                if loaded is None:
                    raise UnknownTask(f"no task {task_id}")
                record, rows, publisher_channel = loaded
                task = _load(record, rows)
                events = decide(task)
                if not events:
                    return []
                written = _save(record, task, events, now, rows)
        except Conflict:
            continue
        if written.fresh:
            record.watched, publisher_channel = written.watched, written.publisher_channel
        listening = listeners(publisher_channel, rows, task, events, sender)
        return notices_for(record, events, channels or {}, listening)
    raise RuntimeError(f"task {task_id}: gave up after {MAX_TRANSITION_RETRIES} conflicting updates")


def unit_of_work(*, lock: bool = True) -> contextlib.AbstractContextManager[Any]:
    """What a transition's (or a publish's) statements run in.

    ``transaction.atomic()`` where transitions lock on read (SQLite), or when ``lock``.
    Without a lock (PostgreSQL), each of its two statements stands alone and the write
    is fenced (:func:`store.write_transition`), so no transaction is needed, and its
    BEGIN and COMMIT would be two more round trips; inside a caller's transaction it is
    a savepoint still, so that an error leaves that transaction usable.
    """
    if lock or not store.statements().optimistic or transaction.get_connection().in_atomic_block:
        return transaction.atomic()
    return contextlib.nullcontext()


# Task events that travel to the task's listeners, one relay per transition (notices_for).
RELAYED_EVENTS = frozenset({"update", "success", "fail", "end"})
# Assignment states whose instance hears the task's events.
_LISTENING = frozenset({*ACTIVE_ASSIGNMENT_STATES, AssignmentState.SEEN})


def listeners(
    publisher_channel: str | None,
    rows: list[store.AssignmentRow],
    task: machine.Task,
    events: list[machine.Event],
    sender: str | None,
) -> list[str]:
    """The channels that hear a transition's task events, besides the task's watchers.

    The publisher's connection while it is connected, and the instances of the services
    still on the task before the transition (so that services told of another's success
    hear it). The sender of an update does not get it back; a service whose own return,
    drop or fail this is hears no more of the task, unless it published it. Instances
    lost in this transition are gone.
    """
    lost = {(a.service, a.attempt) for a in task.assignments if a.state is AssignmentState.LOST}
    channels = {
        row.channel
        for row in rows
        if row.channel and row.state in _LISTENING and (row.service, row.attempt) not in lost
    }
    update = any(e.kind == "update" for e in events)
    if not update and sender is not None:
        channels.discard(sender)
    if publisher_channel:
        channels.add(publisher_channel)
    if update and sender is not None:
        channels.discard(sender)
    return sorted(channels)


def notices_for(
    record: TaskRecord,
    events: Iterable[machine.Event],
    offer_channels: dict[str, str],
    listening: Iterable[str] = (),
) -> list[Notice]:
    """What to tell whom about ``events``, once they are committed.

    Offers go to their instances. The task events of one transition travel as one relay,
    in order, to each of the ``listening`` channels directly and, if the task was ever
    watched, to the task's group, which holds its watchers. A relay carries the task's
    version, so that a connection that both listens and watches hears it once.
    """
    task_id = str(record.id)
    notices: list[Notice] = []
    relayed: list[dict[str, Any]] = []
    exclude: str | None = None
    for e in events:
        if e.kind == "start" and e.instance in offer_channels:
            offer: dict[str, Any] = {
                "type": "task",
                "task": task_id,
                "action": record.action,
                "attempt": e.attempt,
                "publisher": record.publisher_name,
                "payload_size": record.payload_size,
            }
            if record.payload_size <= conf.INLINE_PAYLOAD_SIZE:
                offer["payload"] = record.payload
            notices.append(("channel", offer_channels[e.instance], {"type": "taskhub.offer", "message": offer}))
        elif e.kind == "update":
            relayed.append({"type": "update", "task": task_id, "service": e.service, **e.data})
            exclude = e.instance  # the sender knows its own update
        elif e.kind == "success":
            relayed.append({"type": "success", "task": task_id, "service": e.service, "result": e.data["result"]})
        elif e.kind == "fail":
            relayed.append({"type": "fail", "task": task_id, **e.data})
        elif e.kind == "end":
            relayed.append({"type": "end", "task": task_id, "status": e.data["status"]})
    if relayed:
        relay = {
            "type": "taskhub.relay",
            "task": task_id,
            "version": record.version,
            "messages": relayed,
            "exclude": exclude,
        }
        notices += [("channel", channel, relay) for channel in listening]
        if record.watched:  # else the group is empty: on Redis, sending costs 2 commands
            notices.append(("group", task_group(task_id), relay))
    return notices


def _choose_offers(action: str, now: datetime, channels: dict[str, str]) -> list[tuple[str, str]]:
    """One live instance per subscribed service, least recently assigned first.

    Returns ``(service, instance id)`` pairs and adds the instances' channel names to
    ``channels``. The transition's write marks them assigned (:func:`_save`, from their
    ``start`` events).
    """
    chosen: dict[int, dict[str, Any]] = {}
    for sub in store.live_subscribers(action, now):
        if sub["credential_id"] not in chosen and permits(sub["sub_permissions"], action):
            chosen[sub["credential_id"]] = sub
    channels.update((str(sub["instance"]), sub["channel_name"]) for sub in chosen.values())
    return [(sub["name"], str(sub["instance"])) for sub in chosen.values()]


def _start(task_id: uuid.UUID | str, action: str, now: datetime) -> list[Notice]:
    channels: dict[str, str] = {}

    def decide(task: machine.Task) -> list[machine.Event]:
        if task.status is not TaskStatus.PENDING:
            return []
        return machine.start(task, _choose_offers(action, now, channels), now)

    return transition(task_id, decide, now, channels, with_payload=True)


# -- commands -----------------------------------------------------------------------------


def publish(
    credential: Credential, cmd: Pub, now: datetime, instance_id: uuid.UUID | None = None
) -> tuple[str, bool, list[Notice]]:
    """Persist a new task (with its ``init`` event) and offer it to subscribers.

    ``instance_id`` is the publishing connection's: the task's events go there.

    Re-publishing a task id the same credential already published is a no-op that
    answers ``created=False``, so a client can safely re-send after a reconnect.

    Returns:
        ``(task_id, created, notices)``.

    Raises:
        PermissionDenied: the credential may not publish the action.
        InvalidMessage: ``payload_too_large``, or ``task_exists`` for another
            publisher's or another action's task id.
    """
    action = cmd.action
    if not permits(credential.pub_permissions, action):
        raise PermissionDenied(f"{credential.name} may not publish {action}")
    payload = None if cmd.payload is MISSING else cmd.payload
    size = check_size(payload, "payload")
    task_id = str(uuid.uuid4()) if cmd.task_id is MISSING else cmd.task_id
    pickup_timeout = conf.PICKUP_TIMEOUT if cmd.pickup_timeout is MISSING else cmd.pickup_timeout
    complete_timeout = conf.COMPLETE_TIMEOUT if cmd.timeout is MISSING else cmd.timeout

    task, events = machine.new_task(task_id, now, pickup_timeout=pickup_timeout, complete_timeout=complete_timeout)
    record = TaskRecord(
        id=task_id,
        action=action,
        publisher=credential,
        publisher_name=credential.name,
        publisher_instance=instance_id,
        payload=payload,
        payload_size=size,
        pickup_timeout=pickup_timeout,
        complete_timeout=complete_timeout,
        created_at=now,
    )
    channels: dict[str, str] = {}
    try:
        with unit_of_work(lock=False):
            events[0] = machine.Event("init", credential.name, data={"action": action, "payload_size": size})
            events += machine.start(task, _choose_offers(action, now, channels), now)
            _save(record, task, events, now, [], created=True)
    except IntegrityError:
        # The id is taken: a re-sent pub (answered as a no-op), or another task's id.
        # The insert itself detects it, so a new task costs no extra look-up.
        existing = TaskRecord.objects.filter(pk=task_id).values_list("publisher_id", "action").first()
        if existing is None:
            raise
        _check_same_task(existing, credential, action, task_id)
        # The re-sending connection follows the task through its group, as a watcher.
        TaskRecord.objects.filter(pk=task_id, watched=False).update(watched=True)
        return task_id, False, []
    return task_id, True, notices_for(record, events, channels)


def _check_same_task(existing: tuple[int | None, str], credential: Credential, action: str, task_id: str) -> None:
    """Accept a re-sent ``pub`` of the same task; refuse an id taken by another task.

    Raises:
        InvalidMessage: ``task_exists``.
    """
    if existing != (credential.pk, action):
        raise InvalidMessage(f"task id {task_id} is already taken by another task", "task_exists")


def subscribe(instance_id: uuid.UUID, credential: Credential, action: str, now: datetime) -> tuple[int, list[Notice]]:
    """Subscribe an instance; waiting tasks of the action are then offered.

    Returns:
        ``(number of waiting tasks started, notices)``.

    Raises:
        PermissionDenied: the credential may not subscribe to the action.
    """
    if not permits(credential.sub_permissions, action):
        raise PermissionDenied(f"{credential.name} may not subscribe to {action}")
    Subscription.objects.get_or_create(instance_id=instance_id, action=action)
    return dispatch_waiting(now, actions=[action])


def unsubscribe(instance_id: uuid.UUID, action: str) -> bool:
    """Stop offering new tasks of ``action`` to the instance; whether it was subscribed."""
    deleted, _ = Subscription.objects.filter(instance_id=instance_id, action=action).delete()
    return bool(deleted)


def dispatch_waiting(now: datetime, actions: Iterable[str] | None = None) -> tuple[int, list[Notice]]:
    """Offer pending tasks whose action has a live subscriber, oldest first.

    Called when a service subscribes, and by the sweeper to recover from races and from
    notices the layer dropped.
    """
    live = Subscription.objects.filter(instance__lease_expires_at__gt=now).values("action")
    pending = TaskRecord.objects.filter(status=TaskStatus.PENDING, action__in=live)
    if actions is not None:
        pending = pending.filter(action__in=list(actions))
    started, notices = 0, []
    for task_id, action in list(pending.order_by("created_at").values_list("id", "action")[:DISPATCH_BATCH]):
        more = _start(task_id, action, now)
        started += bool(more)
        notices += more
    return started, notices


def act(
    credential: Credential, cmd: Pickup | Update | Return | Drop | Fail, now: datetime, channel: str | None = None
) -> list[Notice]:
    """Apply a worker's ``pickup``, ``update``, ``return``, ``drop`` or ``fail``.

    ``channel`` is the sending connection's (see :func:`listeners`).

    Raises:
        UnknownTask: no such task, or not offered to this service.
        InvalidTransition: the command does not fit the task's state (``stale_attempt``
            for an attempt the hub gave up on).
        InvalidMessage: ``payload_too_large`` for update data or a result.
    """
    service, attempt = credential.name, cmd.attempt
    decide: Callable[[machine.Task], list[machine.Event]]
    match cmd:
        case Pickup():
            decide = lambda task: machine.pickup(task, service, attempt, now)  # noqa: E731
        case Update():
            data = None if cmd.data is MISSING else cmd.data
            progress = None if cmd.progress is MISSING else cmd.progress
            check_size(data, "update data")
            decide = lambda task: machine.update(task, service, attempt, data, progress, now)  # noqa: E731
        case Return():
            result = None if cmd.result is MISSING else cmd.result
            check_size(result, "result")
            decide = lambda task: machine.return_result(task, service, attempt, result, now)  # noqa: E731
        case Drop():
            decide = lambda task: machine.drop(task, service, attempt, now)  # noqa: E731
        case Fail(error=error):
            decide = lambda task: machine.fail(task, service, attempt, error, now)  # noqa: E731
    return transition(cmd.task, decide, now, sender=channel, service=service)


def _visible_task(credential: Credential, task_id: str, *, lock: bool = False) -> TaskRecord:
    """The task, if the credential published it or works on it; ``lock`` locks its row
    (PostgreSQL), as transitions do, inside the caller's ``atomic()``.

    Raises:
        UnknownTask: otherwise (the same answer as for a task that does not exist).
    """
    tasks = TaskRecord.objects.select_for_update(of=("self",)) if lock else TaskRecord.objects
    record = tasks.filter(pk=task_id).first()
    if record is None or not (
        record.publisher_id == credential.pk or record.assignments.filter(service=credential.name).exists()
    ):
        raise UnknownTask(f"no task {task_id} of yours")
    return record


def get_payload(credential: Credential, task_id: str) -> Any:
    """The task's payload, for its publisher or a service it was offered to.

    Raises:
        UnknownTask: as :func:`_visible_task`.
    """
    return _visible_task(credential, task_id).payload


def watch(credential: Credential, task_id: str, since: int) -> dict[str, Any]:
    """The task's current state and its events with a sequence number above ``since``.

    Call after joining the task's group. The task is marked ``watched`` first, under the
    lock transitions take, so every transition either committed before (its events are
    in the answer) or sees the mark and sends to the group.

    Raises:
        UnknownTask: as :func:`_visible_task`.
    """
    with transaction.atomic():
        record = _visible_task(credential, task_id, lock=True)
        if not record.watched:
            TaskRecord.objects.filter(pk=record.pk).update(watched=True)
        return {"task": task_snapshot(record), "events": _events_since(record, since)}


def _events_since(record: TaskRecord, since: int) -> list[dict[str, Any]]:
    return [
        {
            "seq": e.id,
            "kind": e.kind,
            "service": e.service,
            "attempt": e.attempt,
            "data": e.data,
            "at": e.created_at.isoformat(),
        }
        for e in record.events.filter(id__gt=since).order_by("id")
    ]


def task_snapshot(record: TaskRecord) -> dict[str, Any]:
    """A task as the protocol shows it (``watch``)."""
    return {
        "id": str(record.id),
        "action": record.action,
        "status": record.status,
        "attempt": record.attempt,
        "publisher": record.publisher_name,
        "progress": record.progress,
        "has_result": record.has_result,
        "result": record.result,
        "failure_reason": record.failure_reason,
        "failure_detail": record.failure_detail,
        "created_at": record.created_at.isoformat(),
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
    }


# -- the sweeper --------------------------------------------------------------------------


def sweep(process: str, now: datetime) -> tuple[list[Notice], list[str]]:
    """One pass of a hub process's sweeper. Any process may run it; they race safely.

    Renews the leases of ``process``'s instances, reaps instances whose lease lapsed
    (their tasks are lost), expires overdue tasks, and offers waiting tasks that have a
    subscriber.

    Returns:
        ``(notices, channel names of this process's instances to close)``; those are
        instances of credentials an operator disabled.
    """
    lease = now + timedelta(seconds=conf.INSTANCE_LEASE)
    Instance.objects.filter(process=process).update(lease_expires_at=lease)
    to_close = list(
        Instance.objects.filter(process=process, credential__is_active=False).values_list("channel_name", flat=True)
    )
    notices: list[Notice] = []
    for instance_id in list(
        Instance.objects.filter(lease_expires_at__lte=now).values_list("id", flat=True)[:DISPATCH_BATCH]
    ):
        log.warning("instance %s lost its lease; releasing its tasks", instance_id)
        notices += disconnect(instance_id, now)
    overdue = TaskRecord.objects.filter(deadline__lte=now, status__in=[TaskStatus.PENDING, TaskStatus.STARTED])
    for task_id in list(overdue.order_by("deadline").values_list("id", flat=True)[:DISPATCH_BATCH]):
        notices += transition(task_id, lambda task: machine.expire(task, now), now)
    notices += dispatch_waiting(now)[1]
    return notices, to_close
