"""Shared fixtures. Every wait is bounded by :data:`TIMEOUT`, scaled by one constant."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from channels.testing import WebsocketCommunicator

if TYPE_CHECKING:
    from pytest_django import Settings

    from taskhub.core.commands import Pub, WorkCommand
    from taskhub.models import Credential

#: Multiply every timeout in the suite (slow machines: TASKHUB_TEST_SCALE=3).
SCALE = float(os.environ.get("TASKHUB_TEST_SCALE", "1"))
TIMEOUT = 5 * SCALE


def pytest_configure(config: pytest.Config) -> None:
    """With ``TASKHUB_TEST_EXTRA_COLUMN=name``, add two columns to ``TaskRecord`` in the
    middle of its fields: ``name`` with a Python-side default, right after ``status``, and
    ``name_db`` with a database default, right after ``attempt`` (``tests/test_store.py``)."""
    name = os.environ.get("TASKHUB_TEST_EXTRA_COLUMN")
    if not name:
        return
    import django
    from django.db import models

    django.setup()
    from taskhub.models import TaskRecord

    # Fields are ordered by creation: each goes right after the field named.
    python_default = models.CharField(max_length=20, default=_extra_default, help_text="added by the test")
    python_default.creation_counter = TaskRecord._meta.get_field("status").creation_counter + 0.5  # type: ignore[assignment]
    TaskRecord.add_to_class(name, python_default)
    database_default = models.IntegerField(db_default=7, help_text="added by the test")
    database_default.creation_counter = TaskRecord._meta.get_field("attempt").creation_counter + 0.5  # type: ignore[assignment]
    TaskRecord.add_to_class(f"{name}_db", database_default)


def _extra_default() -> str:
    return "set in Python"


@pytest.fixture(autouse=True)
async def _stop_sweeper():
    yield
    sweeper = sys.modules.get("taskhub.sweeper")  # only if a test started one: the core needs no Django
    if sweeper is not None:
        await sweeper.stop()
    db = sys.modules.get("taskhub.db")
    if db is not None:  # close the database threads' connections while the test may still use the database
        db.shutdown()
    if "django.db" in sys.modules:
        # And asgiref's thread's, which the tests' own ORM calls ran on: with a connection
        # pool (PostgreSQL) an unreturned connection keeps the test database in use.
        from asgiref.sync import sync_to_async
        from django.db import connections

        await sync_to_async(connections.close_all)()


@pytest.fixture(params=["orm", "fast"])
def store_backend(request: pytest.FixtureRequest, settings: Settings) -> str:
    """Run the test against the ORM's store and against the database's own (SQLite's or
    PostgreSQL's): ``"orm"`` or ``"fast"``."""
    settings.TASKHUB_STORE = "orm" if request.param == "orm" else "auto"
    return str(request.param)


def make_credential(
    name: str, *, sub: Sequence[str] = (), pub: Sequence[str] = (), max_instances: int = 1, active: bool = True
) -> tuple[Credential, str]:
    """Create a credential and return ``(credential, key)``."""
    from taskhub.auth import generate_key, hash_key
    from taskhub.models import Credential

    key = generate_key()
    credential = Credential.objects.create(
        name=name,
        key_hash=hash_key(key),
        sub_permissions=list(sub),
        pub_permissions=list(pub),
        max_instances=max_instances,
        is_active=active,
    )
    return credential, key


def pub_command(obj: dict[str, Any]) -> Pub:
    """``parse_command`` of a ``pub``, typed as ``services.publish`` takes it."""
    from taskhub.core.commands import Pub, parse_command

    cmd = parse_command(obj)
    assert isinstance(cmd, Pub)
    return cmd


def task_command(obj: dict[str, Any]) -> WorkCommand:
    """``parse_command`` of a worker's command on a task, typed as ``services.act`` takes it."""
    from taskhub.core.commands import Drop, Fail, Pickup, Return, Touch, Update, parse_command

    cmd = parse_command(obj)
    assert isinstance(cmd, Pickup | Update | Touch | Return | Drop | Fail)
    return cmd


class Peer:
    """A WebsocketCommunicator speaking JSON, with bounded waits."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.comm = communicator
        #: The hub's welcome, once read.
        self.welcome: dict[str, Any] = {}

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.comm.send_to(text_data=message if isinstance(message, str) else json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.comm.receive_from(timeout=TIMEOUT))
        return message

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a command and return the answer carrying its ref (other messages are kept)."""
        message = {"ref": "r", **message}
        await self.send(message)
        return await self.expect(lambda m: m.get("ref") == message["ref"])

    async def expect(self, predicate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """The next message matching ``predicate``; earlier ones are skipped."""
        while True:
            m = await self.recv()
            if predicate(m):
                return m

    async def nothing(self) -> bool:
        return await self.comm.receive_nothing(timeout=0.2 * SCALE)

    async def close(self) -> None:
        await self.comm.disconnect()


async def open_peer(
    name: str | None = None,
    key: str | None = None,
    *,
    expect_welcome: bool = True,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    path: str = "/ws/taskhub/",
) -> Peer:
    from hubproject.asgi import application

    headers = list(headers)
    if name is not None:
        headers.append((b"authorization", b"Basic " + base64.b64encode(f"{name}:{key}".encode())))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    peer = Peer(communicator)
    if expect_welcome:
        peer.welcome = await peer.recv()
        assert peer.welcome["type"] == "welcome", peer.welcome
    return peer
