"""A task and its assignments as a pure aggregate.

The services layer loads a :class:`Task` from the database, calls one of the functions
below with ``now``, and writes back what changed together with the returned
:class:`Event` list, at the version it read (:mod:`taskhub.services.transitions`). Events
are the audit log *and* the notices: the services layer derives what to tell whom from
them once they are written.

Every function raises :class:`~taskhub.core.errors.ProtocolError` subclasses for a
command the task cannot take, and changes nothing when it raises.

Attempts: a task's attempt fails when a service reports an error, its instance is lost
for good, or its complete or heartbeat timeout passes. With retries left (``retries``,
``-1`` for ever) the task goes back to ``pending`` for the next attempt after an
exponential backoff (:func:`retry_delay`), and a ``retry`` event says why; otherwise it
fails. A cancel or a pickup timeout is never retried; a failed task can be retried on
request (:func:`retry`).

Pickup deadlines: whoever is offered a part, at the start or when it is handed over from
a lost instance or a queue, has the whole pickup timeout from that moment to pick it up.
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
    HELD_ASSIGNMENT_STATES,
    TERMINAL_TASK_STATUSES,
    UNHELD_ASSIGNMENT_STATES,
    AssignmentState,
    AssignmentTrigger,
    TaskStatus,
    TaskTrigger,
    advance_assignment,
    advance_task,
)

#: The failures another attempt may mend.
RETRYABLE = frozenset(
    {
        FailureReason.ERROR,
        FailureReason.WORKER_LOST,
        FailureReason.COMPLETE_TIMEOUT,
        FailureReason.HEARTBEAT_TIMEOUT,
    }
)
#: Why an attempt failed, by the final state of its first failed assignment.
_FAILURE_OF = {
    AssignmentState.FAILED: FailureReason.ERROR,
    AssignmentState.LOST: FailureReason.WORKER_LOST,
    AssignmentState.EXPIRED: FailureReason.PICKUP_TIMEOUT,
}
#: Doublings of the retry backoff past which it cannot grow: 2.0 ** 1024 overflows, and
#: any cap is reached long before.
MAX_DOUBLINGS = 64


@dataclass
class Assignment:
    """One service's part in one attempt of a task, held by one instance (none while it
    waits for one)."""

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
    """The state of one task that the state machine reads and writes.

    Every field but ``id``, ``status``, ``assignments``, ``retry_cap`` and ``jitter`` is
    a column of the task's row of the same name. ``retry_cap`` (seconds) caps a retry's
    backoff and ``jitter`` (0 to 1) spreads it; the caller sets both.
    """

    id: str
    status: TaskStatus = TaskStatus.PENDING
    attempt: int = 1
    pickup_timeout: float | None = None
    complete_timeout: float | None = None
    heartbeat_timeout: float | None = None
    retries: int = 0
    retry_backoff: float = 1.0
    pickup_deadline: datetime | None = None
    complete_deadline: datetime | None = None
    heartbeat_deadline: datetime | None = None
    retry_at: datetime | None = None
    failure_reason: str = ""
    failure_detail: str = ""
    has_result: bool = False
    result: Any = None
    progress: float | None = None
    assignments: list[Assignment] = field(default_factory=list)
    retry_cap: float = field(default=60.0, compare=False)
    jitter: float = field(default=0.5, compare=False)

    def current(self) -> list[Assignment]:
        """The assignments of the current attempt."""
        return [a for a in self.assignments if a.attempt == self.attempt]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_TASK_STATUSES

    @property
    def retries_left(self) -> bool:
        """Whether a failed attempt is followed by another."""
        return self.retries < 0 or self.attempt <= self.retries


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


def retry_delay(task: Task) -> float:
    """Seconds before the attempt after ``task.attempt``: ``retry_backoff`` doubled for
    each attempt that failed before, capped by ``retry_cap``, then jittered into its upper
    half (so that tasks failed together do not come back together). Any attempt number
    gives a finite delay (a task retried for ever reaches attempts beyond 1,024)."""
    doublings = min(task.attempt - 1, MAX_DOUBLINGS)
    delay = min(task.retry_backoff * 2.0**doublings, task.retry_cap)
    return float(delay * (0.5 + 0.5 * task.jitter))


def new_task(
    task_id: str,
    now: datetime,
    *,
    pickup_timeout: float | None,
    complete_timeout: float | None,
    heartbeat_timeout: float | None = None,
    retries: int = 0,
    retry_backoff: float = 1.0,
) -> tuple[Task, list[Event]]:
    """Create a pending task; its pickup deadline runs from ``now``."""
    task = Task(
        id=task_id,
        pickup_timeout=pickup_timeout,
        complete_timeout=complete_timeout,
        heartbeat_timeout=heartbeat_timeout,
        retries=retries,
        retry_backoff=retry_backoff,
        pickup_deadline=_after(now, pickup_timeout),
    )
    return task, [Event(EventKind.INIT)]


def start(task: Task, offers: list[tuple[str, str | None]], now: datetime) -> list[Event]:
    """Offer a pending task to one instance of each subscribed service.

    Args:
        offers: ``(service, instance)`` pairs, one per service; an instance of ``None``
            queues that service's part until one of its instances has room
            (:func:`offer_waiting`). Empty leaves the task pending.

    Raises:
        InvalidTransition: if the task is not pending.
    """
    if not offers:
        return []
    task.status = advance_task(task.status, TaskTrigger.START)
    # Services get the whole pickup timeout from the moment of the offer.
    task.pickup_deadline = _after(now, task.pickup_timeout)
    task.retry_at = None
    events = []
    for service, instance in offers:
        state = AssignmentState.OFFERED if instance is not None else AssignmentState.QUEUED
        task.assignments.append(Assignment(service, instance, task.attempt, state, changed=True))
        if instance is not None:
            events.append(Event(EventKind.START, service, instance, task.attempt))
    return events


def _find(task: Task, service: str, attempt: int, instance: str | None) -> Assignment:
    """The service's assignment that a command of ``instance`` concerns.

    Raises:
        UnknownTask: the task was never offered to ``service``.
        InvalidTransition: ``stale_attempt`` for an attempt that is over, or an
            assignment handed to another instance.
    """
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
            if instance is not None and a.instance != instance and a.state in ACTIVE_ASSIGNMENT_STATES:
                raise InvalidTransition(
                    f"task {task.id} was handed to another instance of {service}", ErrorCode.STALE_ATTEMPT
                )
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


def _finish_task(task: Task, event: TaskTrigger, reason: FailureReason | None = None, detail: str = "") -> list[Event]:
    """Move the task to a final status and close every active assignment."""
    task.status = advance_task(task.status, event)
    closing = AssignmentTrigger.TELL if task.status is TaskStatus.SUCCESS else AssignmentTrigger.ABORT
    for a in task.current():
        if a.active:
            _move(a, closing)
    task.pickup_deadline = task.complete_deadline = task.heartbeat_deadline = task.retry_at = None
    events = []
    if task.status is TaskStatus.FAILED:
        assert reason is not None, "a failure has a reason"
        task.failure_reason, task.failure_detail = reason.value, detail
        events.append(Event(EventKind.FAIL, attempt=task.attempt, data={"reason": reason.value, "detail": detail}))
    events.append(Event(EventKind.END, attempt=task.attempt, data={"status": task.status.value}))
    return events


def _fail_attempt(task: Task, trigger: TaskTrigger, reason: FailureReason, detail: str, now: datetime) -> list[Event]:
    """The attempt failed: retry the task if it may, else fail it."""
    if reason not in RETRYABLE or not task.retries_left:
        return _finish_task(task, trigger, reason, detail)
    task.status = advance_task(task.status, TaskTrigger.RETRY)
    for a in task.current():
        if a.active:
            _move(a, AssignmentTrigger.ABORT)
    delay = retry_delay(task)
    failed = task.attempt
    task.attempt += 1
    task.retry_at = now + timedelta(seconds=delay)
    # The next attempt has the whole pickup timeout from the moment it may be offered.
    task.pickup_deadline = _after(task.retry_at, task.pickup_timeout)
    task.complete_deadline = task.heartbeat_deadline = None
    data = {"reason": reason.value, "detail": detail, "next_attempt": task.attempt, "delay": round(delay, 3)}
    return [Event(EventKind.RETRY, attempt=failed, data=data)]


def _settle(task: Task, now: datetime) -> list[Event]:
    """End the attempt of a started task once every assignment of it is finished."""
    current = task.current()
    if task.status is not TaskStatus.STARTED or any(a.active for a in current):
        return []
    failed = [a for a in current if a.state in FAILED_ASSIGNMENT_STATES]
    if failed:
        first = failed[0]
        return _fail_attempt(task, TaskTrigger.SETTLE_FAILED, _FAILURE_OF[first.state], first.detail, now)
    return _finish_task(task, TaskTrigger.SETTLE_EMPTY)


def _beat(task: Task, now: datetime) -> None:
    """A sign of life from a service: the heartbeat timeout starts again."""
    task.heartbeat_deadline = _after(now, task.heartbeat_timeout)


def _picked_up(task: Task, a: Assignment, attempt: int, now: datetime) -> list[Event]:
    """What a move out of ``offered`` into ``picked_up`` records; the complete deadline
    starts with the attempt's first pickup."""
    if task.complete_deadline is None:
        task.complete_deadline = _after(now, task.complete_timeout)
    _beat(task, now)
    return [Event(EventKind.PICKUP, a.service, a.instance, attempt)]


