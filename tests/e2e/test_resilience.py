"""Restarts, layers and frame limits, end to end."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import websockets

from taskhub.client import Client, InvalidMessage
from tests.conftest import TIMEOUT
from tests.e2e.conftest import Parties, unique_action

pytestmark = [pytest.mark.timeout(60 * TIMEOUT), pytest.mark.core]


async def round_trip(worker_url: str, caller_url: str, parties: Parties, payload: Any = 7) -> Any:
    action = parties.action
    worker = parties.worker(worker_url)
    worker.sub(action, lambda task: task.get_payload())
    async with worker, parties.caller(caller_url) as caller:
        return await asyncio.wait_for(caller.pub(action, payload).get_result(), TIMEOUT)


async def test_embedded_default_in_memory_layer(make_hub, credential, parties):
    hub = make_hub(redis=False)
    assert await round_trip(hub.url, hub.url, parties) == 7


async def test_redis_pubsub_layer_across_two_processes(make_hub, credential, parties):
    a, b = make_hub(TASKHUB_LAYER="pubsub"), make_hub(TASKHUB_LAYER="pubsub")
    assert await round_trip(a.url, b.url, parties, {"n": 1}) == {"n": 1}


async def test_clients_reconnect_resubscribe_and_publish_once_after_a_hub_restart(make_hub, credential, parties):
    first = make_hub()
    action = parties.action
    worker = parties.worker(first.url, backoff=lambda n: 0.2)
    worker.sub(action, lambda task: "after restart")
    caller = parties.caller(first.url, backoff=lambda n: 0.2)
    async with worker, caller:
        first.kill()
        handle = caller.pub(action)  # while the hub is down: sent once it is back
        make_hub(port=first.port)
        assert await asyncio.wait_for(handle.get_result(), 4 * TIMEOUT) == "after restart"
        state = await caller.get_task(handle.task_id)
        assert [e["kind"] for e in state.events].count("init") == 1


async def test_oversized_frames(hub, credential):
    """Over the hub's limit: a coded error. Over daphne's (1 MiB): daphne drops the connection."""
    # Two slots: the dropped connection's slot is freed by a database call that may still
    # be on its way when the second connection authenticates.
    name, key = credential(max_instances=2)
    headers = {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}
    async with websockets.connect(hub.url, additional_headers=headers, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "ping", "pad": "x" * (900 * 1024)}))
        assert json.loads(await ws.recv())["code"] == "message_too_large"
        await ws.send(json.dumps({"type": "ping", "pad": "x" * (2 * 1024 * 1024)}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    async with websockets.connect(hub.url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "ping", "ref": 1}))
        assert json.loads(await ws.recv()) == {"type": "pong", "ref": 1}


async def test_the_client_refuses_oversized_messages_before_sending(hub, credential):
    action = unique_action()
    name, key = credential(pub=[action])
    async with Client(hub.url, name=name, key=key) as client:
        with pytest.raises(InvalidMessage) as info:
            await asyncio.wait_for(client.pub(action, "x" * (1024 * 1024)).get_result(), TIMEOUT)
        assert info.value.code == "message_too_large"
        assert await asyncio.wait_for(client.ping(), TIMEOUT) >= 0
