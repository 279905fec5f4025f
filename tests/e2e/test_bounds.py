"""Each connection's memory is bounded (taskhub/flow.py): a client that does not read is
closed, and the hub's memory comes back; a client that floods requests is slowed down."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import websockets

from taskhub.client import Client
from tests.conftest import TIMEOUT
from tests.e2e.conftest import Parties

pytestmark = [pytest.mark.timeout(60 * TIMEOUT), pytest.mark.core]

MiB = 1024 * 1024
#: What the hub may hold for one non-reading client: its limit (4 MiB in these tests),
#: what its socket's kernel buffers took, and the allocator's slack.
ALLOWANCE = 32 * MiB


def rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


async def wait_for_log(hub: Any, text: str) -> None:
    async def poll() -> None:
        while text not in hub.log_path.read_text(errors="replace"):
            await asyncio.sleep(0.05)  # the hub's log file is the only signal there is

    await asyncio.wait_for(poll(), 4 * TIMEOUT)


async def test_a_caller_that_does_not_read_its_updates_is_closed_and_the_memory_comes_back(make_hub, parties):
    hub = make_hub(TASKHUB_MAX_BUFFERED_BYTES=str(4 * MiB))
    action = parties.action
    chunk = "x" * 20_000
    sent = asyncio.Event()
    count = 0

    async def stream(task: Any) -> str:
        nonlocal count
        await task.pickup()
        for _ in range(3_000):  # 60 MB: what the hub would hold without its bound
            await task.update(chunk)
            count += 1
        sent.set()
        return "done"

    worker = parties.worker(hub.url)
    worker.sub(action, stream)
    async with worker:
        baseline = rss(hub.process.pid)
        # max_queue=1: websockets stops reading the socket once one message waits unread.
        caller = await websockets.connect(
            hub.url, additional_headers=basic(parties.caller_name, parties.caller_key), max_queue=1, max_size=None
        )
        await caller.send(json.dumps({"type": "pub", "action": action, "payload": None, "ref": 1}))
        await wait_for_log(hub, "does not read")
        await asyncio.wait_for(sent.wait(), 4 * TIMEOUT)
        with pytest.raises(websockets.ConnectionClosed):
            while True:  # what had reached the client's own buffers, then the end
                await asyncio.wait_for(caller.recv(), TIMEOUT)
        grown = rss(hub.process.pid) - baseline
    # Without the bound the hub held every update (count × 20 KB); with it, a few MiB.
    assert count * len(chunk) > ALLOWANCE + 16 * MiB
    assert grown < ALLOWANCE, f"the hub grew by {grown / MiB:.0f} MiB"


async def test_unread_payload_requests_are_bounded_and_the_instance_goes(make_hub, credential, hub_db):
    hub = make_hub(TASKHUB_MAX_BUFFERED_BYTES=str(4 * MiB))
    action = f"t{uuid.uuid4().hex[:8]}:big"
    name, key = credential(pub=[action])
    payload = "p" * (400 * 1024)
    async with Client(hub.url, name=name, key=key) as client:
        handle = client.pub(action, payload)
        await asyncio.wait_for(handle.published, TIMEOUT)
        task_id = handle.task_id
    baseline = rss(hub.process.pid)
    flooder = await websockets.connect(hub.url, additional_headers=basic(name, key), max_queue=1, max_size=None)
    request = json.dumps({"type": "get_payload", "task": task_id})
    try:
        for _ in range(600):  # 240 MB of answers, if the hub queued them all
            await asyncio.wait_for(flooder.send(request), TIMEOUT)
    except (websockets.ConnectionClosed, TimeoutError):
        pass  # the hub stopped reading us (TCP pushed back), then closed the connection
    await wait_for_log(hub, "does not read")
    await flooder.close()
    assert rss(hub.process.pid) - baseline < ALLOWANCE

    def attached(alias: str) -> int:
        from taskhub.models import Instance

        return Instance.objects.using(alias).filter(credential__name=name, detached_at__isnull=True).count()

    async def detached() -> None:
        while await asyncio.to_thread(hub_db, attached):
            await asyncio.sleep(0.05)  # polling the hub's database: nothing else to wait on

    await asyncio.wait_for(detached(), 4 * TIMEOUT)
    # The credential works again at once (its slot is free).
    async with Client(hub.url, name=name, key=key) as client:
        assert await asyncio.wait_for(client.ping(), TIMEOUT) >= 0


async def test_a_client_that_reads_slowly_loses_nothing(make_hub: Any, parties: Parties) -> None:
    """Flow control slows a fast sender down; it never drops what a reading client gets."""
    hub = make_hub(TASKHUB_MAX_QUEUED_FRAMES="2")
    async with parties.caller(hub.url) as caller:
        results = await asyncio.wait_for(asyncio.gather(*(caller.ping() for _ in range(500))), 4 * TIMEOUT)
    assert len(results) == 500


async def test_a_task_with_a_large_result_and_history_is_read_in_pages(hub, parties):
    """Its ``state`` would be over the frame limit in one piece: the client reads it in pages."""
    action = parties.action
    big = "u" * (400 * 1024)

    async def handler(task: Any) -> str:
        for _ in range(3):
            await task.update(big)
        return "r" * (500 * 1024)

    worker = parties.worker(hub.url)
    worker.sub(action, handler)
    async with worker, parties.caller(hub.url) as caller:
        handle = caller.pub(action)
        assert len(await asyncio.wait_for(handle.get_result(), 4 * TIMEOUT)) == 500 * 1024
        state = await asyncio.wait_for(caller.get_task(handle.task_id), TIMEOUT)
        assert [e["kind"] for e in state.events].count("update") == 3
        assert state.task["result"] == "r" * (500 * 1024)
    # A caller restarted with the finished task's id gets its result at once.
    async with parties.caller(hub.url) as restarted:
        again = restarted.pub(action, task_id=handle.task_id)
        assert len(await asyncio.wait_for(again.get_result(), TIMEOUT)) == 500 * 1024


async def test_a_burst_of_connects_is_welcomed_whole_while_an_established_client_is_served(make_hub, credential):
    """Handshakes are spread over the event loop's turns (taskhub/flow.py): none is
    dropped or refused, some give up while they wait, and an established connection keeps
    its answers coming meanwhile."""
    hub = make_hub()
    burst = 300
    name, key = credential(pub=["bench"], max_instances=burst + 1)

    async def one() -> dict[str, Any]:
        async with websockets.connect(hub.url, additional_headers=basic(name, key), open_timeout=4 * TIMEOUT) as ws:
            welcome: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 4 * TIMEOUT))
            return welcome

    async def gives_up() -> None:
        ws = await websockets.connect(hub.url, additional_headers=basic(name, key))
        ws.transport.abort()  # before its welcome: its handshake may still be waiting

    async with Client(hub.url, name=name, key=key) as established:
        pings = asyncio.gather(*(established.ping() for _ in range(50)))
        welcomes = await asyncio.wait_for(
            asyncio.gather(*(one() for _ in range(burst)), *(gives_up() for _ in range(20))), 8 * TIMEOUT
        )
        assert len(await asyncio.wait_for(pings, 4 * TIMEOUT)) == 50
        assert await asyncio.wait_for(established.ping(), TIMEOUT) >= 0
    assert [w["type"] for w in welcomes[:burst]] == ["welcome"] * burst
    assert len({w["instance"] for w in welcomes[:burst]}) == burst
