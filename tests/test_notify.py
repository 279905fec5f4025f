"""Sending notices: directly in this process, or on the channel layer (taskhub.notify)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer, InMemoryChannelLayer

from taskhub import notify
from taskhub.notify import send_notices
from taskhub.services import Notice


class RecordingLayer:
    """Records what was sent; sends to channel "broken" fail."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    async def group_add(self, group: str, channel: str) -> None:
        self.log.append(("join", channel))

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if channel == "broken":
            raise ConnectionError("layer down")
        self.log.append(("offer", channel))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self.log.append(("relay", message["n"]))


def as_layer(fake: RecordingLayer) -> BaseChannelLayer:
    """The fake as ``send_notices`` takes it: it has the methods a notice needs."""
    return cast(BaseChannelLayer, fake)


async def test_notices_go_out_in_their_order():
    layer = RecordingLayer()
    notices = [
        Notice("channel", "a", {"type": "taskhub.offer"}),
        Notice("group", "g", {"type": "taskhub.relay", "n": 1}),
        Notice("group", "g", {"type": "taskhub.relay", "n": 2}),
    ]
    await send_notices(as_layer(layer), notices)
    assert layer.log == [("offer", "a"), ("relay", 1), ("relay", 2)]


async def test_a_failed_send_is_logged_and_the_others_still_go_out(caplog):
    layer = RecordingLayer()
    notices = [
        Notice("channel", "broken", {"type": "taskhub.offer"}),
        Notice("channel", "a", {"type": "taskhub.offer"}),
        Notice("group", "g", {"type": "taskhub.relay", "n": 1}),
    ]
    with caplog.at_level(logging.ERROR, logger="taskhub.notify"):
        await send_notices(as_layer(layer), notices)
    assert layer.log == [("offer", "a"), ("relay", 1)]
    assert "could not send taskhub.offer to broken" in caplog.text


Deliver = Callable[[dict[str, Any]], Awaitable[None]]


class Local:
    """A consumer of this process, as notify sees one."""

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver

    async def dispatch(self, message: dict[str, Any]) -> None:
        await self.deliver(message)


async def test_no_layer_sends_nothing():
    await send_notices(None, [Notice("channel", "a", {"type": "taskhub.offer"})])


async def test_a_channel_of_this_process_gets_its_notice_without_the_layer():
    layer = RecordingLayer()
    got: list[dict[str, Any]] = []

    async def deliver(message: dict[str, Any]) -> None:
        got.append(message)

    notify.register("local", Local(deliver))
    try:
        await send_notices(
            as_layer(layer),
            [
                Notice("channel", "local", {"type": "taskhub.offer", "n": 1}),
                Notice("channel", "a", {"type": "taskhub.offer"}),
            ],
        )
    finally:
        notify.unregister("local")
    assert got == [{"type": "taskhub.offer", "n": 1}]
    assert layer.log == [("offer", "a")]
    await send_notices(as_layer(layer), [Notice("channel", "local", {"type": "taskhub.offer"})])
    assert got == [{"type": "taskhub.offer", "n": 1}] and layer.log[-1] == ("offer", "local")


async def test_a_failed_local_delivery_is_logged_and_the_others_still_go_out(caplog):
    layer = RecordingLayer()

    async def deliver(message: dict[str, Any]) -> None:
        raise RuntimeError("consumer gone")

    notify.register("local", Local(deliver))
    try:
        with caplog.at_level(logging.ERROR, logger="taskhub.notify"):
            await send_notices(
                as_layer(layer),
                [Notice("channel", "local", {"type": "taskhub.offer"}), Notice("channel", "a", {"type": "x"})],
            )
    finally:
        notify.unregister("local")
    assert layer.log == [("offer", "a")]
    assert "could not send taskhub.offer to local" in caplog.text


async def test_with_the_in_memory_layer_task_groups_live_in_this_process():
    layer = InMemoryChannelLayer()
    got: list[tuple[str, int]] = []

    def consumer(name: str) -> Deliver:
        async def deliver(message: dict[str, Any]) -> None:
            got.append((name, message["n"]))

        return deliver

    for name in ("a", "b"):
        notify.register(name, Local(consumer(name)))
    try:
        await notify.group_add(layer, "g", "a")
        await notify.group_add(layer, "g", "b")
        await send_notices(layer, [Notice("group", "g", {"type": "taskhub.relay", "n": 1})])
        assert sorted(got) == [("a", 1), ("b", 1)]
        assert layer.groups == {}  # the layer's own groups were never used
        await notify.group_discard(layer, "g", "a")
        await send_notices(layer, [Notice("group", "g", {"type": "taskhub.relay", "n": 2})])
        assert got[2:] == [("b", 2)]
        await notify.group_discard(layer, "g", "b")
        await send_notices(layer, [Notice("group", "g", {"type": "taskhub.relay", "n": 3})])
        assert len(got) == 3
    finally:
        for name in ("a", "b"):
            notify.unregister(name)


async def test_a_member_that_fails_does_not_keep_the_others_from_their_event(caplog):
    layer = InMemoryChannelLayer()
    got: list[dict[str, Any]] = []

    async def broken(message: dict[str, Any]) -> None:
        raise RuntimeError("consumer gone")

    async def deliver(message: dict[str, Any]) -> None:
        got.append(message)

    notify.register("a", Local(broken))
    notify.register("b", Local(deliver))
    try:
        for name in ("a", "b"):
            await notify.group_add(layer, "g", name)
        with caplog.at_level(logging.ERROR, logger="taskhub.notify"):
            await send_notices(layer, [Notice("group", "g", {"type": "taskhub.relay"})])
    finally:
        for name in ("a", "b"):
            notify.unregister(name)
            await notify.group_discard(layer, "g", name)
    assert got == [{"type": "taskhub.relay"}]
    assert "could not send taskhub.relay to a" in caplog.text


async def test_a_full_channel_is_a_warning_not_an_error(caplog):
    class FullLayer(RecordingLayer):
        async def send(self, channel: str, message: dict[str, Any]) -> None:
            raise ChannelFull(channel)

    with caplog.at_level(logging.WARNING, logger="taskhub.notify"):
        await send_notices(as_layer(FullLayer()), [Notice("channel", "slow", {"type": "taskhub.relay"})])
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "channel slow is full: dropped taskhub.relay")
    ]


async def test_in_memory_a_channel_whose_consumer_is_gone_is_sent_nothing():
    layer = InMemoryChannelLayer()
    await send_notices(layer, [Notice("channel", "gone", {"type": "taskhub.relay"})])
    assert layer.channels == {}  # nothing waits there to expire
