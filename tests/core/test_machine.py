"""The task aggregate: every lifecycle path, with the clock passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from taskhub.core import machine
from taskhub.core.errors import InvalidTransition, UnknownTask
from taskhub.core.states import AssignmentState, TaskStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def kinds(events):
    return [e.kind for e in events]


def started(*services, pickup=10.0, complete=60.0):
    task, events = machine.new_task("t1", T0, pickup_timeout=pickup, complete_timeout=complete)
    assert kinds(events) == ["init"]
    machine.start(task, [(s, f"{s}-1") for s in services], T0)
    return task


def test_new_task_is_pending_with_pickup_deadline():
    task, _ = machine.new_task("t1", T0, pickup_timeout=5, complete_timeout=None)
    assert task.status is TaskStatus.PENDING
    assert machine.next_deadline(task) == at(5)


def test_start_without_offers_keeps_the_task_pending():
    task, _ = machine.new_task("t1", T0, pickup_timeout=5, complete_timeout=None)
    assert machine.start(task, [], T0) == []
    assert task.status is TaskStatus.PENDING


def test_start_offers_one_assignment_per_service_and_resets_pickup_deadline():
    task, _ = machine.new_task("t1", T0, pickup_timeout=5, complete_timeout=None)
    events = machine.start(task, [("a", "a-1"), ("b", "b-1")], at(3))
    assert kinds(events) == ["start", "start"]
    assert [(e.service, e.instance) for e in events] == [("a", "a-1"), ("b", "b-1")]
    assert task.status is TaskStatus.STARTED
    assert machine.next_deadline(task) == at(8)


def test_start_twice_is_rejected():
    task = started("a")
    with pytest.raises(InvalidTransition):
        machine.start(task, [("b", "b-1")], T0)


def test_happy_path_pickup_update_return():
    task = started("a")
    assert kinds(machine.pickup(task, "a", 1, at(1))) == ["pickup"]
    assert task.complete_deadline == at(61)
    assert machine.next_deadline(task) == at(61)
    events = machine.update(task, "a", 1, {"sent": 1}, 0.5, at(2))
    assert kinds(events) == ["update"] and events[0].data == {"data": {"sent": 1}, "progress": 0.5}
    assert task.progress == 0.5
    events = machine.return_result(task, "a", 1, {"ok": True}, at(3))
    assert kinds(events) == ["success", "end"]
    assert task.status is TaskStatus.SUCCESS and task.result == {"ok": True} and task.has_result
    assert machine.next_deadline(task) is None


def test_update_picks_up_an_offered_task():
    task = started("a")
    assert kinds(machine.update(task, "a", 1, None, None, at(1))) == ["pickup", "update"]
    assert task.assignments[0].state is AssignmentState.PICKED_UP


def test_return_without_pickup_succeeds():
    task = started("a")
    assert kinds(machine.return_result(task, "a", 1, 7, at(1))) == ["success", "end"]


def test_first_return_wins_and_others_are_told_then_late_return_is_recorded():
    task = started("a", "b")
    machine.pickup(task, "b", 1, at(1))
    machine.return_result(task, "a", 1, "A", at(2))
    assert task.assignments[1].state is AssignmentState.TOLD
    events = machine.return_result(task, "b", 1, "B", at(3))
    assert kinds(events) == ["late_return"]
    assert task.result == "A"


def test_update_after_success_is_rejected():
    task = started("a", "b")
    machine.return_result(task, "a", 1, "A", at(2))
    with pytest.raises(InvalidTransition, match="state 'told'"):
        machine.update(task, "b", 1, {}, None, at(3))


def test_all_drop_ends_without_result():
    task = started("a", "b")
    assert kinds(machine.drop(task, "a", 1, at(1))) == ["drop"]
    assert kinds(machine.drop(task, "b", 1, at(2))) == ["drop", "end"]
    assert task.status is TaskStatus.ENDED and not task.has_result


def test_fail_waits_for_the_others_then_fails_with_error():
    task = started("a", "b")
    machine.pickup(task, "b", 1, at(1))
    assert kinds(machine.fail(task, "a", 1, "boom", at(2))) == ["error"]
    assert task.status is TaskStatus.STARTED
    events = machine.drop(task, "b", 1, at(3))
    assert kinds(events) == ["drop", "fail", "end"]
    assert (task.failure_reason, task.failure_detail) == ("error", "boom")


def test_fail_alone_fails_the_task():
    task = started("a")
    assert kinds(machine.fail(task, "a", 1, "ValueError: bad", at(1))) == ["error", "fail", "end"]
    assert task.status is TaskStatus.FAILED and task.failure_reason == "error"


def test_another_service_can_still_succeed_after_one_failed():
    task = started("a", "b")
    machine.fail(task, "a", 1, "boom", at(1))
    machine.return_result(task, "b", 1, "ok", at(2))
    assert task.status is TaskStatus.SUCCESS


def test_lost_instance_fails_with_worker_lost():
    task = started("a")
    machine.pickup(task, "a", 1, at(1))
    assert kinds(machine.lose_instance(task, "other", at(2))) == []
    events = machine.lose_instance(task, "a-1", at(2))
    assert kinds(events) == ["lost", "fail", "end"]
    assert task.failure_reason == "worker_lost"


def test_pickup_timeout_while_pending_fails_the_task():
    task, _ = machine.new_task("t1", T0, pickup_timeout=5, complete_timeout=None)
    assert machine.expire(task, at(4.9)) == []
    events = machine.expire(task, at(5))
    assert kinds(events) == ["fail", "end"]
    assert task.status is TaskStatus.FAILED and task.failure_reason == "pickup_timeout"


def test_no_pickup_timeout_waits_forever():
    task, _ = machine.new_task("t1", T0, pickup_timeout=None, complete_timeout=None)
    assert machine.next_deadline(task) is None
    assert machine.expire(task, at(10**6)) == []


def test_offered_but_not_picked_up_is_seen_and_ends_without_result():
    task = started("a", "b", pickup=10)
    machine.pickup(task, "b", 1, at(1))
    events = machine.expire(task, at(10))
    assert kinds(events) == ["seen"]
    assert task.assignments[0].state is AssignmentState.SEEN
    assert machine.next_deadline(task) == at(61)
    assert kinds(machine.drop(task, "b", 1, at(11))) == ["drop", "end"]
    assert task.status is TaskStatus.ENDED


def test_everyone_only_seeing_it_ends_it():
    task = started("a", pickup=10)
    assert kinds(machine.expire(task, at(10))) == ["seen", "end"]


def test_complete_timeout_fails_and_aborts_active_assignments():
    task = started("a", "b", pickup=10, complete=20)
    machine.pickup(task, "a", 1, at(1))
    events = machine.expire(task, at(21))
    assert kinds(events) == ["fail", "end"]
    assert task.failure_reason == "complete_timeout"
    assert [a.state for a in task.assignments] == [AssignmentState.ABORTED, AssignmentState.ABORTED]


def test_commands_from_a_service_not_on_the_task_are_unknown():
    task = started("a")
    with pytest.raises(UnknownTask):
        machine.pickup(task, "z", 1, at(1))


def test_stale_attempt_is_fenced():
    task = started("a")
    task.attempt = 2
    with pytest.raises(InvalidTransition) as info:
        machine.update(task, "a", 1, {}, None, at(1))
    assert info.value.code == "stale_attempt"


def test_finished_assignment_rejects_more_commands_and_changes_nothing():
    task = started("a", "b")
    machine.drop(task, "a", 1, at(1))
    before = [a.state for a in task.assignments]
    for command in (
        lambda: machine.pickup(task, "a", 1, at(2)),
        lambda: machine.drop(task, "a", 1, at(2)),
        lambda: machine.fail(task, "a", 1, "x", at(2)),
        lambda: machine.return_result(task, "a", 1, 1, at(2)),
    ):
        with pytest.raises(InvalidTransition):
            command()
    assert [a.state for a in task.assignments] == before
    assert task.status is TaskStatus.STARTED


def test_expire_on_finished_task_does_nothing():
    task = started("a")
    machine.return_result(task, "a", 1, 1, at(1))
    assert machine.expire(task, at(10**6)) == []
