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


def check(address: str, name: str, now: float) -> None:
    """Call before verifying a ``hello``; ``now`` is a monotonic clock's seconds.

    Raises:
        AuthenticationFailed: ``too_many_attempts``, with the seconds to wait.
    """
    window, limit = conf.AUTH_FAILURE_WINDOW, conf.AUTH_FAILURES
    for key, what in ((("address", address), "from this address"), (("name", name), f"for {name!r}")):
        times = _failures.get(key)
        if times is None:
            continue
        while times and times[0] <= now - window:
            times.popleft()
        if len(times) >= limit:
            wait = times[0] + window - now
            raise AuthenticationFailed(
                f"too many failed authentications {what}: try again in {wait:.0f} s", ErrorCode.TOO_MANY_ATTEMPTS
            )
        if not times:
            del _failures[key]


def failed(address: str, name: str, now: float) -> None:
    """Count a failed authentication (a wrong name or key)."""
    limit = conf.AUTH_FAILURES
    for key in (("address", address), ("name", name)):
        times = _failures.pop(key, None) or deque(maxlen=limit)
        times.append(now)
        _failures[key] = times  # re-inserted: the dict's order is the order of last failure
    if len(_failures) > MAX_KEYS:
        for key in list(_failures)[: len(_failures) - MAX_KEYS]:
            del _failures[key]


def reset() -> None:
    """Forget every failure (tests)."""
    _failures.clear()
