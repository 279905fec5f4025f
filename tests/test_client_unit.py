"""The client's pieces that need no hub: error mapping, backoff, task callbacks."""

from __future__ import annotations

import asyncio
import json

import pytest

from taskhub.client import (
    AuthenticationFailed,
    InvalidMessage,
    InvalidTransition,
    NoResult,
    PermissionDenied,
    ProtocolError,
    TaskFailed,
    UnknownTask,
    backoff,
)
from taskhub.client.client import Client, error_from
from taskhub.client.tasks import UPDATE_WINDOW, Task, TaskHandle
from tests.conftest import TIMEOUT


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("authentication_failed", AuthenticationFailed),
        ("too_many_instances", AuthenticationFailed),
        ("credential_disabled", AuthenticationFailed),
        ("permission_denied", PermissionDenied),
        ("unknown_task", UnknownTask),
        ("invalid_transition", InvalidTransition),
        ("stale_attempt", InvalidTransition),
        ("invalid_json", InvalidMessage),
        ("invalid_action", InvalidMessage),
        ("payload_too_large", InvalidMessage),
        ("task_exists", InvalidMessage),
        ("internal_error", ProtocolError),
    ],
)
def test_error_codes_map_to_exceptions(code, cls):
    error = error_from({"type": "error", "code": code, "detail": "d"})
    assert type(error) is cls and error.code == code


def test_backoff_follows_wsq():
    assert [backoff(n) for n in (1, 2, 3)] == [0.1, 0.4, 0.9]
    assert backoff(100) == 60.0


def offer():
    return {"type": "task", "task": "t1", "action": "a:b", "attempt": 1, "payload": 5}


async def test_a_callback_registered_after_success_is_still_called():
    task = Task(Client("ws://x", name="n", key="k"), offer())
    task._notify({"type": "success", "task": "t1", "result": 42})
    seen = []
    task.on("success", lambda t, result: seen.append(result))
    task.on("fail", lambda t, reason: seen.append(reason))
    assert seen == [42] and task.done
    assert await task.get_payload() == 5


def test_unknown_events_are_refused():
    task = Task(Client("ws://x", name="n", key="k"), offer())
    with pytest.raises(ValueError, match="unknown task event"):
        task.on("finish", print)


async def test_handle_outcomes_and_defaults():
    client = Client("ws://x", name="n", key="k")
    for message, expected in [
        ({"type": "success", "result": 1}, 1),
        ({"type": "fail", "reason": "complete_timeout", "detail": "slow"}, TaskFailed),
        ({"type": "end", "status": "ended"}, NoResult),
    ]:
        handle = TaskHandle(client, "t1", {})
        handle.published.set_result({})
        handle._notify({**message, "task": "t1"})
        if expected in (TaskFailed, NoResult):
            with pytest.raises(expected):
                await asyncio.wait_for(handle.get_result(), 1)
            assert await asyncio.wait_for(handle.get_result("d"), 1) == "d"
        else:
            assert await asyncio.wait_for(handle.get_result(), 1) == expected


async def test_close_survives_the_hub_closing_right_after_its_bye_ack():
    client = Client("ws://127.0.0.1:9/", name="svc", key="k" * 20)

    class Connection:
        closed = False

        async def send(self, frame: str) -> None:
            ref = json.loads(frame)["ref"]
            client._pending[ref].set_result({"type": "ack", "ref": ref})
            client._ws = None  # the hub closed after its ack, and the session ended

        async def close(self) -> None:
            self.closed = True

    connection = client._ws = Connection()
    await client.close()
    assert connection.closed


