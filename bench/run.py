"""Run every benchmark and print one table: ``python -m bench.run [--quick]``.

The hub is started as users start it (``daphne hubproject.asgi:application``, default
settings, history persisted), on a private redis-server and a fresh database, and is
driven with ``taskhub.client``; scenarios 1, 2, 3 and 5 run it under uvicorn too, with
the options of docs/deployment.md (rows "TaskHub (uvicorn)", a database of its own). The
peers run in the same invocation, on the same machine: Celery (Redis broker and result
backend, ``--pool=solo``, an ``echo`` task), a raw ``websockets`` echo server (the
transport floor) and a Channels echo under daphne and under uvicorn. Systems that are
compared take turns in blocks (:func:`interleaved`), so that they meet the same moments
of the machine.

``--quick`` runs every scenario with a handful of tasks, in seconds (CI runs it so the
scripts keep working); the figures of a quick run mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

from taskhub.client import Client
from taskhub.client.protocol import ClientProtocol
from tests.processes import (
    ROOT,
    Hub,
    create_credential,
    create_database,
    drop_database,
    free_port,
    is_postgres,
    server_command,
    start_redis,
    wait_for_port,
)

PAYLOAD = {"id": 1, "to": "someone@example.org", "subject": "x" * 120, "n": [1, 2, 3, 4, 5]}  # about 200 bytes


@dataclass
class Result:
    scenario: str
    system: str
    count: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds
    note: str = ""
    received: int = 0  # updates the caller received (progress)
    hub_cpu: float = 0.0  # seconds of CPU the hub processes spent (TaskHub), from /proc
    machine_busy: float = 0.0  # seconds of CPU the whole machine spent meanwhile
    frames: float = 0.0  # WebSocket frames per round trip, both ways, all clients (TaskHub)

    @property
    def hub_ms_per_task(self) -> float:
        return 1000 * self.hub_cpu / self.count if self.count else float("nan")

    @property
    def machine_load(self) -> float:
        """The machine's busy CPUs during the measurement (2.0: both cores busy)."""
        return self.machine_busy / self.seconds if self.seconds else float("nan")

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> str:
        note = self.note
        if self.hub_cpu:
            note += (
                f"; hub CPU {self.hub_ms_per_task:.2f} ms/task; machine {self.machine_load:.2f} of "
                f"{os.cpu_count()} cores busy"
            )
        return (
            f"| {self.scenario} | {self.system} | {self.count} | {self.rate:,.0f}/s | {self.ms(0.5):.2f} | "
            f"{self.ms(0.99):.2f} | {1000 * max(self.latencies, default=float('nan')):.2f} | {note} |"
        )


# -- TaskHub scenarios ---------------------------------------------------------------------

#: The round trips whose frames are counted (the difference between two runs, so that
#: connecting, subscribing and warming up cancel out).
FRAME_COUNTS = (10, 30)


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has spent."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


#: The label of TaskHub's rows, by server.
SYSTEMS = {"daphne": "TaskHub", "uvicorn": "TaskHub (uvicorn)"}


class Setup:
    """A database, credentials and one or two hub processes for one group of scenarios."""

    def __init__(
        self,
        database_url: str,
        redis_url: str | None,
        logs: Path,
        processes: int = 1,
        server: str = "daphne",
        **settings: str,
    ):
        self.database_url = database_url
        self.system = SYSTEMS[server]
        self.hubs = [
            Hub(
                database_url,
                redis_url,
                logs / f"hub-{server}-{os.getpid()}-{i}-{time.monotonic_ns()}.log",
                port=None,  # so that mypy does not match ``**settings`` to it
                server=server,
                **settings,
            )
            for i in range(processes)
        ]

    def credential(self, **kwargs: Any) -> tuple[str, str]:
        return create_credential(self.database_url, **kwargs)

    def client(self, credential: tuple[str, str], hub: int = 0) -> Client:
        return Client(self.hubs[hub].url, name=credential[0], key=credential[1])

    def stop(self) -> None:
        for hub in self.hubs:
            hub.stop()


