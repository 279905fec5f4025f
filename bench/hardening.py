"""What one connection can cost the hub, and what a burst of connects costs the others:
``python -m bench.hardening [--quick]``.

1. **A caller that does not read** while its task streams 3,000 updates of 20 KB:
   the hub's resident memory at the start, at its peak and once the caller is gone, with
   the default bound (``TASKHUB_MAX_BUFFERED_BYTES``, 8 MiB) and without one (1 GiB,
   more than the run sends).
2. **600 unread ``get_payload``** answers of 400 KB each, the same two ways.
3. **A burst of connects**: 2,000 connections opened at once by another process, while
   an established client sends pings one after the other: how long its pings took
   during the burst (p50, p99, max), against a quiet hub.

Each scenario starts a fresh hub (``daphne hubproject.asgi:application``, SQLite, the
in-memory layer), as ``bench/run.py`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from taskhub.client import Client
from tests.processes import Hub, create_database

from .run import rss_kib

MiB = 1024 * 1024
UNBOUNDED = str(1024 * MiB)


def basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


def add(database_url: str, **options: Any) -> tuple[str, str]:
    from tests.processes import create_credential

    return create_credential(database_url, **options)


async def memory_watch(pid: int, stop: asyncio.Event) -> int:
    """The highest RSS (KiB) seen until ``stop``."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, rss_kib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return max(peak, rss_kib(pid))


async def unread_updates(database_url: str, logs: Path, limit: str, updates: int) -> str:
    hub = Hub(database_url, None, logs / f"unread-{limit}.log", TASKHUB_MAX_BUFFERED_BYTES=limit)
    try:
        action = f"mem{time.monotonic_ns()}:run"
        worker_cred, caller = add(database_url, sub=[action]), add(database_url, pub=[action])
        chunk = "x" * 20_000
        done = asyncio.Event()

        async def stream(task: Any) -> str:
            await task.pickup()
            for _ in range(updates):
                await task.update(chunk)
            done.set()
            return "done"

        worker = Client(hub.url, name=worker_cred[0], key=worker_cred[1])
        worker.sub(action, stream)
        async with worker:
            before = rss_kib(hub.process.pid)
            stop = asyncio.Event()
            watch = asyncio.ensure_future(memory_watch(hub.process.pid, stop))
            ws = await websockets.connect(hub.url, additional_headers=basic(*caller), max_queue=1, max_size=None)
            await ws.send(json.dumps({"type": "pub", "action": action, "payload": None}))
            await done.wait()
            await ws.close()
            stop.set()
            peak = await watch
            await asyncio.sleep(2)  # the close handshake's timeout, then the allocator settles
            after = rss_kib(hub.process.pid)
        return row("unread updates", limit, updates * len(chunk), before, peak, after)
    finally:
        hub.stop()


async def unread_payloads(database_url: str, logs: Path, limit: str, requests: int) -> str:
    hub = Hub(database_url, None, logs / f"payloads-{limit}.log", TASKHUB_MAX_BUFFERED_BYTES=limit)
    try:
        action = f"mem{time.monotonic_ns()}:big"
        name, key = add(database_url, pub=[action])
        async with Client(hub.url, name=name, key=key) as client:
            handle = client.pub(action, "p" * (400 * 1024))
            await handle.published
            task_id = handle.task_id
        before = rss_kib(hub.process.pid)
        stop = asyncio.Event()
        watch = asyncio.ensure_future(memory_watch(hub.process.pid, stop))
        ws = await websockets.connect(hub.url, additional_headers=basic(name, key), max_queue=1, max_size=None)
        request = json.dumps({"type": "get_payload", "task": task_id})
        try:
            for _ in range(requests):
                await asyncio.wait_for(ws.send(request), 10)
        except (websockets.ConnectionClosed, TimeoutError):
            pass
        await asyncio.sleep(3)  # what was sent is handled (or the connection closed)
        await ws.close()
        stop.set()
        peak = await watch
        await asyncio.sleep(2)
        after = rss_kib(hub.process.pid)
        return row("unread get_payload", limit, requests * 400 * 1024, before, peak, after)
    finally:
        hub.stop()


def row(scenario: str, limit: str, sent: int, before: int, peak: int, after: int) -> str:
    bound = "8 MiB (default)" if limit != UNBOUNDED else "none (1 GiB)"
    grown, kept = (peak - before) / 1024, (after - before) / 1024
    return (
        f"| {scenario} | {bound} | {sent / MiB:.0f} MiB | {before / 1024:.0f} MiB | "
        f"{peak / 1024:.0f} MiB (+{grown:.0f}) | {after / 1024:.0f} MiB (+{kept:.0f}) |"
    )


def _burst(url: str, name: str, key: str, n: int, ready: Any, go: Any, failed: Any) -> None:
    """In a process of its own: open ``n`` connections at once, then close them; counts in
    ``failed`` those that were not welcomed."""

    async def main() -> None:
        ready.set()
        go.wait()

        async def one() -> Any:
            ws = await websockets.connect(url, additional_headers=basic(name, key), open_timeout=120)
            if json.loads(await ws.recv())["type"] != "welcome":
                raise RuntimeError("not welcomed")
            return ws

        sockets = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        failed.value = sum(isinstance(ws, BaseException) for ws in sockets)
        for ws in sockets:
            if not isinstance(ws, BaseException):
                await ws.close()

    asyncio.run(main())


async def connect_burst(database_url: str, logs: Path, n: int) -> list[str]:
    hub = Hub(database_url, None, logs / "burst.log")
    try:
        name, key = add(database_url, max_instances=n + 10)
        rows = []
        async with Client(hub.url, name=name, key=key) as client:
            quiet = [await client.ping() for _ in range(200)]
            ctx = multiprocessing.get_context("spawn")
            ready, go, failed = ctx.Event(), ctx.Event(), ctx.Value("i", -1)
            burst = ctx.Process(target=_burst, args=(hub.url, name, key, n, ready, go, failed))
            burst.start()
            await asyncio.to_thread(ready.wait)
            go.set()
            began = time.monotonic()
            during: list[float] = []
            while burst.is_alive():
                during.append(await client.ping())
            took = time.monotonic() - began
            burst.join()
            burst_label = f"during {n:,} connects ({took:.1f} s, {failed.value} not welcomed)"
            for label, times in (("quiet hub", quiet), (burst_label, during)):
                ms = sorted(t * 1000 for t in times)
                p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
                rows.append(f"| ping, {label} | {len(ms)} | {statistics.median(ms):.2f} | {p99:.2f} | {ms[-1]:.2f} |")
        return rows
    finally:
        hub.stop()


async def run(quick: bool) -> None:
    updates, requests, connects = (300, 60, 100) if quick else (3_000, 600, 2_000)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        database_url = create_database("", logs)
        print("| scenario | bound | sent to the client | hub RSS before | peak | after it left |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for limit in (str(8 * MiB), UNBOUNDED):
            print(await unread_updates(database_url, logs, limit, updates), flush=True)
        for limit in (str(8 * MiB), UNBOUNDED):
            print(await unread_payloads(database_url, logs, limit, requests), flush=True)
        print()
        print("| established client | pings | p50 ms | p99 ms | max ms |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for line in await connect_burst(database_url, logs, connects):
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run; figures mean nothing")
    asyncio.run(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
