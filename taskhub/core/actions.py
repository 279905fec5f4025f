"""Action names and permission patterns.

An *action* is a noun path, a colon and a verb: ``mail:send``, ``weather/metno:forecast``.
Segments use lowercase letters, digits, ``-``, ``_`` and ``.``.

A *permission pattern* grants an action when:

* it equals the action (``mail:send`` grants ``mail:send``);
* it is a namespace, a noun path without a verb, and the action's noun path equals it
  or lies below it (``log`` grants ``log:error``; ``weather`` grants ``weather:forecast``
  and ``weather/metno:forecast``, but not ``weatherly:get``);
* it contains ``*``, which matches any run of characters (``*`` grants everything,
  ``mail:*`` grants every verb of ``mail``, ``weather/*`` every action below ``weather/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import InvalidMessage

MAX_ACTION_LENGTH = 200

_SEGMENT = r"[a-z0-9._-]+"
_NOUN_PATH = rf"{_SEGMENT}(?:/{_SEGMENT})*"
_ACTION_RE = re.compile(rf"{_NOUN_PATH}:{_SEGMENT}")
_NAMESPACE_RE = re.compile(_NOUN_PATH)
_WILDCARD_RE = re.compile(r"[a-z0-9._/*-]+(?::[a-z0-9._*-]+)?")


def validate_action(action: object) -> str:
    """Return ``action`` if it is a valid action name.

    Call on every action a peer sends before using it.

    Raises:
        InvalidMessage: with code ``invalid_action``, naming what is wrong.
    """
    if not isinstance(action, str):
        raise InvalidMessage("action must be a string", "invalid_action")
    if len(action) > MAX_ACTION_LENGTH:
        raise InvalidMessage(f"action is longer than {MAX_ACTION_LENGTH} characters", "invalid_action")
    if not _ACTION_RE.fullmatch(action):
        raise InvalidMessage(
            f"invalid action {action!r}: expected noun/path:verb in lowercase letters, digits, '-', '_' and '.'",
            "invalid_action",
        )
    return action


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid permission pattern.

    Raises:
        ValueError: naming the pattern and what a valid one looks like.
    """
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_ACTION_LENGTH:
        raise ValueError(f"invalid permission pattern {pattern!r}: expected a non-empty string")
    if "*" in pattern:
        ok = _WILDCARD_RE.fullmatch(pattern) is not None
    else:
        ok = bool(_ACTION_RE.fullmatch(pattern) or _NAMESPACE_RE.fullmatch(pattern))
    if not ok:
        raise ValueError(
            f"invalid permission pattern {pattern!r}: expected an action (mail:send), "
            "a namespace (mail, weather/metno) or a wildcard (*, mail:*)"
        )
    return pattern


def wildcard_regex(pattern: str) -> str:
    """The regular expression a wildcard pattern stands for, anchored at both ends
    (``mail:*`` is ``^mail:.*$``); ``*`` matches any run of characters."""
    return "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"


def pattern_grants(pattern: str, action: str) -> bool:
    """Whether one permission pattern grants ``action`` (a valid action name)."""
    if "*" in pattern:
        return re.match(wildcard_regex(pattern), action) is not None
    if pattern == action:
        return True
    if ":" in pattern:
        return False
    noun_path = action.split(":", 1)[0]
    return noun_path == pattern or noun_path.startswith(pattern + "/")


def permits(patterns: Iterable[str], action: str) -> bool:
    """Whether any of ``patterns`` grants ``action``."""
    return any(pattern_grants(pattern, action) for pattern in patterns)