async def round_trips(
    setup: Setup,
    n: int,
    *,
    concurrency: int = 1,
    instances: int = 1,
    updates: int = 0,
    caller_hub: int = 0,
) -> tuple[float, list[float], int, float, float]:
    """``n`` tasks, ``concurrency`` in flight; returns (seconds, latencies, updates
    received, the hubs' CPU seconds, the machine's busy CPU seconds)."""
    action = f"bench{time.monotonic_ns()}:echo"
    worker_cred = setup.credential(sub=[action], max_instances=instances)
    caller_cred = setup.credential(pub=[action])
    workers = [setup.client(worker_cred) for _ in range(instances)]

    async def handler(task: Any) -> Any:
        await task.pickup()
        payload = await task.get_payload()
        for i in range(updates):
            await task.update({"step": i}, progress=(i + 1) / updates)
        return payload

    for w in workers:
        w.sub(action, handler)
    received = 0

    def on_update(update: Any) -> None:
        nonlocal received
        received += 1

    async with contextlib.AsyncExitStack() as stack:
        for w in workers:
            await stack.enter_async_context(w)
        caller = await stack.enter_async_context(setup.client(caller_cred, caller_hub))
        for _ in range(3):  # warm up
            await caller.pub(action, PAYLOAD).get_result()
        received = 0
        latencies: list[float] = []
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with semaphore:
                start = time.perf_counter()
                await caller.pub(action, PAYLOAD).on("update", on_update).get_result()
                latencies.append(time.perf_counter() - start)

        pids = [hub.process.pid for hub in setup.hubs]
        cpu_before, machine_before = sum(cpu_seconds(pid) for pid in pids), machine_seconds()
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        seconds = time.perf_counter() - start
        hub_cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        return seconds, latencies, received, hub_cpu, machine_seconds() - machine_before


async def frames_per_round_trip(setup: Setup) -> float:
    """The WebSocket frames one sequential round trip (pub to result, with the worker's
    pickup) carries, both ways, counted where the client's sans-I/O protocol reads and
    writes them."""
    counted = [0]
    receive, data_to_send = ClientProtocol.receive, ClientProtocol.data_to_send

    def counting_receive(self: ClientProtocol, text: str | bytes) -> Any:
        counted[0] += 1
        return receive(self, text)

    def counting_data_to_send(self: ClientProtocol) -> list[str]:
        frames = data_to_send(self)
        counted[0] += len(frames)
        return frames

    totals = []
    try:
        ClientProtocol.receive = counting_receive  # type: ignore[method-assign]
        ClientProtocol.data_to_send = counting_data_to_send  # type: ignore[method-assign]
        for n in FRAME_COUNTS:
            counted[0] = 0
            await round_trips(setup, n)
            totals.append(counted[0])
    finally:
        ClientProtocol.receive, ClientProtocol.data_to_send = receive, data_to_send  # type: ignore[method-assign]
    return (totals[1] - totals[0]) / (FRAME_COUNTS[1] - FRAME_COUNTS[0])


async def settled(workers: list[Client], task_id: str) -> None:
    """Wait until every worker is done with the task: its return persisted by the hub, or
    skipped because it heard of another service's success first.

    The task ends at the first return; the other services' returns (``late_return``)
    come after its ``end``, and the next task must not queue behind them. A return asks
    for no answer: a ``ping`` of each worker, answered after it, says it was persisted.
    """
    while any(task.id == task_id for w in workers for task in w.running):
        await asyncio.sleep(0.001)  # pacing between polls of the clients; not part of any measurement
    await asyncio.gather(*(w.ping() for w in workers))


