"""Several daphne processes sharing Redis and one database."""

from __future__ import annotations

import asyncio

import pytest

from taskhub.client import AuthenticationFailed, Client, Update
from tests.conftest import TIMEOUT

pytestmark = [pytest.mark.timeout(60 * TIMEOUT), pytest.mark.core]


async def test_worker_on_one_process_caller_on_the_other(make_hub, credential, parties):
    a, b = make_hub(), make_hub()
    action = parties.action
    worker = parties.worker(a.url)

    @worker.sub(action)
    async def handler(task):
        await task.update("halfway", progress=0.5)
        return (await task.get_payload()) * 2

    updates: list[Update] = []
    async with worker, parties.caller(b.url) as caller:
        handles = [caller.pub(action, i).on("update", updates.append) for i in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*(h.get_result() for h in handles)), TIMEOUT)
    assert results == [0, 2, 4, 6, 8]
    assert len(updates) == 5 and {u.progress for u in updates} == {0.5}


async def test_max_instances_holds_across_processes(make_hub, credential):
    a, b = make_hub(), make_hub()
    name, key = credential(max_instances=1)
    async with Client(a.url, name=name, key=key):
        with pytest.raises(AuthenticationFailed, match="live instance"):
            await asyncio.wait_for(Client(b.url, name=name, key=key).connect(), TIMEOUT)


async def test_deadline_enforced_after_the_accepting_process_died(make_hub, credential, parties):
    """The caller's process accepts the task and dies; the other process still fails it on time."""
    a, b = make_hub(), make_hub()
    action = parties.action
    worker = parties.worker(b.url)
    picked_up, failed = asyncio.Event(), asyncio.get_running_loop().create_future()

    @worker.sub(action)
    async def handler(task):
        def on_fail(t, reason):
            if not failed.done():
                failed.set_result(reason)

        task.on("fail", on_fail)
        await task.pickup()
        picked_up.set()
        await asyncio.Event().wait()

    caller = parties.caller(a.url, backoff=lambda n: 3600)
    async with worker:
        await caller.connect()
        await asyncio.wait_for(caller.pub(action, timeout=1.5).published, TIMEOUT)
        await asyncio.wait_for(picked_up.wait(), TIMEOUT)
        a.kill()
        assert await asyncio.wait_for(failed, TIMEOUT) == "complete_timeout"
    await caller.close()


async def test_a_crashed_process_frees_its_instance_slots_after_the_lease(make_hub, credential):
    a, b = make_hub(), make_hub()
    name, key = credential(max_instances=1)
    client = Client(a.url, name=name, key=key, backoff=lambda n: 3600)
    await client.connect()
    a.kill()
    # The lease is 2 s in these hubs: b's sweeper reaps the dead instance, then the slot is free.
    for _ in range(int(20 * TIMEOUT)):
        try:
            async with Client(b.url, name=name, key=key):
                break
        except AuthenticationFailed:
            await asyncio.sleep(0.5)  # waiting on another process's lease: poll
    else:
        pytest.fail("the crashed instance still holds its slot")
    await client.close()
