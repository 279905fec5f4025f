"""The client against a hub the test plays: a handler's output that the hub could not take
still ends the task, offers sent again run once, a caller hears what it asked for at once,
and a client that cannot connect says why at once."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
from typing import Any

import pytest
import websockets

from taskhub.client import Client, ConnectionFailed, ConnectionLost, InvalidMessage, InvalidTransition
from taskhub.core.commands import MAX_ERROR_LENGTH
from tests.conftest import TIMEOUT

from .test_client import ACTION, TASK, ScriptedHub, worker


@pytest.fixture
async def hub():
    async with ScriptedHub() as h:
        yield h


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def offer(hub: ScriptedHub, attempt: int = 1, payload: Any = 5) -> None:
    await hub.send({"type": "task", "task": TASK, "action": ACTION, "attempt": attempt, "payload": payload})


# -- a handler's output ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ({1, 2}, "result could not be sent: not JSON (Object of type set is not JSON serializable): {1, 2}"),
        (math.nan, "result could not be sent: not JSON (Out of range float values are not JSON compliant"),
        ([math.inf], "result could not be sent: not JSON (Out of range float values are not JSON compliant"),
        ("x" * 200, "result of 202 bytes is over the hub's limit of 100 bytes"),  # welcome: 100
        (nested(40), "result could not be sent: frame nests deeper than"),
        ("\udc80", "result could not be sent: not JSON ("),  # a lone surrogate is no UTF-8
    ],
)
async def test_a_result_the_hub_could_not_take_fails_the_task_with_the_reason(hub, result, reason):
    client = await worker(hub, lambda task, client: result)
    await offer(hub)
    (frame,) = await hub.sent(1)
    assert (frame["type"], frame["task"], frame["attempt"]) == ("fail", TASK, 1)
    assert frame["error"].startswith(reason)
    await hub.answer(0)
    await client.close()


async def test_a_return_the_hub_refuses_is_followed_by_a_fail_so_the_task_ends(hub):
    client = await worker(hub, lambda task, client: "fine here")
    await offer(hub)
    await hub.sent(1)
    await hub.refuse(0, "invalid_value")  # the hub knows better (a newer hub's rule, say)
    frames = await hub.sent(2)
    assert [f["type"] for f in frames] == ["return", "fail"]
    assert frames[1]["error"] == "result could not be sent: refused: invalid_value"
    await client.close()


async def test_an_error_text_the_hub_could_not_take_is_cut_and_cleaned(hub):
    def handler(task, client):
        raise ValueError("\x00\udc80" + "x" * 20_000)

    client = await worker(hub, handler)
    await offer(hub)
    (frame,) = await hub.sent(1)
    assert frame["type"] == "fail" and len(frame["error"]) == MAX_ERROR_LENGTH
    assert frame["error"].startswith("ValueError: \\x00\\udc80xxx") and frame["error"].endswith("x…")
    await client.close()


async def test_an_error_whose_text_cannot_be_read_still_fails_the_task(hub):
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    def handler(task, client):
        raise Broken

    client = await worker(hub, handler)
    await offer(hub)
    (frame,) = await hub.sent(1)
    assert (frame["type"], frame["error"]) == ("fail", "Broken: <the error's message could not be read>")
    await client.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({1}, "update data could not be sent: not JSON (Object of type set is not JSON serializable)"),
        ({"x": math.nan}, "update data could not be sent: not JSON (Out of range float"),
        ({"big": 2**60}, "update data could not be sent: frame holds the integer 1152921504606846976…, beyond ±2**53"),
        ("a\x00b", "update data could not be sent: frame holds a string with U+0000"),
    ],
)
async def test_update_data_the_hub_could_not_take_is_raised_in_the_handler(hub, data, message):
    raised = asyncio.get_running_loop().create_future()

    async def handler(task, client):
        try:
            await task.update(data)
        except InvalidMessage as exc:
            raised.set_result(exc)
        return "done"

    client = await worker(hub, handler)
    await offer(hub)
    error = await asyncio.wait_for(raised, TIMEOUT)
    assert error.code == "invalid_value" and str(error).startswith(message)
    (frame,) = await hub.sent(1)
    assert frame["type"] == "return"  # the update never left
    await client.close()


async def test_the_worker_logs_each_task_received_and_finished(hub, caplog):
    caplog.set_level(logging.INFO, logger="taskhub.client")
    client = await worker(hub, lambda task, client: "r")
    await offer(hub)
    await hub.sent(1)
    await hub.answer(0)
    await client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "taskhub.client" and r.levelno == logging.INFO]
    assert f"Task {ACTION}[{TASK}] received (attempt 1)" in lines
    assert any(line.startswith(f"Task {ACTION}[{TASK}] succeeded in ") for line in lines)


# -- offers sent again -------------------------------------------------------------------------


async def test_an_offer_sent_again_after_its_handler_finished_is_not_run_again(hub):
    runs: list[int] = []

    def handler(task, client):
        runs.append(task.attempt)
        return "r"

    client = await worker(hub, handler)
    await offer(hub)
    await hub.sent(1)
    await hub.answer(0)
    await offer(hub)  # the hub's recovery sent it again
    assert await client.ping() >= 0  # the offer came before the pong
    assert runs == [1] and len(hub.frames) == 1 and client.running == []
    await client.close()


async def test_an_old_attempts_handler_finishing_late_leaves_the_new_attempt_alone(hub):
    runs: list[int] = []
    first_started, release_first, second_started = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(task, client):
        runs.append(task.attempt)
        if task.attempt == 2:
            second_started.set()
            await asyncio.Event().wait()
        first_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release_first.wait()  # it takes its time to stop
            raise

    client = await worker(hub, handler)
    await offer(hub, attempt=1)
    await asyncio.wait_for(first_started.wait(), TIMEOUT)
    await offer(hub, attempt=2)  # the retry event was lost; the next attempt came here
    await asyncio.wait_for(second_started.wait(), TIMEOUT)
    release_first.set()
    await offer(hub, attempt=2)  # sent again
    await offer(hub, attempt=1)  # an old one, come late
    assert await client.ping() >= 0
    assert runs == [1, 2]
    assert [(t.id, t.attempt) for t in client.running] == [(TASK, 2)]
    await client.close()


# -- a caller ----------------------------------------------------------------------------------


async def test_a_handle_that_failed_and_is_never_awaited_logs_nothing(hub, caplog):
    async with Client(hub.url, name="app", key="k" * 20) as client:
        handle = client.pub(ACTION, task_id=TASK)
        await hub.sent(1)
        await hub.answer(0, created=True)
        await hub.send({"type": "fail", "task": TASK, "seq": 9, "attempt": 1, "reason": "cancelled", "detail": "x"})
        assert await client.ping() >= 0  # the fail came first
        assert handle.status == "failed"
        del handle
        gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_pub_of_a_task_that_exists_reads_its_outcome_at_once(hub):
    """A caller restarted with the id of a task that finished meanwhile: the hub says the
    task exists, and the client reads it, well before its resync interval."""
    async with Client(hub.url, name="app", key="k" * 20, resync_interval=3600) as client:
        handle = client.pub(ACTION, task_id=TASK)
        await hub.sent(1)
        await hub.answer(0, created=False)
        (_, watch) = await hub.sent(2)
        assert (watch["type"], watch["task"], watch["since"]) == ("watch", TASK, 0)
        state = {"id": TASK, "action": ACTION, "status": "success", "has_result": True, "result": 42}
        await hub.send({"type": "state", "ref": watch["ref"], "task": state, "events": []})
        assert await asyncio.wait_for(handle.get_result(), TIMEOUT) == 42


async def test_retry_raises_the_hubs_refusal_itself(hub):
    async with Client(hub.url, name="app", key="k" * 20) as client:
        retrying = asyncio.ensure_future(client.retry(TASK))
        (read,) = await hub.sent(1)
        assert (read["type"], read["follow"]) == ("watch", False)
        await hub.send(
            {
                "type": "state",
                "ref": read["ref"],
                "task": {"id": TASK, "action": ACTION, "status": "success"},
                "events": [],
            }
        )
        (_, retry) = await hub.sent(2)
        assert retry["type"] == "retry"
        await hub.refuse(1, "invalid_transition")
        with pytest.raises(InvalidTransition):
            await asyncio.wait_for(retrying, TIMEOUT)


async def test_a_cancel_whose_answer_was_lost_raises_connection_lost_and_is_not_sent_again(hub):
    async with Client(hub.url, name="app", key="k" * 20, backoff=lambda n: 0.01) as client:
        handle = client.pub(ACTION, task_id=TASK)
        await hub.sent(1)
        await hub.answer(0, created=True)
        cancelling = asyncio.ensure_future(handle.cancel())
        (_, cancel) = await hub.sent(2)
        assert cancel["type"] == "cancel"
        await hub.ws.close()  # before the hub answered
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(cancelling, TIMEOUT)
        assert await asyncio.wait_for(client.ping(), TIMEOUT) >= 0  # reconnected
        assert [f["type"] for f in hub.frames[2:]] == ["watch"]  # the handle's watch, no cancel


# -- connecting --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/ws/taskhub/", "127.0.0.1:8000", "ws://", "ws://h:99999/"])
def test_a_url_that_is_no_websocket_url_is_refused_at_once(url):
    with pytest.raises(ValueError, match="is not a WebSocket URL"):
        Client(url, name="app", key="k")


async def test_a_path_that_serves_no_hub_fails_the_first_connect_at_once():
    async def serve(ws):
        await ws.send(json.dumps({"type": "error", "code": "not_found", "detail": "no TaskHub endpoint at /x/"}))
        await ws.close(4404)

    async with websockets.serve(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = Client(f"ws://127.0.0.1:{port}/x/", name="app", key="k", connect_timeout=100 * TIMEOUT)
        with pytest.raises(ConnectionFailed, match="not_found: no TaskHub endpoint at /x/"):
            await asyncio.wait_for(client.connect(), TIMEOUT)  # not after the connect timeout
        await client.disconnect()


async def test_an_unexpected_error_in_the_connection_is_logged_and_raised_by_the_first_connect(hub, caplog):
    client = Client(hub.url, name="app", key="k", connect_timeout=100 * TIMEOUT)

    def broken() -> None:
        raise RuntimeError("a bug")

    client.protocol.connection_made = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(client.connect(), TIMEOUT)
    assert "failed unexpectedly" in caplog.text and "RuntimeError: a bug" in caplog.text
    await client.disconnect()


# -- commands go out in the order they were made ----------------------------------------------


async def test_a_pub_goes_out_before_a_request_made_after_it(hub):
    client = Client(hub.url, name="svc", key="k" * 20)
    await asyncio.wait_for(client.connect(), TIMEOUT)
    handle = client.pub(ACTION, 1)
    state = asyncio.ensure_future(client.get_task(handle.task_id))
    frames = await hub.sent(2)
    assert [f["type"] for f in frames] == ["pub", "watch"]
    assert frames[0]["task_id"] == frames[1]["task"] == handle.task_id
    await hub.answer(0, task=handle.task_id, created=True)
    await client.close()
    with pytest.raises(ConnectionLost):
        await state


async def test_a_flush_that_waits_for_the_socket_keeps_later_frames_behind_its_own():
    # The answer to a command acknowledges those sent before it without an answer: a
    # frame must never pass one queued before it, even while the socket's buffer is full.
    client = Client("ws://127.0.0.1:9/ws/taskhub/", name="svc", key="k" * 20)
    sent: list[str] = []
    entered, drained = asyncio.Event(), asyncio.Event()

    class FullSocket:
        async def send(self, frame: str) -> None:
            if frame == "first":
                entered.set()
                await drained.wait()  # the buffer is full: the send waits for the client
            sent.append(frame)

    client._ws = FullSocket()
    client.protocol._outbox += ["first", "second"]
    earlier = asyncio.ensure_future(client._flush())
    await asyncio.wait_for(entered.wait(), TIMEOUT)
    client.protocol._outbox.append("third")
    later = asyncio.ensure_future(client._flush())
    drained.set()
    await asyncio.wait_for(asyncio.gather(earlier, later), TIMEOUT)
    assert sent == ["first", "second", "third"]
