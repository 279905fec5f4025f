"""``python -m taskhub.client``: a worker from a Python function, pub with a progress bar,
watch, payloads from files and standard input, and what it says when something is off.

The command runs from a folder of its own (not the repository), with the virtualenv's
Python, as a user runs it: ``taskhub`` is installed in the virtualenv (scripts/_env.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskhub.client import Client, TaskFailed
from taskhub.client.cli import WAITING_NOTICE
from tests.conftest import TIMEOUT
from tests.e2e.conftest import unique_action
from tests.processes import create_credential, free_port

pytestmark = pytest.mark.timeout(60 * TIMEOUT)

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskhub.client", *args]


def user_env() -> dict[str, str]:
    """The environment of a user's shell: nothing that points Python at the repository."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}


def write_jobs(folder: Path) -> None:
    folder.joinpath("jobs.py").write_text(
        "async def double(task):\n"
        "    await task.pickup()\n"
        "    await task.update('half', progress=0.5)\n"
        "    return (await task.get_payload())['n'] * 2\n"
        "\n"
        "async def size(task):\n"
        "    return len((await task.get_payload())['text'])\n"
    )


class Worker:
    """``python -m taskhub.client worker jobs:FUNCTION`` in ``folder``, read line by line."""

    def __init__(self, url: str, name: str, key: str, target: str, action: str, folder: Path, *extra: str) -> None:
        args = cli("--url", url, "--name", name, "--key", key, "worker", target, "--action", action, *extra)
        self.process = subprocess.Popen(args, cwd=folder, stderr=subprocess.PIPE, text=True, env=user_env())
        self.lines: list[str] = []

    def wait_for(self, pattern: str) -> str:
        """The first line of its standard error that matches ``pattern`` (read as it comes;
        the test's timeout bounds the wait)."""
        assert self.process.stderr is not None  # stderr=PIPE
        for line in self.lines:
            if re.search(pattern, line):
                return line
        while line := self.process.stderr.readline():
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"the worker exited ({self.process.wait()}) without a line matching {pattern!r}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=TIMEOUT)


