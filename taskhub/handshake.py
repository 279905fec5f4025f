"""What a WebSocket handshake says before any frame: the credentials of an
``Authorization: Basic`` header, and a session's options (``TaskHub-Resume``,
``TaskHub-Concurrency``, ``TaskHub-Inline-End``). See docs/protocol.md,
"Authentication"."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, NamedTuple

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


class SessionOptions(NamedTuple):
    """What a session asks for besides its credential (the same as ``hello``'s fields)."""

    #: The token of an instance this client had, to take it back.
    resume: str | None = None
    #: Most unfinished tasks to be offered at once (``None``: no limit).
    concurrency: int | None = None
    #: The client reads an ``end`` carried inside the task event before it.
    inline_end: bool = False


def session_options(scope: Mapping[str, Any]) -> SessionOptions:
    """The session's options from the ``TaskHub-Resume``, ``TaskHub-Concurrency`` and
    ``TaskHub-Inline-End`` handshake headers (what ``hello`` carries otherwise).

    Raises:
        InvalidMessage: ``invalid_field`` for a concurrency that is not an integer from 1
            to :data:`~taskhub.core.commands.MAX_CONCURRENCY`, or an inline end that is
            neither ``true`` nor ``false``.
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
    inline = (_header(scope, b"taskhub-inline-end") or b"false").decode("latin-1").strip().lower()
    if inline not in ("true", "false"):
        raise InvalidMessage("header TaskHub-Inline-End must be true or false", ErrorCode.INVALID_FIELD)
    return SessionOptions(resume.decode("latin-1").strip() if resume else None, value, inline == "true")
