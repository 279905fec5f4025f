"""The real client against a real daphne process over a real Redis channel layer."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from typing import cast

import pytest
import websockets

from taskhub.client import (
    AuthenticationFailed,
    Client,
    NoResult,
    PermissionDenied,
    TaskFailed,
    Update,
)
from tests.conftest import TIMEOUT
from tests.e2e.conftest import unique_action

pytestmark = [pytest.mark.timeout(60 * TIMEOUT), pytest.mark.core]


async def test_round_trip_with_pickup_payload_progress_and_result(hub, credential):
    action = unique_action()
    w_name, w_key = credential(sub=[action])
    c_name, c_key = credential(pub=[action.split(":")[0]])  # a namespace grants the action
    worker = Client(hub.url, name=w_name, key=w_key)

    @worker.sub(action)
    async def handle(task):
        await task.pickup()
        data = await task.get_payload()
        for i in range(3):
            await task.update({"step": i}, progress=(i + 1) / 3)
        return {"echo": data, "publisher": task.publisher}

    updates: list[Update] = []
    async with worker, Client(hub.url, name=c_name, key=c_key) as caller:
        handle_ = caller.pub(action, {"emails": ["a@example.org"]}).on("update", updates.append)
        result = await asyncio.wait_for(handle_.get_result(), TIMEOUT)
    assert result == {"echo": {"emails": ["a@example.org"]}, "publisher": c_name}
    assert [(u.data, u.progress, u.service) for u in updates] == [
        ({"step": 0}, 1 / 3, w_name),
        ({"step": 1}, 2 / 3, w_name),
        ({"step": 2}, 1.0, w_name),
    ]


async def test_a_handler_that_raises_fails_the_task_with_its_error(hub, credential, parties):
    action = parties.action
    worker = parties.worker(hub.url)

    @worker.sub(action)
    async def handle(task):
        raise ValueError("no such mailbox")

    async with worker, parties.caller(hub.url) as caller:
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(caller.pub(action).get_result(), TIMEOUT)
        assert info.value.reason == "error"
        assert "ValueError: no such mailbox" in str(info.value)
        assert await asyncio.wait_for(caller.pub(action).get_result("fallback"), TIMEOUT) == "fallback"


async def test_drop_ends_without_result(hub, credential, parties):
    action = parties.action
    worker = parties.worker(hub.url)

    @worker.sub(action)
    async def handle(task):
        await task.drop()

    async with worker, parties.caller(hub.url) as caller:
        with pytest.raises(NoResult):
            await asyncio.wait_for(caller.pub(action).get_result(), TIMEOUT)
        assert await asyncio.wait_for(caller.pub(action).get_result(default=None), TIMEOUT) is None


async def test_pickup_timeout_without_subscriber(hub, parties):
    action = parties.action  # nobody runs the worker
    async with parties.caller(hub.url) as caller:
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(caller.pub(action, pickup_timeout=0.5).get_result(), TIMEOUT)
    assert info.value.reason == "pickup_timeout"


async def test_complete_timeout_when_the_worker_hangs(hub, credential, parties):
    action = parties.action
    worker = parties.worker(hub.url)
    told = asyncio.Event()

    @worker.sub(action)
    async def handle(task):
        task.on("fail", lambda t, reason: told.set())
        await task.pickup()
        await asyncio.Event().wait()  # hang until cancelled

    async with worker, parties.caller(hub.url) as caller:
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(caller.pub(action, timeout=0.5).get_result(), TIMEOUT)
        assert info.value.reason == "complete_timeout"
        await asyncio.wait_for(told.wait(), TIMEOUT)


async def test_after_a_complete_timeout_the_handler_is_cancelled_and_never_sees_invalid_transition(hub, parties):
    action = parties.action
    worker = parties.worker(hub.url)
    outcome = asyncio.get_running_loop().create_future()

    @worker.sub(action)
    async def handle(task):
        await task.pickup()
        try:
            while True:  # keeps reporting progress past its complete timeout
                await task.update("working")
                await asyncio.sleep(0.05)  # the handler's own pace; the test waits on outcome
        except asyncio.CancelledError:
            outcome.set_result("cancelled")
            raise
        except Exception as exc:
            outcome.set_result(repr(exc))

    async with worker, parties.caller(hub.url) as caller:
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(caller.pub(action, timeout=0.5).get_result(), TIMEOUT)
        assert info.value.reason == "complete_timeout"
        assert await asyncio.wait_for(outcome, TIMEOUT) == "cancelled"


async def test_waiting_task_is_delivered_to_a_late_subscriber(hub, credential, parties):
    action = parties.action
    async with parties.caller(hub.url) as caller:
        handle = caller.pub(action, 21, pickup_timeout=math.inf)
        await asyncio.wait_for(handle.published, TIMEOUT)
        worker = parties.worker(hub.url)
        worker.sub(action, lambda task: task.get_payload())
        async with worker:
            assert await asyncio.wait_for(handle.get_result(), TIMEOUT) == 21


async def test_fan_out_first_return_wins_and_the_other_is_told(hub, credential, parties):
    action = parties.action
    slow_name, slow_key = credential(sub=[action.split(":")[0]])
    fast, slow = parties.worker(hub.url), Client(hub.url, name=slow_name, key=slow_key)
    loop = asyncio.get_running_loop()
    slow_started, slow_saw, slow_cancelled = loop.create_future(), loop.create_future(), loop.create_future()

    @fast.sub(action)
    async def fast_handler(task):
        await slow_started  # both work on it: the slow one is told when the fast one returns
        return "fast"

    @slow.sub(action)
    async def slow_handler(task):
        task.on("success", lambda t, result: slow_saw.set_result(result))
        slow_started.set_result(None)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            slow_cancelled.set_result(True)  # its part is over: the hub told it
            raise

    async with fast, slow, parties.caller(hub.url) as caller:
        assert await asyncio.wait_for(caller.pub(action).get_result(), TIMEOUT) == "fast"
        assert await asyncio.wait_for(slow_saw, TIMEOUT) == "fast"
        assert await asyncio.wait_for(slow_cancelled, TIMEOUT)


async def test_max_instances_distributes_one_instance_per_task(hub, credential):
    action = unique_action()
    w_name, w_key = credential(sub=[action], max_instances=2)
    c_name, c_key = credential(pub=[action])
    seen: dict[str, list[int]] = {}
    workers = [Client(hub.url, name=w_name, key=w_key) for _ in range(2)]
    for w in workers:

        def handler(task, w=w):
            seen.setdefault(w.instance, []).append(task.attempt)
            return w.instance

        w.sub(action, handler)
    async with workers[0], workers[1], Client(hub.url, name=c_name, key=c_key) as caller:
        with pytest.raises(AuthenticationFailed, match="live instance"):
            async with Client(hub.url, name=w_name, key=w_key):
                pass
        results = [await asyncio.wait_for(caller.pub(action).get_result(), TIMEOUT) for _ in range(6)]
    assert sorted(len(v) for v in seen.values()) == [3, 3]
    # Each worker's instance id is set once it has connected.
    assert sorted(results) == sorted(cast(list[str], [w.instance for w in workers]) * 3)


async def test_permissions_and_credentials(hub, credential):
    action = unique_action()
    name, key = credential(sub=[action], pub=["log"])
    async with Client(hub.url, name=name, key=key) as client:
        with pytest.raises(PermissionDenied):
            await asyncio.wait_for(client.pub(action).get_result(), TIMEOUT)
        # A namespace grants every action below it.
        handle = client.pub("log/app:error", {"m": 1}, pickup_timeout=0.3)
        with pytest.raises(TaskFailed):
            await asyncio.wait_for(handle.get_result(), TIMEOUT)
    denied = Client(hub.url, name=name, key=key)
    denied.sub("mail:send", lambda task: None)
    with pytest.raises(PermissionDenied):
        await asyncio.wait_for(denied.connect(), TIMEOUT)
    await denied.close()
    for bad in (Client(hub.url, name=name, key="not-the-key-at-all"), Client(hub.url, name="nobody", key=key)):
        with pytest.raises(AuthenticationFailed, match="invalid name or key"):
            await asyncio.wait_for(bad.connect(), TIMEOUT)
        await bad.close()


async def test_idle_connection_survives_beyond_redis_socket_timeout(hub, credential, parties):
    """redis-py 8 with channels-redis 4.3 closed idle sockets after 5 s (see requirements.txt)."""
    action = parties.action
    worker = parties.worker(hub.url)
    worker.sub(action, lambda task: "still here")
    async with worker, parties.caller(hub.url) as caller:
        await asyncio.sleep(6.5)  # the idle time is what this test is about
        assert await asyncio.wait_for(caller.pub(action).get_result(), TIMEOUT) == "still here"
        assert worker.connected and caller.connected


async def test_a_worker_leaving_mid_task_fails_it_with_worker_lost(hub, parties):
    worker = parties.worker(hub.url)
    picked_up = asyncio.Event()

    @worker.sub(parties.action)
    async def handler(task):
        await task.pickup()
        picked_up.set()
        await asyncio.Event().wait()

    async with parties.caller(hub.url) as caller:
        await worker.connect()
        # No other instance of the service comes: the task waits for one 1 s, then fails.
        handle = caller.pub(parties.action, pickup_timeout=1)
        await asyncio.wait_for(picked_up.wait(), TIMEOUT)
        await worker.close()
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(handle.get_result(), TIMEOUT)
    assert info.value.reason == "worker_lost"


async def test_every_refusal_closes_with_its_documented_code(make_hub, credential):
    """Over daphne (autobahn takes only a plain int as a close code), each refusal is an
    error with its code, then the close code docs/protocol.md gives for it."""
    name, key = credential()
    hub = make_hub(TASKHUB_AUTH_TIMEOUT="0.5")
    base = hub.url.removesuffix("ws/taskhub/")

    async def refused(url: str, headers: dict[str, str], frames: tuple[dict[str, str], ...] = ()) -> tuple[str, int]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            for frame in frames:
                await ws.send(json.dumps(frame))
            error = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None, "closed without a close frame"
        return error["code"], closed.value.rcvd.code

    wrong_key = {"Authorization": "Basic " + base64.b64encode(f"{name}:wrong".encode()).decode()}
    assert await refused(hub.url, wrong_key) == ("authentication_failed", 4001)
    hello = {"type": "hello", "name": name, "key": "wrong", "ref": "h"}
    assert await refused(hub.url, {}, (hello,)) == ("authentication_failed", 4001)
    assert await refused(hub.url, {}) == ("authentication_timeout", 4000)
    assert await refused(base + "elsewhere/", {}) == ("not_found", 4404)
