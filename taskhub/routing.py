"""WebSocket routes; mount them in your project's ``asgi.py``.

``websocket_urlpatterns`` serves the hub at ``ws/taskhub/`` and answers a handshake on any
other path with a ``not_found`` error and close code 4404 (instead of a server error), so
that a client with a wrong URL learns it.
"""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
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


# Typed loosely: Channels routes ASGI apps with Django's path(), which its stubs do not
# express (URLRouter wants a list of a stub-only URLPattern subclass).
websocket_urlpatterns: list[Any] = [
    path("ws/taskhub/", TaskHubConsumer.as_asgi()),  # type: ignore[arg-type]  # an ASGI app, as Channels routes them
    re_path(r"", NoSuchEndpoint.as_asgi()),  # type: ignore[arg-type]
]