def pickup(task: Task, service: str, attempt: int, now: datetime, instance: str | None = None) -> list[Event]:
    """The service works on the task: the complete deadline starts with the first pickup.

    ``instance`` is the sending connection's: a command of an instance the task was
    taken from is refused (``None`` skips that check).

    Raises:
        UnknownTask: the task was not offered to ``service``.
        InvalidTransition: the assignment is finished, or ``attempt`` is stale.
    """
    a = _find(task, service, attempt, instance)
    _move(a, AssignmentTrigger.PICKUP)
    return _picked_up(task, a, attempt, now)


def update(
    task: Task,
    service: str,
    attempt: int,
    data: Any,
    progress: float | None,
    now: datetime,
    instance: str | None = None,
) -> list[Event]:
    """Progress from a service; an update on an offered task picks it up.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt, instance)
    before = _move(a, AssignmentTrigger.UPDATE)
    events = _picked_up(task, a, attempt, now) if before is AssignmentState.OFFERED else []
    _beat(task, now)
    if progress is not None:
        task.progress = progress
    events.append(Event(EventKind.UPDATE, service, a.instance, attempt, {"data": data, "progress": progress}))
    return events


def touch(task: Task, service: str, attempt: int, now: datetime, instance: str | None = None) -> list[Event]:
    """The service is alive and still on the task: the heartbeat timeout starts again.

    A touch on an offered task picks it up. It records no event of its own.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt, instance)
    before = _move(a, AssignmentTrigger.TOUCH)
    events = _picked_up(task, a, attempt, now) if before is AssignmentState.OFFERED else []
    _beat(task, now)
    return events


