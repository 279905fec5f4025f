"""Commands: what a client's frame asks of the hub, checked and applied.

One function per command, called by the consumer with the connection's credential. Each
checks permissions first, changes nothing when it raises, and returns what to answer
and the notices to send once its writes are committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction

from taskhub.conf import conf
from taskhub.core import machine
from taskhub.core.actions import permits
from taskhub.core.codes import ErrorCode, EventKind
from taskhub.core.commands import MISSING, Drop, Fail, Pickup, Pub, Return, Touch, Update, WorkCommand
from taskhub.core.errors import InvalidMessage, InvalidTransition, PermissionDenied, UnknownTask
from taskhub.core.frames import encoded_size
from taskhub.core.states import TaskStatus
from taskhub.models import Credential, Subscription, TaskEvent, TaskRecord
from taskhub.store import get_store

from . import queries
from .dispatch import choose_offers, dispatch_waiting, reserve, start
from .routing import Notice, notices_for
from .transitions import transition, unit_of_work, write_new


def check_size(value: Any, what: str) -> int:
    """Return the encoded size of ``value``.

    Raises:
        InvalidMessage: ``payload_too_large`` over ``TASKHUB_MAX_PAYLOAD_SIZE``.
    """
    size = encoded_size(value)
    if size > conf.MAX_PAYLOAD_SIZE:
        raise InvalidMessage(
            f"{what} of {size} bytes is over the limit of {conf.MAX_PAYLOAD_SIZE} bytes",
            ErrorCode.PAYLOAD_TOO_LARGE,
        )
    return size


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
    task, events = machine.new_task(
        task_id,
        now,
        pickup_timeout=conf.PICKUP_TIMEOUT if cmd.pickup_timeout is MISSING else cmd.pickup_timeout,
        complete_timeout=conf.COMPLETE_TIMEOUT if cmd.timeout is MISSING else cmd.timeout,
        heartbeat_timeout=None if cmd.heartbeat_timeout is MISSING else cmd.heartbeat_timeout,
        retries=0 if cmd.retries is MISSING else cmd.retries,
        retry_backoff=1.0 if cmd.retry_backoff is MISSING else cmd.retry_backoff,
    )
    events[0] = machine.Event(EventKind.INIT, credential.name, data={"action": action, "payload_size": size})
    record = TaskRecord(
        id=task_id,
        action=action,
        publisher=credential,
        publisher_name=credential.name,
        publisher_instance_id=instance_id,
        payload=payload,
        payload_size=size,
        created_at=now,
        autoremove=cmd.autoremove is True,
    )
    store = get_store()
    offers, channels, bounded = choose_offers(store, action, now)
    try:
        # An offer to an instance with a concurrency is reserved in the insert's transaction.
        with unit_of_work(store, lock=bool(bounded)):
            events += machine.start(task, reserve(offers, bounded) if bounded else offers, now)
            written = write_new(store, record, task, events, now)
    except IntegrityError:
        # The id is taken: a re-sent pub (answered as a no-op), or another task's id.
        # The insert itself detects it, so a new task costs no extra look-up.
        existing = TaskRecord.objects.filter(pk=task_id).values_list("publisher_id", "action").first()
        if existing is None:
            raise
        if existing != (credential.pk, action):
            raise InvalidMessage(f"task id {task_id} is already taken by another task", ErrorCode.TASK_EXISTS) from None
        # The re-sending connection follows the task through its group, as a watcher.
        TaskRecord.objects.filter(pk=task_id, watched=False).update(watched=True)
        return task_id, False, []
    return task_id, True, notices_for(record, events, written.event_ids, channels)


def subscribe(instance_id: uuid.UUID, credential: Credential, action: str, now: datetime) -> tuple[int, list[Notice]]:
    """Subscribe an instance; waiting tasks of the action are then offered.

    Returns:
        ``(number of waiting tasks offered, notices)``.

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


def act(
    credential: Credential,
    cmd: WorkCommand,
    now: datetime,
    channel: str | None = None,
    instance: uuid.UUID | None = None,
) -> list[Notice]:
    """Apply a worker's ``pickup``, ``update``, ``touch``, ``return``, ``drop`` or ``fail``.

    ``channel`` and ``instance`` are the sending connection's (see
    :func:`~taskhub.services.routing.listeners`): a command of an instance the task was
    taken from is refused. A command sent ``again`` after a reconnect that the hub
    already applied (an event of the task records its instance and ref) changes nothing,
    nor does one whose task is gone (removed after its end), nor a ``touch`` sent again
    once the part is over (it records no event, so it may have been applied before).

    Raises:
        UnknownTask: no such task, or not offered to this service.
        InvalidTransition: the command does not fit the task's state (``stale_attempt``
            for an attempt the hub gave up on, or a task handed to another instance).
        InvalidMessage: ``payload_too_large`` for update data or a result.
    """
    ref = "" if cmd.ref is None else str(cmd.ref)
    if cmd.again is True and instance is not None and ref and _applied(cmd.task, instance, ref):
        return []
    service, attempt, me = credential.name, cmd.attempt, None if instance is None else str(instance)
    decide: Callable[[machine.Task], list[machine.Event]]
    match cmd:
        case Pickup():
            decide = lambda task: machine.pickup(task, service, attempt, now, me)  # noqa: E731
        case Update():
            data = None if cmd.data is MISSING else cmd.data
            progress = None if cmd.progress is MISSING else cmd.progress
            check_size(data, "update data")
            decide = lambda task: machine.update(task, service, attempt, data, progress, now, me)  # noqa: E731
        case Touch():
            decide = lambda task: machine.touch(task, service, attempt, now, me)  # noqa: E731
        case Return():
            result = None if cmd.result is MISSING else cmd.result
            check_size(result, "result")
            decide = lambda task: machine.return_result(task, service, attempt, result, now, me)  # noqa: E731
        case Drop():
            decide = lambda task: machine.drop(task, service, attempt, now, me)  # noqa: E731
        case Fail(error=error):
            decide = lambda task: machine.fail(task, service, attempt, error, now, me)  # noqa: E731
    try:
        return transition(cmd.task, decide, now, sender=channel, service=service, ref=ref)
    except UnknownTask:
        if cmd.again is True and not TaskRecord.objects.filter(pk=uuid.UUID(cmd.task)).exists():
            return []
        raise
    except InvalidTransition:
        if cmd.again is True and isinstance(cmd, Touch):
            return []
        raise


