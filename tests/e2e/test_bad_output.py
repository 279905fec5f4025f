"""A handler's output the hub could not take, against a real hub: the task still ends at
once with a reason that says why, instead of waiting for its complete timeout. And a
caller that publishes a finished task's id again hears its outcome at once."""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import pytest

from taskhub.client import InvalidMessage, TaskFailed
from tests.conftest import TIMEOUT

pytestmark = pytest.mark.timeout(60 * TIMEOUT)

#: Longer than any test waits: a task that ends by its timeout fails the test.
LONG = 100 * TIMEOUT


class Huge(Exception):
    """An error whose text is over the hub's limit for a ``fail``, with what it refuses."""

    def __str__(self) -> str:
        return "\x00" + "x" * 20_000


@pytest.mark.parametrize(
    ("output", "detail"),
    [
        (lambda: {1, 2}, "result could not be sent: not JSON (Object of type set is not JSON serializable)"),
        (lambda: {"ratio": math.nan}, "result could not be sent: not JSON (Out of range float values"),
        (lambda: "x" * 600_000, "result of 600002 bytes is over the hub's limit of 524288 bytes"),
        (lambda: 2**60, "result could not be sent: frame holds the integer 1152921504606846976…, beyond ±2**53"),
        (Huge, "Huge: \\x00xxxx"),
    ],
)
async def test_output_the_hub_could_not_take_fails_the_task_at_once(hub, parties, output, detail):
    worker = parties.worker(hub.url)

    @worker.sub(parties.action)
    async def handle(task):
        value = output()
        if isinstance(value, Exception):
            raise value
        return value

    async with worker, parties.caller(hub.url) as caller:
        handle_ = caller.pub(parties.action, timeout=LONG, pickup_timeout=LONG)
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(handle_.get_result(), TIMEOUT)
    assert info.value.reason == "error"
    assert info.value.detail.startswith(detail)
    assert len(info.value.detail) <= 10_000


async def test_update_data_the_hub_could_not_take_is_raised_in_the_handler(hub, parties):
    worker = parties.worker(hub.url)

    @worker.sub(parties.action)
    async def handle(task):
        refused: list[Any] = []
        for data in ({"when": {1}}, [math.inf], "a\x00b"):
            try:
                await task.update(data)
            except InvalidMessage as exc:
                refused.append(exc.code)
        await task.update("fine")
        return refused

    async with worker, parties.caller(hub.url) as caller:
        updates: list[Any] = []
        handle_ = caller.pub(parties.action, timeout=LONG).on("update", lambda u: updates.append(u.data))
        assert await asyncio.wait_for(handle_.get_result(), TIMEOUT) == ["invalid_value"] * 3
    assert updates == ["fine"]


async def test_a_caller_that_publishes_a_finished_tasks_id_again_hears_its_outcome_at_once(make_hub, parties):
    # A hub whose sweeper (which sends connections what they missed) would not help in time.
    hub = make_hub(TASKHUB_SWEEP_INTERVAL=str(LONG), TASKHUB_INSTANCE_LEASE=str(LONG))
    worker = parties.worker(hub.url)
    worker.sub(parties.action, lambda task: "done once")
    task_id = str(uuid.uuid4())
    async with worker:
        async with parties.caller(hub.url) as caller:
            assert (
                await asyncio.wait_for(caller.pub(parties.action, task_id=task_id).get_result(), TIMEOUT) == "done once"
            )
        # The caller restarts and publishes the same task again: the hub has its outcome.
        async with parties.caller(hub.url, resync_interval=LONG) as again:
            handle_ = again.pub(parties.action, task_id=task_id)
            assert await asyncio.wait_for(handle_.get_result(), TIMEOUT) == "done once"
            assert handle_.status == "success"