def return_result(
    task: Task, service: str, attempt: int, result: Any, now: datetime, instance: str | None = None
) -> list[Event]:
    """A service returns a result. The first return completes the task.

    A return from a service that was told (another service completed the task first)
    is recorded as ``late_return`` and not delivered.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt, instance)
    _move(a, AssignmentTrigger.RETURN)
    if a.state is AssignmentState.TOLD:
        return [Event(EventKind.LATE_RETURN, service, a.instance, attempt, {"result": result})]
    task.has_result, task.result = True, result
    events = [Event(EventKind.SUCCESS, service, a.instance, attempt, {"result": result})]
    return events + _finish_task(task, TaskTrigger.SUCCEED)


def drop(task: Task, service: str, attempt: int, now: datetime, instance: str | None = None) -> list[Event]:
    """A service is done without a result.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt, instance)
    _move(a, AssignmentTrigger.DROP)
    return [Event(EventKind.DROP, service, a.instance, attempt)] + _settle(task, now)


def fail(
    task: Task, service: str, attempt: int, detail: str, now: datetime, instance: str | None = None
) -> list[Event]:
    """A service reports that it failed (its handler raised).

    The attempt fails once no other service of it is still on it.

    Raises:
        UnknownTask, InvalidTransition: as :func:`pickup`.
    """
    a = _find(task, service, attempt, instance)
    _move(a, AssignmentTrigger.FAIL)
    a.detail = detail
    return [Event(EventKind.ERROR, service, a.instance, attempt, {"detail": detail})] + _settle(task, now)


def release_instance(task: Task, instance: str, successors: dict[str, str], now: datetime) -> list[Event]:
    """The instance is gone for good: each of its parts in the current attempt goes to
    another live instance of the same service (``successors``: service to instance), or
    waits for one until the pickup timeout. Either way the service has the whole pickup
    timeout from ``now``: the task may have run longer than that already.

    Returns:
        ``lost`` for each part it held, and ``start`` for each handed over.
    """
    events = []
    for a in task.current():
        if a.instance != instance or a.state not in HELD_ASSIGNMENT_STATES:
            continue
        events.append(Event(EventKind.LOST, a.service, instance, a.attempt))
        successor = successors.get(a.service)
        if successor is not None:
            _move(a, AssignmentTrigger.HAND_OVER)
            a.instance, a.changed = successor, True
            events.append(Event(EventKind.START, a.service, successor, a.attempt))
        else:
            _move(a, AssignmentTrigger.ORPHAN)
            a.instance, a.changed = None, True
            a.detail = "its instance was lost; waiting for another instance of the service"
        task.pickup_deadline = _after(now, task.pickup_timeout)
    return events


