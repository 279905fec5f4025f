"""What daphne and Channels carry without TaskHub: a consumer that echoes each frame.

``python -m daphne bench.daphne_echo:application``. Built like TaskHub's consumer (an
``AsyncWebsocketConsumer`` with the in-memory channel layer, and without Channels'
per-message hop to the ORM thread), so the difference to TaskHub is TaskHub's own work.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hubproject.settings")

import django  # noqa: E402

django.setup()

from channels.consumer import get_handler_name  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402


class Echo(AsyncWebsocketConsumer):
    async def dispatch(self, message: dict[str, Any]) -> None:
        await getattr(self, get_handler_name(message))(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.send(text_data=text_data, bytes_data=bytes_data)


application = Echo.as_asgi()
