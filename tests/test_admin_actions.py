"""The operator's actions in admin: retry, cancel, disconnect, against live connections
(WebsocketCommunicator peers on the hub's consumer); the task list's search, columns and
millisecond timeline."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client

from taskhub.models import Instance, TaskRecord

from .conftest import TIMEOUT, make_credential, open_peer

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def operator(*, superuser: bool = True) -> Client:
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    if superuser:
        user = user_model.objects.create_superuser("op", "op@example.org", "pw")
    else:  # staff who may look at tasks and instances, and change nothing
        user = user_model.objects.create_user("viewer", "v@example.org", "pw", is_staff=True)
        user.user_permissions.set(Permission.objects.filter(codename__in=["view_taskrecord", "view_instance"]))
    client = Client()
    client.force_login(user)
    return client


@database_sync_to_async
def act(client: Client, model: str, action: str, *pks: Any) -> str:
    """Run an admin action, following its redirect: the page with its messages."""
    response = client.post(
        f"/admin/taskhub/{model}/", {"action": action, "_selected_action": [str(pk) for pk in pks]}, follow=True
    )
    assert response.status_code == 200
    return response.content.decode()


@database_sync_to_async
def page(client: Client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


async def parties() -> tuple[Any, Any, str]:
    """A worker of "mailer" (which may have a second instance) subscribed to mail:send,
    a caller "app", and the worker's key."""
    _, worker_key = await database_sync_to_async(make_credential)("mailer", sub=["mail"], max_instances=2)
    _, app_key = await database_sync_to_async(make_credential)("app", pub=["mail"])
    worker = await open_peer("mailer", worker_key)
    await worker.call({"type": "sub", "action": "mail:send"})
    return worker, await open_peer("app", app_key), worker_key


async def test_cancel_tells_the_caller_and_the_worker_and_retry_offers_a_new_attempt():
    worker, app, _ = await parties()
    task_id = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    offer = await worker.expect(lambda m: m["type"] == "task")
    await worker.call({"type": "pickup", "task": task_id, "attempt": offer["attempt"]})
    admin = await operator()
    said = await act(admin, "taskrecord", "cancel_tasks", task_id)
    assert "Cancelled 1 task(s)." in said
    failed = await app.expect(lambda m: m["type"] == "fail")
    assert (failed["reason"], failed["detail"]) == ("cancelled", "cancelled by operator op")
    assert [(await worker.recv())["type"] for _ in range(2)] == ["fail", "end"]  # the worker is told at once

    said = await act(admin, "taskrecord", "retry_tasks", task_id)
    assert "Retried 1 task(s)." in said
    again = await worker.expect(lambda m: m["type"] == "task")
    assert (again["task"], again["attempt"]) == (task_id, 2)
    record = await database_sync_to_async(TaskRecord.objects.get)(pk=task_id)
    assert (record.status, record.attempt) == ("started", 2)
    await worker.close()
    await app.close()


async def test_an_action_skips_the_tasks_it_cannot_apply_to_and_says_why():
    worker, app, _ = await parties()
    running = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    await worker.expect(lambda m: m["type"] == "task")
    admin = await operator()
    said = await act(admin, "taskrecord", "retry_tasks", running)  # it has not failed
    assert "Retried" not in said and re.search(r"Skipped 1: [0-9a-f-]{36} \(started: ", said), said
    assert (await database_sync_to_async(TaskRecord.objects.get)(pk=running)).attempt == 1
    await worker.close()
    await app.close()


async def test_disconnect_closes_the_connection_with_4005_and_hands_its_task_to_another_instance():
    worker, app, key = await parties()
    task_id = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    offer = await worker.expect(lambda m: m["type"] == "task")
    await worker.call({"type": "pickup", "task": task_id, "attempt": offer["attempt"]})
    other = await open_peer("mailer", key)
    await other.call({"type": "sub", "action": "mail:send"})

    admin = await operator()
    said = await act(admin, "instance", "disconnect", worker.welcome["instance"])
    assert "Disconnected 1 instance(s)" in said
    error = await worker.expect(lambda m: m["type"] == "error")
    assert error["code"] == "disconnected"
    assert (await worker.comm.receive_output(timeout=5))["code"] == 4005
    handed = await other.expect(lambda m: m["type"] == "task")
    assert handed["task"] == task_id and handed["attempt"] == offer["attempt"]
    assert not await database_sync_to_async(Instance.objects.filter(pk=worker.welcome["instance"]).exists)()
    await other.close()
    await app.close()


