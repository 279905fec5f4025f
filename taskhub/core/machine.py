"""A task and its assignments as a pure aggregate.

The services layer loads a :class:`Task` from the database, calls one of the functions
below with ``now``, and writes back what changed together with the returned
:class:`Event` list, at the version it read (:mod:`taskhub.services.transitions`). Events
are the audit log *and* the notices: the services layer derives what to tell whom from
them once they are written.

Every function raises :class:`~taskhub.core.errors.ProtocolError` subclasses for a
command the task cannot take, and changes nothing when it raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .codes import ErrorCode, EventKind, FailureReason
from .errors import InvalidTransition, UnknownTask
from .states import (
    ACTIVE_ASSIGNMENT_STATES,
    FAILED_ASSIGNMENT_STATES,
    TERMINAL_TASK_STATUSES,
    AssignmentState,
    AssignmentTrigger,
    TaskStatus,
    TaskTrigger,
    advance_assignment,
    advance_task,
)


@dataclass
class Assignment:
    """One service's part in one attempt of a task, held by one instance."""

    service: str
    instance: str | None
    attempt: int
    state: AssignmentState = AssignmentState.OFFERED
    detail: str = ""
    changed: bool = field(default=False, compare=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_ASSIGNMENT_STATES


@dataclass
class Task:
    """The state of one task that the state machine reads and writes."""

    id: str
    status: TaskStatus = TaskStatus.PENDING
    attempt: int = 1
    pickup_timeout: float | None = None
    complete_timeout: float | None = None
    pickup_deadline: datetime | None = None
    complete_deadline: datetime | None = None
    failure_reason: str = ""
    failure_detail: str = ""
    has_result: bool = False
    result: Any = None
    progress: float | None = None
    assignments: list[Assignment] = field(default_factory=list)

    def current(self) -> list[Assignment]:
        """The assignments of the current attempt."""
        return [a for a in self.assignments if a.attempt == self.attempt]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_TASK_STATUSES


@dataclass(frozen=True)
class Event:
    """A persisted step in a task's life (see docs/protocol.md, "Events")."""

    kind: EventKind
    service: str = ""
    instance: str | None = None
    attempt: int = 1
    data: Any = None


def _after(now: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else now + timedelta(seconds=seconds)


def new_task(
    task_id: str,
    now: datetime,
    *,
    pickup_timeout: float | None,
    complete_timeout: float | None,
) -> tuple[Task, list[Event]]:
    """Create a pending task; its pickup deadline runs from ``now``."""
    task = Task(
        id=task_id,
        pickup_timeout=pickup_timeout,
        complete_timeout=complete_timeout,
        pickup_deadline=_after(now, pickup_timeout),
    )
    return task, [Event(EventKind.INIT)]


def start(task: Task, offers: list[tuple[str, str]], now: datetime) -> list[Event]:
    """Offer a pending task to one instance of each subscribed service.

    Args:
        offers: ``(service, instance)`` pairs, one per service. Empty leaves the task
            pending.

    Raises:
        InvalidTransition: if the task is not pending.
    """
    if not offers:
        return []
    task.status = advance_task(task.status, TaskTrigger.START)
    # Services get the whole pickup timeout from the moment of the offer.
    task.pickup_deadline = _after(now, task.pickup_timeout)
    events = []
    for service, instance in offers:
        task.assignments.append(Assignment(service, instance, task.attempt, changed=True))
        events.append(Event(EventKind.START, service, instance, task.attempt))
    return events


def _find(task: Task, service: str, attempt: int) -> Assignment:
    mine = [a for a in task.assignments if a.service == service]
    if not mine:
        raise UnknownTask(f"task {task.id} was not offered to {service}")
    if attempt != task.attempt:
        raise InvalidTransition(
            f"attempt {attempt} of task {task.id} is over; the current attempt is {task.attempt}",
            ErrorCode.STALE_ATTEMPT,
        )
    for a in mine:
        if a.attempt == attempt:
            return a
    raise UnknownTask(f"attempt {attempt} of task {task.id} was not offered to {service}")


def _move(a: Assignment, event: AssignmentTrigger) -> AssignmentState:
    """Move ``a`` as the table says; return the state it was in."""
    before = a.state
    state = advance_assignment(before, event)
    # A move to the same state (a second update) leaves the row as it is: its
    # ``updated_at`` says when the state last changed.
    if state is not before:
        a.state, a.changed = state, True
    return before


def _finish_task(
    task: Task, event: TaskTrigger, now: datetime, reason: FailureReason | None = None, detail: str = ""
) -> list[Event]:
    """Move the task to a final status and close every active assignment."""
    task.status = advance_task(task.status, event)
    closing = AssignmentTrigger.TELL if task.status is TaskStatus.SUCCESS else AssignmentTrigger.ABORT
    for a in task.current():
        if a.active:
            _move(a, closing)
    task.pickup_deadline = task.complete_deadline = None
    events = []
    if task.status is TaskStatus.FAILED:
        assert reason is not None, "a failure has a reason"
        task.failure_reason, task.failure_detail = reason.value, detail
        events.append(Event(EventKind.FAIL, attempt=task.attempt, data={"reason": reason.value, "detail": detail}))
    events.append(Event(EventKind.END, attempt=task.attempt, data={"status": task.status.value}))
    return events


def _settle(task: Task, now: datetime) -> list[Event]:
    """End a started task once every assignment of the attempt is finished."""
    current = task.current()
    if task.status is not TaskStatus.STARTED or any(a.active for a in current):
        return []
    failed = [a for a in current if a.state in FAILED_ASSIGNMENT_STATES]
    if failed:
        first = failed[0]
        reason = FailureReason.WORKER_LOST if first.state is AssignmentState.LOST else FailureReason.ERROR
        return _finish_task(task, TaskTrigger.SETTLE_FAILED, now, reason, first.detail)
    return _finish_task(task, TaskTrigger.SETTLE_EMPTY, now)


def _picked_up(task: Task, a: Assignment, attempt: int, now: datetime) -> list[Event]:
    """What a move out of ``offered`` into ``picked_up`` records; the complete deadline
    starts with the task's first pickup."""
    if task.complete_deadline is None:
        task.complete_deadline = _after(now, task.complete_timeout)
    return [Event(EventKind.PICKUP, a.service, a.instance, attempt)]


def pickup(task: Task, service: str, attempt: int, now: datetime) -> list[Event]:
    """The service works on the task: the complete deadline starts with the first pickup.

    Raises:
        UnknownTask: the task was not offered to ``service``.
        InvalidTransition: the assignment is finished, or ``attempt`` is stale.
    """
    a = _find(task, service, attempt)
    _move(a, AssignmentTrigger.PICKUP)
    return _picked_up(task, a, attempt, now)


def update(task: Task, service: str, attempt: int, data: Any, progress: float | None, now: datetime) -> list[Event]:
    """Progress from a service; an update on an offered task picks it up.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt)
    before = _move(a, AssignmentTrigger.UPDATE)
    events = _picked_up(task, a, attempt, now) if before is AssignmentState.OFFERED else []
    if progress is not None:
        task.progress = progress
    events.append(Event(EventKind.UPDATE, service, a.instance, attempt, {"data": data, "progress": progress}))
    return events


def return_result(task: Task, service: str, attempt: int, result: Any, now: datetime) -> list[Event]:
    """A service returns a result. The first return completes the task.

    A return from a service that was told (another service completed the task first)
    is recorded as ``late_return`` and not delivered.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt)
    _move(a, AssignmentTrigger.RETURN)
    if a.state is AssignmentState.TOLD:
        return [Event(EventKind.LATE_RETURN, service, a.instance, attempt, {"result": result})]
    task.has_result, task.result = True, result
    events = [Event(EventKind.SUCCESS, service, a.instance, attempt, {"result": result})]
    return events + _finish_task(task, TaskTrigger.SUCCEED, now)


def drop(task: Task, service: str, attempt: int, now: datetime) -> list[Event]:
    """A service is done without a result.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt)
    _move(a, AssignmentTrigger.DROP)
    return [Event(EventKind.DROP, service, a.instance, attempt)] + _settle(task, now)


def fail(task: Task, service: str, attempt: int, detail: str, now: datetime) -> list[Event]:
    """A service reports that it failed (its handler raised).

    The task fails once no other service of the attempt is still on it.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt)
    _move(a, AssignmentTrigger.FAIL)
    a.detail = detail
    return [Event(EventKind.ERROR, service, a.instance, attempt, {"detail": detail})] + _settle(task, now)


