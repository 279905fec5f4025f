"""``client.pub(..., autoremove=True)`` against a real hub: the caller gets its result,
then the task is gone from the database, events and all; a failed one stays."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from taskhub.client import TaskFailed, UnknownTask
from tests.conftest import TIMEOUT

pytestmark = pytest.mark.timeout(60 * TIMEOUT)


async def test_a_succeeded_autoremove_task_is_deleted_after_its_result_and_a_failed_one_kept(hub, parties, hub_db):
    worker = parties.worker(hub.url)

    async def handle(task: Any) -> Any:
        payload = await task.get_payload()
        if payload == "fail":
            raise RuntimeError("as asked")
        return {"echo": payload}

    worker.sub(parties.action, handle)

    def rows(task_id: str) -> Any:
        def count(alias: str) -> tuple[int, int]:
            from taskhub.models import TaskEvent, TaskRecord

            return (
                TaskRecord.objects.using(alias).filter(pk=task_id).count(),
                TaskEvent.objects.using(alias).filter(task__pk=task_id).count(),
            )

        return hub_db(count)

    async def gone(task_id: str) -> None:
        while (await asyncio.to_thread(rows, task_id))[0]:
            await asyncio.sleep(0.02)  # the hub's database is polled: nothing else to wait on

    async with worker, parties.caller(hub.url) as caller:
        handle_ = caller.pub(parties.action, "hi", autoremove=True)
        assert await asyncio.wait_for(handle_.get_result(), TIMEOUT) == {"echo": "hi"}
        await asyncio.wait_for(gone(handle_.task_id), TIMEOUT)
        assert await asyncio.to_thread(rows, handle_.task_id) == (0, 0)
        with pytest.raises(UnknownTask):
            await caller.get_task(handle_.task_id)

        failed = caller.pub(parties.action, "fail", autoremove=True)
        with pytest.raises(TaskFailed):
            await asyncio.wait_for(failed.get_result(), TIMEOUT)
        assert (await caller.get_task(failed.task_id)).task["status"] == "failed"
