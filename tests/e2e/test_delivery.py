"""Delivery a user can trust, end to end: retries, cancel, heartbeats, a lost worker's task
re-offered, sessions that survive a hub restart, lost layer messages, a Redis restart,
and a sweeper in every process."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskhub.client import Client, ConnectionFailed, TaskFailed, Update
from taskhub.models import TaskRecord
from tests.conftest import SCALE, TIMEOUT
from tests.e2e.conftest import ROOT, unique_action
from tests.processes import start_redis, wait_for_port

pytestmark = pytest.mark.timeout(120 * TIMEOUT)

# Hubs that reap gone instances quickly.
QUICK_GRACE = {"TASKHUB_RESUME_GRACE": "1", "TASKHUB_INSTANCE_LEASE": "2"}
# Hubs whose instances outlive a restart of their process (its lease and the grace).
RESTARTABLE = {"TASKHUB_RESUME_GRACE": "30", "TASKHUB_INSTANCE_LEASE": "30"}


async def eventually(check: Callable[[], Any], seconds: float = TIMEOUT) -> Any:
    """Poll ``check()`` (a condition in another process, or in the database) until it
    returns something truthy; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{check} did not hold within {seconds} s")
        await asyncio.sleep(0.1 * SCALE)  # polling another process's state: no event to wait on


def status_of(hub_db: Callable[[Callable[[str], Any]], Any], task_id: str) -> tuple[str, str]:
    def read(alias: str) -> tuple[str, str]:
        return TaskRecord.objects.using(alias).values_list("status", "failure_reason").get(pk=task_id)

    result: tuple[str, str] = hub_db(read)
    return result


@pytest.mark.core
async def test_a_failed_attempt_is_retried_and_the_third_succeeds(hub, parties, hub_db):
    worker = parties.worker(hub.url)
    attempts: list[int] = []

    @worker.sub(parties.action)
    async def flaky(task):
        attempts.append(task.attempt)
        await task.update({"try": task.attempt})
        if task.attempt < 3:
            raise RuntimeError(f"attempt {task.attempt} failed")
        return "third time lucky"

    updates: list[Update] = []
    retried: list[Any] = []
    async with worker, parties.caller(hub.url) as caller:
        handle = caller.pub(parties.action, retries=5, retry_backoff=0.1)
        handle.on("update", updates.append).on("retry", retried.append)
        assert await asyncio.wait_for(handle.get_result(), 4 * TIMEOUT) == "third time lucky"
    assert attempts == [1, 2, 3]
    assert [u.attempt for u in updates] == [1, 2, 3]
    assert [(r.attempt, r.reason, r.next_attempt) for r in retried] == [(1, "error", 2), (2, "error", 3)]

    def log(alias):
        return list(
            TaskRecord.objects.using(alias).get(pk=handle.task_id).events.values_list("kind", "attempt", "data")
        )

    kinds = [(kind, attempt) for kind, attempt, _ in hub_db(log)]
    assert kinds.count(("retry", 1)) == 1 and kinds.count(("retry", 2)) == 1
    assert [k for k, _ in kinds].count("success") == 1 and kinds[-1] == ("end", 3)
    assert [data["reason"] for kind, _, data in hub_db(log) if kind == "retry"] == ["error", "error"]


async def test_the_last_attempts_failure_reaches_the_caller(hub, parties):
    worker = parties.worker(hub.url)
    worker.sub(parties.action, lambda task: 1 / 0)
    async with worker, parties.caller(hub.url) as caller:
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(caller.pub(parties.action, retries=1, retry_backoff=0.1).get_result(), TIMEOUT)
    assert info.value.reason == "error" and "ZeroDivisionError" in str(info.value)


async def test_the_publisher_retries_a_failed_task_by_id(hub, parties):
    worker = parties.worker(hub.url)
    calls: list[int] = []

    @worker.sub(parties.action)
    async def once_broken(task):
        calls.append(task.attempt)
        if task.attempt == 1:
            raise ValueError("broken the first time")
        return "fixed"

    async with worker, parties.caller(hub.url) as caller:
        with pytest.raises(TaskFailed):
            await asyncio.wait_for(caller.pub(parties.action).get_result(), TIMEOUT)
        (failed,) = await caller.tasks(status="failed", action=parties.action)
        handle = await asyncio.wait_for(caller.retry(failed.id), TIMEOUT)
        assert await asyncio.wait_for(handle.get_result(), TIMEOUT) == "fixed"
    assert calls == [1, 2]


