"""WebSocket routes; mount them in your project's ``asgi.py``."""

from __future__ import annotations

from typing import Any

from django.urls import path

from .consumers import TaskHubConsumer

# Typed loosely: Channels routes ASGI apps with Django's path(), which its stubs do not
# express (URLRouter wants a list of a stub-only URLPattern subclass).
websocket_urlpatterns: list[Any] = [
    path("ws/taskhub/", TaskHubConsumer.as_asgi()),  # type: ignore[arg-type]  # an ASGI app, as Channels routes them
]
