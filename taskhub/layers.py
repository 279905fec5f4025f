"""Living with the channel layer's outages.

channels-redis raises from ``receive`` while Redis is down or restarting; Channels' loop
lets the error end the consumer, and with it the WebSocket, although the database (the
truth) is fine. :class:`ResilientReceive` keeps the consumer's layer receive going: it
waits, with backoff, until the layer answers again, then lets the consumer join its
groups again (a restarted Redis forgot them). What the layer lost meanwhile is sent
from the database by the sweeper (:mod:`taskhub.recovery`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between tries while the layer is down: doubling from the first, up to the last.
RETRY_FIRST, RETRY_MAX = 0.1, 5.0


class ResilientReceive:
    """A consumer mix-in: Channels assigns ``channel_receive`` in ``__call__``; this keeps
    the layer's receive and hands Channels a loop around it instead."""

    _layer_receive: Callable[[], Awaitable[dict[str, Any]]]

    @property
    def channel_receive(self) -> Callable[[], Awaitable[dict[str, Any]]]:
        return self._receive_through_outages

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._layer_receive = receive

    async def rejoin(self) -> None:
        """Join the connection's groups again; called once the layer is back."""

    async def _receive_through_outages(self) -> dict[str, Any]:
        failures = 0
        while True:
            try:
                message = await self._layer_receive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis' ConnectionError, OSError, TimeoutError...
                failures += 1
                if failures == 1:
                    log.warning("the channel layer is unreachable (%s); retrying", exc)
                await asyncio.sleep(min(RETRY_FIRST * 2 ** (failures - 1), RETRY_MAX))
                continue
            if failures:
                log.warning("the channel layer is back after %d failed receive(s)", failures)
                try:
                    await self.rejoin()
                except Exception:
                    log.exception("could not join the groups again")
            return message