@pytest.mark.core
async def test_cancel_fails_the_task_for_the_caller_and_cancels_the_handler(hub, parties):
    worker = parties.worker(hub.url)
    started, cancelled = asyncio.Event(), asyncio.Event()

    @worker.sub(parties.action)
    async def slow(task):
        await task.pickup()
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with worker, parties.caller(hub.url) as caller:
        handle = caller.pub(parties.action, retries=3)
        await asyncio.wait_for(started.wait(), TIMEOUT)
        began = time.monotonic()
        await handle.cancel()
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(handle.get_result(), TIMEOUT)
        assert (info.value.reason, info.value.detail) == ("cancelled", f"cancelled by {parties.caller_name}")
        await asyncio.wait_for(cancelled.wait(), TIMEOUT)
        assert time.monotonic() - began < 2 * SCALE


@pytest.mark.core
async def test_a_heartbeat_is_kept_by_updates_and_expires_in_silence(hub, parties):
    worker = parties.worker(hub.url)

    @worker.sub(parties.action)
    async def beating(task):
        await task.pickup()
        for step in range(10):  # 1 s of work, with a heartbeat timeout of 0.5 s
            await asyncio.sleep(0.1)  # the work itself
            if step % 2:
                await task.touch()
            else:
                await task.update("alive")
        if await task.get_payload() == "go silent":
            await asyncio.Event().wait()
        return "done"

    async with worker, parties.caller(hub.url) as caller:
        assert await asyncio.wait_for(caller.pub(parties.action, heartbeat_timeout=0.5).get_result(), TIMEOUT) == "done"
        silent = caller.pub(parties.action, "go silent", heartbeat_timeout=0.5)
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(silent.get_result(), TIMEOUT)
        assert info.value.reason == "heartbeat_timeout"


