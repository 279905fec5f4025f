"""The transition tables, checked against moves written out by hand (h11's way): a wrong
table fails here, whatever the table says."""

from __future__ import annotations

import pytest

from taskhub.core.errors import InvalidTransition
from taskhub.core.states import (
    ASSIGNMENT_TRANSITIONS,
    TASK_TRANSITIONS,
    AssignmentState,
    AssignmentTrigger,
    TaskStatus,
    TaskTrigger,
    advance_assignment,
    advance_task,
)

P, S, OK, F, E = "pending", "started", "success", "failed", "ended"
TASK_MOVES = [
    (P, "start", S),
    (P, "pickup_timeout", F),
    (P, "cancel", F),
    (S, "succeed", OK),
    (S, "settle_empty", E),
    (S, "settle_failed", F),
    (S, "complete_timeout", F),
    (S, "heartbeat_timeout", F),
    (S, "cancel", F),
    (S, "retry", P),  # a failed attempt, with retries left
    (F, "rerun", P),  # a failed task, retried on request
]

FINISHING = [
    ("return", "returned"),
    ("drop", "dropped"),
    ("fail", "failed"),
    ("lose", "lost"),
    ("tell", "told"),
    ("abort", "aborted"),
]
# The instance holding a part is gone for good: another instance takes it over, or it
# waits for one.
RELEASING = [("hand_over", "offered"), ("orphan", "waiting")]
ASSIGNMENT_MOVES = [
    ("offered", "pickup", "picked_up"),
    ("offered", "update", "picked_up"),  # an update picks the task up
    ("offered", "touch", "picked_up"),  # so does a touch
    ("offered", "pickup_timeout", "seen"),
    *(("offered", trigger, target) for trigger, target in FINISHING + RELEASING),
    ("picked_up", "update", "picked_up"),
    ("picked_up", "touch", "picked_up"),
    *(("picked_up", trigger, target) for trigger, target in FINISHING + RELEASING),
    ("queued", "hand_over", "offered"),  # an instance of the busy service has room
    ("queued", "pickup_timeout", "expired"),  # none had room in time
    ("queued", "tell", "told"),
    ("queued", "abort", "aborted"),
    ("waiting", "hand_over", "offered"),
    ("waiting", "lose", "lost"),  # nobody took it over within the pickup timeout
    ("waiting", "tell", "told"),
    ("waiting", "abort", "aborted"),
    ("told", "return", "told"),  # a late return: recorded, not delivered
]


@pytest.mark.parametrize(("state", "trigger", "expected"), TASK_MOVES)
def test_task_moves(state, trigger, expected):
    assert advance_task(TaskStatus(state), TaskTrigger(trigger)) is TaskStatus(expected)


@pytest.mark.parametrize(("state", "trigger", "expected"), ASSIGNMENT_MOVES)
def test_assignment_moves(state, trigger, expected):
    assert advance_assignment(AssignmentState(state), AssignmentTrigger(trigger)) is AssignmentState(expected)


def test_the_tables_hold_these_moves_and_no_others():
    task_table = {
        (s.value, t.value, target.value) for s, moves in TASK_TRANSITIONS.items() for t, target in moves.items()
    }
    assert task_table == set(TASK_MOVES)
    assignment_table = {
        (s.value, t.value, target.value) for s, moves in ASSIGNMENT_TRANSITIONS.items() for t, target in moves.items()
    }
    assert assignment_table == set(ASSIGNMENT_MOVES)
    assert set(TASK_TRANSITIONS) == set(TaskStatus)
    assert set(ASSIGNMENT_TRANSITIONS) == set(AssignmentState)


ILLEGAL_TASK = [
    (s, t) for s in TaskStatus for t in TaskTrigger if (s.value, t.value) not in {m[:2] for m in TASK_MOVES}
]
ILLEGAL_ASSIGNMENT = [
    (s, t)
    for s in AssignmentState
    for t in AssignmentTrigger
    if (s.value, t.value) not in {m[:2] for m in ASSIGNMENT_MOVES}
]


@pytest.mark.parametrize(("status", "trigger"), ILLEGAL_TASK)
def test_illegal_task_moves_are_refused_in_one_place(status, trigger):
    with pytest.raises(InvalidTransition, match=f"cannot {trigger.value} a task in state '{status.value}'") as info:
        advance_task(status, trigger)
    assert info.value.code == "invalid_transition"


@pytest.mark.parametrize(("state", "trigger"), ILLEGAL_ASSIGNMENT)
def test_illegal_assignment_moves_are_refused_in_one_place(state, trigger):
    with pytest.raises(InvalidTransition, match=f"cannot {trigger.value} an assignment in state '{state.value}'"):
        advance_assignment(state, trigger)


def test_examples_of_refusals_a_user_meets():
    with pytest.raises(InvalidTransition, match="cannot drop an assignment in state 'told'"):
        advance_assignment(AssignmentState.TOLD, AssignmentTrigger.DROP)
    with pytest.raises(InvalidTransition, match="cannot update an assignment in state 'aborted'"):
        advance_assignment(AssignmentState.ABORTED, AssignmentTrigger.UPDATE)
    with pytest.raises(InvalidTransition, match="cannot start a task in state 'success'"):
        advance_task(TaskStatus.SUCCESS, TaskTrigger.START)