async def test_staff_without_change_permission_get_no_actions_and_no_one_deletes_instances():
    worker, app, _ = await parties()
    task_id = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    viewer = await operator(superuser=False)
    listing = await page(viewer, "/admin/taskhub/taskrecord/")
    assert task_id in listing and "cancel_tasks" not in listing and "retry_tasks" not in listing
    assert "disconnect" not in await page(viewer, "/admin/taskhub/instance/")
    admin = await operator()
    instances = await page(admin, "/admin/taskhub/instance/")
    assert 'value="disconnect"' in instances and "delete_selected" not in instances
    pk = worker.welcome["instance"]
    assert (await database_sync_to_async(admin.get)(f"/admin/taskhub/instance/{pk}/delete/")).status_code == 403
    # A running task cannot be deleted (it is cancelled); a finished one can, by those
    # who have the delete permission only.
    assert (await database_sync_to_async(admin.get)(f"/admin/taskhub/taskrecord/{task_id}/delete/")).status_code == 403
    await app.call({"type": "cancel", "task": task_id})
    await app.expect(lambda m: m["type"] == "end")
    delete = f"/admin/taskhub/taskrecord/{task_id}/delete/"
    assert (await database_sync_to_async(viewer.get)(delete)).status_code == 403
    assert "delete_selected" not in await page(viewer, "/admin/taskhub/taskrecord/")
    assert (await database_sync_to_async(admin.get)(delete)).status_code == 200
    await worker.close()
    await app.close()


async def test_search_by_service_publisher_and_failure_detail_and_the_list_columns():
    worker, app, _ = await parties()
    task_id = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    offer = await worker.expect(lambda m: m["type"] == "task")
    await worker.call({"type": "pickup", "task": task_id, "attempt": 1})
    await worker.call({"type": "fail", "task": task_id, "attempt": offer["attempt"], "error": "SMTP refused rcpt"})
    await app.expect(lambda m: m["type"] == "end")
    admin = await operator()
    for query in ("mailer", "app", "SMTP+refused", task_id, task_id[:8]):
        assert task_id in await page(admin, f"/admin/taskhub/taskrecord/?q={query}"), query
    assert task_id not in await page(admin, "/admin/taskhub/taskrecord/?q=nothing-like-it")
    listing = await page(admin, "/admin/taskhub/taskrecord/")
    for column in ("column-services", "column-failure_reason", "column-run_time"):
        assert column in listing
    assert re.search(r'class="field-run_time">[\d,]+\.\d{3} ms<', listing)
    detail = await page(admin, f"/admin/taskhub/taskrecord/{task_id}/change/")
    # Every event of the timeline at millisecond precision, with its offset from init.
    assert re.search(r"\d{2}:\d{2}:\d{2}\.\d{3}", detail)
    offsets = re.findall(r'class="field-offset">\s*<p>\+([\d,]+\.\d{3}) ms', detail)
    assert offsets[0] == "0.000" and len(offsets) >= 5, offsets
    await worker.close()
    await app.close()


async def test_a_disconnect_whose_close_the_layer_lost_is_closed_by_the_next_sweep():
    from django.utils import timezone

    from taskhub import services, sweeper

    worker, app, _ = await parties()
    # The instance is released, and nothing is sent: as if the layer lost the close.
    await database_sync_to_async(services.disconnect)(worker.welcome["instance"], timezone.now())
    assert await app.nothing() and await worker.nothing()
    await asyncio.wait_for(sweeper.sweep_once(), TIMEOUT)
    error = await worker.expect(lambda m: m["type"] == "error")
    assert error["code"] == "disconnected"
    assert (await worker.comm.receive_output(timeout=TIMEOUT))["code"] == 4005
    assert (await app.call({"type": "ping"}))["type"] == "pong"  # the others stay
    await app.close()
