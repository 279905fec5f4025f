"""Sessions and the commands of delivery, through WebsocketCommunicator: resume, superseded
connections, concurrency, a wrong path, cancel, retry, tasks, touch, and bad input to each."""

from __future__ import annotations

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from taskhub import sweeper
from taskhub.models import Instance, TaskEvent, TaskRecord

from .conftest import make_credential, open_peer

pytestmark = pytest.mark.django_db(transaction=True)

credential = database_sync_to_async(make_credential)
TASK = "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"


@database_sync_to_async
def snapshot():
    """What the database holds, to check that a refused command changed nothing."""
    return (
        list(TaskRecord.objects.order_by("pk").values_list("pk", "status", "attempt", "version")),
        TaskEvent.objects.count(),
        list(Instance.objects.order_by("pk").values_list("pk", "channel_name", "detached_at")),
    )


async def later(seconds: float) -> None:
    await sweeper.sweep_once(timezone.now() + timedelta(seconds=seconds))


async def test_a_connection_takes_its_instance_back_with_the_resume_token():
    _, key = await credential("svc", sub=["mail"])
    first = await open_peer("svc", key)
    token, instance = first.welcome["resume"], first.welcome["instance"]
    assert first.welcome["resumed"] is False
    await first.close()  # without bye: detached
    again = await open_peer("svc", key, headers=[(b"taskhub-resume", token.encode())])
    assert (again.welcome["instance"], again.welcome["resumed"]) == (instance, True)
    # The same token: one lost with a welcome that never arrived still resumes.
    assert again.welcome["resume"] == token
    # And with hello, as a browser would.
    await again.close()
    hello = await open_peer(expect_welcome=False)
    welcome = await hello.call({"type": "hello", "name": "svc", "key": key, "resume": again.welcome["resume"]})
    assert (welcome["instance"], welcome["resumed"]) == (instance, True)
    await hello.close()


async def test_a_resumed_instance_supersedes_the_connection_that_still_had_it():
    _, key = await credential("svc", max_instances=2)
    first = await open_peer("svc", key)
    second = await open_peer("svc", key, headers=[(b"taskhub-resume", first.welcome["resume"].encode())])
    assert second.welcome["resumed"] is True
    assert (await first.recv())["code"] == "superseded"
    assert (await first.comm.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4004}
    assert (await second.call({"type": "ping"}))["type"] == "pong"
    await second.close()


async def test_a_wrong_resume_token_gets_a_new_instance():
    _, key = await credential("svc", max_instances=2)
    peer = await open_peer("svc", key, headers=[(b"taskhub-resume", b"not.a-token")])
    assert peer.welcome["resumed"] is False
    await peer.close()


async def test_a_bad_concurrency_header_refuses_the_session():
    _, key = await credential("svc")
    peer = await open_peer("svc", key, headers=[(b"taskhub-concurrency", b"many")], expect_welcome=False)
    error = await peer.recv()
    assert (error["type"], error["code"]) == ("error", "invalid_field")
    assert (await peer.comm.receive_output(timeout=5))["type"] == "websocket.close"
    assert await database_sync_to_async(Instance.objects.count)() == 0


async def test_a_wrong_path_is_told_so_and_closed():
    peer = await open_peer(path="/ws/elsewhere/", expect_welcome=False)
    error = await peer.recv()
    assert error["code"] == "not_found" and "/ws/elsewhere/" in error["detail"]
    assert (await peer.comm.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4404}


