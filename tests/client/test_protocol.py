"""The client's sans-I/O protocol: frames in, events and frames out. No sockets, no clock."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from taskhub.client.protocol import (
    Answered,
    ClientProtocol,
    ConnectionLost,
    ConnectionState,
    Failed,
    HubError,
    Offered,
    Refused,
    SessionRefused,
    TaskEventIn,
    Welcomed,
)
from taskhub.core.commands import Bye, Cancel, GetPayload, Ping, Pub, Retry, Update, Watch
from taskhub.core.errors import AuthenticationFailed, InvalidMessage, UnknownTask
from taskhub.core.messages import TaskSuccess, TaskUpdate

TASK = "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"
WELCOME = {"type": "welcome", "v": 1, "service": "svc", "instance": "i-1", "max_message_size": 1000}


def sent(protocol: ClientProtocol) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in protocol.data_to_send()]


def opened(*subscriptions: str) -> ClientProtocol:
    protocol = ClientProtocol()
    for action in subscriptions:
        assert protocol.subscribe(action) is None  # not connected: sent with the welcome
    protocol.connection_made()
    assert protocol.state is ConnectionState.CONNECTING
    events = protocol.receive(json.dumps(WELCOME))
    # A cast, as mypy keeps the narrowing above across the call that changed the state.
    assert isinstance(events[0], Welcomed) and cast(ConnectionState, protocol.state) is ConnectionState.OPEN
    return protocol


def receive(protocol: ClientProtocol, message: dict[str, Any]) -> list[Any]:
    return protocol.receive(json.dumps(message))


def test_the_welcome_opens_the_session_and_sends_the_subscriptions():
    protocol = ClientProtocol()
    protocol.subscribe("mail:send")
    protocol.connection_made()
    (welcomed,) = receive(protocol, WELCOME)
    frames = sent(protocol)
    assert [(f["type"], f["action"]) for f in frames] == [("sub", "mail:send")]
    assert welcomed.subscriptions == (frames[0]["ref"],)
    assert (protocol.instance, protocol.max_message_size) == ("i-1", 1000)


def test_a_refused_session_is_an_authentication_error():
    protocol = ClientProtocol()
    protocol.connection_made()
    (refused,) = receive(protocol, {"type": "error", "code": "too_many_instances", "detail": "full"})
    assert isinstance(refused, SessionRefused)
    assert isinstance(refused.error, AuthenticationFailed) and refused.error.code == "too_many_instances"


def test_answers_and_refusals_come_back_for_their_refs():
    protocol = opened()
    ping = protocol.send(Ping.build())
    fetch = protocol.send(GetPayload.build(task=TASK))
    assert [f["ref"] for f in sent(protocol)] == [ping, fetch]
    (refused,) = receive(protocol, {"type": "error", "code": "unknown_task", "detail": "no task", "ref": fetch})
    assert isinstance(refused, Refused) and isinstance(refused.error, UnknownTask) and refused.ref == fetch
    (answered,) = receive(protocol, {"type": "pong", "ref": ping})
    assert isinstance(answered, Answered) and answered.ref == ping and answered.message.type == "pong"
    # An error for no command of ours (or an answer to nothing) is not an answer.
    (error,) = receive(protocol, {"type": "error", "code": "internal_error", "detail": "?", "ref": 999})
    assert isinstance(error, HubError)
    assert receive(protocol, {"type": "pong", "ref": ping}) == []


def test_commands_wait_for_the_session_and_go_in_order_after_the_subscriptions():
    protocol = ClientProtocol()
    protocol.subscribe("mail:send")
    first = protocol.send(Pub.build(action="mail:send", task_id=TASK))
    second = protocol.send(Ping.build())
    assert protocol.data_to_send() == []  # no connection: nothing to send
    protocol.connection_made()
    receive(protocol, WELCOME)
    frames = sent(protocol)
    assert [f["type"] for f in frames] == ["sub", "pub", "ping"]
    assert [f["ref"] for f in frames[1:]] == [first, second]


def test_after_a_lost_connection_safe_commands_are_sent_again_and_the_others_fail():
    protocol = opened("mail:send")
    (sub,) = sent(protocol)
    receive(protocol, {"type": "ack", "ref": sub["ref"], "action": "mail:send", "waiting": 0})
    pub = protocol.send(Pub.build(action="mail:send", task_id=TASK))
    update = protocol.send(Update.build(task=TASK, attempt=1, progress=0.5))
    bye = protocol.send(Bye.build())
    sent(protocol)
    events: list[Any] = protocol.connection_lost()  # their types are what is checked
    assert [(type(e), e.ref) for e in events] == [(Failed, bye)]
    assert isinstance(events[0].error, ConnectionLost)
    assert protocol.state is ConnectionState.CLOSED
    protocol.connection_made()
    receive(protocol, {**WELCOME, "resumed": True})
    frames = sent(protocol)
    # The subscription first, then the pub with its ref and its task id (the hub creates
    # the task once), then the update marked again (the hub applies it once).
    assert [(f["type"], f["ref"], f.get("again")) for f in frames] == [
        ("sub", frames[0]["ref"], None),
        ("pub", pub, None),
        ("update", update, True),
    ]
    assert frames[1]["task_id"] == TASK


def test_a_cancel_or_a_retry_whose_answer_was_lost_fails_and_is_not_sent_again():
    """The hub cannot tell a cancel or a retry sent again from a new one: a second cancel
    is refused although the first happened, a second retry starts another attempt."""
    protocol = opened()
    cancel = protocol.send(Cancel.build(task=TASK))
    retry = protocol.send(Retry.build(task=TASK))
    sent(protocol)
    events: list[Any] = protocol.connection_lost()
    assert [(type(e), e.ref) for e in events] == [(Failed, cancel), (Failed, retry)]
    assert all(isinstance(e.error, ConnectionLost) for e in events)
    # Submitted while disconnected, one was never sent: it goes once the session opens.
    held = protocol.send(Cancel.build(task=TASK))
    protocol.connection_made()
    receive(protocol, {**WELCOME, "resumed": True})
    assert [(f["type"], f["ref"]) for f in sent(protocol)] == [("cancel", held)]


def test_a_reconnect_that_does_not_get_the_instance_back_says_so():
    protocol = opened()
    assert protocol.resume_token is None
    protocol.connection_lost()
    protocol.connection_made()
    welcome = {**WELCOME, "resume": "i-1.secret", "resumed": True}
    (welcomed,) = receive(protocol, welcome)
    assert not welcomed.instance_lost and protocol.resume_token == "i-1.secret"
    protocol.connection_lost()
    protocol.connection_made()
    (welcomed,) = receive(protocol, {**welcome, "instance": "i-2", "resumed": False})
    assert welcomed.instance_lost


def test_offers_and_task_events_each_seq_once():
    protocol = opened()
    (offered,) = receive(protocol, {"type": "task", "task": TASK, "action": "a:b", "attempt": 1, "payload": 3})
    assert isinstance(offered, Offered) and offered.offer.payload == 3
    update = {"type": "update", "task": TASK, "seq": 5, "attempt": 1, "service": "x", "data": 1, "progress": 0.5}
    (event,) = receive(protocol, update)
    assert isinstance(event, TaskEventIn)
    assert event.message == TaskUpdate(task=TASK, seq=5, attempt=1, service="x", data=1, progress=0.5)
    assert receive(protocol, update) == []  # heard it already (as publisher and as watcher, say)
    assert protocol.last_seq(TASK) == 5
    protocol.forget(TASK)
    assert receive(protocol, {**update, "seq": 6}) == []  # not followed any more


def test_a_followed_task_is_watched_again_after_a_reconnect_from_the_last_seq():
    protocol = opened()
    protocol.follow(TASK, resume=True)
    receive(protocol, {"type": "update", "task": TASK, "seq": 7, "attempt": 1, "service": "w"})
    protocol.connection_lost()
    protocol.connection_made()
    receive(protocol, WELCOME)
    (watch,) = sent(protocol)
    assert (watch["type"], watch["task"], watch["since"]) == ("watch", TASK, 7)
    events = receive(
        protocol,
        {
            "type": "state",
            "ref": watch["ref"],
            "task": {"id": TASK, "status": "success"},
            "events": [
                {"seq": 7, "kind": "update", "service": "w", "attempt": 1, "data": {"data": 1, "progress": None}},
                {"seq": 8, "kind": "pickup", "service": "w", "attempt": 1, "data": None},
                {"seq": 9, "kind": "success", "service": "w", "attempt": 1, "data": {"result": "r"}},
            ],
        },
    )
    # The events missed (the success; not the update heard, nor the pickup, which is not
    # relayed), then the answer itself.
    assert [type(e) for e in events] == [TaskEventIn, Answered]
    assert events[0].message == TaskSuccess(task=TASK, seq=9, attempt=1, service="w", result="r")


def test_after_a_reconnect_the_protocol_reads_every_page_of_its_own_watch():
    """Nobody else waits for the answer of the watch a reconnect sends: the protocol reads
    the next pages itself, and live events flow again after the last one."""
    protocol = opened()
    protocol.follow(TASK, resume=True)
    protocol.connection_lost()
    protocol.connection_made()
    receive(protocol, WELCOME)
    (watch,) = sent(protocol)

    def logged(seq: int) -> dict[str, Any]:
        return {"seq": seq, "kind": "update", "service": "w", "attempt": 1, "data": {"data": seq, "progress": None}}

    page = {"type": "state", "ref": watch["ref"], "task": {"id": TASK}, "events": [logged(1)], "more": True}
    assert [type(e) for e in receive(protocol, page)] == [TaskEventIn, Answered]
    (following,) = sent(protocol)
    assert (following["type"], following["since"]) == ("watch", 1)
    live = {"type": "fail", "task": TASK, "seq": 9, "attempt": 1, "service": "w", "reason": "error", "detail": "x"}
    assert receive(protocol, live) == []  # held until the last page
    last = {"type": "state", "ref": following["ref"], "task": {"id": TASK}, "events": [logged(2)]}
    events = receive(protocol, last)
    assert [getattr(getattr(e, "message", None), "seq", None) for e in events] == [2, 9, None]
    assert sent(protocol) == []


def test_a_frame_over_the_hubs_limit_is_refused_before_it_is_queued():
    protocol = opened()
    with pytest.raises(InvalidMessage) as info:
        protocol.send(Pub.build(action="a:b", payload="x" * 2000))
    assert info.value.code == "message_too_large"
    assert protocol.data_to_send() == []


def test_a_message_this_client_cannot_read_is_skipped(caplog):
    protocol = opened()
    assert receive(protocol, {"type": "from_the_future"}) == []
    assert protocol.receive("not json") == []
    assert "skipped a message" in caplog.text


def test_live_events_that_race_a_watchs_replay_are_delivered_after_it_in_order():
    """The hub joins the task's group before it reads the events it replays: a live event
    can come before the replay of older ones, and must not make them look heard."""
    protocol = opened()
    protocol.follow(TASK, resume=True)
    ref = protocol.send(Watch.build(task=TASK, since=0))
    sent(protocol)
    live = {"type": "update", "task": TASK, "seq": 12, "attempt": 1, "service": "w", "data": 2}
    assert receive(protocol, live) == []  # held until the replay
    logged = [{"seq": 11, "kind": "update", "service": "w", "attempt": 1, "data": {"data": 1, "progress": None}}]
    logged.append({**logged[0], "seq": 12, "data": {"data": 2, "progress": None}})
    events = receive(protocol, {"type": "state", "ref": ref, "task": {"id": TASK}, "events": logged})
    assert [(type(e).__name__, getattr(getattr(e, "message", None), "seq", None)) for e in events] == [
        ("TaskEventIn", 11),
        ("TaskEventIn", 12),
        ("Answered", None),
    ]
    assert receive(protocol, {**live, "seq": 13}) != []  # the watch answered: live again


def test_live_events_wait_while_a_long_replay_is_read_page_by_page():
    """A replay in pages (``more``): a live event that comes between two pages is newer
    than the next page's events; delivered at once, it would make them look heard."""
    protocol = opened()
    protocol.follow(TASK, resume=True)
    ref = protocol.send(Watch.build(task=TASK, since=0))
    sent(protocol)

    def logged(seq: int) -> dict[str, Any]:
        return {"seq": seq, "kind": "update", "service": "w", "attempt": 1, "data": {"data": seq, "progress": None}}

    first = {"type": "state", "ref": ref, "task": {"id": TASK}, "events": [logged(1), logged(2)], "more": True}
    assert [getattr(e, "message", e).seq for e in receive(protocol, first)[:-1]] == [1, 2]
    live = {"type": "update", "task": TASK, "seq": 5, "attempt": 1, "service": "w", "data": 5}
    assert receive(protocol, live) == []  # held: pages 3 and 4 are still to come
    ref = protocol.send(Watch.build(task=TASK, since=2))
    sent(protocol)
    last = {"type": "state", "ref": ref, "task": {"id": TASK}, "events": [logged(3), logged(4)]}
    events = receive(protocol, last)
    assert [getattr(getattr(e, "message", None), "seq", None) for e in events] == [3, 4, 5, None]


