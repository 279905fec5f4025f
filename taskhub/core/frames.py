"""Frames on the wire: JSON text, decoded strictly and encoded compactly.

Call :func:`decode_frame` on every text frame a peer sends, then hand the object to
:func:`taskhub.core.commands.parse_command` (the hub) or
:func:`taskhub.core.messages.parse_message` (the client). :func:`encode` writes every
frame either side sends; :func:`encoded_size` is how payload limits count.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .codes import ErrorCode
from .errors import InvalidMessage

#: The protocol's version, sent in ``welcome`` as ``v``.
PROTOCOL_VERSION = 1
#: How deep arrays and objects may nest in a frame.
MAX_DEPTH = 32
#: The largest integer a frame may carry (in absolute value): JavaScript's safe integers.
MAX_INTEGER = 2**53


class UnsupportedValue(InvalidMessage):
    """``invalid_value``: valid JSON the hub cannot carry. ``frame`` is the decoded frame
    when the JSON parsed (its ``ref`` still answers the error)."""

    def __init__(self, detail: str, frame: Any = None) -> None:
        super().__init__(detail, ErrorCode.INVALID_VALUE)
        self.frame = frame


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# What the raw text must hold for a value to break a rule: the walk over the decoded
# frame runs only then, so that a common frame costs json.loads alone.
_SUSPECT_STRING = re.compile(r"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")  # U+0000, a surrogate
# Digits as zeros: an integer beyond ±2**53 has 16 digits or more.
_DIGITS = str.maketrans("123456789", "000000000")
_LONG_RUN = "0" * 16


class _OutOfRange(ValueError):
    pass


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise _OutOfRange(f"the number {text[:40]} is out of a double's range")
    return value


def decode_frame(text: str | bytes, max_size: int, *, strict: bool = True) -> Any:
    """Decode one text frame of at most ``max_size`` bytes into a JSON value; with
    ``strict`` (the hub, for what clients send) one the hub can carry and store.

    A client decodes the hub's messages with ``strict=False``: they wrap values a few
    levels deeper than the commands that carried them.

    Raises:
        InvalidMessage: ``message_too_large``; ``invalid_json`` for anything that is not
            strict JSON (``NaN`` and ``Infinity`` included); ``invalid_value`` for JSON
            nested deeper than :data:`MAX_DEPTH`, a number beyond ±2**53 or out of a
            double's range, or a string with U+0000 or a lone surrogate (no database
            stores those, nor UTF-8 carries the latter).
    """
    # A character is at most 4 bytes in UTF-8: most frames need no encoding to be measured.
    size = len(text) if isinstance(text, bytes) or 4 * len(text) <= max_size else len(text.encode())
    if size > max_size:
        raise InvalidMessage(
            f"message of {size} bytes is over the limit of {max_size} bytes", ErrorCode.MESSAGE_TOO_LARGE
        )
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    if not strict:
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except ValueError as exc:
            raise InvalidMessage(f"frame is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None
    try:
        # Floats are rare and each costs a call; integers are common, and checked below
        # only when the text has a long run of digits.
        obj = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite)
    except _OutOfRange as exc:
        # Read once more, infinities allowed, so that the error still answers the ref.
        raise UnsupportedValue(f"frame holds a value the hub cannot carry: {exc}", json.loads(raw)) from None
    except RecursionError:
        raise UnsupportedValue(f"frame nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        if "digits" in str(exc):  # Python refuses integers of more than 4,300 digits
            raise UnsupportedValue("frame holds an integer of thousands of digits") from None
        raise InvalidMessage(f"frame is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None
    strings = _SUSPECT_STRING.search(raw) is not None
    numbers = _LONG_RUN in raw.translate(_DIGITS)  # a string of digits, too: then a walk for nothing
    nested = raw.count("[") + raw.count("{") > MAX_DEPTH
    if strings or numbers or nested:
        try:
            _check(obj, strings=strings, numbers=numbers)
        except UnsupportedValue as exc:
            exc.frame = obj
            raise
    return obj


def _check(obj: Any, *, strings: bool, numbers: bool) -> None:
    """Refuse what :func:`decode_frame` says it refuses, walking the decoded frame."""
    if not isinstance(obj, dict | list):
        obj = [obj]  # a bare value: checked as an item
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UnsupportedValue(f"frame nests deeper than {MAX_DEPTH} levels")
        items: Any = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if strings and isinstance(key, str):
                _check_string(key)
            if isinstance(item, dict | list):
                stack.append((item, depth + 1))
            elif strings and isinstance(item, str):
                _check_string(item)
            elif numbers and isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INTEGER:
                raise UnsupportedValue(f"frame holds the integer {str(item)[:40]}…, beyond ±2**53")


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
