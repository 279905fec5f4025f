"""An ``end`` carried inside the task event before it: folded by the hub, unfolded by the
client, and what is not a carrier left alone."""

from __future__ import annotations

import copy

import pytest

from taskhub.core.ends import fold_ends, unfold_end

TASK = "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"
OTHER = "5b2f0a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"
SUCCESS = {"type": "success", "task": TASK, "seq": 4, "attempt": 1, "service": "w", "result": 7}
END = {"type": "end", "task": TASK, "seq": 5, "attempt": 1, "status": "success"}
INSIDE = {"seq": 5, "attempt": 1, "status": "success"}


def test_an_end_after_an_event_rides_inside_it_and_the_messages_are_not_changed():
    messages = [SUCCESS, END]
    before = copy.deepcopy(messages)
    assert fold_ends(messages) == [({**SUCCESS, "end": INSIDE}, [SUCCESS, END])]
    assert messages == before  # shared by the process's connections


@pytest.mark.parametrize(
    "messages",
    [
        [END],  # nothing before it
        [{"type": "task", "task": TASK, "attempt": 1}, END],  # an offer carries none
        [{**SUCCESS, "task": OTHER}, END],  # another task's
        [END, {**END, "seq": 6}],  # an end carries none
    ],
)
def test_an_end_with_no_event_of_its_task_before_it_goes_alone(messages):
    assert [frame for frame, _ in fold_ends(messages)] == messages


def test_only_the_end_right_after_an_event_rides_and_each_carrier_carries_one():
    update = {"type": "update", "task": TASK, "seq": 3, "attempt": 1, "data": 1}
    retry = {"type": "retry", "task": TASK, "seq": 6, "attempt": 1, "next_attempt": 2}
    frames = fold_ends([update, SUCCESS, END, retry])
    assert [frame for frame, _ in frames] == [update, {**SUCCESS, "end": INSIDE}, retry]
    assert [len(carried) for _, carried in frames] == [1, 2, 1]


def test_unfolding_gives_back_the_two_events():
    assert unfold_end({**SUCCESS, "end": INSIDE}) == [SUCCESS, END]
    failed = {"type": "fail", "task": TASK, "seq": 8, "attempt": 2, "reason": "error", "detail": "x"}
    assert unfold_end({**failed, "end": {"seq": 9, "attempt": 2, "status": "failed"}}) == [
        failed,
        {"type": "end", "task": TASK, "seq": 9, "attempt": 2, "status": "failed"},
    ]


@pytest.mark.parametrize(
    "frame",
    [
        SUCCESS,
        END,
        {"type": "ack", "ref": 1, "end": INSIDE},  # not a task event
        {**SUCCESS, "end": None},
        {**SUCCESS, "end": [5]},
        [SUCCESS],
        "text",
    ],
)
def test_what_carries_no_end_is_left_as_it_came(frame):
    assert unfold_end(frame) == [frame]


def test_folding_then_unfolding_is_the_identity():
    messages = [{"type": "update", "task": TASK, "seq": 3, "attempt": 1, "data": 1}, SUCCESS, END]
    unfolded = [obj for frame, _ in fold_ends(messages) for obj in unfold_end(frame)]
    assert unfolded == messages
