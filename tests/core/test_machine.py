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


def test_a_lost_instance_with_no_heir_leaves_its_part_waiting_then_fails_with_worker_lost():
    task = started("a")
    machine.pickup(task, "a", 1, at(1))
    assert kinds(machine.release_instance(task, "other", {}, at(2))) == []
    events = machine.release_instance(task, "a-1", {}, at(2))
    assert kinds(events) == ["lost"] and task.status is TaskStatus.STARTED
    (part,) = task.current()
    assert (part.state, part.instance) == (AssignmentState.WAITING, None)
    # The service has the whole pickup timeout (10 s) from the loss to bring an instance.
    assert machine.next_deadline(task) == at(12)
    assert machine.expire(task, at(11.9)) == []
    events = machine.expire(task, at(12))
    assert kinds(events) == ["lost", "fail", "end"]
    assert (task.status, task.failure_reason) == (TaskStatus.FAILED, "worker_lost")


def test_a_lost_instance_hands_its_part_to_an_heir_of_the_same_service():
    task = started("a", "b")
    machine.pickup(task, "a", 1, at(1))
    events = machine.release_instance(task, "a-1", {"a": "a-2"}, at(2))
    assert [(e.kind, e.service, e.instance) for e in events] == [("lost", "a", "a-1"), ("start", "a", "a-2")]
    part = next(a for a in task.current() if a.service == "a")
    assert (part.state, part.instance) == (AssignmentState.OFFERED, "a-2")
    # The lost instance is fenced; the heir works as usual.
    with pytest.raises(InvalidTransition, match="handed to another instance") as info:
        machine.update(task, "a", 1, "late", None, at(3), instance="a-1")
    assert info.value.code == "stale_attempt"
    assert kinds(machine.return_result(task, "a", 1, "r", at(3), instance="a-2")) == ["success", "end"]


def test_a_waiting_part_goes_to_the_first_instance_that_comes():
    task = started("a")
    machine.release_instance(task, "a-1", {}, at(1))
    events = machine.offer_waiting(task, "a", "a-3", at(2))
    assert [(e.kind, e.instance) for e in events] == [("start", "a-3")]
    assert task.current()[0].state is AssignmentState.OFFERED
    with pytest.raises(InvalidTransition, match="no part of a waiting"):
        machine.offer_waiting(task, "a", "a-4", at(3))


def test_a_service_whose_instances_are_all_busy_waits_for_one():
    task, _ = machine.new_task("t1", T0, pickup_timeout=10, complete_timeout=None)
    events = machine.start(task, [("a", None), ("b", "b-1")], T0)
    assert [(e.service, e.instance) for e in events] == [("b", "b-1")]
    assert {a.service: a.state for a in task.current()} == {"a": AssignmentState.QUEUED, "b": AssignmentState.OFFERED}
    machine.drop(task, "b", 1, at(1))
    assert task.status is TaskStatus.STARTED  # a is still on it
    # An instance of a gets room: it has the whole pickup timeout from the offer.
    assert kinds(machine.offer_waiting(task, "a", "a-1", at(8))) == ["start"]
    assert task.current()[0].state is AssignmentState.OFFERED
    assert machine.next_deadline(task) == at(18)
    assert machine.expire(task, at(17.9)) == []


def test_a_part_queued_for_a_busy_service_fails_the_task_with_pickup_timeout_and_is_not_retried():
    task, _ = machine.new_task("t1", T0, pickup_timeout=10, complete_timeout=None, retries=5)
    assert machine.start(task, [("a", None)], T0) == []
    assert task.status is TaskStatus.STARTED and machine.next_deadline(task) == at(10)
    assert machine.expire(task, at(9.9)) == []
    events = machine.expire(task, at(10))
    assert kinds(events) == ["fail", "end"]  # not a retry: a pickup timeout is never retried
    assert (task.status, task.failure_reason) == (TaskStatus.FAILED, "pickup_timeout")
    assert task.failure_detail == "no instance of a had room within the pickup timeout"
    assert task.current()[0].state is AssignmentState.EXPIRED


def test_a_queued_part_that_expires_beside_a_working_service_fails_the_attempt_only_if_none_returns():
    task, _ = machine.new_task("t1", T0, pickup_timeout=10, complete_timeout=None)
    machine.start(task, [("a", None), ("b", "b-1")], T0)
    machine.pickup(task, "b", 1, at(1))
    assert machine.expire(task, at(10)) == []  # b still works on it
    assert task.current()[0].state is AssignmentState.EXPIRED
    assert kinds(machine.return_result(task, "b", 1, "r", at(11))) == ["success", "end"]


