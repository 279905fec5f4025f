"""Retention: old finished tasks deleted in batches with their events and assignments, by
``purge``, by the sweepers (``TASKHUB_KEEP_SUCCEEDED``/``TASKHUB_KEEP_FAILED``) and by
``manage.py taskhub_purge``; purgers racing each other and transitions."""

from __future__ import annotations

import io
import logging
import re
import threading
import uuid
from collections import Counter
from datetime import datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from taskhub import services, sweeper
from taskhub.core.errors import UnknownTask
from taskhub.core.states import TERMINAL_TASK_STATUSES
from taskhub.management.commands.taskhub_purge import duration
from taskhub.models import Assignment, TaskEvent, TaskRecord
from taskhub.services import retention

from .conftest import TIMEOUT, make_credential, pub_command, task_command
from .test_races import race
from .test_services import live_instance

pytestmark = pytest.mark.django_db

NOW = timezone.now()
DAY = timedelta(days=1)
UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")


def make_task(status: str, finished_ago: timedelta | None, *, events: int = 3, at: datetime = NOW) -> uuid.UUID:
    """A task in ``status`` that finished ``finished_ago`` before ``at`` (``None``: not
    finished), with ``events`` events and one assignment."""
    finished = None if finished_ago is None else at - finished_ago
    created = (finished or at) - timedelta(seconds=5)
    task = TaskRecord.objects.create(
        action="mail:send",
        publisher_name="app",
        payload={"to": "a@example.org"},
        status=status,
        created_at=created,
        started_at=created,
        finished_at=finished,
    )
    for i in range(events):
        TaskEvent.objects.create(task=task, kind="update", service="mailer", data={"i": i}, created_at=created)
    Assignment.objects.create(task=task, service="mailer", state="returned", created_at=created, updated_at=created)
    return task.pk


def rows(task_id: uuid.UUID) -> tuple[bool, int, int]:
    """Whether the task is there, and how many events and assignments it has."""
    return (
        TaskRecord.objects.filter(pk=task_id).exists(),
        TaskEvent.objects.filter(task_id=task_id).count(),
        Assignment.objects.filter(task_id=task_id).count(),
    )


GONE = (False, 0, 0)
KEPT = (True, 3, 1)


def deletes(queries: CaptureQueriesContext, table: type[TaskRecord] | type[TaskEvent] | type[Assignment]) -> list[str]:
    name = table._meta.db_table
    return [q["sql"] for q in queries.captured_queries if q["sql"].startswith(f'DELETE FROM "{name}"')]


# -- purge --------------------------------------------------------------------------------


def test_purge_deletes_the_old_tasks_of_a_status_with_their_events_and_assignments_only():
    old_success = make_task("success", 2 * DAY)
    young_success = make_task("success", DAY / 2)
    old_failed = make_task("failed", 2 * DAY)
    old_ended = make_task("ended", 2 * DAY)

    purged = retention.purge(statuses=["success"], older_than=NOW - DAY)

    assert (purged.tasks, purged.events, purged.assignments) == ({"success": 1}, {"success": 3}, {"success": 1})
    assert purged.total == 1 and not purged.more
    assert rows(old_success) == GONE
    assert rows(young_success) == rows(old_failed) == rows(old_ended) == KEPT


def test_purge_goes_through_every_finished_status_by_default_and_by_age():
    old = {status: make_task(status, 3 * DAY) for status in ("success", "failed", "ended")}
    young = {status: make_task(status, DAY) for status in ("success", "failed", "ended")}

    purged = retention.purge(older_than=NOW - 2 * DAY)

    assert purged.tasks == {"success": 1, "failed": 1, "ended": 1}
    assert all(rows(task_id) == GONE for task_id in old.values())
    assert all(rows(task_id) == KEPT for task_id in young.values())