def worker_process(url: str, name: str, key: str, job: str, action: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "taskhub.client", "--url", url, "--name", name, "--key", key]
    process = subprocess.Popen(
        [*args, "worker", f"tests.e2e.jobs:{job}", "--action", action],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stderr is not None
    assert "serving" in process.stderr.readline()
    return process


@pytest.mark.core
async def test_a_killed_workers_task_is_offered_to_another_instance_of_its_service(make_hub, credential):
    hub = make_hub(**QUICK_GRACE)
    action = unique_action()
    w_name, w_key = credential(sub=[action], max_instances=2)
    c_name, c_key = credential(pub=[action])
    first = worker_process(hub.url, w_name, w_key, "hold", action)
    second = None
    try:
        async with Client(hub.url, name=c_name, key=c_key) as caller:
            holder: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def held_by(update: Update) -> None:
                if not holder.done():
                    holder.set_result(update.data["pid"])

            handle = caller.pub(action, "the payload", pickup_timeout=30).on("update", held_by)
            assert await asyncio.wait_for(holder, TIMEOUT) == first.pid
            second = worker_process(hub.url, w_name, w_key, "echo", action)
            first.send_signal(signal.SIGKILL)
            result = await asyncio.wait_for(handle.get_result(), 4 * TIMEOUT)
        assert result == {"payload": "the payload", "pid": second.pid}
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(TIMEOUT)


@pytest.mark.core
async def test_a_worker_and_a_caller_ride_through_a_hub_killed_and_restarted(make_hub, parties, hub_db):
    hub = make_hub(**RESTARTABLE)
    worker = parties.worker(hub.url, backoff=lambda n: 0.2)
    picked_up, release = asyncio.Event(), asyncio.Event()

    @worker.sub(parties.action)
    async def long_task(task):
        await task.pickup()
        await task.update("before the crash", progress=0.3)
        picked_up.set()
        await release.wait()
        await task.update("after the crash", progress=0.9)
        return "survived"

    updates: list[Any] = []
    async with worker, parties.caller(hub.url, backoff=lambda n: 0.2) as caller:
        handle = caller.pub(parties.action, timeout=60).on("update", lambda u: updates.append(u.data))
        await asyncio.wait_for(picked_up.wait(), TIMEOUT)
        instance = worker.instance
        hub.kill()
        make_hub(port=hub.port, **RESTARTABLE)
        await asyncio.wait_for(eventually(lambda: worker.connected and caller.connected), 4 * TIMEOUT)
        assert worker.instance == instance  # the instance was taken back, task and slot
        release.set()
        assert await asyncio.wait_for(handle.get_result(), 4 * TIMEOUT) == "survived"
    assert updates == ["before the crash", "after the crash"]
    assert status_of(hub_db, handle.task_id) == ("success", "")


@pytest.mark.core
async def test_two_hundred_tasks_with_thirty_updates_each_ride_through_a_hub_restart(make_hub, parties, hub_db):
    hub = make_hub(**RESTARTABLE)
    workers = [parties.worker(hub.url, backoff=lambda n: 0.2) for _ in range(1)]
    halfway = asyncio.Event()
    progress = {"count": 0}

    async def steady(task):
        await task.pickup()
        for step in range(30):
            await task.update(step, progress=(step + 1) / 30)
            progress["count"] += 1
            if progress["count"] == 200 * 10:
                halfway.set()
            await asyncio.sleep(0.02)  # the work's own pace
        return task.id

    for w in workers:
        w.sub(parties.action, steady)
    seen: dict[str, list[int]] = {}
    async with workers[0], parties.caller(hub.url, backoff=lambda n: 0.2) as caller:
        handles = []
        for _ in range(200):
            handle = caller.pub(parties.action, timeout=120, pickup_timeout=60)
            handle.on("update", lambda u, t=handle.task_id: seen.setdefault(t, []).append(u.data))
            handles.append(handle)
        await asyncio.wait_for(halfway.wait(), 10 * TIMEOUT)
        hub.kill()
        make_hub(port=hub.port, **RESTARTABLE)
        results = await asyncio.wait_for(asyncio.gather(*(h.get_result() for h in handles)), 20 * TIMEOUT)
    assert results == [h.task_id for h in handles]
    # Every update reached the caller once, in order, across the restart.
    assert all(seen[h.task_id] == list(range(30)) for h in handles)

    def statuses(alias):
        return set(TaskRecord.objects.using(alias).filter(action=parties.action).values_list("status", flat=True))

    assert hub_db(statuses) == {"success"}


@pytest.mark.core
async def test_a_waiting_task_survives_a_hub_crash(make_hub, parties):
    hub = make_hub(**RESTARTABLE)
    async with parties.caller(hub.url, backoff=lambda n: 0.2) as caller:
        handle = caller.pub(parties.action, 5, pickup_timeout=math.inf)
        await asyncio.wait_for(handle.published, TIMEOUT)
        hub.kill()
        restarted = make_hub(port=hub.port, **RESTARTABLE)
        worker = parties.worker(restarted.url)
        worker.sub(parties.action, lambda task: task.get_payload())
        async with worker:
            assert await asyncio.wait_for(handle.get_result(), 4 * TIMEOUT) == 5


@pytest.mark.core
async def test_a_sweeper_runs_in_a_process_that_never_had_a_connection(make_hub, parties, hub_db):
    accepting, idle = make_hub(redis=False), make_hub(redis=False)
    async with parties.caller(accepting.url, backoff=lambda n: 3600) as caller:
        handle = caller.pub(parties.action, pickup_timeout=1)
        await asyncio.wait_for(handle.published, TIMEOUT)
        accepting.kill()
    # Nobody ever connected to the idle process: its own sweeper fails the task.
    await eventually(lambda: status_of(hub_db, handle.task_id) == ("failed", "pickup_timeout"), 4 * TIMEOUT)
    assert idle.process.poll() is None


async def test_messages_the_layer_loses_are_sent_again_from_the_database(make_hub, parties):
    lossy = {"DJANGO_SETTINGS_MODULE": "tests.e2e.lossy_settings", "TASKHUB_TEST_LOSE_EVERY": "2"}
    a, b = make_hub(**lossy), make_hub(**lossy)
    worker = parties.worker(a.url)

    @worker.sub(parties.action)
    async def handler(task):
        for step in ("one", "two", "three"):
            await task.update(step)
        return await task.get_payload()

    async with worker, parties.caller(b.url) as caller:
        began = time.monotonic()
        results, updates = [], []
        for n in range(8):  # every other offer and relay crosses the layer and is lost
            heard: list[str] = []
            handle = caller.pub(parties.action, n).on("update", lambda u, heard=heard: heard.append(u.data))
            results.append(await asyncio.wait_for(handle.get_result(), TIMEOUT))
            updates.append(heard)
        # Recovered within sweeps (0.2 s here), not by the 30 s resync or a deadline.
        assert time.monotonic() - began < 8 * 2 * SCALE
    assert results == list(range(8))
    # A lost update is read again as soon as a later relay shows it missing: none is skipped.
    assert updates == [["one", "two", "three"]] * 8


async def test_a_redis_restart_under_load_loses_no_task(make_hub, parties):
    url, redis = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    a, b = make_hub(REDIS_URL=url), make_hub(REDIS_URL=url)
    worker = parties.worker(a.url)
    worker.sub(parties.action, lambda task: task.get_payload())
    acknowledged: list[Any] = []
    try:
        async with worker, parties.caller(b.url) as caller:
            handles = []
            for n in range(60):
                handle = caller.pub(parties.action, n, pickup_timeout=60)
                handles.append(handle)
                if n == 20:
                    redis.send_signal(signal.SIGKILL)
                    redis.wait(TIMEOUT)
                if n == 35:
                    redis = start_redis(port)[1]
                    wait_for_port(port, redis)
                await asyncio.sleep(0.05)  # publishing at a steady pace is the load
            for handle in handles:
                await asyncio.wait_for(handle.published, 4 * TIMEOUT)
                acknowledged.append(handle.task_id)
            results = await asyncio.wait_for(asyncio.gather(*(h.get_result() for h in handles)), 10 * TIMEOUT)
            assert results == list(range(60))
            # Both connections work through the restarted Redis, and across processes.
            assert await asyncio.wait_for(caller.pub(parties.action, "after").get_result(), TIMEOUT) == "after"
        assert len(acknowledged) == len(results) == 60
    finally:
        redis.terminate()
        redis.wait(TIMEOUT)


async def test_an_unreachable_hub_or_a_wrong_path_raises_connection_failed(hub, parties):
    for url in ("ws://127.0.0.1:9/ws/taskhub/", hub.url.replace("/ws/taskhub/", "/ws/nowhere/")):
        client = Client(url, name=parties.caller_name, key=parties.caller_key, connect_timeout=1)
        began = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            async with client:
                pass
        assert url in str(info.value) and time.monotonic() - began < 3 * SCALE
    assert "no TaskHub endpoint at /ws/nowhere/" in str(info.value)


def test_the_command_line_gives_up_on_an_unreachable_hub(parties):
    done = subprocess.run(
        [sys.executable, "-m", "taskhub.client", "--url", "ws://127.0.0.1:9/ws/taskhub/", "--connect-timeout", "1"]
        + ["--name", parties.caller_name, "--key", parties.caller_key, "pub", parties.action],
        capture_output=True,
        text=True,
        timeout=10 * TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert done.returncode == 4, done.stderr
    assert "could not connect to ws://127.0.0.1:9/ws/taskhub/" in done.stderr


async def test_listing_tasks_newest_first_by_status_and_action(hub, credential):
    action = unique_action()
    w_name, w_key = credential(sub=[action.split(":")[0]])
    c_name, c_key = credential(pub=[action])
    other_name, other_key = credential(pub=["*"])
    async with Client(hub.url, name=c_name, key=c_key) as caller:
        first = caller.pub(action, 1, pickup_timeout=math.inf)
        second = caller.pub(action, 2, pickup_timeout=math.inf)
        await asyncio.wait_for(asyncio.gather(first.published, second.published), TIMEOUT)
        mine = await caller.tasks(action=action)
        assert [t.id for t in mine] == [second.task_id, first.task_id]
        assert {t.status for t in mine} == {"pending"}
        assert await caller.tasks(status="success", action=action) == []
        assert len(await caller.tasks(action=action, limit=1)) == 1
    # A service sees only what it was offered (nothing here); a stranger nothing either.
    async with Client(hub.url, name=w_name, key=w_key) as worker:
        assert not {t.id for t in await worker.tasks(status="pending")} & {first.task_id, second.task_id}
    async with Client(hub.url, name=other_name, key=other_key) as stranger:
        assert await stranger.tasks(action=action) == []


async def test_a_busy_instance_gets_no_more_tasks_than_its_concurrency(hub, credential):
    action = unique_action()
    w_name, w_key = credential(sub=[action], max_instances=2)
    c_name, c_key = credential(pub=[action])
    release = asyncio.Event()
    ran: dict[str, list[str]] = {}

    def instance_of(client: Client) -> Any:
        async def handler(task):
            ran.setdefault(str(client.instance), []).append(task.id)
            await release.wait()
            return client.instance

        return handler

    slow = Client(hub.url, name=w_name, key=w_key, concurrency=1)
    idle = Client(hub.url, name=w_name, key=w_key, concurrency=1)
    slow.sub(action, instance_of(slow))
    idle.sub(action, instance_of(idle))
    async with slow, Client(hub.url, name=c_name, key=c_key) as caller:
        first = caller.pub(action)
        await eventually(lambda: slow.running)
        second = caller.pub(action, pickup_timeout=30)  # slow is full: it waits for a free instance
        await asyncio.wait_for(second.published, TIMEOUT)
        async with idle:
            await eventually(lambda: idle.running)  # the waiting task went to the idle twin
            third = caller.pub(action, pickup_timeout=30)  # both full: it waits
            await asyncio.wait_for(third.published, TIMEOUT)
            assert len(slow.running) == len(idle.running) == 1
            release.set()
            results = await asyncio.wait_for(
                asyncio.gather(first.get_result(), second.get_result(), third.get_result()), TIMEOUT
            )
    assert results[0] == slow.instance and results[1] == idle.instance
    assert sorted(len(tasks) for tasks in ran.values()) == [1, 2]
