"""End-to-end fixtures: a redis-server and hub processes the suite starts itself.

The hub runs as users run it (``daphne hubproject.asgi:application``, or uvicorn with the
options of docs/deployment.md) on its own database: a fresh SQLite file, or a fresh
PostgreSQL database when ``DATABASE_URL`` points at PostgreSQL. Credentials are written
to it from the test process.

Servers: ``TASKHUB_TEST_SERVER`` is ``daphne`` (the default), ``uvicorn`` or ``both``
(each test that starts hubs runs once per server, its id ending in ``[daphne]`` or
``[uvicorn]``). Two markers go with it:

- ``@pytest.mark.core``: the core subset, which CI also runs on uvicorn
  (``TASKHUB_TEST_SERVER=uvicorn pytest -m core tests/e2e``): round trips, limits and
  close codes, restarts and the sweeper, scale-out; what depends on the server.
- ``@pytest.mark.daphne_only("why")``: a test of something only daphne has (what
  ``TASKHUB_MAX_QUEUED_FRAMES`` does, say); skipped on another server, with its reason.
"""

from __future__ import annotations

import concurrent.futures
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskhub.client import Client
from tests.conftest import TIMEOUT
from tests.processes import (
    ROOT,
    SERVERS,
    Hub,
    add_credential,
    create_database,
    drop_database,
    hub_database,
    start_redis,
)

__all__ = ["ROOT", "Hub"]

#: The environment variable that chooses the servers the end-to-end tests run against.
SERVER_VARIABLE = "TASKHUB_TEST_SERVER"


def selected_servers() -> tuple[str, ...]:
    """The servers ``TASKHUB_TEST_SERVER`` chooses (daphne when unset).

    Raises:
        pytest.UsageError: it names no server.
    """
    value = os.environ.get(SERVER_VARIABLE, "").strip().lower() or "daphne"
    if value == "both":
        return SERVERS
    if value not in SERVERS:
        raise pytest.UsageError(f"{SERVER_VARIABLE}={value!r}: expected one of {', '.join(SERVERS)} or both")
    return (value,)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"core: the end-to-end subset CI also runs on uvicorn ({SERVER_VARIABLE}=uvicorn pytest -m core)"
    )
    config.addinivalue_line("markers", "daphne_only(reason): skipped unless the hub runs on daphne, for that reason")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """With two servers chosen, run each test that starts hubs once per server; with one,
    its id stays as it is."""
    servers = selected_servers()
    if "server" in metafunc.fixturenames and len(servers) > 1:
        metafunc.parametrize("server", servers, indirect=True, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip a ``daphne_only`` test where its hubs would run on another server."""
    default = selected_servers()[0]
    for item in items:
        marker = item.get_closest_marker("daphne_only")
        if marker is None or "server" not in getattr(item, "fixturenames", ()):
            continue
        callspec = getattr(item, "callspec", None)
        server = callspec.params.get("server", default) if callspec is not None else default
        if server != "daphne":
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"daphne only: {reason}"))


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> str:
    """The server the hubs of this test run on: ``daphne`` or ``uvicorn``."""
    return str(getattr(request, "param", selected_servers()[0]))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free port, gone at the end of the session."""
    try:
        url, process = start_redis()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
    process.terminate()
    process.wait(timeout=TIMEOUT)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database for the hub processes."""
    base = os.environ.get("DATABASE_URL", "")
    url = create_database(base, tmp_path_factory.mktemp("hub"))
    yield url
    drop_database(base, url)


# Fast sweeps and short leases, so that lost instances and deadlines resolve within seconds.
FAST = {"TASKHUB_SWEEP_INTERVAL": "0.2", "TASKHUB_INSTANCE_LEASE": "2"}


@pytest.fixture(scope="session")
def hub(server: str, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One hub process on the Redis channel layer, shared by the session (one per server)."""
    log = tmp_path_factory.mktemp(f"logs-{server}") / "hub.log"
    h = Hub(database_url, redis_url, log, port=None, server=server, **FAST)
    yield h
    h.stop()


@pytest.fixture
def make_hub(server: str, database_url: str, redis_url: str, tmp_path: Path) -> Iterator[object]:
    """Start extra hub processes for one test, on its server; all are stopped after it."""
    hubs: list[Hub] = []

    def start(*, port: int | None = None, redis: bool = True, **settings: str) -> Hub:
        log = tmp_path / f"hub{len(hubs)}.log"
        h = Hub(database_url, redis_url if redis else None, log, port, server=server, **{**FAST, **settings})
        hubs.append(h)
        return h

    yield start
    for h in hubs:
        h.stop()


@pytest.fixture
def credential(database_url: str, django_db_blocker: Any) -> Callable[..., tuple[str, str]]:
    """``credential(sub=[...], pub=[...], max_instances=1) -> (name, key)``, a fresh name each
    call, written to the hubs' database from this process (``tests/e2e/test_cli.py`` makes
    one with ``manage.py taskhub_credential``, as operators do)."""

    def make(**options: Any) -> tuple[str, str]:
        # On a thread of its own: the tests call it from their event loop, where Django
        # refuses synchronous database work.
        with django_db_blocker.unblock(), concurrent.futures.ThreadPoolExecutor(1) as thread:
            return thread.submit(add_credential, database_url, **options).result()

    return make


@pytest.fixture
def hub_db(database_url: str, django_db_blocker: Any) -> Callable[[Callable[[str], Any]], Any]:
    """``hub_db(lambda alias: ...)``: run a function on the hubs' database (its alias
    given) from this process, on a thread of its own, and return what it returns."""

    def run(fn: Callable[[str], Any]) -> Any:
        def call() -> Any:
            with hub_database(database_url) as alias:
                return fn(alias)

        with django_db_blocker.unblock(), concurrent.futures.ThreadPoolExecutor(1) as thread:
            return thread.submit(call).result()

    return run


def unique_action(verb: str = "run") -> str:
    """A fresh action, so that tests sharing a hub never see each other's tasks."""
    return f"t{uuid.uuid4().hex[:10]}:{verb}"


class Parties:
    """A fresh action with a worker credential that may subscribe to it and a caller that may publish it."""

    def __init__(self, credential: Callable[..., tuple[str, str]]) -> None:
        self.action = unique_action()
        self.worker_name, self.worker_key = credential(sub=[self.action])
        self.caller_name, self.caller_key = credential(pub=[self.action])

    def worker(self, url: str, **options: Any) -> Client:
        return Client(url, name=self.worker_name, key=self.worker_key, **options)

    def caller(self, url: str, **options: Any) -> Client:
        return Client(url, name=self.caller_name, key=self.caller_key, **options)


@pytest.fixture
def parties(credential: Callable[..., tuple[str, str]]) -> Parties:
    return Parties(credential)