def test_a_task_published_and_returned_through_the_hub_is_purged_with_everything_it_wrote():
    mailer, _ = make_credential("mailer", sub=["mail"])
    app, _ = make_credential("app", pub=["mail"])
    live_instance(mailer, "chan-mailer")
    publisher = live_instance(app, "chan-app", subscribe=False)
    now = timezone.now()
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), now, publisher.pk)
    returned = task_command({"type": "return", "task": task_id, "attempt": 1, "result": 1})
    services.act(mailer, returned, now, "chan-mailer")
    assert rows(uuid.UUID(task_id)) == (True, 4, 1)  # init, start, success, end

    assert retention.purge(older_than=timezone.now() - DAY).total == 0  # it just finished
    purged = retention.purge(older_than=timezone.now() + timedelta(seconds=1))

    assert purged.tasks == {"success": 1} and rows(uuid.UUID(task_id)) == GONE


def test_every_finished_status_and_no_other_has_a_setting_that_says_how_long_it_is_kept():
    assert set(retention.KEEP_SETTING) == set(retention.FINISHED) == TERMINAL_TASK_STATUSES
    assert set(retention.KEEP_SETTING.values()) == {"KEEP_SUCCEEDED", "KEEP_FAILED"}


def test_pending_and_started_tasks_are_never_deleted_however_old():
    pending = make_task("pending", None, at=NOW - 30 * DAY)
    # Even with a finish time left over (a failed task retried on request runs again).
    started = make_task("started", 30 * DAY)

    purged = retention.purge(older_than=NOW + DAY)

    assert purged.total == 0
    assert rows(pending) == rows(started) == KEPT
    for status in ("pending", "started", "bogus"):
        with pytest.raises(ValueError, match="not a finished status"):
            retention.purge(statuses=[status], older_than=NOW)


@pytest.mark.parametrize(("option", "value"), [("batch", 0), ("batch", -3), ("limit", 0), ("batch", 2.5)])
def test_purge_refuses_a_batch_or_limit_that_is_not_a_positive_integer(option, value):
    make_task("success", 2 * DAY)
    with pytest.raises(ValueError, match=f"{option} must be a positive integer"):
        retention.purge(older_than=NOW, **{option: value})
    assert TaskRecord.objects.count() == 1


def test_purge_deletes_in_batches_of_at_most_batch_tasks_one_transaction_each():
    old = [make_task("success", DAY + timedelta(seconds=i)) for i in range(10)]
    young = make_task("success", DAY / 2)

    with CaptureQueriesContext(connection) as queries:
        purged = retention.purge(statuses=["success"], older_than=NOW - DAY / 2 - timedelta(seconds=1), batch=3)

    assert purged.total == 10 and purged.batches == 4
    assert all(rows(task_id) == GONE for task_id in old) and rows(young) == KEPT
    for table in (TaskRecord, TaskEvent, Assignment):
        statements = deletes(queries, table)
        assert len(statements) == 4, statements
        # Each statement names the ids of its batch's tasks: 3, 3, 3 and 1.
        assert sorted(len(set(UUID.findall(sql))) for sql in statements) == [1, 3, 3, 3]
    # No statement deletes without naming its tasks (no unbounded DELETE ... WHERE status).
    assert not [q for q in queries.captured_queries if q["sql"].startswith("DELETE") and "IN (" not in q["sql"]]
    # Each batch its own transaction: committed as it goes (savepoints under the test's).
    assert sum(1 for q in queries.captured_queries if q["sql"].startswith("SAVEPOINT")) == 4


def test_purge_deletes_the_oldest_first_and_stops_at_the_limit():
    tasks = [make_task("failed", DAY + timedelta(hours=i)) for i in range(6)]  # the last one is the oldest

    purged = retention.purge(statuses=["failed"], older_than=NOW - DAY / 2, batch=3, limit=4)

    assert purged.total == 4 and purged.more
    assert [rows(task_id) == GONE for task_id in tasks] == [False, False, True, True, True, True]
    rest = retention.purge(statuses=["failed"], older_than=NOW - DAY / 2, batch=3, limit=4)
    assert rest.total == 2 and not rest.more