def offer_waiting(task: Task, service: str, instance: str, now: datetime) -> list[Event]:
    """Hand a service's queued or waiting part to one of its live instances, which has the
    whole pickup timeout from ``now`` to pick it up.

    Raises:
        InvalidTransition: the service has no such part in the current attempt.
    """
    for a in task.current():
        if a.service == service and a.state in UNHELD_ASSIGNMENT_STATES:
            _move(a, AssignmentTrigger.HAND_OVER)
            a.instance, a.detail, a.changed = instance, "", True
            task.pickup_deadline = _after(now, task.pickup_timeout)
            return [Event(EventKind.START, service, instance, a.attempt)]
    raise InvalidTransition(f"task {task.id} has no part of {service} waiting for an instance")


def cancel(task: Task, by: str, now: datetime) -> list[Event]:
    """The publisher or an operator (``by``) cancels the task: it fails at once with
    reason ``cancelled``, and every service still on it is told.

    Raises:
        InvalidTransition: the task is already finished.
    """
    return _finish_task(task, TaskTrigger.CANCEL, FailureReason.CANCELLED, f"cancelled by {by}")


def retry(task: Task, by: str, now: datetime) -> list[Event]:
    """Retry a failed task on request (its publisher's or an operator's): its next
    attempt may be offered at once.

    Raises:
        InvalidTransition: the task did not fail.
    """
    task.status = advance_task(task.status, TaskTrigger.RERUN)
    data = {"reason": task.failure_reason, "detail": task.failure_detail, "next_attempt": task.attempt + 1, "by": by}
    failed = task.attempt
    task.attempt += 1
    task.failure_reason = task.failure_detail = ""
    task.retry_at = None
    task.pickup_deadline = _after(now, task.pickup_timeout)
    return [Event(EventKind.RETRY, attempt=failed, data=data)]


def expire(task: Task, now: datetime) -> list[Event]:
    """Apply whatever deadlines have passed at ``now``; nothing if none has.

    A pending task whose retry is due only forgets its ``retry_at``: dispatch offers it.
    """
    if task.status is TaskStatus.PENDING:
        if task.pickup_deadline is not None and task.pickup_deadline <= now:
            return _finish_task(
                task,
                TaskTrigger.PICKUP_TIMEOUT,
                FailureReason.PICKUP_TIMEOUT,
                "no service subscribed within the pickup timeout",
            )
        if task.retry_at is not None and task.retry_at <= now:
            task.retry_at = None
        return []
    if task.status is not TaskStatus.STARTED:
        return []
    if task.complete_deadline is not None and task.complete_deadline <= now:
        return _fail_attempt(
            task,
            TaskTrigger.COMPLETE_TIMEOUT,
            FailureReason.COMPLETE_TIMEOUT,
            "the task did not finish within its complete timeout",
            now,
        )
    if task.heartbeat_deadline is not None and task.heartbeat_deadline <= now:
        return _fail_attempt(
            task,
            TaskTrigger.HEARTBEAT_TIMEOUT,
            FailureReason.HEARTBEAT_TIMEOUT,
            "no update or touch within the heartbeat timeout",
            now,
        )
    events = []
    if task.pickup_deadline is not None and task.pickup_deadline <= now:
        task.pickup_deadline = None
        for a in task.current():
            if a.state is AssignmentState.OFFERED:
                _move(a, AssignmentTrigger.PICKUP_TIMEOUT)
                events.append(Event(EventKind.SEEN, a.service, a.instance, a.attempt))
            elif a.state is AssignmentState.WAITING:
                _move(a, AssignmentTrigger.LOSE)
                a.detail = "its instance was lost, and no other instance of the service came in time"
                events.append(Event(EventKind.LOST, a.service, None, a.attempt))
            elif a.state is AssignmentState.QUEUED:
                _move(a, AssignmentTrigger.PICKUP_TIMEOUT)
                a.detail = f"no instance of {a.service} had room within the pickup timeout"
    return events + _settle(task, now)


def next_deadline(task: Task) -> datetime | None:
    """When :func:`expire` must next look at the task; ``None`` for never."""
    candidates: list[datetime | None]
    if task.status is TaskStatus.PENDING:
        candidates = [task.pickup_deadline, task.retry_at]
    elif task.status is TaskStatus.STARTED:
        candidates = [task.complete_deadline, task.heartbeat_deadline]
        if any(a.state is AssignmentState.OFFERED or a.state in UNHELD_ASSIGNMENT_STATES for a in task.current()):
            candidates.append(task.pickup_deadline)
    else:
        return None
    present = [d for d in candidates if d is not None]
    return min(present) if present else None
