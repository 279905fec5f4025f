"""The read side: tasks and their events as the protocol shows them.

What a credential may see is decided here once: the tasks it published, and the tasks
offered to its service. Anything else answers ``unknown_task``, the same answer as for a
task that does not exist.
"""

from __future__ import annotations

from typing import Any

from django.db import connection

from taskhub.core.errors import UnknownTask
from taskhub.core.messages import LoggedEvent, TaskSnapshot
from taskhub.models import Credential, TaskRecord


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


def events_since(record: TaskRecord, since: int) -> list[dict[str, Any]]:
    """The task's events with a ``seq`` above ``since``, oldest first, as ``watch`` shows them."""
    return [
        LoggedEvent(
            seq=e.id, kind=e.kind, service=e.service, attempt=e.attempt, data=e.data, at=e.created_at.isoformat()
        ).to_dict()
        for e in record.events.filter(id__gt=since).order_by("id")
    ]


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
        created_at=record.created_at.isoformat(),
        finished_at=record.finished_at.isoformat() if record.finished_at else None,
    ).to_dict()