def test_a_dry_run_changes_nothing_and_counts_what_a_purge_then_deletes():
    # Several tasks finished at the same moment: the dry run's walk must count each once.
    same = NOW - 2 * DAY
    for status in ("success", "success", "failed"):
        for _ in range(3):
            make_task(status, NOW - same)
    make_task("ended", 3 * DAY, events=5)
    keep = make_task("success", DAY / 2)
    before = (TaskRecord.objects.count(), TaskEvent.objects.count(), Assignment.objects.count())

    dry = retention.purge(older_than=NOW - DAY, batch=2, dry_run=True)

    assert (TaskRecord.objects.count(), TaskEvent.objects.count(), Assignment.objects.count()) == before
    assert dry.tasks == {"success": 6, "failed": 3, "ended": 1}
    assert dry.events == {"success": 18, "failed": 9, "ended": 5}
    assert dry.assignments == {"success": 6, "failed": 3, "ended": 1}
    real = retention.purge(older_than=NOW - DAY, batch=2)
    assert (real.tasks, real.events, real.assignments) == (dry.tasks, dry.events, dry.assignments)
    assert TaskRecord.objects.get().pk == keep


def test_a_dry_run_with_a_limit_counts_the_tasks_a_purge_with_that_limit_deletes():
    for i in range(5):
        make_task("success", DAY + timedelta(hours=i), events=i)

    dry = retention.purge(older_than=NOW - DAY / 2, batch=2, limit=3, dry_run=True)
    real = retention.purge(older_than=NOW - DAY / 2, batch=2, limit=3)

    assert dry.more and real.more
    assert (dry.tasks, dry.events) == (real.tasks, real.events) == ({"success": 3}, {"success": 4 + 3 + 2})


# -- retention by the settings ------------------------------------------------------------


def test_expire_history_does_nothing_without_a_query_when_both_settings_are_none():
    make_task("success", 300 * DAY)
    with CaptureQueriesContext(connection) as queries:
        purged = retention.expire_history(NOW)
    assert purged.total == 0 and not purged.more
    assert queries.captured_queries == []
    assert TaskRecord.objects.count() == 1


@override_settings(TASKHUB_KEEP_FAILED=7 * 86400)
def test_expire_history_with_nothing_to_delete_is_one_indexed_query_per_status_concerned():
    make_task("failed", DAY)
    make_task("success", 300 * DAY)  # KEEP_SUCCEEDED is None: kept for ever

    with CaptureQueriesContext(connection) as queries:
        purged = retention.expire_history(NOW)

    assert purged.total == 0 and not purged.more
    selects = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert len(selects) == 1 and "LIMIT" in selects[0]
    assert TaskRecord.objects.count() == 2


@override_settings(TASKHUB_KEEP_SUCCEEDED=3600, TASKHUB_KEEP_FAILED=86400)
def test_expire_history_keeps_succeeded_and_ended_tasks_for_keep_succeeded_and_failed_ones_for_keep_failed():
    hour = timedelta(hours=1)
    deleted = [make_task("success", 2 * hour), make_task("ended", 2 * hour), make_task("failed", 2 * DAY)]
    kept = [make_task("success", hour / 2), make_task("ended", hour / 2), make_task("failed", 2 * hour)]
    kept.append(make_task("started", 2 * DAY))

    purged = retention.expire_history(NOW)

    assert purged.tasks == {"success": 1, "ended": 1, "failed": 1} and not purged.more
    assert [rows(task_id) for task_id in deleted] == [GONE] * 3
    assert [rows(task_id) for task_id in kept] == [KEPT] * 4


@override_settings(TASKHUB_KEEP_SUCCEEDED=3600, TASKHUB_KEEP_FAILED=3600, TASKHUB_PURGE_BATCH=2)
def test_expire_history_deletes_at_most_its_budget_of_batches_taking_the_statuses_in_turn():
    for _ in range(9):
        make_task("success", DAY)
    for _ in range(3):
        make_task("failed", DAY)

    with CaptureQueriesContext(connection) as queries:
        first = retention.expire_history(NOW, budget=3)

    # Success, failed, success: a backlog of one status does not hold up the other.
    assert (first.tasks, first.more) == ({"success": 4, "failed": 2}, True)
    assert len(deletes(queries, TaskRecord)) == 3
    second = retention.expire_history(NOW, budget=3)
    assert (second.tasks, second.more) == ({"success": 4, "failed": 1}, True)
    third = retention.expire_history(NOW, budget=3)
    assert (third.tasks, third.more) == ({"success": 1}, False)
    assert TaskRecord.objects.count() == 0


# -- the sweeper --------------------------------------------------------------------------