async def fanout(setup: Setup, n: int, services: int = 20, *, one_at_a_time: bool = False) -> tuple[Result, Result]:
    """One task to ``services`` services: time to the last ``start`` and to the result.

    Each handler returns once every service has started: a handler that returned at once
    could end the task (the first return wins) before the last service's handler ran, and
    the client cancels a handler whose task ended before it started. So the result comes
    after the last start.

    Back to back, each task also waits behind the previous task's late returns;
    ``one_at_a_time`` publishes the next task once the hub has recorded every return of the
    previous one.
    """
    action = f"fan{time.monotonic_ns()}:echo"
    creds = [setup.credential(sub=[action]) for _ in range(services)]
    caller_cred = setup.credential(pub=[action])
    started: list[float] = []
    everyone = asyncio.Event()

    async def handler(task: Any) -> Any:
        started.append(time.perf_counter())
        if len(started) == services:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), 10)
        return "ok"

    workers = [setup.client(c) for c in creds]
    for w in workers:
        w.sub(action, handler)
    to_last_start, to_result = [], []
    async with contextlib.AsyncExitStack() as stack:
        for w in workers:
            await stack.enter_async_context(w)
        caller = await stack.enter_async_context(setup.client(caller_cred))
        begin = time.perf_counter()
        for _ in range(n):
            started.clear()
            everyone.clear()
            t0 = time.perf_counter()
            handle = caller.pub(action, PAYLOAD)
            await handle.get_result()
            to_result.append(time.perf_counter() - t0)
            await asyncio.wait_for(everyone.wait(), 10)
            to_last_start.append(max(started) - t0)
            if one_at_a_time:
                await asyncio.wait_for(settled(workers, handle.task_id), 10)
        seconds = time.perf_counter() - begin
    how = f"{services} services, " + ("one task at a time" if one_at_a_time else "back to back")
    return (
        Result("4 fan-out: last start", setup.system, n, seconds, to_last_start, how),
        Result("4 fan-out: result", setup.system, n, seconds, to_result, how),
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle(setup: Setup, n: int) -> Result:
    """``n`` authenticated, subscribed connections on one process: memory and connect rate."""
    action = f"idle{time.monotonic_ns()}:wait"
    name, key = setup.credential(sub=[action], max_instances=n)
    headers = {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}
    hub = setup.hubs[0]
    # One connection first, so that the process's one-off start-up costs are not counted.
    async with websockets.connect(hub.url, additional_headers=headers) as ws:
        await ws.recv()
    before = rss_kib(hub.process.pid)
    sockets: list[Any] = []
    latencies: list[float] = []

    failed: collections.Counter[str] = collections.Counter()

    async def connect() -> None:
        t0 = time.perf_counter()
        try:
            ws = await websockets.connect(hub.url, additional_headers=headers, compression=None, open_timeout=60)
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            failed[type(exc).__name__ if not isinstance(exc, websockets.InvalidStatus) else str(exc)] += 1
            return  # counted and said: the figures are of the connections that opened
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "sub", "action": action, "ref": 1}))
        answer = json.loads(await ws.recv())
        if answer.get("type") != "ack":
            raise RuntimeError(f"sub failed: {answer}")
        latencies.append(time.perf_counter() - t0)
        sockets.append(ws)

    start = time.perf_counter()
    for i in range(0, n, 100):
        await asyncio.gather(*(connect() for _ in range(min(100, n - i))))
    seconds = time.perf_counter() - start
    after = rss_kib(hub.process.pid)
    await asyncio.gather(*(ws.close() for ws in sockets))
    per = (after - before) / max(len(sockets), 1)
    refused = "".join(f"; {count} not opened: {why}" for why, count in failed.most_common())
    return Result(
        "5 idle connections",
        setup.system,
        len(sockets),
        seconds,
        latencies,
        f"{per:.1f} KiB RSS per connection ({before / 1024:.0f} → {after / 1024:.0f} MiB){refused}",
    )


# -- peers --------------------------------------------------------------------------------


