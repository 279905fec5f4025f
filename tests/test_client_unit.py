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
from taskhub.client.tasks import Task, TaskHandle


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
