"""Origin checks for WebSocket handshakes."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


class BrowserOriginValidator(OriginValidator):
    """Check the ``Origin`` of browser handshakes against ``ALLOWED_HOSTS``.

    Channels' own validator refuses handshakes without an ``Origin``; service clients
    send none and authenticate with their key, so they are let through. A browser always
    sends one, and a foreign page cannot then ride on an operator's session.
    """

    def __init__(self, application: Any) -> None:
        super().__init__(application, settings.ALLOWED_HOSTS)

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        if settings.DEBUG and not self.allowed_origins:
            return True
        return bool(self.validate_origin(parsed_origin))