def test_closing_fails_every_command_waiting_and_refuses_new_ones():
    protocol = ClientProtocol()
    held = protocol.send(Ping.build())
    protocol.connection_made()
    receive(protocol, WELCOME)
    sent_ref = protocol.send(GetPayload.build(task=TASK))
    events = protocol.close()
    got = sorted((type(e).__name__, getattr(e, "ref", None)) for e in events)
    assert got == [("Failed", held), ("Failed", sent_ref)]
    with pytest.raises(ConnectionLost):
        protocol.send(Ping.build())
    assert protocol.data_to_send() == []


def test_a_command_held_before_the_hub_said_its_limit_is_refused_once_it_did():
    protocol = ClientProtocol()
    big = protocol.send(Pub.build(action="a:b", payload="x" * 2000))  # no limit known yet
    protocol.connection_made()
    welcomed, refused = receive(protocol, WELCOME)  # max_message_size 1000
    assert isinstance(welcomed, Welcomed) and isinstance(refused, Refused) and refused.ref == big
    assert refused.error.code == "message_too_large"  # type: ignore[attr-defined]
    assert sent(protocol) == []


@pytest.mark.parametrize(
    "message",
    [
        {"type": "update", "task": TASK, "seq": "12"},
        {"type": "update", "task": TASK, "seq": True},
        {"type": "task", "task": TASK, "action": "a:b", "attempt": "1"},
    ],
)
def test_a_message_with_fields_of_the_wrong_type_is_skipped(message, caplog):
    protocol = opened()
    protocol.follow(TASK)
    assert receive(protocol, message) == []
    assert "wrong" in caplog.text


