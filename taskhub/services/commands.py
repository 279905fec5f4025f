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
from taskhub.core.commands import MISSING, Drop, Fail, Pickup, Pub, Return, Update
from taskhub.core.errors import InvalidMessage, PermissionDenied
from taskhub.core.frames import encoded_size
from taskhub.models import Credential, Subscription, TaskRecord
from taskhub.store import get_store

from . import queries
from .dispatch import choose_offers, dispatch_waiting
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
    pickup_timeout = conf.PICKUP_TIMEOUT if cmd.pickup_timeout is MISSING else cmd.pickup_timeout
    complete_timeout = conf.COMPLETE_TIMEOUT if cmd.timeout is MISSING else cmd.timeout

    task, events = machine.new_task(task_id, now, pickup_timeout=pickup_timeout, complete_timeout=complete_timeout)
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
    )
    store = get_store()
    offers, channels = choose_offers(store, action, now)
    events += machine.start(task, offers, now)
    try:
        with unit_of_work(store, lock=False):
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
    credential: Credential, cmd: Pickup | Update | Return | Drop | Fail, now: datetime, channel: str | None = None
) -> list[Notice]:
    """Apply a worker's ``pickup``, ``update``, ``return``, ``drop`` or ``fail``.

    ``channel`` is the sending connection's (see
    :func:`~taskhub.services.routing.listeners`).

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


def get_payload(credential: Credential, task_id: str) -> Any:
    """The task's payload, for its publisher or a service it was offered to.

    Raises:
        UnknownTask: as :func:`~taskhub.services.queries.visible_task`.
    """
    return queries.visible_task(credential, task_id).payload


def watch(credential: Credential, task_id: str, since: int) -> dict[str, Any]:
    """The task's current state and its events with a ``seq`` above ``since``.

    Call after joining the task's group. The task is marked ``watched`` first, under the
    lock transitions take, so every transition either committed before (its events are
    in the answer) or sees the mark and sends to the group.

    Returns:
        ``{"task": snapshot, "events": [...]}``, the fields of a ``state`` message.

    Raises:
        UnknownTask: as :func:`~taskhub.services.queries.visible_task`.
    """
    with transaction.atomic():
        record = queries.visible_task(credential, task_id, lock=True)
        if not record.watched:
            TaskRecord.objects.filter(pk=record.pk).update(watched=True)
        return {"task": queries.task_snapshot(record), "events": queries.events_since(record, since)}
