"""Frames on the wire: JSON text, decoded strictly and encoded compactly.

Call :func:`decode_frame` on every text frame a peer sends, then hand the object to
:func:`taskhub.core.commands.parse_command` (the hub) or
:func:`taskhub.core.messages.parse_message` (the client). :func:`encode` writes every
frame either side sends; :func:`encoded_size` is how payload limits count.
"""

from __future__ import annotations

import json
from typing import Any

from .codes import ErrorCode
from .errors import InvalidMessage

#: The protocol's version, sent in ``welcome`` as ``v``.
PROTOCOL_VERSION = 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_frame(text: str | bytes, max_size: int) -> Any:
    """Decode one text frame of at most ``max_size`` bytes into a JSON value.

    Raises:
        InvalidMessage: ``message_too_large``, or ``invalid_json`` for anything that is not
            strict JSON (``NaN`` and ``Infinity`` included).
    """
    # A character is at most 4 bytes in UTF-8: most frames need no encoding to be measured.
    size = len(text) if isinstance(text, bytes) or 4 * len(text) <= max_size else len(text.encode())
    if size > max_size:
        raise InvalidMessage(
            f"message of {size} bytes is over the limit of {max_size} bytes", ErrorCode.MESSAGE_TOO_LARGE
        )
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidMessage(f"frame is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None


# Built once: json.dumps with options builds a new encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(message: Any) -> str:
    """Encode a message for the wire (compact, UTF-8 kept as is)."""
    return _ENCODER.encode(message)


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes on the wire, as payload limits count them."""
    return len(_ENCODER.encode(value).encode())