# -- commands that ask for no answer, and an end inside the event before it ----------


def silent_update(data: Any) -> Update:
    return Update.build(task=TASK, attempt=1, data=data, ack=False)


def test_the_answer_to_a_later_command_acknowledges_those_that_asked_for_none():
    protocol = opened()
    first, second = protocol.send(silent_update(1)), protocol.send(silent_update(2))
    assert protocol.unacknowledged == 2
    fetch = protocol.send(GetPayload.build(task=TASK))
    assert [f.get("ack") for f in sent(protocol)] == [False, False, None]
    events = receive(protocol, {"type": "payload", "ref": fetch, "task": TASK, "payload": 5})
    assert [(type(e), e.ref) for e in events] == [(Answered, first), (Answered, second), (Answered, fetch)]
    assert events[0].message.type == "ack" and events[0].message.task == TASK
    assert protocol.unacknowledged == 0


def test_a_refusal_of_one_that_asked_for_no_answer_acknowledges_those_before_it():
    protocol = opened()
    first, second = protocol.send(silent_update(1)), protocol.send(silent_update(2))
    third = protocol.send(silent_update(3))
    sent(protocol)
    events = receive(protocol, {"type": "error", "code": "stale_attempt", "detail": "over", "ref": second})
    assert [(type(e), e.ref) for e in events] == [(Answered, first), (Refused, second)]
    assert protocol.unacknowledged == 1  # the third: the hub may still refuse it
    assert protocol.sync() and [f["type"] for f in sent(protocol)] == ["ping"]
    assert not protocol.sync()  # the ping asks for the answer already
    (ping,) = [ref for ref, command in protocol._unanswered.items() if command.type == "ping"]
    events = receive(protocol, {"type": "pong", "ref": ping})
    assert [(type(e), e.ref) for e in events] == [(Answered, third), (Answered, ping)]


