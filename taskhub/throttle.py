"""Throttling failed authentications, per client address and per credential name.

After ``TASKHUB_AUTH_FAILURES`` failed attempts within ``TASKHUB_AUTH_FAILURE_WINDOW``
seconds from one address, or for one name, further attempts from that address (or for
that name) are refused with ``too_many_attempts`` (close code 4029) until the oldest
failure leaves the window, whether their key is right or not: a guesser learns nothing
more. Keys are long and random, so this is about noise in the logs and the database
more than about guessing; the cost is that someone hammering a name also keeps its real
services out for up to a window (their client reconnects with backoff).

Each hub process counts its own attempts, in memory.
"""

from __future__ import annotations

from collections import deque

from .conf import conf
from .core.codes import ErrorCode
from .core.errors import AuthenticationFailed

#: Most addresses and names remembered at once; beyond, the oldest are forgotten first.
MAX_KEYS = 10_000

_failures: dict[tuple[str, str], deque[float]] = {}
# Attempts checked and not yet settled: concurrent hellos count before they fail.
_pending: dict[tuple[str, str], int] = {}


def _keys(address: str, name: str) -> tuple[tuple[str, str], tuple[str, str]]:
    return ("address", address), ("name", name)


def check(address: str, name: str, now: float) -> None:
    """Call before verifying a ``hello``, and :func:`settle` once it is verified;
    ``now`` is a monotonic clock's seconds.

    Raises:
        AuthenticationFailed: ``too_many_attempts``, with the seconds to wait.
    """
    window, limit = conf.AUTH_FAILURE_WINDOW, conf.AUTH_FAILURES
    for key, what in zip(_keys(address, name), ("from this address", f"for {name[:100]!r}"), strict=True):
        times = _failures.get(key)
        if times is not None:
            while times and times[0] <= now - window:
                times.popleft()
            if not times:
                del _failures[key]
        failed = len(times) if times else 0
        if failed + _pending.get(key, 0) >= limit:
            wait = times[0] + window - now if times and failed >= limit else 1.0
            raise AuthenticationFailed(
                f"too many failed authentications {what}: try again in {max(wait, 1.0):.0f} s",
                ErrorCode.TOO_MANY_ATTEMPTS,
            )
    for key in _keys(address, name):
        _pending[key] = _pending.get(key, 0) + 1


def settle(address: str, name: str, now: float, *, failed: bool) -> None:
    """The attempt :func:`check` let through is over; ``failed``: a wrong name or key."""
    limit = conf.AUTH_FAILURES
    for key in _keys(address, name):
        left = _pending.get(key, 1) - 1
        if left > 0:
            _pending[key] = left
        else:
            _pending.pop(key, None)
        if failed:
            times = _failures.pop(key, None) or deque(maxlen=limit)
            times.append(now)
            _failures[key] = times  # re-inserted: the dict's order is the order of last failure
    if len(_failures) > MAX_KEYS:
        for key in list(_failures)[: len(_failures) - MAX_KEYS]:
            del _failures[key]


def reset() -> None:
    """Forget every failure (tests)."""
    _failures.clear()
    _pending.clear()
