"""End-to-end fixtures: a redis-server and daphne processes the suite starts itself.

The hub runs as users run it (``daphne hubproject.asgi:application``) on its own
database: a fresh SQLite file, or a fresh PostgreSQL database when ``DATABASE_URL``
points at PostgreSQL. Credentials are made with ``manage.py taskhub_credential``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from taskhub.client import Client
from tests.conftest import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 4 * TIMEOUT) -> None:
    """Block until ``port`` accepts connections, or fail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)  # polling a port we do not own: there is no event to wait on
    raise TimeoutError(f"nothing listens on {port} after {timeout} s")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free port, gone at the end of the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=TIMEOUT)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database for the hub processes."""
    base = os.environ.get("DATABASE_URL", "")
    if base.startswith(("postgres://", "postgresql://")):
        import psycopg

        name = f"taskhub_e2e_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('hub') / 'hub.sqlite3'}"
    manage("migrate", "--no-input", database_url=url)
    yield url
    if base.startswith(("postgres://", "postgresql://")):
        import psycopg

        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def hub_env(database_url: str, redis_url: str | None, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DJANGO_SETTINGS_MODULE")}
    env.update(DATABASE_URL=database_url, DJANGO_SETTINGS_MODULE="hubproject.settings", PYTHONUNBUFFERED="1")
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(settings)
    return env


def manage(*args: str, database_url: str) -> str:
    """Run ``manage.py`` against the hub's database and return its output."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=hub_env(database_url, None),
        capture_output=True,
        text=True,
        timeout=20 * TIMEOUT,
    )
    if done.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


class Hub:
    """One daphne process serving the project."""

    def __init__(
        self, database_url: str, redis_url: str | None, log_path: Path, port: int | None = None, **settings: str
    ) -> None:
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws/taskhub/"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "hubproject.asgi:application"],
            cwd=ROOT,
            env=hub_env(database_url, redis_url, **settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.process)

    def kill(self) -> None:
        """Kill the process without letting it clean up (a crash)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=TIMEOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# Fast sweeps and short leases, so that lost instances and deadlines resolve within seconds.
FAST = {"TASKHUB_SWEEP_INTERVAL": "0.2", "TASKHUB_INSTANCE_LEASE": "2"}


@pytest.fixture(scope="session")
def hub(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One daphne process on the Redis channel layer, shared by the session."""
    h = Hub(database_url, redis_url, tmp_path_factory.mktemp("logs") / "hub.log", **FAST)
    yield h
    h.stop()


@pytest.fixture
def make_hub(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[object]:
    """Start extra daphne processes for one test; all are stopped after it."""
    hubs: list[Hub] = []

    def start(*, port: int | None = None, redis: bool = True, **settings: str) -> Hub:
        log = tmp_path / f"hub{len(hubs)}.log"
        h = Hub(database_url, redis_url if redis else None, log, port, **{**FAST, **settings})
        hubs.append(h)
        return h

    yield start
    for h in hubs:
        h.stop()


@pytest.fixture
def credential(database_url: str):
    """``credential(sub=[...], pub=[...], max_instances=1) -> (name, key)``, a fresh name each call."""

    def create(
        *, sub: list[str] = (), pub: list[str] = (), max_instances: int = 1, prefix: str = "svc"
    ) -> tuple[str, str]:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        args = ["taskhub_credential", "create", name, "--max-instances", str(max_instances)]
        for pattern in sub:
            args += ["--sub", pattern]
        for pattern in pub:
            args += ["--pub", pattern]
        key = manage(*args, database_url=database_url).strip().splitlines()[-1]
        return name, key

    return create


def unique_action(verb: str = "run") -> str:
    """A fresh action, so that tests sharing a hub never see each other's tasks."""
    return f"t{uuid.uuid4().hex[:10]}:{verb}"


class Parties:
    """A fresh action with a worker credential that may subscribe to it and a caller that may publish it."""

    def __init__(self, credential) -> None:
        self.action = unique_action()
        self.worker_name, self.worker_key = credential(sub=[self.action])
        self.caller_name, self.caller_key = credential(pub=[self.action])

    def worker(self, url: str, **options) -> Client:
        return Client(url, name=self.worker_name, key=self.worker_key, **options)

    def caller(self, url: str, **options) -> Client:
        return Client(url, name=self.caller_name, key=self.caller_key, **options)


@pytest.fixture
def parties(credential) -> Parties:
    return Parties(credential)
