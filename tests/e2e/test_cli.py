"""``python -m taskhub.client``: a worker from a Python function, and pub with a progress bar."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import TIMEOUT
from tests.processes import ROOT, create_credential

pytestmark = pytest.mark.timeout(60 * TIMEOUT)


def cli(*args: str, **kwargs: Any) -> list[str]:
    return [sys.executable, "-m", "taskhub.client", *args]


def test_worker_and_pub_from_the_command_line(hub, credential, database_url, tmp_path):
    action = f"t{uuid.uuid4().hex[:10]}:double"
    # As an operator makes it: the key printed by manage.py taskhub_credential works.
    w_name, w_key = create_credential(database_url, sub=[action])
    c_name, c_key = credential(pub=[action])
    (tmp_path / "jobs.py").write_text(
        "async def double(task):\n"
        "    await task.pickup()\n"
        "    await task.update('half', progress=0.5)\n"
        "    return (await task.get_payload())['n'] * 2\n"
    )
    worker = subprocess.Popen(
        cli("--url", hub.url, "--name", w_name, "--key", w_key, "worker", "jobs:double", "--action", action),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert worker.stderr is not None  # stderr=PIPE
    try:
        assert "serving" in worker.stderr.readline()
        done = subprocess.run(
            cli(
                "--url", hub.url, "--name", c_name, "--key", c_key, "pub", action, '{"n": 21}', "--pickup-timeout", "10"
            ),
            capture_output=True,
            text=True,
            timeout=10 * TIMEOUT,
            env={"PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == 42
        assert "[###############...............]  50%" in done.stderr
    finally:
        worker.terminate()
        worker.wait(timeout=TIMEOUT)


def test_pub_exit_codes(hub, credential):
    action = f"t{uuid.uuid4().hex[:10]}:nobody"
    c_name, c_key = credential(pub=[action])

    def pub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli("--url", hub.url, "--name", c_name, "--key", c_key, "pub", *args),
            capture_output=True, text=True, timeout=10 * TIMEOUT, env={"PYTHONPATH": str(ROOT)},
        )  # fmt: skip

    failed = pub(action, "--pickup-timeout", "0.3")
    assert (failed.returncode, "pickup_timeout" in failed.stderr) == (1, True), failed.stderr
    denied = pub("other:thing")
    assert (denied.returncode, "may not publish" in denied.stderr) == (3, True), denied.stderr
    bad = pub(action, "{nope")
    assert bad.returncode != 0 and "not JSON" in bad.stderr, bad.stderr