def test_a_ping_goes_after_every_run_of_commands_that_asked_for_no_answer():
    from taskhub.client.protocol import SYNC_EVERY

    protocol = opened()
    for i in range(2 * SYNC_EVERY):
        protocol.send(silent_update(i))
    types = [f["type"] for f in sent(protocol)]
    assert types == (["update"] * SYNC_EVERY + ["ping"]) * 2
    assert not protocol.sync()


def test_an_offers_applied_acknowledges_those_sent_up_to_it_and_no_ping_is_needed():
    from taskhub.client.protocol import SYNC_EVERY

    protocol = opened()
    refs = [protocol.send(silent_update(i)) for i in range(SYNC_EVERY - 2)]
    last = protocol.send(silent_update("after"))
    assert "ping" not in [f["type"] for f in sent(protocol)]
    offer = {"type": "task", "task": TASK, "action": "a:b", "attempt": 1, "applied": refs[-1]}
    events = receive(protocol, offer)
    assert [(type(e), getattr(e, "ref", None)) for e in events] == [(Answered, ref) for ref in refs] + [(Offered, None)]
    assert protocol.unacknowledged == 1  # the one sent after: the hub may still refuse it
    # The run starts again: 64 more in a row before a ping, not one.
    for i in range(SYNC_EVERY - 2):
        protocol.send(silent_update(i))
    assert "ping" not in [f["type"] for f in sent(protocol)]
    assert protocol.sync()  # unknown still: a ping asks
    events = receive(protocol, {"type": "update", "task": TASK, "seq": 1, "data": 1, "applied": last})
    assert [(type(e), e.ref) for e in events[:1]] == [(Answered, last)]


