"""The JavaScript client (``taskhub/static/taskhub/taskhub.js``) against a live hub.

Node's own test runner runs ``tests/js/*.test.mjs``; this module gives them a hub, fresh
credentials (in ``TASKHUB_*`` environment variables) and, across languages, the Python
side: a Python worker for a JS caller, and a Python caller for a JS worker. The Node
dependencies (``ws``, pinned in ``tests/js/package-lock.json``) are installed with
``npm ci`` when ``tests/js/node_modules`` lacks them. Without ``node``, every test here
is skipped, saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskhub.client import Client, TaskFailed, Update
from tests.conftest import TIMEOUT
from tests.e2e.conftest import Hub, Parties, unique_action
from tests.processes import ROOT

JS = ROOT / "tests" / "js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(
        NODE is None, reason="node is not installed: the JavaScript client's tests need Node 20 or newer"
    ),
    pytest.mark.timeout(120 * TIMEOUT),
]

Credential = Callable[..., tuple[str, str]]


@pytest.fixture(scope="module")
def node_env() -> Iterator[dict[str, str]]:
    """The environment node runs in; ``tests/js``'s dependencies installed first if missing."""
    if not (JS / "node_modules" / "ws" / "package.json").is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not installed: it installs tests/js's dependencies (npm ci in tests/js)")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True, timeout=60 * TIMEOUT
        )
        if done.returncode:
            pytest.fail(f"npm ci failed in tests/js:\n{done.stdout}{done.stderr}")
    yield {**os.environ, "TASKHUB_TEST_TIMEOUT": str(TIMEOUT)}


async def run_node_tests(path: str, env: dict[str, str]) -> str:
    """Run one file of Node tests; fail with its report unless every test passed. Runs as
    a child process, so that this event loop keeps serving a Python party meanwhile."""
    process = await asyncio.create_subprocess_exec(
        NODE or "node",
        "--test",
        "--test-reporter=spec",
        path,
        cwd=JS,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 100 * TIMEOUT)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        pytest.fail(f"node --test {path} did not finish:\n{output.decode(errors='replace')}")
    report = output.decode(errors="replace")
    if process.returncode != 0:
        pytest.fail(f"node --test {path} exited with {process.returncode}:\n{report}")
    assert "ℹ fail 0" in report and "ℹ pass 0" not in report, report
    return report


def credentials(credential: Credential, **roles: dict[str, Any]) -> dict[str, str]:
    """``TASKHUB_<ROLE>_NAME`` and ``_KEY`` of a fresh credential for each role."""
    env: dict[str, str] = {}
    for role, options in roles.items():
        name, key = credential(**options)
        env[f"TASKHUB_{role}_NAME"], env[f"TASKHUB_{role}_KEY"] = name, key
    return env


async def test_module_logic_with_a_fake_websocket(node_env: dict[str, str]) -> None:
    """Values, refs, backoff, reconnects and handlers, against a fake WebSocket (no hub)."""
    report = await run_node_tests("unit.test.mjs", node_env)
    assert "reconnecting" in report


async def test_the_seed_readme_example(hub: Hub, credential: Credential, node_env: dict[str, str]) -> None:
    """The seed README's client example: a JS worker and a JS caller on mail:send-bulk."""
    roles = credentials(credential, WORKER={"sub": ["mail:send-bulk"]}, CALLER={"pub": ["mail:send-bulk"]})
    await run_node_tests("seed.test.mjs", {**node_env, **roles, "TASKHUB_URL": hub.url})


async def test_js_workers_and_callers(hub: Hub, credential: Credential, node_env: dict[str, str]) -> None:
    """Failures, cancel and task.signal, lost connections, reads, retries and refusals."""
    namespace = unique_action().split(":")[0]
    roles = credentials(
        credential,
        WORKER={"sub": [namespace], "max_instances": 4},
        WORKER2={"sub": [namespace]},
        CALLER={"pub": [namespace], "max_instances": 4},
    )
    env = {**node_env, **roles, "TASKHUB_URL": hub.url, "TASKHUB_NAMESPACE": namespace}
    await run_node_tests("client.test.mjs", env)


