"""Frames on the wire: JSON text, decoded strictly and encoded compactly.

Call :func:`decode_frame` on every text frame a peer sends, then hand the object to
:func:`taskhub.core.commands.parse_command` (the hub) or
:func:`taskhub.core.messages.parse_message` (the client). :func:`encode` writes every
frame either side sends; :func:`encoded_size` is how payload limits count.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .codes import ErrorCode
from .errors import InvalidMessage

#: The protocol's version, sent in ``welcome`` as ``v``.
PROTOCOL_VERSION = 1
#: How deep arrays and objects may nest in a frame.
MAX_DEPTH = 32
#: The largest integer a frame may carry (in absolute value): JavaScript's safe integers.
MAX_INTEGER = 2**53


class _Unsupported(ValueError):
    """JSON the hub cannot carry (a value the check below refuses)."""


class UnsupportedValue(InvalidMessage):
    """``invalid_value``: valid JSON the hub cannot carry. ``frame`` is the decoded frame
    when the JSON parsed (its ``ref`` still answers the error)."""

    def __init__(self, detail: str, frame: Any = None) -> None:
        super().__init__(detail, ErrorCode.INVALID_VALUE)
        self.frame = frame


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unsupported(f"the number {text[:40]} is out of range")
    return value


def _integer(text: str) -> int:
    # From 16 characters on, compare: Python would take 4,300-digit integers.
    if len(text) > 15 and (len(text) > 20 or abs(int(text)) > MAX_INTEGER):
        raise _Unsupported(f"the integer {text[:40]}… is beyond ±2**53")
    return int(text)


def decode_frame(text: str | bytes, max_size: int) -> Any:
    """Decode one text frame of at most ``max_size`` bytes into a JSON value the hub can
    carry and store.

    Raises:
        InvalidMessage: ``message_too_large``; ``invalid_json`` for anything that is not
            strict JSON (``NaN`` and ``Infinity`` included); ``invalid_value`` for JSON
            nested deeper than :data:`MAX_DEPTH`, a number beyond ±2**53 or out of a
            float's range, or a string with U+0000 or a lone surrogate (no database
            stores those, nor UTF-8 carries the latter).
    """
    # A character is at most 4 bytes in UTF-8: most frames need no encoding to be measured.
    size = len(text) if isinstance(text, bytes) or 4 * len(text) <= max_size else len(text.encode())
    if size > max_size:
        raise InvalidMessage(
            f"message of {size} bytes is over the limit of {max_size} bytes", ErrorCode.MESSAGE_TOO_LARGE
        )
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite, parse_int=_integer)
    except _Unsupported as exc:
        raise UnsupportedValue(f"frame holds a value the hub cannot carry: {exc}") from None
    except RecursionError:
        raise UnsupportedValue(f"frame nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidMessage(f"frame is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None
    # U+0000 and surrogates can only come as \u escapes (a frame is UTF-8 text).
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    try:
        _check(obj, strings="\\u" in raw, nested=raw.count("[") + raw.count("{") > MAX_DEPTH)
    except UnsupportedValue as exc:
        exc.frame = obj
        raise
    return obj


def _check(obj: Any, *, strings: bool, nested: bool) -> None:
    """Refuse what :func:`decode_frame` says it refuses; walk only when the raw text could
    hold it."""
    if not strings and not nested:
        return
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            if strings and isinstance(value, str):
                _check_string(value)
            continue
        if depth > MAX_DEPTH:
            raise UnsupportedValue(f"frame nests deeper than {MAX_DEPTH} levels")
        for key, item in items:
            if strings and isinstance(key, str):
                _check_string(key)
            if isinstance(item, dict | list):
                stack.append((item, depth + 1))
            elif strings and isinstance(item, str):
                _check_string(item)


def _check_string(value: str) -> None:
    if "\x00" in value:
        raise UnsupportedValue("frame holds a string with U+0000, which the hub cannot store")
    if not storable(value):
        raise UnsupportedValue("frame holds a string with a lone surrogate")


def storable(value: str) -> bool:
    """Whether a string can travel and be stored: UTF-8 encodable (no lone surrogate).
    U+0000 is checked apart."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Built once: json.dumps with options builds a new encoder per call. NaN and Infinity
# are not JSON: encoding them raises ValueError.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(message: Any) -> str:
    """Encode a message for the wire (compact, UTF-8 kept as is)."""
    return _ENCODER.encode(message)


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes on the wire, as payload limits count them."""
    return len(_ENCODER.encode(value).encode())