@contextlib.contextmanager
def celery_worker(redis_url: str, logs: Path) -> Iterator[Any]:
    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    log = (logs / "celery.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "--pool=solo",
            "-Q",
            "bench",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    os.environ["BENCH_REDIS_URL"] = redis_url
    from bench import celery_app

    celery_app.app.conf.update(broker_url=redis_url, result_backend=redis_url)
    try:
        celery_app.echo.apply_async(args=[1]).get(timeout=60)  # ready
        yield celery_app.echo
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def celery_sequential(echo: Any, n: int) -> Result:
    for _ in range(3):
        echo.apply_async(args=[PAYLOAD]).get(timeout=10)
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        echo.apply_async(args=[PAYLOAD]).get(timeout=10)
        latencies.append(time.perf_counter() - t0)
    return Result("1 sequential", "Celery", n, time.perf_counter() - start, latencies, "apply_async().get()")


def celery_burst(echo: Any, n: int) -> Result:
    start = time.perf_counter()
    sent = [(time.perf_counter(), echo.apply_async(args=[PAYLOAD])) for _ in range(n)]
    latencies = []
    for t0, result in sent:
        result.get(timeout=60)
        latencies.append(time.perf_counter() - t0)
    return Result("2 burst", "Celery", n, time.perf_counter() - start, latencies, f"{n} sent, then all collected")


ECHO_SERVERS: dict[str, tuple[Callable[[int], list[str]], str]] = {
    # system: (its command line for a port, note)
    "websockets echo": (lambda port: [sys.executable, "-m", "bench.echo_server", str(port)], "transport floor"),
    "daphne echo": (
        functools.partial(server_command, "daphne", app="bench.daphne_echo:application"),
        "daphne + Channels, no database",
    ),
    "uvicorn echo": (
        functools.partial(server_command, "uvicorn", app="bench.daphne_echo:application"),
        "uvicorn + Channels, no database",
    ),
}


async def ws_echo(n: int, concurrency: int, system: str = "websockets echo") -> Result:
    """Echo round trips of the payload against a peer server of :data:`ECHO_SERVERS`."""
    command, note = ECHO_SERVERS[system]
    port = free_port()
    process = subprocess.Popen(
        command(port),
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "hubproject.settings"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        message = json.dumps(PAYLOAD)
        async with websockets.connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
            for _ in range(20):  # warm up
                await ws.send(message)
                await ws.recv()
            latencies: list[float] = []
            start = time.perf_counter()
            if concurrency == 1:
                for _ in range(n):
                    t0 = time.perf_counter()
                    await ws.send(message)
                    await ws.recv()
                    latencies.append(time.perf_counter() - t0)
            else:
                sent: list[float] = []
                for _ in range(concurrency):
                    sent.append(time.perf_counter())
                    await ws.send(message)
                for i in range(n):
                    await ws.recv()
                    latencies.append(time.perf_counter() - sent[i])
                    if len(sent) < n:
                        sent.append(time.perf_counter())
                        await ws.send(message)
            seconds = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=20)
    name = "1 sequential" if concurrency == 1 else f"2 {concurrency} in flight"
    return Result(name, system, n, seconds, latencies, note)


# -- the run ------------------------------------------------------------------------------


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


Measure = Callable[[int], Awaitable[Result]]


def merged(parts: list[Result]) -> Result:
    """One result from the blocks of one measurement."""
    first = parts[0]
    return Result(
        first.scenario,
        first.system,
        sum(p.count for p in parts),
        sum(p.seconds for p in parts),
        [latency for p in parts for latency in p.latencies],
        first.note,
        sum(p.received for p in parts),
        sum(p.hub_cpu for p in parts),
        sum(p.machine_busy for p in parts),
    )


def measure(setup: Setup, scenario: str, note: str, **options: Any) -> Measure:
    """A TaskHub measurement of ``k`` round trips (:func:`round_trips` with ``options``)."""

    async def run(k: int) -> Result:
        seconds, latencies, received, hub_cpu, busy = await round_trips(setup, k, **options)
        return Result(scenario, setup.system, k, seconds, latencies, note, received, hub_cpu, busy)

    return run


async def interleaved(n: int, rounds: int, measures: list[Measure]) -> list[Result]:
    """Each measurement in ``rounds`` blocks of ``n // rounds`` tasks, taking turns.

    The machine's speed drifts by tens of percent over minutes (other tenants, CPU
    frequency), and a run takes ten. Measured one after the other, two systems met
    different moments and their ratio swung with them (0.53x and 0.78x Celery in two
    runs ten minutes apart); in turns, every system meets the same moments. The order
    alternates between rounds so that no system always follows the same one.
    """
    parts: list[list[Result]] = [[] for _ in measures]
    for r in range(rounds):
        order = list(range(len(measures)))
        for i in order if r % 2 == 0 else reversed(order):
            parts[i].append(await measures[i](n // rounds))
    return [merged(p) for p in parts]


async def run(args: argparse.Namespace) -> list[Result]:
    quick = args.quick
    n_seq, n_burst, n_fan, n_idle = (20, 100, 5, 100) if quick else (500, 1000, 50, 10_000)
    rounds = 2 if quick else 5
    results: list[Result] = []
    logs = Path(tempfile.mkdtemp(prefix="taskhub-bench-"))
    redis_url, redis = start_redis()
    base = args.database_url
    try:
        # The embedded default (SQLite, in-memory layer, one process) under daphne and
        # under uvicorn, each on a database of its own, in turns with each other and with
        # the peers on the same machine and Redis.
        for server in ("daphne", "uvicorn"):
            (logs / f"embedded-{server}").mkdir(exist_ok=True)
        setup, uv = (Setup(create_database("", logs / f"embedded-{s}"), None, logs, server=s) for s in SYSTEMS)
        try:
            with celery_worker(redis_url, logs) as echo:

                async def celery_seq(k: int) -> Result:
                    return celery_sequential(echo, k)

                async def celery_many(k: int) -> Result:
                    return celery_burst(echo, k)

                def hubs(scenario: str, note: str, **options: Any) -> list[Measure]:
                    return [measure(s, scenario, note, **options) for s in (setup, uv)]

                sequential = hubs("1 sequential", "SQLite, in-memory layer")
                progress = hubs("3 progress", "3 updates each", updates=3)
                in_flight = hubs("2 50 in flight", "4 worker instances", concurrency=50, instances=4)

                def echoes(concurrency: int) -> list[Measure]:
                    return [functools.partial(ws_echo, concurrency=concurrency, system=s) for s in ECHO_SERVERS]

                one_at_a_time = await interleaved(n_seq, rounds, [celery_seq, *echoes(1), *sequential, *progress])
                results += one_at_a_time[: -len(progress)]
                many = await interleaved(n_burst, rounds, [celery_many, *echoes(50), *in_flight])
                results += many
                for updated in one_at_a_time[-len(progress) :]:
                    updated.note += f"; {updated.received} received"
                    results.append(updated)
            for hub_setup in (setup, uv):
                frames = await frames_per_round_trip(hub_setup)
                for r in results:
                    if r.scenario == "1 sequential" and r.system == hub_setup.system:
                        r.frames = frames
                        r.note += f"; {frames:g} frames per round trip"
            results.extend(await fanout(setup, n_fan))
            results.extend(await fanout(setup, n_fan, one_at_a_time=True))
            results.append(await idle(setup, n_idle))
            setup.stop()  # uvicorn's idle connections alone on the machine, as daphne's were
            results.append(await idle(uv, n_idle))
        finally:
            setup.stop()
            uv.stop()

        # Scaled out: Redis layers, PostgreSQL (when reachable), one process and two, in
        # turns (the worker on one, the caller on the other).
        (logs / "scaled").mkdir(exist_ok=True)
        database = create_database(base, logs / "scaled")
        db_name = "PostgreSQL" if is_postgres(base) else "SQLite"
        try:
            for layer in ("core", "pubsub"):
                setups = [Setup(database, redis_url, logs, processes, TASKHUB_LAYER=layer) for processes in (1, 2)]
                try:
                    measures: dict[str, list[Measure]] = {"6 sequential": [], "6 50 in flight": []}
                    for processes, setup in enumerate(setups, start=1):
                        where = f"{layer} layer, {db_name}, {processes} process{'es' if processes > 1 else ''}"
                        caller_hub = processes - 1
                        measures["6 sequential"].append(measure(setup, "6 sequential", where, caller_hub=caller_hub))
                        measures["6 50 in flight"].append(
                            measure(setup, "6 50 in flight", where, concurrency=50, instances=4, caller_hub=caller_hub)
                        )
                    results += await interleaved(n_seq, rounds, measures["6 sequential"])
                    results += await interleaved(n_burst, rounds, measures["6 50 in flight"])
                finally:
                    for setup in setups:
                        setup.stop()
        finally:
            drop_database(base, database)
    finally:
        redis.terminate()
        redis.wait(timeout=20)
    return results


#: Issue 16's targets: ratios to the peers in the same run.
TARGETS = {
    "sequential": 1.0,  # x Celery's sequential rate (moonshot 1.5x), with every event persisted
    "sequential p99 ms": 5.0,
    "in flight": 1.0,  # x Celery's burst, 50 in flight (moonshot 2x)
    "progress": 0.7,  # x our sequential, with 3 progress updates
    "fan-out one at a time ms": 5.0,  # p99 to the last of 20 services' start
    "fan-out back to back ms": 10.0,
    "idle KiB": 25.0,  # per idle connection, 10,000 on one process
    "frames": 6,  # per round trip: pub, pickup, return and the result
    "scale-out core": 1.4,  # hub CPU per task, two processes / one
    "scale-out pubsub": 1.25,
}


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def ratios(results: list[Result]) -> list[str]:
    """Each figure beside its target (:data:`TARGETS`), with what the machine was doing."""

    def find(scenario: str, system: str, note: str = "") -> Result | None:
        return next((r for r in results if r.scenario == scenario and r.system == system and note in r.note), None)

    t = TARGETS
    lines = []
    seq, celery_seq = find("1 sequential", "TaskHub"), find("1 sequential", "Celery")
    burst, celery_burst_ = find("2 50 in flight", "TaskHub"), find("2 burst", "Celery")
    progress = find("3 progress", "TaskHub")
    floor, daphne = find("1 sequential", "websockets echo"), find("1 sequential", "daphne echo")
    if seq and celery_seq and floor and daphne:
        ratio, p99 = seq.rate / celery_seq.rate, seq.ms(0.99)
        lines.append(
            f"- sequential: {ratio:.2f}x Celery (target >= {t['sequential']}x, moonshot 1.5x: "
            f"{met(ratio >= t['sequential'])}), p99 {p99:.2f} ms (target <= {t['sequential p99 ms']:g} ms: "
            f"{met(p99 <= t['sequential p99 ms'])}); machine {seq.machine_load:.2f} of {os.cpu_count()} cores busy; "
            f"one round trip costs {daphne.rate / seq.rate:.1f} daphne echoes and {floor.rate / seq.rate:.1f} "
            "websockets echoes"
        )
    if seq and seq.frames:
        lines.append(
            f"- frames per round trip: {seq.frames:g} (target <= {t['frames']}: {met(seq.frames <= t['frames'])})"
        )
    if seq and celery_seq and daphne and seq.frames:
        # What daphne carries bounds what any hub on it can do: its echo is two frames
        # (one each way) through daphne and Channels, with nothing else to do.
        frames_ms = 1000 * seq.frames / (2 * daphne.rate)
        target_ms = 1000 / (t["sequential"] * celery_seq.rate)
        lines.append(
            f"- the transport's share: {seq.frames:g} frames at the daphne echo's cost take {frames_ms:.2f} ms; "
            f"{t['sequential']}x Celery allows {target_ms:.2f} ms per round trip, which leaves "
            f"{target_ms - frames_ms:.2f} ms for three persisted transitions and the protocol; TaskHub's hub "
            f"spent {seq.hub_ms_per_task:.2f} ms of CPU per round trip"
        )
    if burst and celery_burst_:
        ratio = burst.rate / celery_burst_.rate
        lines.append(
            f"- 50 in flight: {ratio:.2f}x Celery's burst (target >= {t['in flight']}x, moonshot 2x: "
            f"{met(ratio >= t['in flight'])}); the hub spent {burst.hub_ms_per_task:.2f} ms of CPU per task, "
            f"{burst.hub_cpu / burst.seconds:.0%} of one core (one process runs on one); machine "
            f"{burst.machine_load:.2f} of {os.cpu_count()} cores busy"
        )
    if progress and seq:
        ratio = progress.rate / seq.rate
        lines.append(
            f"- progress: {ratio:.2f}x our sequential (target >= {t['progress']}x: {met(ratio >= t['progress'])})"
        )
    for how, key in (("back to back", "fan-out back to back ms"), ("one task at a time", "fan-out one at a time ms")):
        last_start = find("4 fan-out: last start", "TaskHub", how)
        if last_start:
            p99 = last_start.ms(0.99)
            lines.append(
                f"- fan-out to 20, {how}: p99 to the last start {p99:.2f} ms (target <= {t[key]:g} ms: "
                f"{met(p99 <= t[key])})"
            )
    for system in ("TaskHub", SYSTEMS["uvicorn"]):
        idle_ = find("5 idle connections", system)
        if idle_:
            per = float(idle_.note.split(" KiB")[0])
            lines.append(
                f"- idle, {system}: {idle_.note} at {idle_.count:,} (target <= {t['idle KiB']:g} KiB: "
                f"{met(per <= t['idle KiB'])}); {idle_.rate:,.0f} connects/s"
            )
    lines += uvicorn_ratios(find)
    for layer in ("core", "pubsub"):
        one = find("6 50 in flight", "TaskHub", f"{layer} layer")
        two = next(
            (
                r
                for r in results
                if r.scenario == "6 50 in flight" and f"{layer} layer" in r.note and "2 processes" in r.note
            ),
            None,
        )
        if one and two:
            cost, target = two.hub_ms_per_task / one.hub_ms_per_task, t[f"scale-out {layer}"]
            lines.append(
                f"- scaled out ({layer} layer), 50 in flight, the worker on one process and the caller on the "
                f"other: hub CPU {one.hub_ms_per_task:.2f} → {two.hub_ms_per_task:.2f} ms per task, {cost:.2f}x "
                f"(target <= {target}x: {met(cost <= target)}); rate {two.rate / one.rate:.2f}x; machine "
                f"{one.machine_load:.2f} → {two.machine_load:.2f} of {os.cpu_count()} cores busy"
            )
    return lines


def uvicorn_ratios(find: Callable[..., Result | None]) -> list[str]:
    """The lines that compare TaskHub under uvicorn with daphne and the peers."""
    lines = []
    uv = SYSTEMS["uvicorn"]
    seq, uv_seq, celery_seq = find("1 sequential", "TaskHub"), find("1 sequential", uv), find("1 sequential", "Celery")
    echo = find("1 sequential", "uvicorn echo")
    if seq and uv_seq and celery_seq and echo:
        lines.append(
            f"- uvicorn, sequential: {uv_seq.rate / celery_seq.rate:.2f}x Celery, {uv_seq.rate / seq.rate:.2f}x "
            f"daphne's rate, p99 {uv_seq.ms(0.99):.2f} ms; hub CPU {seq.hub_ms_per_task:.2f} → "
            f"{uv_seq.hub_ms_per_task:.2f} ms per round trip; one round trip costs {echo.rate / uv_seq.rate:.1f} "
            "uvicorn echoes"
        )
    burst, uv_burst = find("2 50 in flight", "TaskHub"), find("2 50 in flight", uv)
    celery_burst_ = find("2 burst", "Celery")
    if burst and uv_burst and celery_burst_:
        lines.append(
            f"- uvicorn, 50 in flight: {uv_burst.rate / celery_burst_.rate:.2f}x Celery's burst, "
            f"{uv_burst.rate / burst.rate:.2f}x daphne's rate; hub CPU {burst.hub_ms_per_task:.2f} → "
            f"{uv_burst.hub_ms_per_task:.2f} ms per task"
        )
    progress = find("3 progress", uv)
    if progress and uv_seq:
        lines.append(f"- uvicorn, progress: {progress.rate / uv_seq.rate:.2f}x its sequential")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run; the figures mean nothing")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="PostgreSQL for the scaled-out scenarios (a fresh database is created beside it); default: SQLite",
    )
    args = parser.parse_args()
    before = load()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = asyncio.run(run(args))
    print(
        f"\nTaskHub benchmarks, {started}; {'QUICK run: figures mean nothing; ' if args.quick else ''}"
        f"before: {before}; after: {load()}\n"
    )
    print("| scenario | system | tasks | rate | p50 ms | p99 ms | max ms | notes |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        print(r.row())
    print("\nAgainst the targets:")
    for line in ratios(results):
        if line:
            print(line)


if __name__ == "__main__":
    main()
