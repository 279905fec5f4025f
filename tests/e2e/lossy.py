"""A channel layer that loses messages, for the hub processes of tests/e2e/test_delivery.py:
channels-redis' core layer, dropping every ``TASKHUB_TEST_LOSE_EVERY``-th message sent
to a channel or a group (as a full channel, an expiry or a Redis restart would)."""

from __future__ import annotations

import itertools
import os
from typing import Any

from channels_redis.core import RedisChannelLayer


class LossyRedisLayer(RedisChannelLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count = itertools.count(1)
        self._every = int(os.environ.get("TASKHUB_TEST_LOSE_EVERY", "2"))

    def _lost(self) -> bool:
        return next(self._count) % self._every == 0

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if not self._lost():
            await super().send(channel, message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if not self._lost():
            await super().group_send(group, message)