def test_a_part_handed_over_after_the_pickup_timeout_has_a_pickup_timeout_of_its_own():
    task = started("a", pickup=10, complete=100)
    machine.pickup(task, "a", 1, at(1))
    # It runs past its pickup timeout; then its instance is lost and another takes over.
    events = machine.release_instance(task, "a-1", {"a": "a-2"}, at(30))
    assert [(e.kind, e.instance) for e in events] == [("lost", "a-1"), ("start", "a-2")]
    assert machine.next_deadline(task) == at(40)
    assert machine.expire(task, at(31)) == []  # offered to a-2, not seen
    assert task.current()[0].state is AssignmentState.OFFERED
    assert kinds(machine.pickup(task, "a", 1, at(35), instance="a-2")) == ["pickup"]
    assert kinds(machine.return_result(task, "a", 1, "r", at(36), instance="a-2")) == ["success", "end"]


def test_a_waiting_part_offered_late_has_a_pickup_timeout_of_its_own():
    task = started("a", pickup=10)
    machine.release_instance(task, "a-1", {}, at(1))  # waits until 11
    machine.offer_waiting(task, "a", "a-2", at(10))
    assert machine.next_deadline(task) == at(20)
    assert machine.expire(task, at(11)) == []


def failing(retries=2, backoff=1.0, **options):
    options = {"pickup_timeout": 10, "complete_timeout": None, **options}
    task, _ = machine.new_task("t1", T0, retries=retries, retry_backoff=backoff, **options)
    task.jitter = 1.0  # the full backoff, for round numbers
    machine.start(task, [("a", "a-1")], T0)
    return task


def test_a_failed_attempt_is_retried_after_its_backoff_with_a_new_attempt_number():
    task = failing(retries=2)
    events = machine.fail(task, "a", 1, "boom", at(1))
    assert kinds(events) == ["error", "retry"]
    retry = events[1]
    assert retry.attempt == 1
    assert retry.data == {"reason": "error", "detail": "boom", "next_attempt": 2, "delay": 1.0}
    assert (task.status, task.attempt, task.retry_at) == (TaskStatus.PENDING, 2, at(2))
    assert task.failure_reason == ""  # the task has not failed
    assert machine.next_deadline(task) == at(2)  # the sweeper offers it then
    assert machine.expire(task, at(2)) == [] and task.retry_at is None
    assert machine.next_deadline(task) == at(12)  # the pickup timeout counts from the retry
    # Attempt 1 is over: its stale actors are refused.
    with pytest.raises(InvalidTransition, match="attempt 1 of task t1 is over") as info:
        machine.update(task, "a", 1, None, None, at(2))
    assert info.value.code == "stale_attempt"
    machine.start(task, [("a", "a-1")], at(2))
    assert kinds(machine.fail(task, "a", 2, "boom", at(3))) == ["error", "retry"]
    assert task.retry_at == at(5)  # 2 s: the backoff doubles
    machine.start(task, [("a", "a-1")], at(5))
    events = machine.fail(task, "a", 3, "boom again", at(6))
    assert kinds(events) == ["error", "fail", "end"]  # no retries left
    assert (task.status, task.failure_reason, task.failure_detail) == (TaskStatus.FAILED, "error", "boom again")


def test_the_backoff_is_capped_and_jittered_into_its_upper_half():
    task = failing(retries=-1, backoff=10)
    task.retry_cap = 15
    task.attempt = 5
    assert machine.retry_delay(task) == 15  # 10 * 2**4 capped
    task.jitter = 0.0
    assert machine.retry_delay(task) == 7.5
    task.attempt, task.jitter = 1, 0.5
    assert machine.retry_delay(task) == 7.5


def test_the_backoff_of_a_task_retried_for_ever_stays_finite():
    task = failing(retries=-1, backoff=10**9)
    task.retry_cap = 60
    for attempt in (1025, 1026, 10**6):
        task.attempt = attempt
        assert machine.retry_delay(task) == 60
    # An attempt that far on fails and is retried like the first.
    task.assignments.append(machine.Assignment("a", "a-1", 10**6, AssignmentState.PICKED_UP))
    events = machine.fail(task, "a", 10**6, "again", at(2))
    assert kinds(events) == ["error", "retry"] and task.retry_at == at(62)


