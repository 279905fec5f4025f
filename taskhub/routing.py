"""WebSocket routes; mount them in your project's ``asgi.py``."""

from __future__ import annotations

from django.urls import path

from .consumers import TaskHubConsumer

websocket_urlpatterns = [
    path("ws/taskhub/", TaskHubConsumer.as_asgi()),  # type: ignore[arg-type]  # an ASGI app, as Channels routes them
]
