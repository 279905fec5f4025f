"""Sending the services layer's notices after commit: to this process's consumers
directly, to the rest on the channel layer.

Task events go to the channels the database names (the task's publisher and its
services) and to the task's group, which holds its watchers. With the in-memory layer,
every consumer is in this process, so the groups are kept here too and nothing goes
through the layer. With the Redis layers, notices for consumers of this process go
directly; the rest, and the groups, go through Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer, InMemoryChannelLayer

from . import metrics
from .services.routing import Notice

log = logging.getLogger(__name__)


class Consumer(Protocol):
    """A consumer of this process, as notices reach it."""

    async def dispatch(self, message: dict[str, Any]) -> None: ...


# The consumers of this process, by channel name. A message for one of them is handed
# to its handler at once: through the layer it took a queue, a deep copy and three turns
# of the event loop in memory, and a round trip on Redis (bench/README.md).
_local: dict[str, Any] = {}
# Group members, by group, when the layer is in-memory.
_groups: dict[str, set[str]] = {}


def register(channel_name: str, consumer: Consumer) -> None:
    """Deliver notices for ``channel_name`` to ``consumer`` (its ``dispatch``) directly.

    Call when a consumer connects; :func:`unregister` when it goes.
    """
    _local[channel_name] = consumer


def consumers() -> list[Any]:
    """The consumers of this process (for :func:`taskhub.recovery.recover`)."""
    return list(_local.values())


def channels() -> frozenset[str]:
    """The channel names of this process's consumers: its open connections."""
    return frozenset(_local)


def unregister(channel_name: str) -> None:
    _local.pop(channel_name, None)


def in_process(layer: BaseChannelLayer | None) -> bool:
    """Whether every consumer ``layer`` reaches is in this process (the in-memory
    layer): then notices never go through it."""
    return isinstance(layer, InMemoryChannelLayer)


async def group_add(layer: BaseChannelLayer | None, group: str, channel: str) -> None:
    """Add ``channel`` to ``group``: in this process for the in-memory layer, else on the layer."""
    if in_process(layer):
        _groups.setdefault(group, set()).add(channel)
    elif layer is not None:
        await layer.group_add(group, channel)


async def group_discard(layer: BaseChannelLayer | None, group: str, channel: str) -> None:
    """Remove ``channel`` from ``group``; a group without members is forgotten."""
    if in_process(layer):
        members = _groups.get(group)
        if members is not None:
            members.discard(channel)
            if not members:
                del _groups[group]
    elif layer is not None:
        await layer.group_discard(group, channel)


async def send_notices(layer: BaseChannelLayer | None, notices: Iterable[Notice]) -> None:
    """Send each notice, in order; a failure is logged, not raised (the database has the truth)."""
    for kind, name, message in notices:
        if kind == "group" and in_process(layer):
            for channel in list(_groups.get(name, ())):  # a member may leave while it is told
                await _send(layer, channel, message)
            continue
        try:
            if kind == "channel":
                await _send(layer, name, message)
            elif layer is not None:
                await layer.group_send(name, message)
        except Exception:  # the layer is a best-effort bus; callers recover from the database
            metrics.send_failed("error")
            log.exception("could not send %s to %s", message.get("type"), name)


async def _send(layer: BaseChannelLayer | None, channel: str, message: dict[str, Any]) -> None:
    consumer = _local.get(channel)
    try:
        if consumer is not None:
            await consumer.dispatch(message)
        elif layer is not None and not in_process(layer):  # in memory, it is gone
            await layer.send(channel, message)
    except ChannelFull:
        # A consumer that stopped reading, or one that is gone and whose messages wait
        # to expire; either way the database has what the message said.
        metrics.send_failed("full")
        log.warning("channel %s is full: dropped %s", channel, message.get("type"))
    except Exception:
        metrics.send_failed("error")
        log.exception("could not send %s to %s", message.get("type"), channel)