@sync_to_async
def make_tasks(status: str, finished_ago: timedelta, count: int = 1, at: datetime = NOW) -> list[uuid.UUID]:
    return [make_task(status, finished_ago, at=at) for _ in range(count)]


@sync_to_async
def left() -> Counter[str]:
    return Counter(TaskRecord.objects.values_list("status", flat=True))


@pytest.mark.django_db(transaction=True)
@override_settings(TASKHUB_KEEP_SUCCEEDED=3600, TASKHUB_KEEP_FAILED=86400)
async def test_the_sweepers_pass_applies_the_settings_and_logs_what_it_deleted(caplog):
    now = timezone.now()
    await make_tasks("success", timedelta(hours=2), 2, at=now)
    await make_tasks("success", timedelta(minutes=30), at=now)
    await make_tasks("failed", timedelta(hours=2), at=now)
    await make_tasks("failed", 2 * DAY, 2, at=now)
    await make_tasks("ended", timedelta(hours=2), at=now)

    with caplog.at_level(logging.INFO, logger="taskhub.sweeper"):
        await sweeper.sweep_once(now)

    assert await left() == {"success": 1, "failed": 1}
    assert "retention: deleted 1 ended, 2 failed, 2 success tasks (15 events)" in caplog.messages


@pytest.mark.django_db(transaction=True)
@override_settings(TASKHUB_KEEP_SUCCEEDED=3600, TASKHUB_PURGE_BATCH=2, TASKHUB_SWEEP_INTERVAL=1.0)
async def test_a_backlog_is_worked_off_a_budget_per_pass_then_retention_waits_its_interval():
    now = timezone.now()
    budget = retention.EXPIRE_BUDGET
    await make_tasks("success", DAY, 2 * budget * 2 + 1, at=now)  # two passes' worth, and one

    await sweeper.sweep_once(now)
    assert await left() == {"success": 2 * budget + 1}
    # The next pass goes on with it, however soon.
    await sweeper.sweep_once(now + timedelta(seconds=1))
    assert await left() == {"success": 1}
    await sweeper.sweep_once(now + timedelta(seconds=2))
    assert await left() == {}
    # Nothing left: retention waits its interval, then deletes what has aged since.
    await make_tasks("success", DAY, at=now)
    await sweeper.sweep_once(now + timedelta(seconds=3))
    assert await left() == {"success": 1}
    await sweeper.sweep_once(now + timedelta(seconds=3 + sweeper.RETENTION_INTERVAL))
    assert await left() == {}


@pytest.mark.django_db(transaction=True)
@override_settings(TASKHUB_KEEP_FAILED=3600, TASKHUB_SWEEP_INTERVAL=1.0)
async def test_a_failing_retention_is_logged_and_the_sweeper_goes_on(monkeypatch, caplog):
    now = timezone.now()
    await make_tasks("failed", DAY, at=now)

    def broken(self: retention.Expiry) -> retention.Purged:
        raise RuntimeError("disk full")

    monkeypatch.setattr(retention.Expiry, "step", broken)
    with caplog.at_level(logging.ERROR, logger="taskhub.sweeper"):
        await sweeper.sweep_once(now)  # does not raise
    assert "retention failed" in caplog.text and "disk full" in caplog.text
    assert await left() == {"failed": 1}

    monkeypatch.undo()
    await sweeper.sweep_once(now + timedelta(seconds=sweeper.RETENTION_INTERVAL))
    assert await left() == {}


@pytest.mark.django_db(transaction=True)
async def test_the_sweeper_runs_no_retention_batch_when_both_settings_are_none(monkeypatch):
    calls = []
    monkeypatch.setattr(retention.Expiry, "step", lambda self: calls.append(self))
    await make_tasks("success", 300 * DAY)

    await sweeper.sweep_once()

    assert calls == [] and await left() == {"success": 1}


# -- the command --------------------------------------------------------------------------


def purge_command(*args: str) -> str:
    out = io.StringIO()
    call_command("taskhub_purge", *args, stdout=out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 12 * 3600), ("90m", 90 * 60), ("3600s", 3600), ("2w", 14 * 86400), ("45", 45)],
)
def test_durations(text, seconds):
    assert duration(text) == timedelta(seconds=seconds)


