"""Sending the services layer's notices on the channel layer, after commit."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from channels.layers import BaseChannelLayer

from .services import Notice

log = logging.getLogger(__name__)


async def send_notices(layer: BaseChannelLayer | None, notices: Iterable[Notice]) -> None:
    """Send each notice; a failure is logged, not raised (the database has the truth)."""
    if layer is None:
        return
    for kind, name, message in notices:
        try:
            if kind == "group":
                await layer.group_send(name, message)
            elif kind == "join":
                await layer.group_add(name, message["channel"])
            else:
                await layer.send(name, message)
        except Exception:  # the layer is a best-effort bus; callers recover from the database
            log.exception("could not send %s to %s", message.get("type"), name)