def test_an_applied_naming_no_command_sent_without_an_answer_changes_nothing():
    protocol = opened()
    silent = protocol.send(silent_update(1))
    fetch = protocol.send(GetPayload.build(task=TASK))
    sent(protocol)
    for applied in (fetch, 999, "x", None):
        events = receive(protocol, {"type": "task", "task": TASK, "action": "a:b", "attempt": 1, "applied": applied})
        assert [type(e) for e in events] == [Offered]
    assert protocol.unacknowledged == 1 and fetch in protocol._unanswered and silent in protocol._unanswered


def test_after_a_reconnect_those_not_known_to_be_applied_go_again_still_asking_for_no_answer():
    protocol = opened()
    applied, pending = protocol.send(silent_update(1)), None
    fetch = protocol.send(GetPayload.build(task=TASK))
    receive(protocol, {"type": "payload", "ref": fetch, "task": TASK, "payload": 5})
    pending = protocol.send(silent_update(2))
    sent(protocol)
    assert protocol.connection_lost() == []
    protocol.connection_made()
    receive(protocol, WELCOME)
    (again,) = sent(protocol)
    assert (again["ref"], again["again"], again["ack"], again["data"]) == (pending, True, False, 2)
    assert applied != pending and protocol.unacknowledged == 1


def test_an_end_inside_the_event_before_it_is_two_events():
    protocol = opened()
    protocol.follow(TASK)
    success = {"type": "success", "task": TASK, "seq": 4, "attempt": 1, "service": "w", "result": 7}
    events = receive(protocol, {**success, "end": {"seq": 5, "attempt": 1, "status": "success"}})
    assert [(e.message.type, e.message.seq) for e in events] == [("success", 4), ("end", 5)]
    assert events[0].message == TaskSuccess(task=TASK, seq=4, attempt=1, service="w", result=7)
    assert events[1].message.status == "success" and protocol.last_seq(TASK) == 5
    # Heard already: neither comes twice when the sweeper sends them again apart.
    assert receive(protocol, success) == []
    assert receive(protocol, {"type": "end", "task": TASK, "seq": 5, "status": "success"}) == []


def test_an_end_inside_that_cannot_be_read_is_skipped_and_the_event_kept(caplog):
    protocol = opened()
    protocol.follow(TASK)
    update = {"type": "update", "task": TASK, "seq": 4, "attempt": 1, "service": "w", "data": 1}
    events = receive(protocol, {**update, "end": {"seq": "five"}})
    assert [(e.message.type, e.message.seq) for e in events] == [("update", 4)]
    assert "skipped a message from the hub" in caplog.text
    assert [e.message.type for e in receive(protocol, {**update, "seq": 5, "end": None})] == ["update"]
