"""Origin checks for WebSocket handshakes."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings

#: What Django accepts as hosts under DEBUG when ALLOWED_HOSTS is empty.
DEBUG_HOSTS = [".localhost", "127.0.0.1", "[::1]"]


class BrowserOriginValidator(OriginValidator):
    """Check the ``Origin`` of browser handshakes against ``ALLOWED_HOSTS``.

    Channels' own validator refuses handshakes without an ``Origin``; service clients
    send none and authenticate with their key, so they are let through. A browser always
    sends one, and a foreign page cannot then ride on an operator's session.
    """

    def __init__(self, application: Any) -> None:
        super().__init__(application, [])

    @property  # type: ignore[override]
    def allowed_origins(self) -> list[str]:
        """``ALLOWED_HOSTS``, read on each handshake; as Django's own host check, with
        DEBUG and no ``ALLOWED_HOSTS``, the local names only."""
        return list(settings.ALLOWED_HOSTS) or (DEBUG_HOSTS if settings.DEBUG else [])

    @allowed_origins.setter
    def allowed_origins(self, value: Any) -> None:
        pass  # Channels' __init__ sets it; the settings are the truth

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return bool(self.validate_origin(parsed_origin))