class Wire:
    """A connection that records the frames a client sends; the test answers them."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.frames: list[dict] = []
        self._more = asyncio.Event()
        client._ws = self
        client._connected.set()

    async def send(self, frame: str) -> None:
        self.frames.append(json.loads(frame))
        self._more.set()

    async def sent(self, count: int) -> None:
        """Wait until ``count`` frames were sent."""
        while len(self.frames) < count:
            self._more.clear()
            await asyncio.wait_for(self._more.wait(), TIMEOUT)

    def answer(self, index: int, **fields) -> None:
        frame = self.frames[index]
        self.client._dispatch({"type": "ack", "task": frame.get("task"), **fields, "ref": frame["ref"]})

    def refuse(self, index: int, code: str) -> None:
        self.answer(index, type="error", code=code, detail=f"refused: {code}")


TASK_ID = "6a1d5b0e-7c4f-4a53-9b1e-2f0c8d9e4a11"


def worker_task() -> tuple[Task, Wire]:
    client = Client("ws://x", name="n", key="k")
    client._max_payload_size = 100
    return Task(client, {**offer(), "task": TASK_ID}), Wire(client)


async def test_update_returns_once_sent_and_keeps_the_order():
    task, wire = worker_task()
    await task.update({"step": 1}, progress=0.5)
    await task.update({"step": 2}, progress=1)
    assert [(f["type"], f["data"], f["progress"]) for f in wire.frames] == [
        ("update", {"step": 1}, 0.5),
        ("update", {"step": 2}, 1),
    ]
    assert [f["ref"] for f in wire.frames] == sorted(f["ref"] for f in wire.frames)
    wire.answer(0)
    wire.answer(1)
    await task._settle_updates()
    assert not task._client._pending


async def test_update_waits_for_the_oldest_answer_once_the_window_is_full():
    task, wire = worker_task()
    for i in range(UPDATE_WINDOW):
        await task.update(i)
    blocked = asyncio.ensure_future(task.update("one more"))
    # One turn of the loop, not a wait for time: the task runs until it suspends, which
    # (the window being full) is on the oldest update's answer, having sent nothing.
    await asyncio.sleep(0)
    assert not blocked.done() and len(wire.frames) == UPDATE_WINDOW
    wire.answer(0)
    await asyncio.wait_for(blocked, TIMEOUT)
    assert wire.frames[-1]["data"] == "one more"


async def test_a_refused_update_is_raised_by_the_next_and_nothing_more_is_sent():
    task, wire = worker_task()
    await task.update(1)
    wire.refuse(0, "stale_attempt")
    with pytest.raises(InvalidTransition, match="refused: stale_attempt"):
        await task.update(2)
    assert len(wire.frames) == 1
    await task.update(3)  # raised once
    assert wire.frames[-1]["data"] == 3


async def test_pickup_returns_once_sent_and_what_follows_goes_after_it():
    task, wire = worker_task()
    await task.pickup()  # no answer yet: it did not wait for one
    await task.update("half")
    assert [f["type"] for f in wire.frames] == ["pickup", "update"]
    assert wire.frames[0] == {"type": "pickup", "task": task.id, "attempt": task.attempt, "ref": wire.frames[0]["ref"]}


async def test_a_refused_pickup_is_raised_by_the_next_update():
    task, wire = worker_task()
    await task.pickup()
    wire.refuse(0, "invalid_transition")
    with pytest.raises(InvalidTransition, match="refused: invalid_transition"):
        await task.update("too late")
    assert len(wire.frames) == 1  # the update was not sent


async def test_a_refused_update_is_raised_by_drop():
    task, wire = worker_task()
    await task.update(1)
    drop = asyncio.ensure_future(task.drop())
    await asyncio.sleep(0)  # one turn of the loop: the drop runs until it suspends
    assert len(wire.frames) == 1  # the drop waits for the update's answer
    wire.refuse(0, "stale_attempt")
    with pytest.raises(InvalidTransition):
        await asyncio.wait_for(drop, TIMEOUT)
    assert len(wire.frames) == 1


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"progress": 1.5}, "invalid_field"),
        ({"progress": "half"}, "invalid_field"),
        ({"data": "x" * 99}, "payload_too_large"),  # 101 bytes encoded, over the hub's 100
    ],
)
async def test_a_bad_update_is_refused_before_it_is_sent(kwargs, code):
    task, wire = worker_task()
    with pytest.raises(InvalidMessage) as info:
        await task.update(**kwargs)
    assert info.value.code == code and wire.frames == []


async def test_the_result_is_returned_after_a_refused_update_and_the_refusal_logged(caplog):
    task, wire = worker_task()
    client = task._client
    client._tasks[task.id] = task

    async def answer_all():
        await wire.sent(2)
        wire.answer(1)

    async def handler(t):
        await t.update("bad")
        wire.refuse(0, "stale_attempt")
        return "result"

    answering = asyncio.ensure_future(answer_all())
    await asyncio.wait_for(client._work(task, handler), TIMEOUT)
    await answering
    assert [f["type"] for f in wire.frames] == ["update", "return"]
    assert wire.frames[1]["result"] == "result"
    assert f"an update of {TASK_ID} was not accepted: refused: stale_attempt" in caplog.text