def test_worker_and_pub_from_the_command_line(hub, credential, database_url, tmp_path):
    action = f"t{uuid.uuid4().hex[:10]}:double"
    # As an operator makes it: the key printed by manage.py taskhub_credential works.
    w_name, w_key = create_credential(database_url, sub=[action])
    c_name, c_key = credential(pub=[action])
    write_jobs(tmp_path)
    worker = Worker(hub.url, w_name, w_key, "jobs:double", action, tmp_path)
    try:
        worker.wait_for("serving")
        done = subprocess.run(
            cli("--url", hub.url, "--name", c_name, "--key", c_key, "pub", action, '{"n": 21}'),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=10 * TIMEOUT,
            env=user_env(),
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == 42  # the result alone on standard output
        task_id = re.match(rf"task ({UUID})\n", done.stderr)
        assert task_id is not None, done.stderr  # the id first, to watch the task with
        assert "[###############...............]  50%" in done.stderr
        # The worker logs the task (INFO, on by default).
        assert "INFO" in worker.wait_for(task_id.group(1))
    finally:
        worker.stop()


def test_pub_exit_codes(hub, credential):
    action = f"t{uuid.uuid4().hex[:10]}:nobody"
    c_name, c_key = credential(pub=[action])

    def pub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli("--url", hub.url, "--name", c_name, "--key", c_key, "pub", *args),
            capture_output=True, text=True, timeout=10 * TIMEOUT, env=user_env(),
        )  # fmt: skip

    failed = pub(action, "--pickup-timeout", "0.3")
    assert (failed.returncode, "pickup_timeout" in failed.stderr) == (1, True), failed.stderr
    denied = pub("other:thing")
    assert (denied.returncode, "may not publish" in denied.stderr) == (3, True), denied.stderr
    bad = pub(action, "{nope")
    assert (bad.returncode, bad.stderr) == (3, "error: the payload is not JSON: Expecting property name enclosed in "
                                            "double quotes: line 1 column 2 (char 1)\n")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["pub", "a:b", "1", "--task-id", "abc"], "error: --task-id 'abc' is not a UUID (task ids look like "),
        (["watch", "abc"], "error: the task id 'abc' is not a UUID (task ids look like "),
        (["pub", "a:b", "@no-such-file.json"], "error: cannot read the payload file 'no-such-file.json': "),
        (["worker", "nowhere:job", "--action", "a:b"], "error: cannot import 'nowhere' "),
    ],
)
def test_bad_arguments_get_one_line_before_anything_is_sent(tmp_path, args, error):
    # Nothing listens at the URL: the command is refused before it tries to connect.
    url = f"ws://127.0.0.1:{free_port()}/ws/taskhub/"
    done = subprocess.run(
        cli("--url", url, "--name", "svc", "--key", "k" * 20, "--connect-timeout", "60", *args),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=10 * TIMEOUT,
        env=user_env(),
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith(error) and done.stderr.count("\n") == 1, done.stderr


def test_payload_from_a_file_and_from_standard_input(hub, credential, tmp_path):
    action = unique_action("size")
    w_name, w_key = credential(sub=[action])
    c_name, c_key = credential(pub=[action])
    write_jobs(tmp_path)
    # Over the kernel's limit on one argument (MAX_ARG_STRLEN, 128 KiB), within the hub's
    # payload limit (512 KiB).
    text = "x" * 300_000
    tmp_path.joinpath("payload.json").write_text(json.dumps({"text": text}))
    worker = Worker(hub.url, w_name, w_key, "jobs:size", action, tmp_path)
    try:
        worker.wait_for("serving")
        for payload, stdin in (("@payload.json", None), ("-", json.dumps({"text": text}))):
            done = subprocess.run(
                cli("--url", hub.url, "--name", c_name, "--key", c_key, "pub", action, payload),
                cwd=tmp_path,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=10 * TIMEOUT,
                env=user_env(),
            )
            assert (done.returncode, done.stdout) == (0, "300000\n"), done.stderr
    finally:
        worker.stop()


def test_pub_says_when_a_task_waits_for_a_subscriber(hub, credential, tmp_path):
    action = unique_action("double")
    w_name, w_key = credential(sub=[action])
    c_name, c_key = credential(pub=[action])
    write_jobs(tmp_path)
    pub = subprocess.Popen(
        cli("--url", hub.url, "--name", c_name, "--key", c_key, "pub", action, '{"n": 2}', "--pickup-timeout", "60"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=user_env(),
    )
    assert pub.stderr is not None and pub.stdout is not None  # PIPE
    worker = None
    try:
        task_id = re.fullmatch(rf"task ({UUID})\n", pub.stderr.readline())
        assert task_id is not None
        # Nobody subscribes: after WAITING_NOTICE seconds it says so (and keeps waiting).
        assert pub.stderr.readline() == (
            f"task {task_id.group(1)} is waiting for a subscriber of {action} "
            "(start a worker for it; the task fails after its pickup timeout)\n"
        )
        # A worker that comes later gets the task, and pub prints its result.
        worker = Worker(hub.url, w_name, w_key, "jobs:double", action, tmp_path)
        assert pub.wait(timeout=10 * TIMEOUT) == 0, pub.stderr.read()
        assert json.loads(pub.stdout.read()) == 4
    finally:
        pub.kill()
        pub.wait()
        if worker is not None:
            worker.stop()


def test_no_waiting_notice_for_a_task_picked_up_in_time(hub, credential, tmp_path):
    action = unique_action("double")
    w_name, w_key = credential(sub=[action])
    c_name, c_key = credential(pub=[action])

    async def slow(task: Any) -> str:
        await task.pickup()
        await asyncio.sleep(WAITING_NOTICE + 1)  # working, past the notice's moment
        return "done"

    async def run() -> subprocess.CompletedProcess[str]:
        async with Client(hub.url, name=w_name, key=w_key) as worker:
            worker.sub(action, slow)
            args = cli("--url", hub.url, "--name", c_name, "--key", c_key, "pub", action)
            return await asyncio.to_thread(
                subprocess.run, args, capture_output=True, text=True, timeout=10 * TIMEOUT, env=user_env()
            )

    done = asyncio.run(run())
    assert done.returncode == 0 and json.loads(done.stdout) == "done", done.stderr
    assert "waiting" not in done.stderr


async def read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str]) -> str:
    """Read lines of ``stream`` into ``seen`` until one matches ``pattern``."""
    while line := (await asyncio.wait_for(stream.readline(), 10 * TIMEOUT)).decode():
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in {''.join(seen)}")


