from __future__ import annotations

import pytest

from taskhub.core.errors import InvalidTransition
from taskhub.core.states import (
    ASSIGNMENT_TRANSITIONS,
    TASK_TRANSITIONS,
    TERMINAL_TASK_STATUSES,
    AssignmentState,
    AssignmentTrigger,
    TaskStatus,
    TaskTrigger,
    advance_assignment,
    advance_task,
)

TASK_CASES = [(s, e) for s in TaskStatus for e in TaskTrigger]
ASSIGNMENT_CASES = [(s, e) for s in AssignmentState for e in AssignmentTrigger]


def test_every_state_has_a_row():
    assert set(TASK_TRANSITIONS) == set(TaskStatus)
    assert set(ASSIGNMENT_TRANSITIONS) == set(AssignmentState)


@pytest.mark.parametrize(("status", "event"), TASK_CASES)
def test_task_transitions_follow_the_table(status, event):
    expected = TASK_TRANSITIONS[status].get(event)
    if expected is None:
        with pytest.raises(InvalidTransition, match=f"cannot {event.value} a task in state '{status.value}'") as info:
            advance_task(status, event)
        assert info.value.code == "invalid_transition"
    else:
        assert advance_task(status, event) is expected


@pytest.mark.parametrize(("state", "event"), ASSIGNMENT_CASES)
def test_assignment_transitions_follow_the_table(state, event):
    expected = ASSIGNMENT_TRANSITIONS[state].get(event)
    if expected is None:
        with pytest.raises(InvalidTransition, match=f"cannot {event.value} an assignment in state '{state.value}'"):
            advance_assignment(state, event)
    else:
        assert advance_assignment(state, event) is expected


def test_terminal_statuses_only_leave_by_retry():
    for status in TERMINAL_TASK_STATUSES:
        assert set(TASK_TRANSITIONS[status]) <= {TaskTrigger.RETRY}
    assert TaskStatus.PENDING not in TERMINAL_TASK_STATUSES


def test_finished_assignments_take_no_event():
    for state in AssignmentState:
        if state not in (AssignmentState.OFFERED, AssignmentState.PICKED_UP):
            assert ASSIGNMENT_TRANSITIONS[state] == {}


def test_pickup_timeout_only_makes_offered_assignments_seen():
    assert advance_assignment(AssignmentState.OFFERED, AssignmentTrigger.PICKUP_TIMEOUT) is AssignmentState.SEEN
    with pytest.raises(InvalidTransition):
        advance_assignment(AssignmentState.PICKED_UP, AssignmentTrigger.PICKUP_TIMEOUT)
