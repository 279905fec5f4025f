"""WebSocket routes; mount them in your project's ``asgi.py``.

``websocket_urlpatterns`` serves the hub at ``ws/taskhub/`` and answers a handshake on any
other path with a ``not_found`` error and close code 4404 (instead of a server error), so
that a client with a wrong URL learns it.

:class:`ServiceHandshakes` sends the handshakes of services straight to the hub, past the
middleware that only a browser's handshake needs.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.auth.models import AnonymousUser
from django.urls import path, re_path

from .consumers import TaskHubConsumer
from .core.codes import CloseCode, ErrorCode
from .core.frames import encode
from .core.messages import Error


class NoSuchEndpoint(AsyncWebsocketConsumer):
    """A WebSocket handshake on a path that serves nothing."""

    async def connect(self) -> None:
        await self.accept()
        detail = f"no TaskHub endpoint at {self.scope.get('path', '?')}: the hub serves /ws/taskhub/"
        await self.send(text_data=encode(Error(code=ErrorCode.NOT_FOUND, detail=detail).to_dict()))
        await self.close(int(CloseCode.NOT_FOUND))  # autobahn refuses an IntEnum


#: The path :data:`websocket_urlpatterns` serves the hub at.
HUB_PATH = "/ws/taskhub/"

# Typed loosely: Channels routes ASGI apps with Django's path(), which its stubs do not
# express (URLRouter wants a list of a stub-only URLPattern subclass).
websocket_urlpatterns: list[Any] = [
    path(HUB_PATH.lstrip("/"), TaskHubConsumer.as_asgi()),  # type: ignore[arg-type]  # an ASGI app, as Channels routes them
    re_path(r"", NoSuchEndpoint.as_asgi()),  # type: ignore[arg-type]
]


_anonymous = AnonymousUser()  # holds no state: one serves every service


class ServiceHandshakes:
    """An ASGI application for the ``websocket`` scope: a handshake on ``path`` without a
    ``Cookie`` and without an ``Origin`` (a service's: it authenticates with its key)
    goes straight to the hub's consumer; every other goes to ``app``.

    Wrap your WebSocket stack in it (``ServiceHandshakes(BrowserOriginValidator(
    AuthMiddlewareStack(URLRouter(websocket_urlpatterns))))``). That stack would let such
    a handshake through with an anonymous user, but each of its layers copies the scope
    or keeps a coroutine frame, a session store and a lazy user for the life of the
    connection: 4.2 of the 37.6 KiB an idle connection held (bench/README.md). The
    handshake gets the same anonymous ``user`` here, so a ``hello`` asking for monitor
    rights is refused the same way. A browser always sends an ``Origin``, so what the
    ``Origin`` check and the session are for still goes through ``app``.
    """

    #: An ASGI 3 application although ``__call__`` is a plain function (asgiref's test).
    _asgi_single_callable = True

    def __init__(self, app: Any, path: str = HUB_PATH) -> None:
        self.app, self.path = app, path
        self.hub: Any = TaskHubConsumer.as_asgi()

    # Not a coroutine function: the application it picks runs in the caller's frame, and
    # no frame of this one stays for the connection's life.
    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        if (
            scope["type"] == "websocket"
            and scope.get("path") == self.path
            and not any(name in (b"cookie", b"origin") for name, _ in scope.get("headers", ()))
        ):
            scope.setdefault("user", _anonymous)
            return self.hub(scope, receive, send)  # type: ignore[no-any-return]  # typed Any
        return self.app(scope, receive, send)  # type: ignore[no-any-return]
