"""The read side: tasks and their events as the protocol shows them.

What a credential may see is decided here once: the tasks it published, and the tasks
offered to its service. Anything else answers ``unknown_task``, the same answer as for a
task that does not exist.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import connection
from django.db.models import Exists, OuterRef, Q

from taskhub.conf import conf
from taskhub.core.codes import RELAYED_KINDS, EventKind
from taskhub.core.errors import UnknownTask
from taskhub.core.frames import encoded_size
from taskhub.core.messages import LoggedEvent, TaskSnapshot, event_message
from taskhub.core.states import AssignmentState, TaskStatus
from taskhub.models import Assignment, Credential, TaskEvent, TaskRecord

from .routing import offer_message


def visible_task(credential: Credential, task_id: str, *, lock: bool = False) -> TaskRecord:
    """The task, if the credential published it or works on it.

    ``lock`` locks its row (``SELECT ... FOR UPDATE``, as transitions under the lock do)
    inside the caller's ``atomic()``.

    Raises:
        UnknownTask: otherwise (the same answer as for a task that does not exist).
    """
    tasks = TaskRecord.objects.all()
    if lock and connection.features.has_select_for_update:
        tasks = tasks.select_for_update(of=("self",) if connection.features.has_select_for_update_of else ())
    record = tasks.filter(pk=task_id).first()
    if record is None or not (
        record.publisher_id == credential.pk or record.assignments.filter(service=credential.name).exists()
    ):
        raise UnknownTask(f"no task {task_id} of yours")
    return record


def answer_budget() -> int:
    """Bytes the items of one ``state`` or ``tasks`` answer may take: the hub's message
    size (its peers' frame limit is at least that), less room for the envelope."""
    return int(conf.MAX_MESSAGE_SIZE) - ENVELOPE


#: Bytes kept for what surrounds a page's items in its message.
ENVELOPE = 1024


def listed(
    credential: Credential, *, status: str | None, action: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The tasks the credential published or was offered, newest first (``tasks``): those
    :func:`visible_task` shows it, and no other.

    Returns:
        ``(snapshots, more)``: ``more`` when the list was cut to fit one message.
    """
    offered = Assignment.objects.filter(task=OuterRef("pk"), service=credential.name)
    tasks = TaskRecord.objects.filter(Q(publisher=credential) | Exists(offered))
    if status is not None:
        tasks = tasks.filter(status=status)
    if action is not None:
        tasks = tasks.filter(action=action)
    budget, used = answer_budget(), 0
    page: list[dict[str, Any]] = []
    for record in tasks.defer("payload").order_by("-created_at")[:limit].iterator(chunk_size=100):
        snapshot = task_snapshot(record)
        size = encoded_size(snapshot) + 1
        if page and used + size > budget:
            return page, True
        page.append(snapshot)
        used += size
    return page, False


def state_page(record: TaskRecord, since: int) -> dict[str, Any]:
    """The fields of a ``state`` message: the task's snapshot and its events with a ``seq``
    above ``since``, oldest first, as many as one message holds.

    A page that cannot hold the events and the task's result too leaves the result out
    and says ``more``: the next page, from its last event, has it. Each page holds one
    event at least, so that a reader that follows ``more`` gets to the end.
    """
    snapshot = task_snapshot(record)
    slim = {**snapshot, "result": None}
    budget, used = answer_budget(), 0
    room = budget - encoded_size(slim)
    events: list[dict[str, Any]] = []
    more = False
    rows = record.events.filter(id__gt=since).order_by("id").iterator(chunk_size=100)
    for e in rows:
        event = LoggedEvent(
            seq=e.id, kind=e.kind, service=e.service, attempt=e.attempt, data=e.data, at=e.created_at.isoformat()
        ).to_dict()
        size = encoded_size(event) + 1
        if events and used + size > room:
            more = True
            break
        events.append(event)
        used += size
    if used + encoded_size(snapshot) > budget:  # the result does not fit beside the events
        return {"task": slim, "events": events, "more": True}
    return {"task": snapshot, "events": events, "more": more}


def task_snapshot(record: TaskRecord) -> dict[str, Any]:
    """A task as the protocol shows it (the ``task`` of a ``state`` message)."""
    return TaskSnapshot(
        id=str(record.id),
        action=record.action,
        status=record.status,
        attempt=record.attempt,
        publisher=record.publisher_name,
        progress=record.progress,
        has_result=record.has_result,
        result=record.result,
        failure_reason=record.failure_reason,
        failure_detail=record.failure_detail,
        retries=record.retries,
        retry_at=record.retry_at.isoformat() if record.retry_at else None,
        created_at=record.created_at.isoformat(),
        finished_at=record.finished_at.isoformat() if record.finished_at else None,
    ).to_dict()


# -- what the layer may have lost (taskhub.recovery) ---------------------------------------


def offered_to(process: str) -> list[tuple[uuid.UUID, uuid.UUID, int]]:
    """``(instance, task, attempt)`` of the offers that instances of ``process`` have not
    picked up yet, in tasks still running."""
    return list(
        Assignment.objects.filter(
            instance__process=process, state=AssignmentState.OFFERED, task__status=TaskStatus.STARTED
        ).values_list("instance_id", "task_id", "attempt")
    )


def offer_of(task_id: uuid.UUID, attempt: int, instance: uuid.UUID | None = None) -> dict[str, Any] | None:
    """The offer message of the task's attempt, while the task runs that attempt and its
    part is still offered to ``instance`` (to some instance, if ``None``): not picked up,
    finished or handed to another instance since :func:`offered_to` read it."""
    offered = Assignment.objects.filter(task=OuterRef("pk"), attempt=attempt, state=AssignmentState.OFFERED)
    if instance is not None:
        offered = offered.filter(instance=instance)
    record = TaskRecord.objects.filter(Exists(offered), pk=task_id, status=TaskStatus.STARTED, attempt=attempt).first()
    return None if record is None else offer_message(record, attempt)


def versions(task_ids: list[str]) -> dict[str, int]:
    """The current version of each of the tasks (those that still exist)."""
    found: dict[str, int] = {}
    for start in range(0, len(task_ids), 500):
        rows = TaskRecord.objects.filter(pk__in=task_ids[start : start + 500]).values_list("id", "version")
        found.update((str(pk), version) for pk, version in rows)
    return found


def relayed_since(task_id: str, seq: int, instance: uuid.UUID | None) -> list[dict[str, Any]]:
    """The live messages of the task's relayed events after ``seq``, but the updates of
    ``instance`` (which knows its own)."""
    events = TaskEvent.objects.filter(task_id=uuid.UUID(task_id), id__gt=seq, kind__in=RELAYED_KINDS)
    if instance is not None:  # in the query: a long task's own updates would all be read
        events = events.exclude(kind=EventKind.UPDATE, instance=instance)
    messages = []
    for e in events.order_by("id"):
        message = event_message(str(task_id), e.id, e.kind, e.service, e.attempt, e.data)
        if message is not None:
            messages.append(message.to_dict())
    return messages
