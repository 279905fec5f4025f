"""Routing WebSocket handshakes (taskhub.routing): a service's straight to the hub,
everything a browser sends through the project's stack."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from taskhub.routing import HUB_PATH, ServiceHandshakes

from .conftest import TIMEOUT, make_credential

pytestmark = pytest.mark.django_db(transaction=True)


class Stack:
    """The project's stack, recording what reached it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)


class Hub:
    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)


def routed(path: str, headers: list[tuple[bytes, bytes]], kind: str = "websocket") -> tuple[str, dict[str, Any]]:
    stack, hub = Stack(), Hub()
    handshakes = ServiceHandshakes(stack)
    handshakes.hub = hub
    scope = {"type": kind, "path": path, "headers": headers}
    asyncio.run(handshakes(scope, None, None))  # type: ignore[arg-type]  # an awaitable of a coroutine
    return ("hub", hub.scopes[0]) if hub.scopes else ("stack", stack.scopes[0])


AUTH = (b"authorization", b"Basic c3ZjOmtleQ==")


def test_servers_call_it_as_an_asgi_3_application():
    from asgiref.compatibility import guarantee_single_callable

    handshakes = ServiceHandshakes(Stack())
    assert guarantee_single_callable(handshakes) is handshakes  # not wrapped as ASGI 2


def test_a_services_handshake_goes_straight_to_the_hub_as_an_anonymous_user():
    where, scope = routed(HUB_PATH, [AUTH, (b"user-agent", b"taskhub-python")])
    assert where == "hub"
    assert scope["user"].is_authenticated is False  # what AuthMiddlewareStack gives it


@pytest.mark.parametrize(
    ("path", "headers", "kind"),
    [
        (HUB_PATH, [AUTH, (b"origin", b"http://localhost")], "websocket"),  # a browser
        (HUB_PATH, [(b"cookie", b"sessionid=abc")], "websocket"),  # a session: the dashboard's
        ("/ws/other/", [AUTH], "websocket"),  # not the hub: the stack's not_found
        (HUB_PATH, [], "http"),
    ],
)
def test_anything_a_browser_or_another_path_sends_goes_through_the_stack(path, headers, kind):
    where, scope = routed(path, headers, kind)
    assert where == "stack" and "user" not in scope


async def test_through_the_projects_application_a_service_is_welcomed_and_a_cookie_read():
    from hubproject.asgi import application

    _, key = await database_sync_to_async(make_credential)("svc")
    service = WebsocketCommunicator(application, HUB_PATH, headers=[(b"authorization", _basic("svc", key))])
    assert (await service.connect(timeout=TIMEOUT))[0]
    assert (await service.receive_json_from(timeout=TIMEOUT))["type"] == "welcome"
    await service.disconnect()
    # Without a session, straight to the hub or through the stack (a cookie that names
    # none), a monitor is refused the same way.
    for headers in ([], [(b"cookie", b"sessionid=nothing")]):
        browser = WebsocketCommunicator(application, HUB_PATH, headers=headers)
        assert (await browser.connect(timeout=TIMEOUT))[0]
        await browser.send_json_to({"type": "hello", "monitor": True, "ref": 1})
        error = await browser.receive_json_from(timeout=TIMEOUT)
        assert (error["code"], "log in to the admin" in error["detail"]) == ("authentication_failed", True)
        await browser.disconnect()


def _basic(name: str, key: str) -> bytes:
    import base64

    return b"Basic " + base64.b64encode(f"{name}:{key}".encode())
