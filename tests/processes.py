"""Processes for end-to-end tests and benchmarks: a private redis-server, fresh
databases, and daphne or uvicorn serving the project, as users start it
(docs/deployment.md).

Used by ``tests/e2e/conftest.py`` and by ``bench/``, so both run the hub the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
#: Seconds to wait for a process to start listening or to stop.
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
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


def start_redis(port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """A private redis-server on ``port`` (a free one by default): ``(url, process)``.

    Raises:
        RuntimeError: redis-server is not installed.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    port = port or free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    return f"redis://127.0.0.1:{port}/0", process


def is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


def create_database(base_url: str, directory: Path) -> str:
    """A fresh, migrated database: a new PostgreSQL database beside ``base_url`` when it is
    PostgreSQL, else a SQLite file in ``directory``. Drop it with :func:`drop_database`."""
    if is_postgres(base_url):
        import psycopg

        name = f"taskhub_e2e_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = urlunsplit(urlsplit(base_url)._replace(path=f"/{name}"))
    else:
        url = f"sqlite:///{directory / 'hub.sqlite3'}"
    manage("migrate", "--no-input", database_url=url)
    return url


def drop_database(base_url: str, url: str) -> None:
    if is_postgres(base_url):
        import psycopg

        name = urlsplit(url).path.lstrip("/")
        with psycopg.connect(base_url, autocommit=True) as conn:
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
        timeout=6 * START_TIMEOUT,
    )
    if done.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


#: The servers a :class:`Hub` can run: daphne, the default, and uvicorn.
SERVERS = ("daphne", "uvicorn")

#: uvicorn's options for the hub, as docs/deployment.md gives them: the fast stack
#: (uvloop, httptools, websockets' sans-I/O protocol), the sweeper started by the ASGI
#: lifespan, daphne's limits (1 MiB frames, a ping every 20 s, 30 s for its pong),
#: without per-message compression (the hub's clients do not use it), and a stop that
#: waits at most 5 s for clients.
UVICORN_OPTIONS = (
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--ws",
    "websockets-sansio",
    "--lifespan",
    "on",
    "--ws-max-size",
    str(1024 * 1024),
    "--ws-ping-interval",
    "20",
    "--ws-ping-timeout",
    "30",
    "--ws-per-message-deflate",
    "false",
    "--timeout-graceful-shutdown",
    "5",
)


def server_command(server: str, port: int, app: str = "hubproject.asgi:application") -> list[str]:
    """The command line that serves ``app`` on 127.0.0.1:``port`` with ``server``. An
    ``app`` other than the hub's runs without the ASGI lifespan under uvicorn (a bare
    Channels consumer refuses it).

    Raises:
        ValueError: ``server`` is not one of :data:`SERVERS`.
    """
    if server == "daphne":
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
    if server == "uvicorn":
        options = list(UVICORN_OPTIONS)
        if app != "hubproject.asgi:application":
            options[options.index("--lifespan") + 1] = "off"
        return [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), *options, app]
    raise ValueError(f"unknown server {server!r}: one of {', '.join(SERVERS)}")


class Hub:
    """One hub process serving the project: ``server`` is ``"daphne"`` (the default) or
    ``"uvicorn"`` (:func:`server_command`)."""

    def __init__(
        self,
        database_url: str,
        redis_url: str | None,
        log_path: Path,
        port: int | None = None,
        *,
        server: str = "daphne",
        **settings: str,
    ) -> None:
        self.server = server
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws/taskhub/"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            server_command(server, self.port),
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
            self.process.wait(timeout=START_TIMEOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def create_credential(
    database_url: str, *, sub: Sequence[str] = (), pub: Sequence[str] = (), max_instances: int = 1, prefix: str = "svc"
) -> tuple[str, str]:
    """A credential with a fresh name, made with ``manage.py taskhub_credential``: ``(name, key)``."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    args = ["taskhub_credential", "create", name, "--max-instances", str(max_instances)]
    for pattern in sub:
        args += ["--sub", pattern]
    for pattern in pub:
        args += ["--pub", pattern]
    key = manage(*args, database_url=database_url).strip().splitlines()[-1]
    return name, key


@contextlib.contextmanager
def hub_database(database_url: str) -> Iterator[str]:
    """The hubs' database, opened from this process (Django must be set up) under an alias
    of its own, which it yields; closed and forgotten after, so that no test-database
    machinery ever sees that alias."""
    import dj_database_url
    from django.db import connections

    alias = f"hub_{uuid.uuid4().hex[:8]}"
    config = dict(dj_database_url.parse(database_url))
    connections.settings[alias] = connections.configure_settings({"default": config})["default"]
    try:
        yield alias
    finally:
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]


def add_credential(
    database_url: str, *, sub: Sequence[str] = (), pub: Sequence[str] = (), max_instances: int = 1, prefix: str = "svc"
) -> tuple[str, str]:
    """A credential with a fresh name, written from this process (Django must be set up):
    ``(name, key)``. What :func:`create_credential` does, without a process per credential.
    """
    from taskhub.auth import generate_key, hash_key
    from taskhub.models import Credential

    with hub_database(database_url) as alias:
        name, key = f"{prefix}-{uuid.uuid4().hex[:8]}", generate_key()
        Credential.objects.using(alias).create(
            name=name,
            key_hash=hash_key(key),
            sub_permissions=list(sub),
            pub_permissions=list(pub),
            max_instances=max_instances,
        )
        return name, key
