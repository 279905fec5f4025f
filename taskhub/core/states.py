"""The task state machine, as data.

Rule 1: everything that changes a task's or an assignment's state is listed in the two
tables below. Code elsewhere calls :func:`advance_task` or :func:`advance_assignment`
and never assigns a state itself.

Rule 2: an illegal move is rejected in one place, with a message that names the event
and the state (``cannot drop an assignment in state 'told'``).

A *task* moves ``pending -> started -> success | failed | ended``. Each service the
hub offers the task to gets an *assignment* (its part in the task, for one attempt),
which moves ``offered -> picked_up -> returned | dropped | failed | ...``. A started
task settles when every assignment of its current attempt is finished.

An assignment starts ``offered``, or ``queued`` when every instance of its service was
busy (its concurrency): it is offered to the first with room (``hand_over``) or, at the
pickup timeout, ``expired``, which fails the attempt with ``pickup_timeout`` (never
retried). A part whose instance is gone for good goes to another instance of the service
(``hand_over``) or ``waiting`` for one, and is ``lost`` (``worker_lost``, which may be
retried) if none comes within the pickup timeout.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from .errors import InvalidTransition


class TaskStatus(StrEnum):
    PENDING = "pending"  # persisted, waiting for a subscriber (or for its retry)
    STARTED = "started"  # offered to the subscribed services
    SUCCESS = "success"  # a service returned a result
    FAILED = "failed"  # see Task.failure_reason
    ENDED = "ended"  # every service saw or dropped it: no result


class TaskTrigger(StrEnum):
    START = "start"  # offered to at least one service
    SUCCEED = "succeed"  # the first return
    SETTLE_EMPTY = "settle_empty"  # all assignments finished, none returned or failed
    SETTLE_FAILED = "settle_failed"  # all finished, none returned, at least one failed
    PICKUP_TIMEOUT = "pickup_timeout"  # nobody subscribed in time
    COMPLETE_TIMEOUT = "complete_timeout"  # picked up, but no end in time
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"  # picked up, but no update or touch in time
    CANCEL = "cancel"  # the caller or an operator cancelled it
    RETRY = "retry"  # a failed attempt is followed by another (after its backoff)
    RERUN = "rerun"  # a failed task is run again on request


TASK_TRANSITIONS: dict[TaskStatus, dict[TaskTrigger, TaskStatus]] = {
    TaskStatus.PENDING: {
        TaskTrigger.START: TaskStatus.STARTED,
        TaskTrigger.PICKUP_TIMEOUT: TaskStatus.FAILED,
        TaskTrigger.CANCEL: TaskStatus.FAILED,
    },
    TaskStatus.STARTED: {
        TaskTrigger.SUCCEED: TaskStatus.SUCCESS,
        TaskTrigger.SETTLE_EMPTY: TaskStatus.ENDED,
        TaskTrigger.SETTLE_FAILED: TaskStatus.FAILED,
        TaskTrigger.COMPLETE_TIMEOUT: TaskStatus.FAILED,
        TaskTrigger.HEARTBEAT_TIMEOUT: TaskStatus.FAILED,
        TaskTrigger.CANCEL: TaskStatus.FAILED,
        TaskTrigger.RETRY: TaskStatus.PENDING,
    },
    TaskStatus.SUCCESS: {},
    TaskStatus.FAILED: {TaskTrigger.RERUN: TaskStatus.PENDING},
    TaskStatus.ENDED: {},
}

TERMINAL_TASK_STATUSES = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.ENDED})


class AssignmentState(StrEnum):
    OFFERED = "offered"  # sent to one instance of the service
    PICKED_UP = "picked_up"  # the service works on it; the hub waits
    QUEUED = "queued"  # every instance of the service was busy: waiting for one with room
    WAITING = "waiting"  # its instance is gone: waiting for another of the service
    RETURNED = "returned"  # the service returned a result
    DROPPED = "dropped"  # the service finished without a result
    FAILED = "failed"  # the service reported an error
    LOST = "lost"  # its instance disconnected while holding it
    SEEN = "seen"  # not picked up within the pickup timeout: a passive listener
    EXPIRED = "expired"  # queued, and no instance of the service had room within the pickup timeout
    TOLD = "told"  # another service completed the task
    ABORTED = "aborted"  # the hub failed or cancelled the task


class AssignmentTrigger(StrEnum):
    PICKUP = "pickup"
    UPDATE = "update"
    TOUCH = "touch"  # alive, without news
    RETURN = "return"
    DROP = "drop"
    FAIL = "fail"
    LOSE = "lose"  # its instance is gone and nobody took it over in time
    HAND_OVER = "hand_over"  # offered to another instance of the service
    ORPHAN = "orphan"  # its instance is gone and no other of the service is live
    PICKUP_TIMEOUT = "pickup_timeout"  # offered but not picked up, or queued, in time
    TELL = "tell"
    ABORT = "abort"


_FINISH = {
    AssignmentTrigger.RETURN: AssignmentState.RETURNED,
    AssignmentTrigger.DROP: AssignmentState.DROPPED,
    AssignmentTrigger.FAIL: AssignmentState.FAILED,
    AssignmentTrigger.LOSE: AssignmentState.LOST,
    AssignmentTrigger.TELL: AssignmentState.TOLD,
    AssignmentTrigger.ABORT: AssignmentState.ABORTED,
}

# An instance that is gone hands its part over to another of the service, or leaves it
# waiting for one.
_RELEASE = {
    AssignmentTrigger.HAND_OVER: AssignmentState.OFFERED,
    AssignmentTrigger.ORPHAN: AssignmentState.WAITING,
}

ASSIGNMENT_TRANSITIONS: dict[AssignmentState, dict[AssignmentTrigger, AssignmentState]] = {
    AssignmentState.OFFERED: {
        AssignmentTrigger.PICKUP: AssignmentState.PICKED_UP,
        # An update or a touch implies work: it picks the task up (and records a pickup).
        AssignmentTrigger.UPDATE: AssignmentState.PICKED_UP,
        AssignmentTrigger.TOUCH: AssignmentState.PICKED_UP,
        AssignmentTrigger.PICKUP_TIMEOUT: AssignmentState.SEEN,
        **_FINISH,
        **_RELEASE,
    },
    AssignmentState.PICKED_UP: {
        AssignmentTrigger.UPDATE: AssignmentState.PICKED_UP,
        AssignmentTrigger.TOUCH: AssignmentState.PICKED_UP,
        **_FINISH,
        **_RELEASE,
    },
    # Never offered: every instance of the service was busy. Not picked up in time, it
    # fails the attempt as a task nobody subscribed to does (pickup_timeout).
    AssignmentState.QUEUED: {
        AssignmentTrigger.HAND_OVER: AssignmentState.OFFERED,
        AssignmentTrigger.PICKUP_TIMEOUT: AssignmentState.EXPIRED,
        AssignmentTrigger.TELL: AssignmentState.TOLD,
        AssignmentTrigger.ABORT: AssignmentState.ABORTED,
    },
    AssignmentState.WAITING: {
        AssignmentTrigger.HAND_OVER: AssignmentState.OFFERED,
        AssignmentTrigger.LOSE: AssignmentState.LOST,
        AssignmentTrigger.TELL: AssignmentState.TOLD,
        AssignmentTrigger.ABORT: AssignmentState.ABORTED,
    },
    AssignmentState.RETURNED: {},
    AssignmentState.DROPPED: {},
    AssignmentState.FAILED: {},
    AssignmentState.LOST: {},
    AssignmentState.SEEN: {},
    AssignmentState.EXPIRED: {},
    # Another service completed the task first: a return that crossed the news is
    # recorded (a late_return event), not delivered.
    AssignmentState.TOLD: {AssignmentTrigger.RETURN: AssignmentState.TOLD},
    AssignmentState.ABORTED: {},
}

#: The states in which the service is still on the task (the hub waits for it).
ACTIVE_ASSIGNMENT_STATES = frozenset(
    {AssignmentState.OFFERED, AssignmentState.PICKED_UP, AssignmentState.QUEUED, AssignmentState.WAITING}
)
#: The states in which an instance holds the assignment.
HELD_ASSIGNMENT_STATES = frozenset({AssignmentState.OFFERED, AssignmentState.PICKED_UP})
#: The states in which the assignment waits for an instance of its service.
UNHELD_ASSIGNMENT_STATES = frozenset({AssignmentState.QUEUED, AssignmentState.WAITING})
#: The final states that fail the attempt (unless another service returned).
FAILED_ASSIGNMENT_STATES = frozenset({AssignmentState.FAILED, AssignmentState.LOST, AssignmentState.EXPIRED})


def _advance(table: dict[Any, dict[Any, Any]], state: Any, trigger: Any, what: str) -> Any:
    try:
        return table[state][trigger]
    except KeyError:
        raise InvalidTransition(f"cannot {trigger.value} {what} in state {state.value!r}") from None


def advance_task(status: TaskStatus, trigger: TaskTrigger) -> TaskStatus:
    """Return the status a task in ``status`` moves to on ``trigger``.

    Raises:
        InvalidTransition: if the table has no such move.
    """
    return TaskStatus(_advance(TASK_TRANSITIONS, status, trigger, "a task"))


def advance_assignment(state: AssignmentState, trigger: AssignmentTrigger) -> AssignmentState:
    """Return the state an assignment in ``state`` moves to on ``trigger``.

    Raises:
        InvalidTransition: if the table has no such move.
    """
    return AssignmentState(_advance(ASSIGNMENT_TRANSITIONS, state, trigger, "an assignment"))