async def test_watch_follows_a_task_to_its_end(hub, credential, tmp_path):
    action = unique_action()
    w_name, w_key = credential(sub=[action])
    c_name, c_key = credential(pub=[action], max_instances=2)  # the caller here, and watch
    release = asyncio.Event()
    worker = Client(hub.url, name=w_name, key=w_key)

    @worker.sub(action)
    async def handle(task):
        await task.pickup()
        await task.update({"step": 1}, progress=0.25)
        await release.wait()
        await task.update({"step": 2}, progress=0.75)
        if await task.get_payload() == "fail":
            raise ValueError("no such mailbox")
        return {"sent": 3}

    async def watch(task_id: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *cli("--url", hub.url, "--name", c_name, "--key", c_key, "watch", task_id),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=user_env(),
        )

    async with worker, Client(hub.url, name=c_name, key=c_key) as caller:
        first = asyncio.Event()
        for payload, status, out in (("ok", 0, {"sent": 3}), ("fail", 1, None)):
            release.clear()
            first.clear()
            handle = caller.pub(action, payload).on("update", lambda update: first.set())
            await asyncio.wait_for(first.wait(), TIMEOUT)  # picked up, one update in
            process = await watch(handle.task_id)
            assert process.stderr is not None and process.stdout is not None  # PIPE
            seen: list[str] = []
            # The timeline so far, then the task's state...
            await read_until(process.stderr, rf"^{action} started, attempt 1$", seen)
            kinds = [line.split()[1] for line in seen[:-1]]
            assert kinds == ["init", "start", "pickup", "update"], seen
            # ...then it follows the task: the next update, and the end.
            release.set()
            await read_until(process.stderr, r"\]  75%$", seen)
            assert not any("25%" in line for line in seen)  # the replayed update is in the timeline only
            assert await asyncio.wait_for(process.wait(), 10 * TIMEOUT) == status
            rest = (await process.stderr.read()).decode()
            if out is not None:
                assert json.loads(await process.stdout.read()) == out
            else:
                assert rest.startswith(f"failed: task {handle.task_id} failed (error): ValueError: no such mailbox")
                with pytest.raises(TaskFailed):
                    await handle.get_result()
        # A task that is not this credential's: the hub's refusal, on one line.
        process = await watch(str(uuid.uuid4()))
        assert await asyncio.wait_for(process.wait(), 10 * TIMEOUT) == 3
        assert process.stderr is not None
        error = (await process.stderr.read()).decode()
        assert error.startswith("error: ") and error.count("\n") == 1, error


def test_pub_no_wait_prints_the_task_id_to_watch(hub, credential, tmp_path):
    action = unique_action("double")
    w_name, w_key = credential(sub=[action])
    c_name, c_key = credential(pub=[action])
    write_jobs(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli("--url", hub.url, "--name", c_name, "--key", c_key, *args),
            cwd=tmp_path, capture_output=True, text=True, timeout=10 * TIMEOUT, env=user_env(),
        )  # fmt: skip

    published = run("pub", action, '{"n": 5}', "--no-wait", "--pickup-timeout", "60")
    assert published.returncode == 0, published.stderr
    task_id = published.stdout.strip()
    assert re.fullmatch(UUID, task_id), published.stdout
    worker = Worker(hub.url, w_name, w_key, "jobs:double", action, tmp_path)
    try:
        watched = run("watch", task_id)
        assert (watched.returncode, json.loads(watched.stdout)) == (0, 10), watched.stderr
    finally:
        worker.stop()


def test_worker_log_level(hub, credential, tmp_path):
    action = unique_action("double")
    w_name, w_key = credential(sub=[action])
    c_name, c_key = credential(pub=[action])
    write_jobs(tmp_path)
    worker = Worker(hub.url, w_name, w_key, "jobs:double", action, tmp_path, "--log-level", "warning")
    try:
        worker.wait_for("serving")

        async def publish() -> tuple[str, Any]:
            async with Client(hub.url, name=c_name, key=c_key) as caller:
                handle = caller.pub(action, {"n": 1})
                return handle.task_id, await asyncio.wait_for(handle.get_result(), 10 * TIMEOUT)

        task_id, result = asyncio.run(publish())
        assert result == 2
    finally:
        worker.stop()
    # The task's INFO lines (logged before its result went out) are not shown.
    assert worker.process.stderr is not None
    logged = "".join(worker.lines) + worker.process.stderr.read()
    assert task_id not in logged and "INFO" not in logged, logged


def test_a_url_that_is_not_a_websocket_url_gets_one_line(tmp_path):
    done = subprocess.run(
        cli("--url", "http://127.0.0.1:8000/ws/taskhub/", "--name", "svc", "--key", "k" * 20, "pub", "a:b", "1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=10 * TIMEOUT,
        env=user_env(),
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("error: ") and "ws://" in done.stderr and done.stderr.count("\n") == 1, done.stderr
