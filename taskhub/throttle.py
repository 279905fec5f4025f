"""Throttling failed authentications, per client address and per credential name.

After ``TASKHUB_AUTH_FAILURES`` failed attempts within ``TASKHUB_AUTH_FAILURE_WINDOW``
seconds from one address, or for one name, further attempts from that address (or for
that name) are refused with ``too_many_attempts`` (close code 4029) until the oldest
failure leaves the window, whether their key is right or not: a guesser learns nothing
more. Keys are long and random, so this is about noise in the logs and the database
more than about guessing; the cost is that someone hammering a name also keeps its real
services out for up to a window (their client reconnects with backoff).

Attempts in flight count too: once failures and attempts not yet settled fill the limit,
a new attempt waits for one of them to settle (:func:`admit`), so that a burst of wrong
keys sent at once stops at the limit, while a burst of right ones (a service's instances
reconnecting after a restart) only queues for a moment and is never refused.

Each hub process counts its own attempts, in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from .conf import conf
from .core.codes import ErrorCode
from .core.errors import AuthenticationFailed

#: Most addresses and names remembered at once; beyond, the oldest are forgotten first.
MAX_KEYS = 10_000

Key = tuple[str, str]

_failures: dict[Key, deque[float]] = {}
# Attempts checked and not yet settled: concurrent hellos count before they fail.
_pending: dict[Key, int] = {}
# Attempts waiting for room (admit), by the key that had none, oldest first: a settle
# looks only at the queues of its own keys, and wakes only the attempts it made room for.
_waiting: dict[Key, deque[_Waiter]] = {}


@dataclass
class _Waiter:
    address: str
    name: str
    admitted: asyncio.Future[None]


def _keys(address: str, name: str) -> tuple[Key, Key]:
    return ("address", address), ("name", name)


def _full(address: str, name: str, now: float) -> Key | None:
    """The first of the attempt's keys whose failures and attempts in flight fill the
    limit, or ``None``: it may go on.

    Raises:
        AuthenticationFailed: ``too_many_attempts``: failures alone fill the limit.
    """
    window, limit = conf.AUTH_FAILURE_WINDOW, conf.AUTH_FAILURES
    full = None
    for key, what in zip(_keys(address, name), ("from this address", f"for {name[:100]!r}"), strict=True):
        times = _failures.get(key)
        if times is not None:
            while times and times[0] <= now - window:
                times.popleft()
            if not times:
                del _failures[key]
        failed = len(times) if times else 0
        if times and failed >= limit:
            raise AuthenticationFailed(
                f"too many failed authentications {what}: try again in {max(times[0] + window - now, 1.0):.0f} s",
                ErrorCode.TOO_MANY_ATTEMPTS,
            )
        if full is None and failed + _pending.get(key, 0) >= limit:
            full = key
    return full


def _take(address: str, name: str) -> None:
    for key in _keys(address, name):
        _pending[key] = _pending.get(key, 0) + 1


def check(address: str, name: str, now: float) -> bool:
    """Call before verifying a ``hello`` (or use :func:`admit`), and :func:`settle` once
    it is verified, if this returned True; ``now`` is a monotonic clock's seconds.

    Returns:
        True: the attempt may go on (it is counted in flight until settled). False:
        attempts in flight fill what the failures leave of the limit; check again once
        one settles.

    Raises:
        AuthenticationFailed: ``too_many_attempts``, with the seconds to wait: failures
            alone fill the limit.
    """
    if _full(address, name, now) is not None:
        return False
    _take(address, name)
    return True


async def admit(address: str, name: str) -> None:
    """Wait until the attempt may go on, in the order attempts came; then it is in
    flight: :func:`settle` it.

    Raises:
        AuthenticationFailed: ``too_many_attempts``, at once or after waiting.
    """
    full = _full(address, name, time.monotonic())
    if full is None:
        _take(address, name)
        return
    waiter = _Waiter(address, name, asyncio.get_running_loop().create_future())
    _waiting.setdefault(full, deque()).append(waiter)
    try:
        await waiter.admitted
    except asyncio.CancelledError:
        # Let in by a settle, then cancelled before it could go on: not in flight.
        if waiter.admitted.done() and not waiter.admitted.cancelled() and waiter.admitted.exception() is None:
            _release(address, name)
            for key in _keys(address, name):
                _wake(key, time.monotonic())
        raise


def _release(address: str, name: str) -> None:
    for key in _keys(address, name):
        left = _pending.get(key, 1) - 1
        if left > 0:
            _pending[key] = left
        else:
            _pending.pop(key, None)


def settle(address: str, name: str, now: float, *, failed: bool) -> None:
    """The attempt :func:`check` let through is over; ``failed``: a wrong name or key."""
    limit = conf.AUTH_FAILURES
    _release(address, name)
    for key in _keys(address, name):
        if failed:
            times = _failures.pop(key, None) or deque(maxlen=limit)
            times.append(now)
            _failures[key] = times  # re-inserted: the dict's order is the order of last failure
    if len(_failures) > MAX_KEYS:
        for key in list(_failures)[: len(_failures) - MAX_KEYS]:
            del _failures[key]
    for key in _keys(address, name):
        _wake(key, now)


def _wake(key: Key, now: float) -> None:
    """Let in the attempts waiting on ``key`` that now have room, oldest first; refuse
    those whose failures now fill the limit; one still without room on ``key`` stops it,
    one without room on its other key waits there."""
    queue = _waiting.get(key)
    while queue:
        waiter = queue[0]
        if waiter.admitted.done() or waiter.admitted.get_loop().is_closed():  # cancelled while it waited
            queue.popleft()
            continue
        try:
            full = _full(waiter.address, waiter.name, now)
        except AuthenticationFailed as exc:
            queue.popleft()
            waiter.admitted.set_exception(exc)
            continue
        if full == key:
            break
        queue.popleft()
        if full is None:
            _take(waiter.address, waiter.name)
            waiter.admitted.set_result(None)
        else:
            _waiting.setdefault(full, deque()).append(waiter)
    if not queue:
        _waiting.pop(key, None)


def reset() -> None:
    """Forget every failure (tests)."""
    _failures.clear()
    _pending.clear()
    _waiting.clear()
