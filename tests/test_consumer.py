"""The hub through WebsocketCommunicator: every lifecycle path, permissions, bad input."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from unittest.mock import ANY

import pytest
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from django.test import override_settings
from django.utils import timezone

from taskhub import sweeper
from taskhub.models import Assignment, Credential, Instance, Subscription, TaskEvent, TaskRecord

from .conftest import TIMEOUT, make_credential, open_peer

pytestmark = pytest.mark.django_db(transaction=True)

credential = database_sync_to_async(make_credential)


@database_sync_to_async
def task_row(task_id):
    return TaskRecord.objects.get(pk=task_id)


@database_sync_to_async
def event_kinds(task_id):
    return list(TaskEvent.objects.filter(task_id=task_id).values_list("kind", flat=True))


@database_sync_to_async
def counts():
    return (
        TaskRecord.objects.count(),
        TaskEvent.objects.count(),
        Assignment.objects.count(),
        Subscription.objects.count(),
    )


async def worker(name="mailer", sub=("mail",), action="mail:send", **kw):
    _, key = await credential(name, sub=list(sub), **kw)
    peer = await open_peer(name, key)
    if action:
        ack = await peer.call({"type": "sub", "action": action})
        assert ack["type"] == "ack", ack
    return peer


async def caller(name="app", pub=("mail",)):
    _, key = await credential(name, pub=list(pub))
    return await open_peer(name, key)


async def later(seconds):
    await sweeper.sweep_once(timezone.now() + timedelta(seconds=seconds))


# -- authentication ---------------------------------------------------------------------


async def test_basic_auth_welcome_names_service_and_instance():
    _, key = await credential("svc")
    peer = await open_peer("svc", key, expect_welcome=False)
    welcome = await peer.recv()
    assert welcome["type"] == "welcome" and welcome["service"] == "svc" and welcome["v"] == 1
    assert await database_sync_to_async(Instance.objects.filter(pk=welcome["instance"]).exists)()
    await peer.close()


async def test_hello_frame_authenticates():
    _, key = await credential("svc")
    peer = await open_peer(expect_welcome=False)
    welcome = await peer.call({"type": "hello", "name": "svc", "key": key})
    assert welcome["type"] == "welcome"
    again = await peer.call({"type": "hello", "name": "svc", "key": key})
    assert again["code"] == "already_authenticated"
    await peer.close()


async def test_commands_before_hello_are_refused_and_change_nothing():
    peer = await open_peer(expect_welcome=False)
    answer = await peer.call({"type": "pub", "action": "mail:send"})
    assert answer["code"] == "not_authenticated"
    assert await counts() == (0, 0, 0, 0)
    await peer.close()


@pytest.mark.parametrize(
    ("name", "use_right_key", "code", "close"),
    [
        ("svc", False, "authentication_failed", 4001),
        ("nobody", True, "authentication_failed", 4001),
    ],
)
async def test_wrong_key_or_unknown_name(name, use_right_key, code, close):
    _, key = await credential("svc")
    peer = await open_peer(name, key if use_right_key else "wrong-key-wrong-key", expect_welcome=False)
    error = await peer.recv()
    assert (error["type"], error["code"]) == ("error", code)
    assert (await peer.comm.receive_output(timeout=5))["code"] == close


async def test_disabled_credential_is_refused():
    _, key = await credential("svc", active=False)
    peer = await open_peer("svc", key, expect_welcome=False)
    assert (await peer.recv())["code"] == "credential_disabled"


async def test_max_instances_is_enforced_and_a_slot_frees_on_disconnect():
    _, key = await credential("svc", max_instances=2)
    a, b = await open_peer("svc", key), await open_peer("svc", key)
    c = await open_peer("svc", key, expect_welcome=False)
    assert (await c.recv())["code"] == "too_many_instances"
    assert (await c.comm.receive_output(timeout=5))["code"] == 4003
    await a.close()
    d = await open_peer("svc", key)
    await b.close()
    await d.close()


@override_settings(TASKHUB_INSTANCE_LEASE=10.0, TASKHUB_RESUME_GRACE=10.0)
async def test_an_instance_whose_lease_lapsed_is_released_after_the_resume_grace():
    cred, key = await credential("svc")
    a = await open_peer("svc", key)
    await database_sync_to_async(Instance.objects.filter(credential=cred).update)(process="dead-process")
    await later(19)  # lapsed, but its client may still resume it
    assert await database_sync_to_async(Instance.objects.filter(credential=cred).exists)()
    await later(21)
    b = await open_peer("svc", key)
    await b.close()
    await a.close()


async def test_disabling_a_credential_disconnects_its_instances():
    cred, key = await credential("svc")
    peer = await open_peer("svc", key)
    cred.is_active = False
    await database_sync_to_async(cred.save)()
    await sweeper.sweep_once()
    assert (await peer.recv())["code"] == "credential_disabled"
    assert (await peer.comm.receive_output(timeout=5))["code"] == 4002


# -- the lifecycle ------------------------------------------------------------------------


async def test_full_lifecycle_pub_pickup_update_return():
    w = await worker()
    c = await caller()
    ack = await c.call({"type": "pub", "action": "mail:send", "payload": {"to": ["a@b"]}})
    assert ack["type"] == "ack" and ack["created"] is True
    task_id = ack["task"]
    offer = await w.recv()
    assert offer == {
        "type": "task",
        "task": task_id,
        "action": "mail:send",
        "attempt": 1,
        "publisher": "app",
        "payload_size": 14,
        "payload": {"to": ["a@b"]},
    }
    assert (await w.call({"type": "pickup", "task": task_id, "attempt": 1}))["type"] == "ack"
    await w.call({"type": "update", "task": task_id, "attempt": 1, "data": {"sent": 1}, "progress": 0.5})
    update = await c.recv()
    assert update == {
        **{"type": "update", "task": task_id, "seq": ANY, "attempt": 1},
        **{"service": "mailer", "data": {"sent": 1}, "progress": 0.5},
    }
    await w.call({"type": "return", "task": task_id, "attempt": 1, "result": {"ok": True}})
    success, end = await c.recv(), await c.recv()
    assert success == {
        **{"type": "success", "task": task_id, "seq": ANY, "attempt": 1},
        **{"service": "mailer", "result": {"ok": True}},
    }
    assert end == {"type": "end", "task": task_id, "seq": ANY, "attempt": 1, "status": "success"}
    # Live events carry the seq that watch replays them by.
    replayed = (await c.call({"type": "watch", "task": task_id}))["events"]
    seqs = {e["kind"]: e["seq"] for e in replayed}
    assert [update["seq"], success["seq"], end["seq"]] == [seqs["update"], seqs["success"], seqs["end"]]
    row = await task_row(task_id)
    assert (row.status, row.result, row.progress, row.publisher_name) == ("success", {"ok": True}, 0.5, "app")
    assert await event_kinds(task_id) == ["init", "start", "pickup", "update", "success", "end"]
    assert row.deadline is None and row.finished_at is not None
    await w.close()
    await c.close()


async def test_commands_sent_without_waiting_are_handled_and_answered_in_order():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    commands = [{"type": "update", "task": task_id, "attempt": 1, "data": i, "progress": i / 3} for i in range(3)]
    commands.append({"type": "return", "task": task_id, "attempt": 1, "result": "done"})
    for ref, command in enumerate(commands):
        await w.send({**command, "ref": ref})
    assert [(await w.recv())["ref"] for _ in commands] == [0, 1, 2, 3]
    heard = [await c.recv() for _ in range(5)]
    assert [(m["type"], m.get("data", m.get("result"))) for m in heard] == [
        ("update", 0),
        ("update", 1),
        ("update", 2),
        ("success", "done"),
        ("end", None),
    ]
    assert await event_kinds(task_id) == ["init", "start", "pickup", "update", "update", "update", "success", "end"]
    await w.close()
    await c.close()


async def test_an_offer_to_a_worker_of_this_process_does_not_need_the_channel_layer(monkeypatch):
    async def layer_down(self, channel, message):
        raise ConnectionError("layer down")

    monkeypatch.setattr(InMemoryChannelLayer, "send", layer_down)
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send", "payload": 1}))["task"]
    assert (await w.recv())["task"] == task_id
    await w.close()
    await c.close()


async def test_the_worker_does_not_hear_its_own_update():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    await w.call({"type": "update", "task": task_id, "attempt": 1, "data": 1})
    assert await w.nothing()
    await w.close()
    await c.close()


async def test_a_service_hears_no_more_of_a_task_once_its_part_is_over():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    await w.call({"type": "return", "task": task_id, "attempt": 1, "result": 1})
    assert (await c.recv())["type"] == "success"
    assert (await c.recv())["type"] == "end"
    assert await w.nothing()  # its own success and the end would be news to nobody
    await w.close()
    await c.close()


async def test_a_service_that_publishes_to_itself_still_hears_the_outcome():
    _, key = await credential("loop", sub=["mail"], pub=["mail"])
    peer = await open_peer("loop", key)
    await peer.call({"type": "sub", "action": "mail:send"})
    task_id = (await peer.call({"type": "pub", "action": "mail:send"}))["task"]
    assert (await peer.expect(lambda m: m["type"] == "task"))["task"] == task_id
    await peer.call({"type": "return", "task": task_id, "attempt": 1, "result": "done"})
    assert [(m["type"], m.get("result")) for m in (await peer.recv(), await peer.recv())] == [
        ("success", "done"),
        ("end", None),
    ]
    await peer.close()


async def test_a_publisher_that_also_watches_its_task_hears_each_event_once():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await c.call({"type": "watch", "task": task_id})
    await w.recv()
    await w.call({"type": "update", "task": task_id, "attempt": 1, "progress": 0.5})
    await w.call({"type": "return", "task": task_id, "attempt": 1, "result": 1})
    assert [(await c.recv())["type"] for _ in range(3)] == ["update", "success", "end"]
    assert await c.nothing()
    await w.close()
    await c.close()


async def test_a_pub_resent_from_a_new_connection_hears_the_task():
    w = await worker()
    _, key = await credential("app", pub=["mail"])
    first = await open_peer("app", key)
    task_id = str(uuid.uuid4())
    await first.call({"type": "pub", "action": "mail:send", "task_id": task_id})
    await first.close()  # the answer was lost with the connection; the client re-sends
    second = await open_peer("app", key)
    again = await second.call({"type": "pub", "action": "mail:send", "task_id": task_id})
    assert again["created"] is False
    await w.recv()
    await w.call({"type": "return", "task": task_id, "attempt": 1, "result": 1})
    assert [(await second.recv())["type"] for _ in range(2)] == ["success", "end"]
    await w.close()
    await second.close()


async def test_fan_out_to_every_service_first_return_wins_others_are_told():
    a = await worker("a", sub=["mail"])
    b = await worker("b", sub=["mail:send"])
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    assert (await a.recv())["task"] == task_id
    assert (await b.recv())["task"] == task_id
    await b.call({"type": "pickup", "task": task_id, "attempt": 1})
    await a.call({"type": "update", "task": task_id, "attempt": 1, "data": "half"})
    assert (await b.recv())["type"] == "update"  # another service's update
    await a.call({"type": "return", "task": task_id, "attempt": 1, "result": "A"})
    success = {"type": "success", "task": task_id, "seq": ANY, "attempt": 1, "service": "a", "result": "A"}
    assert await b.recv() == success
    late = await b.call({"type": "return", "task": task_id, "attempt": 1, "result": "B"})
    assert late["type"] == "ack"
    assert (await task_row(task_id)).result == "A"
    assert "late_return" in await event_kinds(task_id)
    for p in (a, b, c):
        await p.close()


async def test_one_instance_per_service_least_recently_assigned():
    _, key = await credential("pool", sub=["mail"], max_instances=3)
    peers = [await open_peer("pool", key) for _ in range(3)]
    for p in peers:
        await p.call({"type": "sub", "action": "mail:send"})
    c = await caller()
    got = []
    for _ in range(6):
        task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
        waits = [asyncio.ensure_future(p.recv()) for p in peers]
        done, pending = await asyncio.wait(waits, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
        assert len(done) == 1
        first = done.pop()
        assert first.result()["task"] == task_id
        got.append(waits.index(first))
        assert all([await p.nothing() for p in peers])  # nobody else got it
    assert sorted(got) == [0, 0, 1, 1, 2, 2]
    for p in [*peers, c]:
        await p.close()


async def test_waiting_task_is_delivered_to_a_late_subscriber():
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send", "payload": 1}))["task"]
    assert (await task_row(task_id)).status == "pending"
    w = await worker(action=None)
    ack = await w.call({"type": "sub", "action": "mail:send"})
    assert ack["waiting"] == 1
    offer = await w.recv()
    assert (offer["task"], offer["payload"]) == (task_id, 1)
    await w.close()
    await c.close()


async def test_pickup_timeout_fails_a_task_nobody_subscribes_to():
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send", "pickup_timeout": 5}))["task"]
    await later(4)
    assert await c.nothing()
    await later(6)
    fail = await c.recv()
    assert fail == {
        "type": "fail",
        "task": task_id,
        "seq": ANY,
        "attempt": 1,
        "reason": "pickup_timeout",
        "detail": "no service subscribed within the pickup timeout",
    }
    assert (await c.recv())["status"] == "failed"
    assert (await task_row(task_id)).failure_reason == "pickup_timeout"
    await c.close()


async def test_no_pickup_timeout_waits_forever():
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send", "pickup_timeout": None}))["task"]
    await later(10**6)
    assert (await task_row(task_id)).status == "pending"
    await c.close()


async def test_offered_but_never_picked_up_ends_without_result():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send", "pickup_timeout": 5}))["task"]
    await w.recv()
    await later(6)
    assert await c.recv() == {"type": "end", "task": task_id, "seq": ANY, "attempt": 1, "status": "ended"}
    assert await event_kinds(task_id) == ["init", "start", "seen", "end"]
    await w.close()
    await c.close()


async def test_complete_timeout_fails_a_picked_up_task():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send", "timeout": 10}))["task"]
    await w.recv()
    await w.call({"type": "pickup", "task": task_id, "attempt": 1})
    await later(9)
    assert await c.nothing()
    await later(11)
    assert (await c.recv())["reason"] == "complete_timeout"
    assert (await w.expect(lambda m: m["type"] == "fail"))["reason"] == "complete_timeout"
    stale = await w.call({"type": "return", "task": task_id, "attempt": 1, "result": 1})
    assert stale["code"] == "invalid_transition"
    assert (await task_row(task_id)).has_result is False
    await w.close()
    await c.close()


async def test_worker_failure_fails_the_task_with_its_error():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    await w.call({"type": "fail", "task": task_id, "attempt": 1, "error": "ValueError: no such mailbox"})
    assert await c.recv() == {
        "type": "fail",
        "task": task_id,
        "seq": ANY,
        "attempt": 1,
        "reason": "error",
        "detail": "ValueError: no such mailbox",
    }
    await w.close()
    await c.close()


async def test_drop_ends_without_result():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    await w.call({"type": "drop", "task": task_id, "attempt": 1})
    assert await c.recv() == {"type": "end", "task": task_id, "seq": ANY, "attempt": 1, "status": "ended"}
    await w.close()
    await c.close()


async def test_a_worker_gone_mid_task_fails_it_with_worker_lost_after_its_grace_and_pickup_timeout():
    """A connection closed without bye may come back within the resume grace (10 s); then
    its task waits for another instance of the service within the pickup timeout (5 s)."""
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send", "pickup_timeout": 5}))["task"]
    await w.recv()
    await w.call({"type": "pickup", "task": task_id, "attempt": 1})
    await w.close()
    await later(9.9)
    assert await c.nothing()
    assert (await task_row(task_id)).status == "started"
    await later(10.1)  # the grace is over: the part waits for another instance
    assert await c.nothing()
    assert await Assignment.objects.filter(task_id=task_id).values_list("state", flat=True).aget() == "waiting"
    await later(15.2)
    assert (await c.recv())["reason"] == "worker_lost"
    assert await event_kinds(task_id) == ["init", "start", "pickup", "lost", "lost", "fail", "end"]
    await c.close()


async def test_republishing_the_same_task_id_creates_nothing_new():
    c = await caller()
    task_id = str(uuid.uuid4())
    first = await c.call({"type": "pub", "action": "mail:send", "task_id": task_id})
    again = await c.call({"type": "pub", "action": "mail:send", "task_id": task_id})
    assert (first["created"], again["created"]) == (True, False)
    assert await event_kinds(task_id) == ["init"]
    other = await caller("other", pub=["*"])
    taken = await other.call({"type": "pub", "action": "mail:send", "task_id": task_id})
    assert taken["code"] == "task_exists"
    await c.close()
    await other.close()


async def test_large_payload_is_fetched_with_get_payload():
    w = await worker()
    c = await caller()
    big = "x" * 20_000
    task_id = (await c.call({"type": "pub", "action": "mail:send", "payload": big}))["task"]
    offer = await w.recv()
    assert "payload" not in offer and offer["payload_size"] == 20_002
    answer = await w.call({"type": "get_payload", "task": task_id})
    assert answer == {"type": "payload", "ref": "r", "task": task_id, "payload": big}
    await w.close()
    await c.close()


async def test_watch_returns_state_and_missed_events():
    w = await worker()
    c = await caller()
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    await w.call({"type": "return", "task": task_id, "attempt": 1, "result": 42})
    state = await c.call({"type": "watch", "task": task_id})
    assert state["type"] == "state" and state["task"]["status"] == "success" and state["task"]["result"] == 42
    assert [e["kind"] for e in state["events"]] == ["init", "start", "success", "end"]
    since = state["events"][1]["seq"]
    newer = await c.call({"type": "watch", "task": task_id, "since": since})
    assert [e["kind"] for e in newer["events"]] == ["success", "end"]
    await w.close()
    await c.close()


# -- permissions ------------------------------------------------------------------------


async def test_denied_pub_and_sub_change_nothing():
    peer = await caller("narrow", pub=["log"])
    denied = await peer.call({"type": "pub", "action": "mail:send"})
    assert denied["code"] == "permission_denied"
    denied = await peer.call({"type": "sub", "action": "log:error"})
    assert denied["code"] == "permission_denied"
    assert (await peer.call({"type": "pub", "action": "log/app:error"}))["type"] == "ack"
    assert (await counts())[0] == 1 and (await counts())[3] == 0
    await peer.close()


async def test_commands_on_unknown_or_foreign_tasks():
    w = await worker()
    c = await caller()
    stranger = await worker("stranger", sub=["geo"], action="geo:locate")
    task_id = (await c.call({"type": "pub", "action": "mail:send", "payload": "secret"}))["task"]
    await w.recv()
    before = await counts()
    for peer, cmd in [
        (stranger, {"type": "pickup", "task": task_id, "attempt": 1}),
        (stranger, {"type": "return", "task": task_id, "attempt": 1, "result": 1}),
        (stranger, {"type": "get_payload", "task": task_id}),
        (stranger, {"type": "watch", "task": task_id}),
        (w, {"type": "pickup", "task": str(uuid.uuid4()), "attempt": 1}),
        (c, {"type": "return", "task": task_id, "attempt": 1, "result": 1}),
    ]:
        assert (await peer.call(cmd))["code"] == "unknown_task", cmd
    stale = await w.call({"type": "pickup", "task": task_id, "attempt": 2})
    assert stale["code"] == "stale_attempt"
    assert await counts() == before
    assert (await w.call({"type": "pickup", "task": task_id, "attempt": 1}))["type"] == "ack"
    for p in (w, c, stranger):
        await p.close()


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('"pub"', "invalid_frame"),
        ('{"ref": 1}', "missing_type"),
        ('{"type": "publish", "ref": 1}', "unknown_type"),
        ('{"type": "pub", "action": "Mail Send", "ref": 1}', "invalid_action"),
        ('{"type": "pub", "action": "mail:send", "timeout": "soon", "ref": 1}', "invalid_field"),
        ('{"type": "pickup", "task": "not-a-uuid", "attempt": 1, "ref": 1}', "invalid_field"),
        (
            '{"type": "update", "task": "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a", "attempt": 1, "progress": 2, "ref": 1}',
            "invalid_field",
        ),
    ],
)
async def test_bad_frames_get_a_coded_error_and_change_nothing(frame, code):
    peer = await caller()
    await peer.send(frame)
    error = await peer.recv()
    assert (error["type"], error["code"]) == ("error", code)
    if '"ref": 1' in frame:
        assert error["ref"] == 1
    assert await counts() == (0, 0, 0, 0)
    assert (await peer.call({"type": "ping"}))["type"] == "pong"  # the connection keeps serving
    await peer.close()


async def test_binary_frames_are_refused():
    peer = await caller()
    await peer.comm.send_to(bytes_data=b"\x00\x01")
    assert (await peer.recv())["code"] == "invalid_frame"
    await peer.close()


@override_settings(TASKHUB_MAX_MESSAGE_SIZE=2000, TASKHUB_MAX_PAYLOAD_SIZE=1000, TASKHUB_INLINE_PAYLOAD_SIZE=500)
async def test_oversized_messages_and_payloads():
    w = await worker()
    c = await caller()
    # A frame over the limit is not parsed, so its error carries no ref.
    await c.send({"type": "pub", "action": "mail:send", "payload": "x" * 3000, "ref": "r"})
    assert await c.recv() == {
        "type": "error",
        "code": "message_too_large",
        "detail": "message of 3065 bytes is over the limit of 2000 bytes",
    }
    assert (await c.call({"type": "pub", "action": "mail:send", "payload": "x" * 1500}))["code"] == "payload_too_large"
    assert (await counts())[0] == 0
    task_id = (await c.call({"type": "pub", "action": "mail:send"}))["task"]
    await w.recv()
    too_big = await w.call({"type": "return", "task": task_id, "attempt": 1, "result": "y" * 1500})
    assert too_big["code"] == "payload_too_large"
    assert (await task_row(task_id)).status == "started"
    await w.close()
    await c.close()


async def test_bye_frees_the_slot_before_answering():
    _, key = await credential("svc")
    peer = await open_peer("svc", key)
    assert await peer.call({"type": "bye"}) == {"type": "ack", "ref": "r"}
    assert await database_sync_to_async(Instance.objects.count)() == 0
    assert (await peer.comm.receive_output(timeout=5))["type"] == "websocket.close"
    again = await open_peer("svc", key)
    await again.close()


async def test_with_the_in_memory_layer_a_connection_waits_on_its_frames_alone():
    """Every notice reaches a consumer of this process directly, so under the in-memory
    layer nothing waits on the connection's channel: no layer queue, no task of its own
    beside the application's (Channels' loop kept two, and a queue, per connection)."""
    from channels.layers import get_channel_layer

    peers = [await worker(f"w{i}") for i in range(5)]
    waiting = [task.get_coro().__qualname__ for task in asyncio.all_tasks()]  # type: ignore[union-attr]
    # Channels' loop waits in a task on each: the layer's receive, and the frames' queue.
    assert "ResilientReceive._receive_through_outages" not in waiting
    assert "Queue.get" not in waiting
    assert waiting.count("HubApplication.__call__") == len(peers)
    layer = get_channel_layer()
    assert not layer.channels  # type: ignore[union-attr]  # InMemoryChannelLayer's queues
    # Each still hears its offers and answers its commands.
    app = await caller()
    task_id = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    assert [(await peer.recv())["task"] for peer in peers] == [task_id] * len(peers)
    for peer in [*peers, app]:
        await peer.close()


async def test_the_instances_of_a_service_share_one_credential_until_it_changes():
    from taskhub import notify

    first = await worker("mailer", max_instances=3)
    (one,) = [c for c in notify.consumers() if c.credential is not None]
    credential = one.credential

    @database_sync_to_async
    def rekey() -> str:
        from taskhub.auth import generate_key, hash_key

        key = generate_key()
        row = Credential.objects.get(pk=credential.pk)
        row.key_hash = hash_key(key)
        row.save()  # updated_at moves: a new version of the credential
        return key

    key = await rekey()
    second = await open_peer("mailer", key)
    third = await open_peer("mailer", key)
    held = {c.channel_name: c.credential for c in notify.consumers() if c.credential is not None}
    assert held[one.channel_name] is credential  # the first keeps what it authenticated with
    newer = [cred for name, cred in held.items() if name != one.channel_name]
    assert len(newer) == 2 and newer[0] is newer[1] and newer[0] is not credential
    assert newer[0].updated_at > credential.updated_at
    for peer in (first, second, third):
        await peer.close()