def test_the_command_deletes_what_is_older_than_asked_and_says_so_per_status():
    make_task("success", 3 * DAY)
    make_task("success", 3 * DAY)
    make_task("failed", 3 * DAY)
    young = make_task("failed", DAY)

    out = purge_command("--older-than", "2d")

    lines = out.splitlines()
    assert lines[0].startswith("success: deleted 2 tasks (6 events, 2 assignments) that finished before ")
    assert lines[1].startswith("failed: deleted 1 tasks (3 events, 1 assignments)")
    assert lines[2].startswith("ended: deleted 0 tasks")
    assert lines[3] == "Deleted 3 tasks in 3 batches."
    assert [task.pk for task in TaskRecord.objects.all()] == [young]


def test_the_commands_dry_run_says_what_it_would_delete_and_deletes_nothing():
    make_task("failed", 3 * DAY)
    make_task("success", 3 * DAY)

    out = purge_command("--older-than", "48h", "--status", "failed", "--dry-run")

    assert out.splitlines()[0].startswith("failed: would delete 1 tasks (3 events, 1 assignments)")
    assert out.splitlines()[-1] == "Would delete 1 tasks in 1 batches."
    assert TaskRecord.objects.count() == 2 and TaskEvent.objects.count() == 6


@override_settings(TASKHUB_KEEP_SUCCEEDED=3600)
def test_the_command_goes_by_the_settings_without_older_than():
    make_task("success", timedelta(hours=2))
    make_task("ended", timedelta(hours=2))
    kept = [make_task("success", timedelta(minutes=30)), make_task("failed", 30 * DAY)]

    out = purge_command("--batch", "1")

    assert "failed: kept (TASKHUB_KEEP_FAILED is None)" in out.splitlines()
    assert out.splitlines()[-1] == "Deleted 2 tasks in 4 batches."
    assert sorted(task.pk for task in TaskRecord.objects.all()) == sorted(kept)


def test_the_command_stops_at_its_limit_and_says_more_may_be_left():
    for _ in range(3):
        make_task("success", 3 * DAY)
    make_task("failed", 3 * DAY)

    out = purge_command("--older-than", "1d", "--limit", "2")

    assert out.splitlines()[-1] == "Deleted 2 tasks in 1 batches. Stopped at --limit: more may be left."
    assert TaskRecord.objects.count() == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "3x"], "invalid duration '3x'"),
        (["--older-than=-1d"], "invalid duration '-1d'"),
        (["--older-than", "d"], "invalid duration 'd'"),
        (["--older-than", "1d", "--status", "pending"], "pending tasks are not finished and never purged"),
        (["--older-than", "1d", "--status", "bogus"], "unknown status 'bogus'"),
        (["--older-than", "1d", "--batch", "0"], "'0' is not a positive integer"),
        (["--older-than", "1d", "--limit", "x"], "'x' is not a positive integer"),
        ([], "nothing says how old tasks must be: give --older-than, or set TASKHUB_KEEP_SUCCEEDED"),
        (
            ["--status", "failed"],
            "nothing says how old failed tasks must be: give --older-than or set TASKHUB_KEEP_FAILED",
        ),
    ],
)
def test_the_command_refuses_bad_input_and_deletes_nothing(args, message):
    make_task("success", 300 * DAY)
    with pytest.raises(CommandError, match=re.escape(message)):
        purge_command(*args)
    assert TaskRecord.objects.count() == 1


@override_settings(TASKHUB_KEEP_SUCCEEDED=3600)
def test_the_command_refuses_a_status_whose_setting_is_none_when_asked_for_it():
    make_task("failed", 300 * DAY)
    with pytest.raises(CommandError, match="set TASKHUB_KEEP_FAILED"):
        purge_command("--status", "failed", "--status", "success")
    assert TaskRecord.objects.count() == 1


# -- races --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_purgers_at_once_delete_each_task_once_and_nothing_else():
    old = [make_task("success", DAY + timedelta(seconds=i)) for i in range(30)]
    young = make_task("success", DAY / 2)
    running = make_task("started", 3 * DAY)

    def purger() -> retention.Purged:
        return retention.purge(older_than=NOW - DAY / 2 - timedelta(seconds=1), batch=3)

    results = race([purger, purger])

    assert not [r for r in results if isinstance(r, Exception)], results
    # No task counted twice: the two purgers' counts add up to what was there.
    assert sum(r.total for r in results) == 30
    assert sum(sum(r.events.values()) for r in results) == 90
    assert all(rows(task_id) == GONE for task_id in old)
    assert rows(young) == rows(running) == KEPT