async def test_cancel_retry_and_tasks_through_the_hub():
    _, worker_key = await credential("mailer", sub=["mail"])
    _, app_key = await credential("app", pub=["mail"])
    worker = await open_peer("mailer", worker_key)
    await worker.call({"type": "sub", "action": "mail:send"})
    app = await open_peer("app", app_key)
    task_id = (await app.call({"type": "pub", "action": "mail:send", "heartbeat_timeout": 30}))["task"]
    offer = await worker.expect(lambda m: m["type"] == "task")
    await worker.call({"type": "touch", "task": task_id, "attempt": offer["attempt"]})
    listed = await app.call({"type": "tasks", "action": "mail:send"})
    assert [(t["id"], t["status"]) for t in listed["tasks"]] == [(task_id, "started")]
    assert (await worker.call({"type": "cancel", "task": task_id}))["code"] == "unknown_task"  # not its task
    assert (await app.call({"type": "cancel", "task": task_id}))["type"] == "ack"
    assert [(await worker.recv())["type"] for _ in range(2)] == ["fail", "end"]  # the worker is told
    failed = await app.expect(lambda m: m["type"] == "fail")
    assert (failed["reason"], failed["detail"]) == ("cancelled", "cancelled by app")
    assert (await app.call({"type": "retry", "task": task_id}))["type"] == "ack"
    again = await worker.expect(lambda m: m["type"] == "task")
    assert (again["task"], again["attempt"]) == (task_id, 2)
    stale = await worker.call({"type": "update", "task": task_id, "attempt": 1})
    assert stale["code"] == "stale_attempt"
    assert (await app.call({"type": "retry", "task": task_id}))["code"] == "invalid_transition"
    await worker.close()
    await app.close()


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ({"type": "touch", "task": TASK, "attempt": 1}, "unknown_task"),
        ({"type": "touch", "task": TASK}, "invalid_field"),
        ({"type": "touch", "task": TASK, "attempt": 1, "again": "yes"}, "invalid_field"),
        ({"type": "cancel", "task": TASK}, "unknown_task"),
        ({"type": "cancel", "task": 42}, "invalid_field"),
        ({"type": "retry", "task": TASK}, "unknown_task"),
        ({"type": "retry"}, "invalid_field"),
        ({"type": "tasks", "status": "finished"}, "invalid_field"),
        ({"type": "tasks", "limit": 100000}, "invalid_field"),
        ({"type": "tasks", "action": "Not An Action"}, "invalid_action"),
        ({"type": "pub", "action": "mail:send", "retries": -5}, "invalid_field"),
        ({"type": "pub", "action": "mail:send", "retry_backoff": "soon"}, "invalid_field"),
        ({"type": "pub", "action": "mail:send", "heartbeat_timeout": 0}, "invalid_field"),
        ({"type": "watch", "task": TASK, "follow": "no"}, "invalid_field"),
        ({"type": "hello", "name": "x", "key": "y", "concurrency": -1}, "invalid_field"),
    ],
)
async def test_bad_input_to_the_delivery_commands_gets_a_coded_error_and_changes_nothing(command, code):
    _, key = await credential("app", pub=["mail"], sub=["mail"])
    peer = await open_peer("app", key)
    before = await snapshot()
    answer = await peer.call(command)
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", code, "r")
    assert await snapshot() == before
    assert (await peer.call({"type": "ping"}))["type"] == "pong"
    await peer.close()


async def test_a_concurrency_of_one_keeps_a_second_task_waiting_for_the_instance():
    _, worker_key = await credential("mailer", sub=["mail"])
    _, app_key = await credential("app", pub=["mail"])
    worker = await open_peer("mailer", worker_key, headers=[(b"taskhub-concurrency", b"1")])
    await worker.call({"type": "sub", "action": "mail:send"})
    app = await open_peer("app", app_key)
    first = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    second = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    assert (await worker.expect(lambda m: m["type"] == "task"))["task"] == first
    assert await worker.nothing()  # full: the second waits
    await worker.call({"type": "return", "task": first, "attempt": 1, "result": 1})
    assert (await worker.expect(lambda m: m["type"] == "task"))["task"] == second
    await worker.close()
    await app.close()


async def test_an_instance_gone_without_bye_is_released_after_its_grace():
    _, key = await credential("svc")
    peer = await open_peer("svc", key)
    await peer.close()
    instance = await database_sync_to_async(Instance.objects.get)()
    assert instance.detached_at is not None and instance.channel_name == ""
    await later(9)
    assert await database_sync_to_async(Instance.objects.count)() == 1
    await later(11)
    assert await database_sync_to_async(Instance.objects.count)() == 0
