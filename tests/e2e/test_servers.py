"""What depends on the server that runs the hub (docs/deployment.md): a stop with SIGTERM,
and a frame over the server's own limit. Run on uvicorn with ``TASKHUB_TEST_SERVER``
(tests/e2e/conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shlex
import signal
import time
from typing import Any

import pytest
import websockets

from taskhub.models import Instance
from tests.conftest import TIMEOUT
from tests.e2e.conftest import Parties
from tests.processes import ROOT, START_TIMEOUT, UVICORN_OPTIONS

pytestmark = [pytest.mark.timeout(60 * TIMEOUT), pytest.mark.core]

# Instances that outlive a restart of their process (its lease and the grace).
RESTARTABLE = {"TASKHUB_RESUME_GRACE": "30", "TASKHUB_INSTANCE_LEASE": "30"}


def basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


def stopped_cleanly(hub: Any, began: float) -> None:
    """The hub exited by itself on SIGTERM (uvicorn exits by the signal once it has shut
    down), before :meth:`Hub.stop` would have killed it, without a traceback."""
    assert hub.process.returncode in (0, -signal.SIGTERM), hub.log()
    assert time.monotonic() - began < START_TIMEOUT
    assert "Traceback" not in hub.log(), hub.log()


async def test_sigterm_stops_a_hub_cleanly_and_its_clients_ride_through_the_restart(
    make_hub: Any, parties: Parties, hub_db: Any, server: str
) -> None:
    hub = make_hub(**RESTARTABLE)
    worker = parties.worker(hub.url, backoff=lambda n: 0.2)
    picked_up, release = asyncio.Event(), asyncio.Event()

    async def long_task(task: Any) -> str:
        await task.pickup()
        await task.update("before the stop", progress=0.3)
        picked_up.set()
        await release.wait()
        await task.update("after the stop", progress=0.9)
        return "done"

    worker.sub(parties.action, long_task)

    updates: list[Any] = []
    async with worker, parties.caller(hub.url, backoff=lambda n: 0.2) as caller:
        handle = caller.pub(parties.action, timeout=60).on("update", lambda u: updates.append(u.data))
        await asyncio.wait_for(picked_up.wait(), TIMEOUT)
        instance = worker.instance
        assert instance is not None
        began = time.monotonic()
        await asyncio.to_thread(hub.stop)
        stopped_cleanly(hub, began)

        def detached(alias: str) -> bool:
            return Instance.objects.using(alias).get(pk=instance).detached_at is not None

        if server == "uvicorn":
            # The ASGI lifespan's shutdown ran (the sweeper stopped), after every
            # connection was closed (1012) and its instance detached.
            assert "Application shutdown complete" in hub.log()
            assert hub_db(detached)
        else:  # daphne just drops the connections: the instance lives on its lease
            assert not hub_db(detached)
        make_hub(port=hub.port, **RESTARTABLE)

        async def back() -> None:
            while not (worker.connected and caller.connected):
                await asyncio.sleep(0.05)  # the clients' reconnects are not observable otherwise

        await asyncio.wait_for(back(), 4 * TIMEOUT)
        assert worker.instance == instance  # taken back, with its task
        release.set()
        assert await asyncio.wait_for(handle.get_result(), 4 * TIMEOUT) == "done"
    assert updates == ["before the stop", "after the stop"]


async def test_sigterm_stops_a_hub_with_a_client_that_does_not_read(make_hub: Any, parties: Parties) -> None:
    """A client that reads nothing cannot hold the hub's stop up for longer than uvicorn's
    ``--timeout-graceful-shutdown`` (daphne does not wait for clients at all)."""
    hub = make_hub(TASKHUB_MAX_BUFFERED_BYTES=str(256 * 1024 * 1024))  # never given up on
    action = parties.action
    sent = asyncio.Event()

    async def stream(task: Any) -> str:
        await task.pickup()
        for _ in range(1500):  # 30 MB: more than the socket buffers hold
            await task.update("x" * 20_000)
        sent.set()
        return "done"

    worker = parties.worker(hub.url)
    worker.sub(action, stream)
    async with worker:
        caller = await websockets.connect(
            hub.url, additional_headers=basic(parties.caller_name, parties.caller_key), max_queue=1, max_size=None
        )
        await caller.send(json.dumps({"type": "pub", "action": action, "payload": None, "ref": 1}))
        await asyncio.wait_for(sent.wait(), 4 * TIMEOUT)
        began = time.monotonic()
        await asyncio.to_thread(hub.stop)
        stopped_cleanly(hub, began)
        caller.transport.abort()


async def test_a_frame_over_the_servers_own_limit_ends_the_connection(hub: Any, credential: Any, server: str) -> None:
    """Over the hub's limit (768 KiB), ``message_too_large`` (tests/e2e/test_resilience.py);
    over the server's (1 MiB), daphne drops the TCP connection and uvicorn closes it with
    1009 (message too big)."""
    name, key = credential(max_instances=2)
    async with websockets.connect(hub.url, additional_headers=basic(name, key), max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "ping", "pad": "x" * (1024 * 1024)}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    code = closed.value.rcvd.code if closed.value.rcvd is not None else None
    assert code == {"daphne": None, "uvicorn": 1009}[server]


def test_the_documented_uvicorn_command_is_the_one_tested() -> None:
    """docs/deployment.md's command line, but for the address, is what the tests and the
    benchmarks run (tests/processes.py)."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    command = next(
        block for block in re.findall(r"```sh\n(.*?)```", text, re.S) if block.lstrip().startswith("uvicorn ")
    )
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:5] == ["uvicorn", "--host", "0.0.0.0", "--port", "8000"]
    assert words[5:] == [*UVICORN_OPTIONS, "hubproject.asgi:application"]