@pytest.mark.django_db(transaction=True)
def test_a_failed_task_retried_while_purged_is_either_gone_whole_or_retried_whole():
    tasks = [make_task("failed", 2 * DAY + timedelta(seconds=i)) for i in range(40)]
    events_before = {task_id: TaskEvent.objects.filter(task_id=task_id).count() for task_id in tasks}

    def retry_all() -> list[str]:
        outcomes = []
        for task_id in tasks:  # the youngest first: the purge starts at the other end
            try:
                services.retry(None, str(task_id), timezone.now(), "operator")
                outcomes.append("retried")
            except UnknownTask:
                outcomes.append("gone")
        return outcomes

    def purger() -> retention.Purged:
        return retention.purge(statuses=["failed"], older_than=NOW - DAY, batch=5)

    purged, outcomes = race([purger, retry_all])

    assert not isinstance(purged, Exception) and not isinstance(outcomes, Exception), (purged, outcomes)
    assert purged.total == outcomes.count("gone")
    for task_id in tasks:
        there, events, assignments = rows(task_id)
        if there:  # retried: running again, with every event it had and the retry's
            assert TaskRecord.objects.get(pk=task_id).status == "pending"
            assert events > events_before[task_id] and assignments == 1
        else:
            assert (events, assignments) == (0, 0)


def pause_after_select(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the next purge batch stop between its select and its deletes: it sets the
    first event once it holds its tasks and waits for the second to go on."""
    selected, go = threading.Event(), threading.Event()
    delete = retention.delete_tasks

    def paused(task_ids):
        if not selected.is_set():
            selected.set()
            assert go.wait(TIMEOUT)
        return delete(task_ids)

    monkeypatch.setattr(retention, "delete_tasks", paused)
    return selected, go


def give_up_on_locks_at_once() -> None:
    """This connection's statements fail at once where they would wait for a lock."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET lock_timeout = '1ms'")
        else:
            cursor.execute("PRAGMA busy_timeout = 1")


@pytest.mark.django_db(transaction=True)
def test_a_batch_holds_its_tasks_from_its_select_to_its_deletes(monkeypatch):
    """A retry that comes between a batch's select and its deletes must wait for the
    batch (here it gives up at once instead), and then finds no task: never a task
    retried, running, and then deleted with its events."""
    task_id = make_task("failed", 2 * DAY)
    selected, go = pause_after_select(monkeypatch)

    def purger() -> retention.Purged:
        return retention.purge(statuses=["failed"], older_than=NOW - DAY)

    def retry() -> None:
        assert selected.wait(TIMEOUT)
        try:
            give_up_on_locks_at_once()
            services.retry(None, str(task_id), timezone.now(), "operator")
        finally:
            go.set()

    purged, retried = race([purger, retry])

    assert isinstance(retried, OperationalError), retried
    assert isinstance(purged, retention.Purged) and purged.tasks == {"failed": 1}
    assert rows(task_id) == GONE


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite has one writer: a second purger waits its turn")
def test_a_second_purger_skips_the_tasks_the_first_holds_instead_of_waiting(monkeypatch):
    tasks = [make_task("success", DAY + timedelta(seconds=i)) for i in range(10)]
    selected, go = pause_after_select(monkeypatch)

    def first() -> retention.Purged:
        return retention.purge(statuses=["success"], older_than=NOW - DAY / 2, batch=4)

    def second() -> retention.Purged:
        assert selected.wait(TIMEOUT)
        try:
            give_up_on_locks_at_once()  # waiting for the first would fail this purge
            return retention.purge(statuses=["success"], older_than=NOW - DAY / 2, batch=4)
        finally:
            go.set()

    one, two = race([first, second])

    assert isinstance(one, retention.Purged) and isinstance(two, retention.Purged), (one, two)
    # The first's batch (the 4 oldest) went by the first; the second took all the rest.
    assert (one.total, two.total) == (4, 6)
    assert all(rows(task_id) == GONE for task_id in tasks)