def test_retries_for_ever():
    task = failing(retries=-1)
    for attempt in range(1, 30):
        assert kinds(machine.fail(task, "a", attempt, "x", at(attempt))) == ["error", "retry"]
        machine.start(task, [("a", "a-1")], at(attempt))
    assert task.attempt == 30


@pytest.mark.parametrize(
    ("lose", "reason"),
    [
        (lambda task: machine.expire(task, at(20)), "pickup_timeout"),
        (lambda task: machine.cancel(task, "app", at(1)), "cancelled"),
    ],
)
def test_a_pickup_timeout_or_a_cancel_is_never_retried(lose, reason):
    task, _ = machine.new_task("t1", T0, pickup_timeout=10, complete_timeout=None, retries=5)
    assert kinds(lose(task)) == ["fail", "end"]
    assert task.failure_reason == reason


def test_a_lost_worker_and_timeouts_are_retried():
    task = failing(retries=3, complete_timeout=5)
    machine.pickup(task, "a", 1, at(1))
    events = machine.expire(task, at(6))
    assert kinds(events) == ["retry"] and events[0].data["reason"] == "complete_timeout"
    machine.start(task, [("a", "a-1")], at(7))
    machine.release_instance(task, "a-1", {}, at(8))
    events = machine.expire(task, at(18))
    assert kinds(events) == ["lost", "retry"] and events[1].data["reason"] == "worker_lost"


def test_a_heartbeat_is_kept_by_updates_and_touches_and_expires_in_silence():
    task = failing(retries=0, heartbeat_timeout=3)
    assert machine.next_deadline(task) == at(10)  # offered: the pickup timeout
    machine.pickup(task, "a", 1, at(1))
    assert machine.next_deadline(task) == at(4)
    machine.update(task, "a", 1, "x", 0.5, at(3))
    assert task.heartbeat_deadline == at(6)
    assert machine.touch(task, "a", 1, at(5)) == []  # a touch records no event
    assert task.heartbeat_deadline == at(8)
    assert machine.expire(task, at(7.9)) == []
    events = machine.expire(task, at(8))
    assert kinds(events) == ["fail", "end"]
    assert task.failure_reason == "heartbeat_timeout"
    assert task.failure_detail == "no update or touch within the heartbeat timeout"


def test_a_touch_on_an_offered_task_picks_it_up():
    task = failing(heartbeat_timeout=3)
    assert kinds(machine.touch(task, "a", 1, at(1))) == ["pickup"]
    assert task.current()[0].state is AssignmentState.PICKED_UP


def test_cancel_fails_a_pending_or_started_task_and_tells_its_services():
    pending, _ = machine.new_task("t1", T0, pickup_timeout=10, complete_timeout=None)
    assert kinds(machine.cancel(pending, "app", at(1))) == ["fail", "end"]
    task = started("a", "b")
    machine.pickup(task, "a", 1, at(1))
    events = machine.cancel(task, "operator", at(2))
    assert [e.data for e in events] == [
        {"reason": "cancelled", "detail": "cancelled by operator"},
        {"status": "failed"},
    ]
    assert {a.state for a in task.current()} == {AssignmentState.ABORTED}
    with pytest.raises(InvalidTransition, match="cannot cancel a task in state 'failed'"):
        machine.cancel(task, "app", at(3))


def test_a_failed_task_is_retried_on_request_at_once():
    task = failing(retries=0)
    machine.fail(task, "a", 1, "boom", at(1))
    events = machine.retry(task, "app", at(5))
    assert kinds(events) == ["retry"]
    assert events[0].data == {"reason": "error", "detail": "boom", "next_attempt": 2, "by": "app"}
    assert (task.status, task.attempt, task.failure_reason, task.retry_at) == (TaskStatus.PENDING, 2, "", None)
    assert machine.next_deadline(task) == at(15)
    done = started("a")
    machine.return_result(done, "a", 1, "r", at(1))
    with pytest.raises(InvalidTransition, match="cannot rerun a task in state 'success'"):
        machine.retry(done, "app", at(2))
    machine.start(task, [("a", "a-1")], at(5))
    with pytest.raises(InvalidTransition, match="cannot rerun a task in state 'started'"):
        machine.retry(task, "app", at(6))


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
