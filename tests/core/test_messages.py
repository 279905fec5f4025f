"""Messages the hub sends: built by the hub and read by the client with the same classes."""

from __future__ import annotations

import pytest

from taskhub.core.codes import RELAYED_KINDS, CloseCode, ErrorCode, EventKind
from taskhub.core.commands import MISSING, Pub, Update
from taskhub.core.errors import (
    AuthenticationFailed,
    InvalidMessage,
    InvalidTransition,
    PermissionDenied,
    ProtocolError,
    UnknownTask,
    error_for,
)
from taskhub.core.messages import (
    MESSAGES,
    Ack,
    Error,
    Offer,
    State,
    TaskEnd,
    TaskFailure,
    TaskSuccess,
    TaskUpdate,
    Welcome,
    event_message,
    parse_message,
)

TASK = "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"


def test_messages_are_written_without_their_missing_fields():
    assert Ack(ref=3, task=TASK, created=True).to_dict() == {"type": "ack", "ref": 3, "task": TASK, "created": True}
    assert Ack().to_dict() == {"type": "ack"}
    offer = Offer(task=TASK, action="a:b", attempt=1, publisher="app", payload_size=5)
    assert offer.to_dict() == {
        "type": "task",
        "task": TASK,
        "action": "a:b",
        "attempt": 1,
        "publisher": "app",
        "payload_size": 5,
    }
    # A null payload is a payload: it is sent.
    assert Offer(task=TASK, action="a:b", attempt=1, payload=None).to_dict()["payload"] is None


@pytest.mark.parametrize(
    "message",
    [
        Welcome(service="s", instance="i", max_message_size=10, max_payload_size=5, ref="r"),
        Ack(ref=1, action="a:b", waiting=0),
        Error(code="unknown_task", detail="no task", ref=2),
        Offer(task=TASK, action="a:b", attempt=2, publisher="app", payload_size=2, payload=[1]),
        State(ref=4, task={"id": TASK}, events=[]),
        TaskUpdate(task=TASK, seq=5, attempt=1, service="w", data={"n": 1}, progress=0.5),
        TaskSuccess(task=TASK, seq=6, attempt=1, service="w", result=None),
        TaskFailure(task=TASK, seq=7, attempt=2, reason="error", detail="boom"),
        TaskEnd(task=TASK, seq=8, attempt=2, status="failed"),
    ],
    ids=lambda m: m.type,
)
def test_what_the_hub_writes_the_client_reads_back(message):
    assert parse_message(message.to_dict()) == message


def test_every_message_type_is_known():
    assert set(MESSAGES) == {
        "welcome", "ack", "pong", "error", "task", "payload", "state", "tasks", "update", "success", "retry",
        "fail", "end", "transition", "stats",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ([], "invalid_frame"),
        ({"type": "surprise"}, "unknown_type"),
        ({}, "unknown_type"),
        ({"type": "update", "task": TASK}, "invalid_field"),  # no seq
        ({"type": "error"}, "invalid_field"),
        ({"type": "task", "task": TASK, "action": "a:b"}, "invalid_field"),
    ],
)
def test_a_message_the_client_cannot_read(obj, code):
    with pytest.raises(InvalidMessage) as info:
        parse_message(obj)
    assert info.value.code == code


def test_live_and_replayed_events_read_the_same():
    update = event_message(TASK, 9, "update", "w", 2, {"data": [1], "progress": 1.0})
    assert update == TaskUpdate(task=TASK, seq=9, attempt=2, service="w", data=[1], progress=1.0)
    assert event_message(TASK, 10, "success", "w", 2, {"result": "r"}) == TaskSuccess(
        task=TASK, seq=10, attempt=2, service="w", result="r"
    )
    assert event_message(TASK, 11, "fail", "", 2, {"reason": "error", "detail": "d"}) == TaskFailure(
        task=TASK, seq=11, attempt=2, reason="error", detail="d"
    )
    assert event_message(TASK, 12, "end", "", 2, {"status": "failed"}) == TaskEnd(
        task=TASK, seq=12, attempt=2, status="failed"
    )
    relayed = {kind for kind in EventKind if event_message(TASK, 1, kind, "", 1, {}) is not None}
    assert relayed == RELAYED_KINDS


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("authentication_failed", AuthenticationFailed),
        ("authentication_timeout", AuthenticationFailed),
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
        ("a_code_from_a_newer_hub", ProtocolError),
    ],
)
def test_error_codes_map_to_exceptions(code, cls):
    error = error_for(code, "d")
    assert type(error) is cls and error.code == code


def test_every_error_code_has_its_exception_and_auth_codes_their_close_codes():
    for code in ErrorCode:
        assert isinstance(error_for(code, ""), (ProtocolError, AuthenticationFailed))
    assert CloseCode.for_error("too_many_instances") == 4003
    assert CloseCode.for_error("authentication_timeout") == 4000


def test_commands_are_built_with_the_hubs_checks_and_written_as_frames():
    pub = Pub.build(action="a:b", payload=None, task_id=TASK)
    assert pub.to_dict() == {"type": "pub", "action": "a:b", "payload": None, "task_id": TASK}
    assert Pub.build(ref=1, action="a:b").to_dict() == {"type": "pub", "action": "a:b", "ref": 1}
    assert Pub.build(action="a:b", timeout=MISSING).timeout is MISSING
    with pytest.raises(InvalidMessage, match="progress"):
        Update.build(task=TASK, attempt=1, progress=2)
