"""The asyncio client against a hub played by the test over a local WebSocket: what a
handler's calls send, when they return, and what they raise."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import websockets

from taskhub.client import Client, InvalidMessage, NoResult, ProtocolError, Task, TaskFailed, UnknownTask, backoff
from taskhub.client.tasks import UPDATE_WINDOW
from tests.conftest import SCALE, TIMEOUT

TASK = "6a1d5b0e-7c4f-4a53-9b1e-2f0c8d9e4a11"
ACTION = "mail:send"


class ScriptedHub:
    """A hub the test plays: it welcomes one connection at a time, answers ``sub``, ``ping``
    and ``bye`` itself, and records every other frame for the test to answer. The first
    ``hold_pings`` pings are recorded too, and not answered; with ``record_pings``, the
    pings it answers are recorded too."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.hold_pings = 0
        self.record_pings = False
        self.ws: Any = None
        self._more = asyncio.Event()
        self.url = ""

    async def __aenter__(self) -> ScriptedHub:
        self.server = await websockets.serve(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/ws/taskhub/"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, ws: Any) -> None:
        self.ws = ws
        welcome = {"type": "welcome", "v": 1, "service": "svc", "instance": "i-1", "max_payload_size": 100}
        await ws.send(json.dumps(welcome))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "ping" and self.hold_pings:
                self.hold_pings -= 1
            elif frame["type"] == "ping":
                await ws.send(json.dumps({"type": "pong", "ref": frame["ref"]}))
                if not self.record_pings:
                    continue
            if frame["type"] in ("sub", "bye"):
                await ws.send(json.dumps({"type": "ack", "ref": frame["ref"], "action": frame.get("action")}))
                continue
            self.frames.append(frame)
            self._more.set()

    async def sent(self, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` frames (besides subs) were sent; return them."""
        while len(self.frames) < count:
            self._more.clear()
            await asyncio.wait_for(self._more.wait(), TIMEOUT)
        return self.frames

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def answer(self, index: int, **fields: Any) -> None:
        frame = self.frames[index]
        await self.send({"type": "ack", "task": frame.get("task"), **fields, "ref": frame["ref"]})

    async def pong(self, index: int) -> None:
        await self.send({"type": "pong", "ref": self.frames[index]["ref"]})

    async def refuse(self, index: int, code: str) -> None:
        await self.answer(index, type="error", code=code, detail=f"refused: {code}")

    async def offer(self, payload: Any = 5) -> None:
        await self.send({"type": "task", "task": TASK, "action": ACTION, "attempt": 1, "payload": payload})


@pytest.fixture
async def hub():
    async with ScriptedHub() as h:
        yield h


async def worker(hub: ScriptedHub, handler: Callable[[Task, Client], Any]) -> Client:
    client = Client(hub.url, name="svc", key="k" * 20)
    client.sub(ACTION, lambda task: handler(task, client))
    await asyncio.wait_for(client.connect(), TIMEOUT)
    return client


def test_backoff_follows_wsq():
    assert [backoff(n) for n in (1, 2, 3)] == [0.1, 0.4, 0.9]
    assert backoff(100) == 60.0


async def test_update_returns_once_sent_and_keeps_the_order(hub):
    done = asyncio.Event()

    async def handler(task, client):
        await task.update({"step": 1}, progress=0.5)
        await task.update({"step": 2}, progress=1)
        done.set()  # both returned, with no answer from the hub
        await asyncio.Event().wait()

    client = await worker(hub, handler)
    await hub.offer()
    await asyncio.wait_for(done.wait(), TIMEOUT)
    frames = await hub.sent(2)
    assert [(f["type"], f["data"], f["progress"]) for f in frames] == [
        ("update", {"step": 1}, 0.5),
        ("update", {"step": 2}, 1),
    ]
    assert [f["ref"] for f in frames] == sorted(f["ref"] for f in frames)
    await client.close()


async def test_update_waits_for_the_oldest_answer_once_the_window_is_full(hub):
    async def handler(task, client):
        for i in range(UPDATE_WINDOW + 1):
            await task.update(i)
        await asyncio.Event().wait()

    hub.hold_pings = 3
    client = await worker(hub, handler)
    await hub.offer()
    half = ["update"] * (UPDATE_WINDOW // 2)  # then a ping asks for the answer to them
    assert [f["type"] for f in await hub.sent(UPDATE_WINDOW + 2)] == half + ["ping"] + half + ["ping"]
    probe = asyncio.ensure_future(client.ping())  # held too: the window is still full after it
    await hub.sent(UPDATE_WINDOW + 3)
    await hub.pong(UPDATE_WINDOW // 2)  # acknowledges the first half: the next update goes
    frames = await hub.sent(UPDATE_WINDOW + 4)
    assert [f["type"] for f in frames[-3:]] == ["ping", "ping", "update"]
    await hub.pong(UPDATE_WINDOW + 2)
    assert await asyncio.wait_for(probe, TIMEOUT) >= 0
    assert [f["data"] for f in frames if f["type"] == "update"] == list(range(UPDATE_WINDOW + 1))
    assert all(f["ack"] is False for f in frames if f["type"] == "update")
    await client.close()


async def test_a_refused_update_is_raised_by_the_next_and_nothing_more_is_sent(hub):
    raised = asyncio.get_running_loop().create_future()

    async def handler(task, client):
        await task.update(1)
        await hub.sent(1)
        await hub.refuse(0, "internal_error")
        await client.ping()  # the hub answers in order: the refusal came before the pong
        try:
            await task.update(2)
        except ProtocolError as exc:
            raised.set_result(exc)
        await task.update(3)  # raised once
        await asyncio.Event().wait()

    client = await worker(hub, handler)
    await hub.offer()
    assert "refused: internal_error" in str(await asyncio.wait_for(raised, TIMEOUT))
    frames = await hub.sent(2)
    assert [f.get("data") for f in frames] == [1, 3]
    await client.close()


@pytest.mark.parametrize("code", ["stale_attempt", "invalid_transition", "unknown_task"])
async def test_a_refusal_that_ends_the_part_cancels_the_handler_and_nothing_more_is_sent(hub, code):
    cancelled = asyncio.Event()

    async def handler(task, client):
        await task.update(1)
        try:
            await asyncio.Event().wait()  # long work: the refusal cancels it
        except asyncio.CancelledError:
            cancelled.set()
            raise

    client = await worker(hub, handler)
    await hub.offer()
    await hub.sent(1)
    await hub.refuse(0, code)
    await asyncio.wait_for(cancelled.wait(), TIMEOUT)
    assert await client.ping() >= 0
    assert [f["type"] for f in hub.frames] == ["update"]  # no fail, no return
    assert client.running == []
    await client.close()


@pytest.mark.parametrize(
    "message",
    [
        {"type": "end", "status": "success"},  # another service's success ended the task
        {"type": "fail", "reason": "cancelled", "detail": "cancelled by app"},
        {"type": "retry", "reason": "complete_timeout", "detail": "", "next_attempt": 2},
    ],
)
async def test_the_hub_ending_the_attempt_cancels_the_handler(hub, message):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(task, client):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    client = await worker(hub, handler)
    await hub.offer()
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await hub.send({**message, "task": TASK, "seq": 5, "attempt": 1})
    await asyncio.wait_for(cancelled.wait(), TIMEOUT)
    assert await client.ping() >= 0 and hub.frames == []
    await client.close()


async def test_pickup_returns_once_sent_and_what_follows_goes_after_it(hub):
    async def handler(task, client):
        await task.pickup()  # no answer: it did not wait for one
        await task.update("half")
        await asyncio.Event().wait()

    client = await worker(hub, handler)
    await hub.offer()
    frames = await hub.sent(2)
    assert [f["type"] for f in frames] == ["pickup", "update"]
    # It asks for no answer: the hub answers it only to refuse it.
    assert frames[0] == {"type": "pickup", "task": TASK, "attempt": 1, "ack": False, "ref": frames[0]["ref"]}
    await client.close()


async def test_a_refused_update_is_raised_by_drop(hub):
    raised = asyncio.get_running_loop().create_future()

    async def handler(task, client):
        await task.update(1)
        try:
            await task.drop()  # waits for the update's answer
        except ProtocolError as exc:
            raised.set_result(exc.code)

    hub.hold_pings = 1
    client = await worker(hub, handler)
    await hub.offer()
    assert [f["type"] for f in await hub.sent(2)] == ["update", "ping"]  # asks for the update's answer
    await hub.refuse(0, "internal_error")
    await hub.pong(1)
    assert await asyncio.wait_for(raised, TIMEOUT) == "internal_error"
    assert [f["type"] for f in hub.frames] == ["update", "ping"]  # the drop was not sent
    await client.close()


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"progress": 1.5}, "invalid_field"),
        ({"progress": "half"}, "invalid_field"),
        ({"data": "x" * 99}, "payload_too_large"),  # 101 bytes encoded, over the hub's 100
    ],
)
async def test_a_bad_update_is_refused_before_it_is_sent(hub, kwargs, code):
    raised = asyncio.get_running_loop().create_future()

    async def handler(task, client):
        try:
            await task.update(**kwargs)
        except InvalidMessage as exc:
            raised.set_result(exc.code)
        return "done"

    client = await worker(hub, handler)
    await hub.offer()
    assert await asyncio.wait_for(raised, TIMEOUT) == code
    (frame,) = await hub.sent(1)
    assert frame["type"] == "return"  # the update never left
    await client.close()


async def test_the_result_is_returned_after_a_refused_update_and_the_refusal_logged(hub, caplog):
    async def handler(task, client):
        await task.update("bad")
        return "result"

    client = await worker(hub, handler)
    await hub.offer()
    await hub.sent(1)
    await hub.refuse(0, "internal_error")
    frames = await hub.sent(2)
    assert [f["type"] for f in frames] == ["update", "return"] and frames[1]["result"] == "result"
    await hub.answer(1)
    await client.close()
    assert f"an update of {TASK} was not accepted: refused: internal_error" in caplog.text


async def test_a_callback_registered_after_success_is_still_called(hub):
    seen = asyncio.get_running_loop().create_future()

    async def handler(task, client):
        await hub.send({"type": "success", "task": TASK, "seq": 3, "attempt": 1, "service": "other", "result": 42})
        await client.ping()  # the success came before the pong
        assert task.done
        task.on("success", lambda t, result: seen.set_result(result))
        assert await task.get_payload() == 5
        with pytest.raises(ValueError, match="unknown task event"):
            task.on("finish", print)

    client = await worker(hub, handler)
    await hub.offer()
    assert await asyncio.wait_for(seen, TIMEOUT) == 42
    await client.close()


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"type": "success", "service": "w", "result": 1}, 1),
        ({"type": "fail", "reason": "complete_timeout", "detail": "slow"}, TaskFailed),
        ({"type": "end", "status": "ended"}, NoResult),
    ],
)
async def test_a_handle_finishes_as_its_task_did(hub, message, expected):
    async with Client(hub.url, name="app", key="k" * 20) as client:
        handle = client.pub(ACTION, task_id=TASK)
        (pub,) = await hub.sent(1)
        await hub.answer(0, created=True)
        await asyncio.wait_for(handle.published, TIMEOUT)
        await hub.send({**message, "task": TASK, "seq": 9, "attempt": 1})
        if expected in (TaskFailed, NoResult):
            with pytest.raises(expected):
                await asyncio.wait_for(handle.get_result(), TIMEOUT)
            assert await asyncio.wait_for(handle.get_result("d"), TIMEOUT) == "d"
        else:
            assert await asyncio.wait_for(handle.get_result(), TIMEOUT) == expected
    assert pub["task_id"] == TASK


async def test_close_survives_the_hub_closing_right_after_its_bye_ack():
    async def serve(ws):
        await ws.send(json.dumps({"type": "welcome", "v": 1, "service": "svc", "instance": "i-1"}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "bye":
                await ws.send(json.dumps({"type": "ack", "ref": frame["ref"]}))
                await ws.close()

    async with websockets.serve(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = Client(f"ws://127.0.0.1:{port}/", name="svc", key="k" * 20)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        await asyncio.wait_for(client.close(), TIMEOUT)
        assert not client.connected


async def test_get_result_raises_unknown_task_when_the_task_is_gone_before_its_outcome(hub):
    """A task deleted (autoremove, retention) before its outcome reached this client:
    the resync's unknown_task ends the wait instead of a resync every interval."""
    client = Client(hub.url, name="svc", key="k" * 20, resync_interval=0.05 * SCALE)
    await asyncio.wait_for(client.connect(), TIMEOUT)
    handle = client.pub(ACTION, 1)
    (pub,) = await hub.sent(1)
    await hub.answer(0, task=pub["task_id"], created=True)
    result = asyncio.ensure_future(handle.get_result())
    (_, watch) = await hub.sent(2)  # the quiet spell's resync
    assert watch["type"] == "watch"
    await hub.refuse(1, "unknown_task")
    with pytest.raises(UnknownTask):
        await asyncio.wait_for(result, TIMEOUT)
    await client.close()
