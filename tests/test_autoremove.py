"""``pub`` with ``autoremove``: the task, its payload and its events are deleted once it
succeeded and its result reached the publisher; nothing else is."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async

from taskhub.models import TaskEvent, TaskRecord

from .conftest import TIMEOUT, make_credential, open_peer

pytestmark = pytest.mark.django_db(transaction=True)


async def parties() -> tuple[Any, Any, str]:
    _, worker_key = await database_sync_to_async(make_credential)("mailer", sub=["mail"])
    _, app_key = await database_sync_to_async(make_credential)("app", pub=["mail"])
    worker = await open_peer("mailer", worker_key)
    await worker.call({"type": "sub", "action": "mail:send"})
    return worker, await open_peer("app", app_key), app_key


async def kept(task_id: str) -> tuple[bool, int]:
    """Whether the task's row is there, and how many events it has."""
    exists = await database_sync_to_async(TaskRecord.objects.filter(pk=task_id).exists)()
    return exists, await database_sync_to_async(TaskEvent.objects.filter(task__pk=task_id).count)()


async def gone(task_id: str) -> None:
    """Until the task's row is deleted (the database is all there is to wait on)."""
    while (await kept(task_id))[0]:
        await asyncio.sleep(0.01)  # the deletion is a row going: polled, bounded by the callers' timeout


async def work(worker: Any, task_id: str, *, ok: bool = True) -> None:
    offer = await worker.expect(lambda m: m["type"] == "task" and m["task"] == task_id)
    await worker.call({"type": "pickup", "task": task_id, "attempt": offer["attempt"]})
    if ok:
        await worker.call({"type": "return", "task": task_id, "attempt": offer["attempt"], "result": {"sent": 1}})
    else:
        await worker.call({"type": "fail", "task": task_id, "attempt": offer["attempt"], "error": "refused"})


async def test_a_succeeded_task_is_deleted_once_its_publisher_has_the_result():
    worker, app, _ = await parties()
    task_id = (await app.call({"type": "pub", "action": "mail:send", "payload": {"to": "a"}, "autoremove": True}))[
        "task"
    ]
    await work(worker, task_id)
    success = await app.expect(lambda m: m["type"] == "success")
    assert success["result"] == {"sent": 1}
    await app.expect(lambda m: m["type"] == "end")
    # The publisher's connection deletes it once it has forwarded the end.
    await asyncio.wait_for(gone(task_id), TIMEOUT)
    assert await kept(task_id) == (False, 0)
    assert (await app.call({"type": "watch", "task": task_id}))["code"] == "unknown_task"
    await worker.close()
    await app.close()


async def test_failed_tasks_and_tasks_without_autoremove_are_kept():
    worker, app, _ = await parties()
    failed = (await app.call({"type": "pub", "action": "mail:send", "autoremove": True}))["task"]
    await work(worker, failed, ok=False)
    await app.expect(lambda m: m["type"] == "end" and m["task"] == failed)
    plain = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    await work(worker, plain)
    await app.expect(lambda m: m["type"] == "end" and m["task"] == plain)
    await app.call({"type": "ping"})  # both ends forwarded and handled
    assert (await kept(failed))[0] and (await kept(plain))[0]
    await worker.close()
    await app.close()


async def test_a_publisher_away_at_the_end_gets_the_result_by_watch_and_then_it_is_deleted():
    worker, app, app_key = await parties()
    task_id = (await app.call({"type": "pub", "action": "mail:send", "autoremove": True}))["task"]
    await app.call({"type": "bye"})
    await work(worker, task_id)
    # A service's watch of it gives no result to the publisher: the task stays.
    assert (await worker.call({"type": "watch", "task": task_id, "follow": False}))["type"] == "state"
    assert (await kept(task_id))[0]
    again = await open_peer("app", app_key)
    state = await again.call({"type": "watch", "task": task_id})
    assert state["task"]["status"] == "success" and state["task"]["result"] == {"sent": 1}
    await asyncio.wait_for(gone(task_id), TIMEOUT)
    assert await kept(task_id) == (False, 0)
    await worker.close()
    await again.close()


async def test_autoremove_must_be_a_boolean():
    worker, app, _ = await parties()
    answer = await app.call({"type": "pub", "action": "mail:send", "autoremove": "yes"})
    assert (answer["type"], answer["code"]) == ("error", "invalid_field")
    assert await database_sync_to_async(TaskRecord.objects.count)() == 0
    await worker.close()
    await app.close()


async def test_an_end_whose_success_the_layer_lost_does_not_remove_the_task():
    """The result must have gone through this connection: an end alone (its success lost
    on the layer) leaves the task for the client's resync."""
    from channels.layers import get_channel_layer

    from taskhub import notify
    from taskhub.models import Instance
    from taskhub.services import Notice
    from taskhub.services.routing import RELAY

    worker, app, _ = await parties()
    task_id = (await app.call({"type": "pub", "action": "mail:unheard", "autoremove": True}))["task"]
    await database_sync_to_async(TaskRecord.objects.filter(pk=task_id).update)(
        status="success", has_result=True, result={"sent": 1}, version=5
    )
    instance = app.welcome["instance"]
    channel = await database_sync_to_async(lambda: Instance.objects.get(pk=instance).channel_name)()
    end = {"type": "end", "task": task_id, "seq": 10**6, "status": "success"}
    relay = {"type": RELAY, "task": task_id, "version": 5, "messages": [end], "remove_by": instance}
    await notify.send_notices(get_channel_layer(), [Notice("channel", channel, relay)])
    assert (await app.expect(lambda m: m["type"] == "end"))["task"] == task_id
    await app.call({"type": "ping"})  # the relay was handled before the ping
    assert (await kept(task_id))[0]
    # Its resync (a watch) gives it the result: then it goes.
    state = await app.call({"type": "watch", "task": task_id})
    assert state["task"]["result"] == {"sent": 1}
    await asyncio.wait_for(gone(task_id), TIMEOUT)
    await worker.close()
    await app.close()
