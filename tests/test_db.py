"""The hub's database threads (taskhub.db)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from taskhub import db, services
from taskhub.models import Credential, Instance

from .conftest import TIMEOUT, make_credential

pytestmark = pytest.mark.django_db(transaction=True)


@override_settings(TASKHUB_SQLITE_INLINE=False)
async def test_calls_run_on_a_database_thread_and_return_or_raise():
    def add(a: int, b: int = 0) -> int:  # not a lambda: mypy infers no lambda's types through a ParamSpec
        return a + b

    assert (await db.run(threading.current_thread)).name.startswith("taskhub-db")
    assert await db.run(add, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        await db.run(lambda: 1 / 0)


async def test_work_done_on_a_database_thread_is_committed():
    await db.run(make_credential, "svc")
    assert await db.run(lambda: Credential.objects.filter(name="svc").exists())


def test_one_thread_on_sqlite_eight_elsewhere_unless_set():
    assert db.thread_count() == (1 if connection.vendor == "sqlite" else db.DEFAULT_THREADS)
    with override_settings(TASKHUB_DB_THREADS=3):
        assert db.thread_count() == 3


@override_settings(TASKHUB_DB_THREADS=3)
async def test_several_threads_when_configured():
    barrier = threading.Barrier(3, timeout=5)

    def meet() -> str:
        barrier.wait()  # only passes if three calls run at once
        return threading.current_thread().name

    names = await asyncio.gather(*(db.run(meet) for _ in range(3)))
    assert len(set(names)) == 3


def test_an_answer_for_a_closed_event_loop_does_not_kill_the_thread():
    loop = asyncio.new_event_loop()
    call = db._Call(lambda: 1, loop)
    loop.close()
    call.answer(True, 1)  # would raise RuntimeError in the database thread


@override_settings(TASKHUB_SQLITE_INLINE=False)
async def test_shutdown_closes_connections_and_later_calls_start_new_threads():
    def connected() -> bool:
        Credential.objects.exists()
        return connection.connection is not None

    assert await db.run(connected)
    first = await db.run(threading.current_thread)
    db.shutdown()
    assert not first.is_alive()
    assert await db.run(connected)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="group commit is for SQLite's one writer")
@override_settings(TASKHUB_SQLITE_INLINE=False)
async def test_calls_queued_on_sqlite_commit_together_and_a_failing_one_undoes_only_itself():
    started, release = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait(5)

    def create(name: str, fail: bool = False) -> bool:
        make_credential(name)
        if fail:
            raise ValueError(name)
        return connection.in_atomic_block  # inside the group's transaction

    blocker = asyncio.ensure_future(db.run(hold))
    await asyncio.to_thread(started.wait, 5)
    calls = [asyncio.ensure_future(db.run(create, n, fail=n == "b")) for n in ("a", "b", "c")]
    # Not a timed wait: sleep(0) yields once, and each task runs up to its queue put.
    await asyncio.sleep(0)
    release.set()
    assert await blocker
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], ValueError)
    names = await db.run(lambda: sorted(Credential.objects.values_list("name", flat=True)))
    assert names == ["a", "c"]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="WAL checkpoints are SQLite's")
async def test_sqlite_hub_threads_leave_checkpoints_to_the_checkpointer():
    def autocheckpoint() -> int:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_autocheckpoint")
            return int(cursor.fetchone()[0])

    def wal_size_limit() -> int:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_size_limit")
            return int(cursor.fetchone()[0])

    assert await db.run(autocheckpoint) == 0
    assert await asyncio.to_thread(autocheckpoint) > 0  # other connections (manage.py, admin) keep SQLite's default
    assert await db.run(wal_size_limit) == db.WAL_SIZE_LIMIT
    await db.run(make_credential, "svc")
    busy, frames, done = await db.run(db.checkpoint)
    assert (busy, done) == (0, frames)


sqlite_only = pytest.mark.skipif(connection.vendor != "sqlite", reason="inline calls are SQLite's")


@pytest.mark.parametrize(("restarts", "tried"), [([1, 0], 2), ([1] * 9, 5)])
def test_the_checkpointer_tries_a_busy_restart_again_a_few_times(monkeypatch, restarts, tried):
    calls: list[str] = []
    again = threading.Event()

    def checkpoint() -> tuple[int, int, int]:
        calls.append("checkpoint")
        if calls.count("checkpoint") == 2:
            again.set()
        return 1, db.RESTART_FRAMES, db.RESTART_FRAMES  # its restart found a writer

    answers = itertools.chain(restarts, itertools.repeat(0))

    def restart() -> int:
        calls.append("restart")
        return int(next(answers))

    monkeypatch.setattr(db, "checkpoint", checkpoint)
    monkeypatch.setattr(db, "restart", restart)
    monkeypatch.setattr(db, "CHECKPOINT_INTERVAL", 0.001)
    monkeypatch.setattr(db, "RESTART_RETRY", 0.001)
    checkpointer = db._Checkpointer()
    checkpointer.start()
    try:
        assert again.wait(TIMEOUT)
    finally:
        checkpointer.stop()
    assert calls[: tried + 2] == ["checkpoint", *["restart"] * tried, "checkpoint"]


@sqlite_only
def test_a_restart_with_a_writer_in_the_way_says_busy_at_once_and_done_after():
    import sqlite3

    writer = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    writer.execute("CREATE TABLE scratch (x BLOB)")
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO scratch VALUES (x'00')")
        assert db.restart() == 1  # at once: its connection waited 20 s for a lock before
        writer.execute("COMMIT")
        assert db.restart() == 0
        with connection.cursor() as c:
            c.execute("PRAGMA busy_timeout")
            assert c.fetchone()[0] > 0  # waits for locks again, as Django set it up
    finally:
        writer.execute("DROP TABLE scratch")
        writer.close()


@sqlite_only
def test_under_a_steady_writer_the_checkpointer_lets_the_wal_start_over():
    """A busy hub commits while a checkpoint copies a second's frames back. With passive
    checkpoints alone the WAL then never started over and grew without end (tens of MB
    here); the checkpointer now makes sure it does, without waiting for the writers."""
    import sqlite3
    import time

    name = connection.settings_dict["NAME"]
    setup = sqlite3.connect(name, isolation_level=None)
    setup.execute("CREATE TABLE scratch (x BLOB)")
    stop, written = threading.Event(), threading.Semaphore(0)

    def write() -> None:
        writer = sqlite3.connect(name, isolation_level=None, timeout=TIMEOUT)
        writer.execute("PRAGMA wal_autocheckpoint=0")
        try:
            while not stop.is_set():
                writer.execute("BEGIN IMMEDIATE")
                writer.executemany("INSERT INTO scratch VALUES (?)", [(b"x" * 3000,)] * 5)
                writer.execute("COMMIT")
                written.release()
                # Not a synchronisation: the pause between transactions is the thing under
                # test. A hub's writer pauses between network waits, and a restart can only
                # get in then; a writer that never paused would keep the WAL growing with
                # or without the fix.
                time.sleep(0.0005)
        finally:
            writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    frames: list[int] = []
    try:
        with connection.cursor() as c:
            c.execute("PRAGMA busy_timeout")
            timeout = c.fetchone()[0]
        for _ in range(8):
            for _ in range(250):  # some 1,800 frames
                assert written.acquire(timeout=TIMEOUT)
            busy, count, done = db.checkpoint()
            frames.append(count)
    finally:
        stop.set()
        thread.join()
        setup.execute("DROP TABLE scratch")
        setup.close()
    assert any(later < earlier for earlier, later in itertools.pairwise(frames)), frames  # started over
    with connection.cursor() as c:
        c.execute("PRAGMA busy_timeout")
        assert c.fetchone()[0] == timeout  # this connection waits for locks as before


def _credential_exists(name: str) -> bool:
    return Credential.objects.filter(name=name).exists()


@sqlite_only
async def test_on_sqlite_an_idle_hub_runs_calls_inline_on_the_event_loops_thread():
    assert await db.run(threading.current_thread) is threading.current_thread()
    await db.run(make_credential, "svc")
    assert await asyncio.to_thread(_credential_exists, "svc")  # committed: another connection sees it
    with pytest.raises(ZeroDivisionError):
        await db.run(lambda: 1 / 0)


@sqlite_only
async def test_a_call_that_finds_sqlite_locked_waits_on_the_database_thread_not_on_the_loop():
    import sqlite3

    other = sqlite3.connect(connection.settings_dict["NAME"], timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a manage.py command holding the write lock, say

    def write() -> str:
        make_credential("svc")
        return threading.current_thread().name

    try:
        call = asyncio.ensure_future(db.run(write))
        # Not a timed wait: sleep(0) yields once, and the call runs up to its wait on the thread.
        await asyncio.sleep(0)
        assert not call.done()
        assert not await asyncio.to_thread(_credential_exists, "svc")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await asyncio.wait_for(call, TIMEOUT)).startswith("taskhub-db")
    assert await asyncio.to_thread(_credential_exists, "svc")


@sqlite_only
@override_settings(TASKHUB_RESUME_GRACE=1.0)
async def test_a_sweep_batch_that_finds_sqlite_locked_waits_for_the_lock_and_logs_nothing(caplog):
    """The sweeper's batches log an instance they cannot release and go on; SQLite's lock,
    met inline, is not such a failure (seen when a hub stopped while its database thread
    was busy): the batch runs again on the database thread and releases them all."""
    import sqlite3

    def setup() -> tuple[datetime, set[uuid.UUID]]:
        w, _ = make_credential("w", sub=["mail"], max_instances=2)
        now = timezone.now()
        sessions = [services.connect(w, f"chan-{i}", "p", "", now) for i in range(2)]
        for i, session in enumerate(sessions):
            services.detach(session.instance.pk, f"chan-{i}", now)
        return now + timedelta(seconds=5), {session.instance.pk for session in sessions}

    later, gone = await db.run(setup)
    other = sqlite3.connect(connection.settings_dict["NAME"], timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        call = asyncio.ensure_future(db.run(services.release_lapsed, later))
        # Not a timed wait: sleep(0) yields exactly once, in which the call runs inline,
        # meets the lock and queues for the database thread.
        await asyncio.sleep(0)
        assert not call.done()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await asyncio.wait_for(call, TIMEOUT))[1] is None
    assert not await db.run(lambda: Instance.objects.filter(pk__in=gone).exists())
    assert "could not release" not in caplog.text
