"""What a WebSocket handshake says before any frame: the credentials of an
``Authorization: Basic`` header, and a session's options (``TaskHub-Resume``,
``TaskHub-Concurrency``). See docs/protocol.md, "Authentication"."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from .core.codes import ErrorCode
from .core.commands import MAX_CONCURRENCY
from .core.errors import InvalidMessage


def basic_credentials(scope: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(name, key)`` from an ``Authorization: Basic`` handshake header, if any."""
    value = _header(scope, b"authorization")
    if value is None or value[:6].lower() != b"basic ":
        return None
    try:
        name, _, key = base64.b64decode(value[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    return (name, key)


def _header(scope: Mapping[str, Any], name: bytes) -> bytes | None:
    for header, value in scope.get("headers", ()):
        if header == name:
            return bytes(value)
    return None


def session_options(scope: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """``(resume token, concurrency)`` from the ``TaskHub-Resume`` and
    ``TaskHub-Concurrency`` handshake headers (what ``hello`` carries otherwise).

    Raises:
        InvalidMessage: ``invalid_field`` for a concurrency that is not an integer from 1
            to :data:`~taskhub.core.commands.MAX_CONCURRENCY`.
    """
    resume = _header(scope, b"taskhub-resume")
    concurrency = _header(scope, b"taskhub-concurrency")
    value: int | None = None
    if concurrency is not None:
        text = concurrency.decode("latin-1").strip()
        # isascii: "¹" is a digit to str.isdigit, not to int().
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_CONCURRENCY):
            raise InvalidMessage(
                f"header TaskHub-Concurrency must be an integer from 1 to {MAX_CONCURRENCY}", ErrorCode.INVALID_FIELD
            )
        value = int(text)
    return (resume.decode("latin-1").strip() if resume else None), value
