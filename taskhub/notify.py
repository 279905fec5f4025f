"""Sending the services layer's notices after commit: to this process's consumers
directly, to the rest on the channel layer."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from channels.layers import BaseChannelLayer

from .services import Notice

log = logging.getLogger(__name__)

Deliver = Callable[[dict[str, Any]], Awaitable[None]]

# The consumers of this process, by channel name. A message for one of them is handed
# to its handler at once: through the layer it took a queue and three turns of the event
# loop in memory, and a round trip to Redis on the Redis layers (bench/README.md).
_local: dict[str, Deliver] = {}


def register(channel_name: str, deliver: Deliver) -> None:
    """Deliver ``channel`` notices for ``channel_name`` with ``deliver``, in this process.

    Call when a consumer connects, with its ``dispatch``; :func:`unregister` when it goes.
    """
    _local[channel_name] = deliver


def unregister(channel_name: str) -> None:
    _local.pop(channel_name, None)


async def send_notices(layer: BaseChannelLayer | None, notices: Iterable[Notice]) -> None:
    """Send each notice, in order; a failure is logged, not raised (the database has the truth)."""
    for kind, name, message in notices:
        try:
            if kind == "channel" and name in _local:
                await _local[name](message)
            elif layer is None:
                continue
            elif kind == "group":
                await layer.group_send(name, message)
            elif kind == "join":
                await layer.group_add(name, message["channel"])
            else:
                await layer.send(name, message)
        except Exception:  # the layer is a best-effort bus; callers recover from the database
            log.exception("could not send %s to %s", message.get("type"), name)
