"""Fewer frames on the hot path: a worker's commands that ask for no answer
(``"ack": false``) are answered only when refused, and a client that reads an ``end``
inside the event before it (``inline_end``) gets the two in one frame. A round trip then
takes six frames, and nothing is persisted or delivered differently."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async

from taskhub import sweeper
from taskhub.models import TaskRecord

from .conftest import Peer, make_credential, open_peer
from .test_consumer import event_kinds, worker

pytestmark = pytest.mark.django_db(transaction=True)

credential = database_sync_to_async(make_credential)


async def caller(*, inline: bool) -> Peer:
    _, key = await credential("app", pub=["mail"])
    return await open_peer("app", key, headers=[(b"taskhub-inline-end", b"true" if inline else b"false")])


@database_sync_to_async
def status(task_id: str) -> str:
    return TaskRecord.objects.get(pk=task_id).status


async def test_a_round_trip_takes_six_frames_and_persists_every_event():
    w = await worker()
    c = await caller(inline=True)
    ack = await c.call({"type": "pub", "action": "mail:send", "payload": 1})  # 1, 2
    task_id = ack["task"]
    offer = await w.recv()  # 3
    await w.send({"type": "pickup", "task": task_id, "attempt": 1, "ack": False, "ref": 1})  # 4
    await w.send({"type": "return", "task": task_id, "attempt": 1, "result": 2, "ack": False, "ref": 2})  # 5
    done = await c.recv()  # 6
    assert offer["type"] == "task"
    assert done["type"] == "success" and done["result"] == 2
    assert done["end"] == {"seq": done["seq"] + 1, "attempt": 1, "status": "success"}
    assert await c.nothing() and await w.nothing()  # no acks, no separate end
    assert await event_kinds(task_id) == ["init", "start", "pickup", "success", "end"]
    assert await status(task_id) == "success"
    # The answer to a later command is what acknowledges them: it comes after them.
    assert (await w.call({"type": "ping", "ref": 3}))["type"] == "pong"
    await w.close()
    await c.close()


async def test_the_next_offer_names_the_last_command_applied_that_asked_for_no_answer():
    """A busy worker needs no ``ping``: the offer after its silent commands says they were
    applied, once; an answer with a ref says it as well, and a caller never hears of it."""
    w = await worker()
    c = await caller(inline=True)
    # Its first pass may read the tasks while they move and send w what it thinks w
    # missed: the frame that then says "applied" would not be the offer.
    await sweeper.stop()

    async def offered() -> dict[str, Any]:
        task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
        offer: dict[str, Any] = await w.recv()
        assert offer["task"] == task_id
        return offer

    first = await offered()
    assert "applied" not in first  # nothing was sent without an answer yet
    await w.send({"type": "pickup", "task": first["task"], "attempt": 1, "ack": False, "ref": 1})
    await w.send({"type": "return", "task": first["task"], "attempt": 1, "ack": False, "ref": "r"})
    assert (await c.recv())["type"] == "success"  # the return was applied
    second = await offered()
    assert second["applied"] == "r"
    assert "applied" not in await offered()  # said once
    await w.send({"type": "pickup", "task": second["task"], "attempt": 1, "ack": False, "ref": 7})
    pong = await w.call({"type": "ping", "ref": 8})
    assert (pong["ref"], "applied" in pong) == (8, False)
    assert "applied" not in await offered()  # the pong said it
    assert await c.nothing()
    # One without a ref cannot be named: the last one with a ref still is.
    await w.send({"type": "update", "task": second["task"], "attempt": 1, "data": 1, "ack": False, "ref": "u"})
    await w.send({"type": "update", "task": second["task"], "attempt": 1, "data": 2, "ack": False})
    # The offer can only name what was applied before it: the caller hears of both first.
    assert [(await c.recv())["data"] for _ in range(2)] == [1, 2]
    assert (await offered())["applied"] == "u"
    await w.close()
    await c.close()


async def test_a_command_that_asked_for_no_answer_is_still_refused_with_its_ref():
    w = await worker()
    c = await caller(inline=True)
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    await w.send({"type": "update", "task": task_id, "attempt": 2, "data": 1, "ack": False, "ref": "u"})
    error = await w.recv()
    assert (error["type"], error["code"], error["ref"]) == ("error", "stale_attempt", "u")
    assert await event_kinds(task_id) == ["init", "start"]  # nothing changed
    await w.send({"type": "touch", "task": task_id, "attempt": 1, "ack": "no", "ref": "t"})
    error = await w.recv()
    assert (error["code"], error["ref"]) == ("invalid_field", "t")
    assert await event_kinds(task_id) == ["init", "start"]
    await w.close()
    await c.close()


@pytest.mark.parametrize("by_hello", [False, True])
async def test_an_end_rides_inside_the_event_before_it_only_for_a_client_that_asked(by_hello):
    w = await worker()
    _, key = await credential("app", pub=["mail"], max_instances=2)
    folded = await open_peer(expect_welcome=False)
    welcome = await folded.call({"type": "hello", "name": "app", "key": key, "inline_end": True})
    assert welcome["type"] == "welcome"
    if not by_hello:
        await folded.close()
        folded = await open_peer("app", key, headers=[(b"taskhub-inline-end", b"True ")])
    plain = await open_peer("app", key)
    task_id = (await folded.call({"type": "pub", "action": "mail:send"}))["task"]
    assert (await plain.call({"type": "watch", "task": task_id}))["type"] == "state"
    await w.recv()
    await w.send({"type": "fail", "task": task_id, "attempt": 1, "error": "boom", "ref": 1})
    assert (await w.recv())["ref"] == 1  # asked for its answer: gets it
    failed = await folded.recv()
    assert failed["type"] == "fail" and failed["reason"] == "error"
    assert failed["end"] == {"seq": failed["seq"] + 1, "attempt": 1, "status": "failed"}
    assert await folded.nothing()
    apart = [await plain.recv(), await plain.recv()]
    assert [m["type"] for m in apart] == ["fail", "end"] and "end" not in apart[0]
    assert {**apart[0], "end": failed["end"]} == failed
    await w.close()
    await folded.close()
    await plain.close()


@pytest.mark.parametrize("value", [b"yes", b"1", b"true, false"])
async def test_a_bad_inline_end_header_refuses_the_session(value):
    _, key = await credential("app", pub=["mail"])
    peer = await open_peer("app", key, headers=[(b"taskhub-inline-end", value)], expect_welcome=False)
    error = await peer.recv()
    assert (error["type"], error["code"]) == ("error", "invalid_field")
    assert "TaskHub-Inline-End" in error["detail"]


async def test_a_bad_inline_end_in_hello_is_refused():
    _, key = await credential("app", pub=["mail"])
    peer = await open_peer(expect_welcome=False)
    error = await peer.call({"type": "hello", "name": "app", "key": key, "inline_end": "yes"})
    assert (error["type"], error["code"]) == ("error", "invalid_field")
    welcome = await peer.call({"type": "hello", "name": "app", "key": key})
    assert welcome["type"] == "welcome"  # the refused hello changed nothing
    await peer.close()