def lose_instance(task: Task, instance: str, now: datetime) -> list[Event]:
    """The instance disconnected: its active assignments of the attempt are lost."""
    events = []
    for a in task.current():
        if a.instance == instance and a.active:
            _move(a, AssignmentTrigger.LOSE)
            a.detail = "the instance holding the task disconnected"
            events.append(Event(EventKind.LOST, a.service, instance, a.attempt))
    return events + (_settle(task, now) if events else [])


def expire(task: Task, now: datetime) -> list[Event]:
    """Apply whatever deadlines have passed at ``now``; nothing if none has."""
    if task.status is TaskStatus.PENDING:
        if task.pickup_deadline is not None and task.pickup_deadline <= now:
            return _finish_task(
                task,
                TaskTrigger.PICKUP_TIMEOUT,
                now,
                FailureReason.PICKUP_TIMEOUT,
                "no service subscribed within the pickup timeout",
            )
        return []
    if task.status is not TaskStatus.STARTED:
        return []
    if task.complete_deadline is not None and task.complete_deadline <= now:
        return _finish_task(
            task,
            TaskTrigger.COMPLETE_TIMEOUT,
            now,
            FailureReason.COMPLETE_TIMEOUT,
            "the task did not finish within its complete timeout",
        )
    events = []
    if task.pickup_deadline is not None and task.pickup_deadline <= now:
        task.pickup_deadline = None
        for a in task.current():
            if a.state is AssignmentState.OFFERED:
                _move(a, AssignmentTrigger.PICKUP_TIMEOUT)
                events.append(Event(EventKind.SEEN, a.service, a.instance, a.attempt))
    return events + _settle(task, now)


def next_deadline(task: Task) -> datetime | None:
    """When :func:`expire` must next look at the task; ``None`` for never."""
    if task.status is TaskStatus.PENDING:
        return task.pickup_deadline
    if task.status is not TaskStatus.STARTED:
        return None
    candidates = [task.complete_deadline]
    if any(a.state is AssignmentState.OFFERED for a in task.current()):
        candidates.append(task.pickup_deadline)
    present = [d for d in candidates if d is not None]
    return min(present) if present else None