def _applied(task_id: str, instance: uuid.UUID, ref: str) -> bool:
    """Whether a command of ``instance`` with ``ref`` already wrote an event of the task."""
    return TaskEvent.objects.filter(task_id=uuid.UUID(task_id), instance=instance, ref=ref).exists()


def cancel(credential: Credential | None, task_id: str, now: datetime, by: str) -> list[Notice]:
    """Cancel a pending or running task: it fails with reason ``cancelled`` and every
    service on it is told. ``credential`` must have published it (``None``: an operator,
    who may cancel any task); ``by`` names who asked, for the failure's detail.

    The task is marked ``watched`` first, as :func:`watch` does, so that a connection
    that joined its group (another than the publishing one) hears the outcome live.

    Raises:
        UnknownTask: no such task, or not published by ``credential``.
        InvalidTransition: the task is already finished.
    """
    _own(credential, task_id)
    return transition(task_id, lambda task: machine.cancel(task, by, now), now)


def retry(credential: Credential | None, task_id: str, now: datetime, by: str) -> list[Notice]:
    """Retry a failed task at once: its next attempt is offered to the action's
    subscribers (or waits for one). ``credential`` as :func:`cancel`.

    Call after the connection joined the task's group: the task is marked ``watched``
    first, as :func:`watch` does, so that the connection hears the new attempt live,
    whichever connection published the task.

    Raises:
        UnknownTask: no such task, or not published by ``credential``.
        InvalidTransition: the task did not fail.
    """
    action = _own(credential, task_id)
    notices = transition(task_id, lambda task: machine.retry(task, by, now), now)
    return notices + start(task_id, action, now)


def _own(credential: Credential | None, task_id: str) -> str:
    """The action of the task, if ``credential`` published it (``None``: anyone may);
    the task is marked ``watched``, before any transition that follows reads it.

    Raises:
        UnknownTask: otherwise.
    """
    tasks = TaskRecord.objects.filter(pk=task_id)
    if credential is not None:
        tasks = tasks.filter(publisher=credential)
    action = tasks.values_list("action", flat=True).first()
    if action is None:
        raise UnknownTask(f"no task {task_id} of yours")
    tasks.filter(watched=False).update(watched=True)
    return action


def get_payload(credential: Credential | None, task_id: str) -> Any:
    """The task's payload, for its publisher or a service it was offered to (``None``: a
    monitor, for any task).

    Raises:
        UnknownTask: as :func:`~taskhub.services.queries.visible_task`.
    """
    return queries.visible_task(credential, task_id).payload


def watch(credential: Credential | None, task_id: str, since: int, *, follow: bool = True) -> dict[str, Any]:
    """The task's current state and its events with a ``seq`` above ``since``.

    To ``follow`` the task, call after joining its group: the task is marked ``watched``
    first, under a lock on its row, so every transition either wrote before (its events
    are in the answer) or sees the mark and sends to the group (docs/architecture.md,
    "Notices").

    ``credential=None`` is a monitor's read, of any task: it changes nothing, whatever
    ``follow`` says (a monitor hears every task's events through the monitors' group),
    and the snapshot is a monitor's (:func:`~taskhub.services.queries.monitor_snapshot`).

    Returns:
        ``{"task": snapshot, "events": [...], "more": bool}``, the fields of a ``state``
        message: one page of them (:func:`~taskhub.services.queries.state_page`);
        ``"relayed"``, the version of the task's last relay the read saw (what a
        :class:`~taskhub.recovery.Ledger` starts from); and
        ``"remove": True`` when the answer gives the publisher the result of a task
        published with ``autoremove`` (then call
        :func:`~taskhub.services.retention.remove_delivered`).

    Raises:
        UnknownTask: as :func:`~taskhub.services.queries.visible_task`.
    """
    if credential is None:
        record = queries.visible_task(None, task_id)
        return {**queries.state_page(record, since, monitor=True), "relayed": record.relayed_version}
    with transaction.atomic():
        record = queries.visible_task(credential, task_id, lock=follow)
        if follow and not record.watched:
            TaskRecord.objects.filter(pk=record.pk).update(watched=True)
        state = queries.state_page(record, since)
    state["relayed"] = record.relayed_version
    if record.autoremove and record.status == TaskStatus.SUCCESS and not state["more"]:
        state["remove"] = record.publisher_id == credential.pk
    return state