async def test_a_js_caller_and_a_python_worker(hub: Hub, parties: Parties, node_env: dict[str, str]) -> None:
    """tests/js/caller.test.mjs publishes; a Python worker in this process handles."""
    worker = parties.worker(hub.url)
    cancelled = asyncio.Event()

    @worker.sub(parties.action)
    async def handle(task):
        await task.pickup()
        job = await task.get_payload()
        if "fail" in job:
            raise ValueError(job["fail"])
        if job.get("hang"):
            await task.update({"hanging": True})
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        for i in range(job["steps"]):
            await task.update({"step": i + 1}, progress=(i + 1) / job["steps"])
        return {"done": job["steps"], "by": "python", "publisher": task.publisher}

    env = {
        **node_env,
        "TASKHUB_URL": hub.url,
        "TASKHUB_ACTION": parties.action,
        "TASKHUB_WORKER_NAME": parties.worker_name,
        "TASKHUB_CALLER_NAME": parties.caller_name,
        "TASKHUB_CALLER_KEY": parties.caller_key,
    }
    async with worker:
        await run_node_tests("caller.test.mjs", env)
        await asyncio.wait_for(cancelled.wait(), TIMEOUT)


class JsWorker:
    """``node tests/js/worker.mjs``: a taskhub.js worker, stopped by closing its stdin."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def line(self) -> str:
        """The worker's next line of output (what it printed, or says it ended)."""
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
        line = raw.decode(errors="replace").strip()
        if not raw:
            pytest.fail(f"the JS worker ended (exit {self.process.returncode}); it said:\n" + "\n".join(self.lines))
        self.lines.append(line)
        return line

    async def stop(self) -> int:
        """Close its stdin (it says bye and exits) and return its exit code."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            return await asyncio.wait_for(self.process.wait(), TIMEOUT)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


async def test_a_python_caller_and_a_js_worker(hub: Hub, parties: Parties, node_env: dict[str, str]) -> None:
    """tests/js/worker.mjs handles; a Python caller in this process publishes."""
    env = {
        **node_env,
        "TASKHUB_URL": hub.url,
        "TASKHUB_ACTION": parties.action,
        "TASKHUB_WORKER_NAME": parties.worker_name,
        "TASKHUB_WORKER_KEY": parties.worker_key,
    }
    process = await asyncio.create_subprocess_exec(
        NODE or "node",
        "worker.mjs",
        cwd=JS,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    js = JsWorker(process)
    try:
        assert await js.line() == "ready"
        async with parties.caller(hub.url) as caller:
            await _call_the_js_worker(caller, parties.action, parties.worker_name, js)
        assert await js.stop() == 0
        assert await js.line() == "closed"  # after its bye was answered
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _call_the_js_worker(caller: Client, action: str, worker_name: str, js: JsWorker) -> None:
    updates: list[Update] = []
    handle = caller.pub(action, {"steps": 3}, timeout=30).on("update", updates.append)
    assert await asyncio.wait_for(handle.get_result(), TIMEOUT) == {
        "done": 3,
        "by": "javascript",
        "publisher": caller.name,
    }
    assert [(u.data, u.progress, u.service, u.attempt) for u in updates] == [
        ({"step": 1}, 1 / 3, worker_name, 1),
        ({"step": 2}, 2 / 3, worker_name, 1),
        ({"step": 3}, 1.0, worker_name, 1),
    ]

    # A handler that throws fails the task with its error's text.
    with pytest.raises(TaskFailed) as info:
        await asyncio.wait_for(caller.pub(action, {"fail": "no such mailbox"}).get_result(), TIMEOUT)
    assert info.value.reason == "error"
    assert info.value.detail == "Error: no such mailbox"
    assert await asyncio.wait_for(caller.pub(action, {"fail": "x"}).get_result("fallback"), TIMEOUT) == "fallback"

    # A payload too large for the offer is fetched by getPayload().
    big = "é" * 20000
    result = await asyncio.wait_for(caller.pub(action, {"big": big}).get_result(), TIMEOUT)
    assert result == {"length": 20000, "inline": False}

    # A cancel from Python aborts the JS handler's task.signal; its return is not sent.
    started = asyncio.Event()
    handle = caller.pub(action, {"hang": True}).on("update", lambda update: started.set())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await asyncio.wait_for(handle.cancel(), TIMEOUT)
    with pytest.raises(TaskFailed) as info:
        await asyncio.wait_for(handle.get_result(), TIMEOUT)
    assert info.value.reason == "cancelled"
    aborted = json.loads(await js.line())
    assert aborted["aborted"] == handle.task_id
    assert aborted["name"] == "AbortError"
    assert "cancelled" in aborted["detail"]
    state = await caller.get_task(handle.task_id)
    assert [e["kind"] for e in state.events if e["kind"] in ("success", "late_return", "error")] == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Run in a page of the hub's origin: taskhub.js as a page imports it, a worker and a caller.
IN_THE_PAGE = """async ([action, worker, caller]) => {
  const { Client, TaskFailed } = await import('/static/taskhub/taskhub.js');
  const quiet = {};
  const w = new Client('/ws/taskhub/', { name: worker[0], key: worker[1], logger: quiet });
  let aborted;
  w.sub(action, async (task) => {
    task.pickup();
    const n = await task.getPayload();
    if (n === 'hang') {
      task.update('hanging');
      await new Promise((resolve) => task.signal.addEventListener('abort', resolve));
      aborted = task.signal.reason;
      return;
    }
    if (n < 0) throw new Error('negative');
    task.update({ n }, 0.5);
    return n * 2;
  });
  const welcome = await w.connect();
  const c = new Client('/ws/taskhub/', { name: caller[0], key: caller[1], logger: quiet });
  const updates = [];
  const result = await c.pub(action, 21).on('update', (data, u) => updates.push([data, u.progress])).getResult();
  const failure = await c.pub(action, -1).getResult().catch((e) => [e instanceof TaskFailed, e.reason, e.detail]);
  const fallback = await c.pub(action, -2).getResult('fallback');
  const started = new Promise((resolve) => { var h = c.pub(action, 'hang').on('update', () => resolve(h)); });
  const handle = await started;
  await handle.cancel();
  const cancelled = await handle.getResult().catch((e) => e.reason);
  while (!aborted) await new Promise((resolve) => setTimeout(resolve, 10));
  await c.close();
  await w.close();
  return {
    url: w.url, resumed: welcome.resumed, result, updates, failure, fallback, cancelled,
    aborted: [aborted.name, aborted.code],
  };
}"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium): no browser here")
async def test_in_a_browser(hub: Hub, parties: Parties) -> None:
    """taskhub.js as a page loads it from the hub (``/static/taskhub/taskhub.js``), in
    headless Chromium: the browser's own WebSocket, a relative URL, ``hello`` auth and the
    hub's Origin check."""
    playwright = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")
    async with playwright.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            origin = hub.url.replace("ws://", "http://").removesuffix("/ws/taskhub/")
            response = await page.goto(f"{origin}/static/taskhub/taskhub.js")
            assert response is not None and response.ok
            assert "javascript" in (response.headers.get("content-type") or "")
            credentials = [[parties.worker_name, parties.worker_key], [parties.caller_name, parties.caller_key]]
            seen = await asyncio.wait_for(page.evaluate(IN_THE_PAGE, [parties.action, *credentials]), 20 * TIMEOUT)
        finally:
            await browser.close()
    assert seen == {
        "url": hub.url,
        "resumed": False,
        "result": 42,
        "updates": [[{"n": 21}, 0.5]],
        "failure": [True, "error", "Error: negative"],
        "fallback": "fallback",
        "cancelled": "cancelled",
        "aborted": ["AbortError", "aborted"],
    }
