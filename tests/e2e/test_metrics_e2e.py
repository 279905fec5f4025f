"""/taskhub/metrics on real daphne hubs: scraped with the bearer token after real tasks,
and summed across two processes that share PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskhub.client import Client, TaskFailed
from tests.conftest import TIMEOUT
from tests.e2e.conftest import Hub

pytestmark = pytest.mark.timeout(60 * TIMEOUT)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(hub: Hub, headers: dict[str, str]) -> tuple[int, str, str]:
    """``(status, content type, body)`` of a GET of the hub's metrics."""
    request = urllib.request.Request(f"http://127.0.0.1:{hub.port}/taskhub/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def scrape(hub: Hub, token: str) -> Samples:
    status, content_type, body = await asyncio.to_thread(get, hub, {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_a_hub_counts_real_tasks_for_the_token_and_refuses_others(make_hub, parties):
    token = secrets.token_urlsafe(24)
    hub = make_hub(TASKHUB_METRICS_TOKEN=token)
    action = parties.action
    worker = parties.worker(hub.url)

    @worker.sub(action)
    async def handle(task):
        await task.pickup()
        payload = await task.get_payload()
        if payload == "fail":
            raise ValueError("no such mailbox")
        return payload

    async with parties.caller(hub.url) as caller:
        async with worker:
            assert await asyncio.wait_for(caller.pub(action, 1).get_result(), TIMEOUT) == 1
            assert await asyncio.wait_for(caller.pub(action, 2).get_result(), TIMEOUT) == 2
            with pytest.raises(TaskFailed) as failed:
                await asyncio.wait_for(caller.pub(action, "fail").get_result(), TIMEOUT)
            assert failed.value.reason == "error"
            samples = await scrape(hub, token)
            assert value(samples, "taskhub_instances", service=parties.worker_name) == 1
        # The worker left: the next task waits for a subscriber.
        await asyncio.wait_for(caller.pub(action, 3).published, TIMEOUT)
        later = await scrape(hub, token)

    assert value(samples, "taskhub_tasks_published_total", action=action) == 3
    finished = "taskhub_tasks_finished_total"
    assert value(samples, finished, action=action, status="success", reason="") == 2
    assert value(samples, finished, action=action, status="failed", reason="error") == 1
    assert value(samples, "taskhub_task_wait_seconds_count", action=action) == 3
    assert value(samples, "taskhub_task_run_seconds_count", action=action) == 3
    assert 0 < (value(samples, "taskhub_task_run_seconds_sum", action=action) or 0) < 3 * TIMEOUT
    assert value(samples, "taskhub_instances", service=parties.caller_name) == 1

    assert value(later, "taskhub_tasks_published_total", action=action) == 4
    assert value(later, "taskhub_tasks", action=action, status="pending") == 1
    assert value(later, "taskhub_tasks_waiting_for_subscriber", action=action) == 1
    assert value(later, "taskhub_instances", service=parties.worker_name) == 0

    for headers in ({}, {"Authorization": f"Bearer {token}-wrong"}):
        status, _, body = await asyncio.to_thread(get, hub, headers)
        assert status == 401 and "taskhub_" not in body


async def test_two_processes_sharing_a_multiprocess_directory_answer_the_sum(make_hub, credential, parties, tmp_path):
    """Tasks published on both processes and worked on one: either process's answer has
    them all, each counted once."""
    token = secrets.token_urlsafe(24)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    a = make_hub(PROMETHEUS_MULTIPROC_DIR=str(directory), TASKHUB_METRICS_TOKEN=token)
    b = make_hub(PROMETHEUS_MULTIPROC_DIR=str(directory), TASKHUB_METRICS_TOKEN=token)
    action = parties.action
    worker = parties.worker(a.url)

    @worker.sub(action)
    async def handle(task):
        await task.pickup()
        return await task.get_payload()

    other_name, other_key = credential(pub=[action])
    async with (
        worker,
        parties.caller(a.url) as on_a,
        Client(b.url, name=other_name, key=other_key) as on_b,
    ):
        handles = [on_a.pub(action, i) for i in range(2)] + [on_b.pub(action, i) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*(h.get_result() for h in handles)), TIMEOUT)
    assert sorted(results) == [0, 0, 1, 1, 2]

    for hub in (a, b):
        samples = await scrape(hub, token)
        assert value(samples, "taskhub_tasks_published_total", action=action) == 5
        assert value(samples, "taskhub_tasks_finished_total", action=action, status="success", reason="") == 5
        assert value(samples, "taskhub_task_wait_seconds_count", action=action) == 5
        assert value(samples, "taskhub_task_run_seconds_count", action=action) == 5
