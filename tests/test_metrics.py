"""Prometheus metrics at /taskhub/metrics (taskhub.metrics): what a scrape says after a
known set of tasks, who may read it, and the bound on action labels."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from django.contrib.auth.models import User
from django.db import DatabaseError
from django.test import Client as HttpClient
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from taskhub import metrics, notify, services
from taskhub.models import Credential, Instance, Subscription, TaskRecord

from .conftest import make_credential, pub_command, task_command
from .processes import ROOT

pytestmark = pytest.mark.django_db

URL = "/taskhub/metrics"
TOKEN = "s3cret-metrics-token-0123456789"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def events(monkeypatch: pytest.MonkeyPatch) -> metrics.TaskMetrics:
    """A fresh set of counters for each test, in place of the process's."""
    fresh = metrics.TaskMetrics()
    monkeypatch.setattr(metrics, "EVENTS", fresh)
    return fresh


@pytest.fixture
def staff(client: HttpClient) -> HttpClient:
    client.force_login(User.objects.create_user("ops", password="pw-ops-123", is_staff=True))
    return client


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def scrape(client: HttpClient, **headers: str) -> Samples:
    response = client.get(URL, headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def buckets(samples: Samples, name: str, action: str) -> dict[float, float]:
    """A histogram's cumulative buckets for ``action``, by upper bound."""
    found = {}
    for (sample, labels), count in samples.items():
        named = dict(labels)
        if sample == f"{name}_bucket" and named.get("action") == action:
            found[float(named["le"])] = count
    return found


def labelled(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in samples if sample == name}


class Hub:
    """The services layer with a worker service ``w`` and a publisher ``app``, at times
    given as seconds after ``t0``."""

    def __init__(self, actions: list[str]) -> None:
        self.t0 = timezone.now()
        self.app, _ = make_credential("app", pub=["*"])
        self.w, _ = make_credential("w", sub=["*"])
        self.actions = actions
        self.instance: Instance | None = None

    def at(self, seconds: float) -> datetime:
        return self.t0 + timedelta(seconds=seconds)

    def connect(self) -> Instance:
        """A live instance of ``w``, subscribed to the actions."""
        now = timezone.now()
        self.instance = Instance.objects.create(
            credential=self.w,
            channel_name="chan-w",
            process="p",
            connected_at=now,
            lease_expires_at=now + timedelta(seconds=600),
        )
        for action in self.actions:
            Subscription.objects.create(instance=self.instance, action=action)
        return self.instance

    def publish(self, action: str, at: float = 0, **fields: Any) -> str:
        task_id, created, _ = services.publish(
            self.app, pub_command({"type": "pub", "action": action, **fields}), self.at(at)
        )
        assert created
        return task_id

    def act(self, task_id: str, kind: str, at: float, attempt: int = 1, **fields: Any) -> None:
        assert self.instance is not None
        command = task_command({"type": kind, "task": task_id, "attempt": attempt, **fields})
        services.act(self.w, command, self.at(at), "chan-w", self.instance.pk)

    def run(self, action: str, picked_up: float | None, ended: float, kind: str = "return", **fields: Any) -> str:
        task_id = self.publish(action)
        if picked_up is not None:
            self.act(task_id, "pickup", picked_up)
        self.act(task_id, kind, ended, **fields)
        return task_id


@pytest.mark.usefixtures("store_backend")
def test_a_scrape_counts_a_known_set_of_tasks(staff, settings):
    settings.TASKHUB_METRICS_TOKEN = TOKEN
    hub = Hub(["mail:send", "report:build"])
    # Published before any worker is there: it fails with pickup_timeout.
    timed_out = hub.publish("mail:send", pickup_timeout=1)
    hub.connect()
    services.expire([uuid.UUID(timed_out)], hub.at(2))
    for i in range(3):  # picked up 1, 2 and 3 s after publication, each running 2 s
        hub.run("mail:send", picked_up=i + 1, ended=i + 3, result=i)
    hub.run("mail:send", picked_up=0.5, ended=1.5, kind="fail", error="boom")
    hub.run("report:build", picked_up=0.02, ended=0.05, result="done")
    hub.publish("mail:send")  # offered, still running
    hub.publish("idle:wait")  # nobody subscribes: pending

    for samples in (scrape(staff), scrape(HttpClient(), Authorization=f"Bearer {TOKEN}")):
        assert value(samples, "taskhub_tasks_published_total", action="mail:send") == 6
        assert value(samples, "taskhub_tasks_published_total", action="report:build") == 1
        assert value(samples, "taskhub_tasks_published_total", action="idle:wait") == 1
        finished = "taskhub_tasks_finished_total"
        assert value(samples, finished, action="mail:send", status="success", reason="") == 3
        assert value(samples, finished, action="mail:send", status="failed", reason="error") == 1
        assert value(samples, finished, action="mail:send", status="failed", reason="pickup_timeout") == 1
        assert value(samples, finished, action="report:build", status="success", reason="") == 1
        assert labelled(samples, finished, "action") == {"mail:send", "report:build"}

        wait, run = "taskhub_task_wait_seconds", "taskhub_task_run_seconds"
        assert value(samples, f"{wait}_count", action="mail:send") == 4
        assert value(samples, f"{wait}_sum", action="mail:send") == pytest.approx(0.5 + 1 + 2 + 3)
        assert {le: n for le, n in buckets(samples, wait, "mail:send").items() if le in (0.25, 0.5, 1, 2.5, 5)} == {
            0.25: 0,
            0.5: 1,
            1: 2,
            2.5: 3,
            5: 4,
        }
        assert value(samples, f"{run}_count", action="mail:send") == 4
        assert value(samples, f"{run}_sum", action="mail:send") == pytest.approx(2 + 2 + 2 + 1)
        assert buckets(samples, run, "mail:send")[1] == 1  # the failed one ran 1 s
        assert value(samples, f"{wait}_sum", action="report:build") == pytest.approx(0.02)
        assert value(samples, f"{run}_sum", action="report:build") == pytest.approx(0.03)
        assert value(samples, f"{run}_count", action="idle:wait") == 0

        assert value(samples, "taskhub_tasks", action="mail:send", status="started") == 1
        assert value(samples, "taskhub_tasks", action="idle:wait", status="pending") == 1
        assert labelled(samples, "taskhub_tasks", "action") == {"mail:send", "idle:wait"}
        waiting = "taskhub_tasks_waiting_for_subscriber"
        assert value(samples, waiting, action="idle:wait") == 1
        assert labelled(samples, waiting, "action") == {"idle:wait"}
        assert value(samples, "taskhub_instances", service="w") == 1
        assert value(samples, "taskhub_instances", service="app") == 0


@pytest.mark.usefixtures("store_backend")
def test_a_retried_attempt_counts_a_retry_and_both_runs(staff):
    hub = Hub(["mail:send"])
    hub.connect()
    task_id = hub.publish("mail:send", retries=1, retry_backoff=1)
    hub.act(task_id, "pickup", 1)
    hub.act(task_id, "fail", 2, error="flaky")  # retried within a second
    services.dispatch_waiting(hub.at(10))
    hub.act(task_id, "pickup", 11, attempt=2)
    hub.act(task_id, "return", 13, attempt=2, result="ok")
    samples = scrape(staff)
    assert value(samples, "taskhub_tasks_retried_total", action="mail:send", reason="error") == 1
    assert value(samples, "taskhub_tasks_finished_total", action="mail:send", status="success", reason="") == 1
    assert labelled(samples, "taskhub_tasks_finished_total", "status") == {"success"}
    assert value(samples, "taskhub_task_run_seconds_count", action="mail:send") == 2
    assert value(samples, "taskhub_task_run_seconds_sum", action="mail:send") == pytest.approx(1 + 2)
    # The second attempt waited for its backoff: only the first's pickup is a wait.
    assert value(samples, "taskhub_task_wait_seconds_count", action="mail:send") == 1


@pytest.mark.usefixtures("store_backend")
def test_a_task_retried_on_request_is_counted_again_when_it_finishes_again(staff):
    hub = Hub(["mail:send"])
    hub.connect()
    task_id = hub.run("mail:send", picked_up=1, ended=2, kind="fail", error="boom")
    services.retry(None, task_id, hub.at(5), "ops")
    hub.act(task_id, "pickup", 6, attempt=2)
    hub.act(task_id, "return", 8, attempt=2, result="ok")
    samples = scrape(staff)
    finished = "taskhub_tasks_finished_total"
    assert value(samples, finished, action="mail:send", status="failed", reason="error") == 1
    assert value(samples, finished, action="mail:send", status="success", reason="") == 1
    assert not labelled(samples, "taskhub_tasks_retried_total", "action")  # an operator's retry is no failed attempt
    assert value(samples, "taskhub_task_run_seconds_sum", action="mail:send") == pytest.approx(1 + 2)


@pytest.mark.usefixtures("store_backend")
def test_without_a_complete_timeout_the_run_time_comes_from_the_pickup(staff):
    hub = Hub(["mail:send"])
    hub.connect()
    task_id = hub.publish("mail:send", timeout=None)
    hub.act(task_id, "pickup", 1)
    hub.act(task_id, "update", 2, progress=0.5)
    hub.act(task_id, "return", 4.5, result="ok")
    samples = scrape(staff)
    assert value(samples, "taskhub_task_run_seconds_count", action="mail:send") == 1
    assert value(samples, "taskhub_task_run_seconds_sum", action="mail:send") == pytest.approx(3.5)


@pytest.mark.usefixtures("store_backend")
def test_tasks_ended_without_a_pickup_have_no_wait_or_run_time(staff):
    hub = Hub(["mail:send"])
    hub.connect()
    hub.run("mail:send", picked_up=None, ended=1, result="quick")
    hub.run("mail:send", picked_up=None, ended=1, kind="drop")
    cancelled = hub.publish("mail:send")
    services.cancel(None, cancelled, hub.at(3), "ops")
    samples = scrape(staff)
    finished = "taskhub_tasks_finished_total"
    assert value(samples, finished, action="mail:send", status="success", reason="") == 1
    assert value(samples, finished, action="mail:send", status="ended", reason="") == 1
    assert value(samples, finished, action="mail:send", status="failed", reason="cancelled") == 1
    assert value(samples, "taskhub_task_wait_seconds_count", action="mail:send") == 0
    assert value(samples, "taskhub_task_run_seconds_count", action="mail:send") == 0


def test_a_re_sent_pub_is_not_counted_twice(staff):
    hub = Hub(["mail:send"])
    task_id = hub.publish("mail:send")
    _, created, _ = services.publish(
        hub.app, pub_command({"type": "pub", "action": "mail:send", "task_id": task_id}), hub.at(1)
    )
    assert not created
    assert value(scrape(staff), "taskhub_tasks_published_total", action="mail:send") == 1


def test_instances_are_the_connected_live_ones_of_each_active_credential(staff):
    now = timezone.now()
    live, _ = make_credential("live", max_instances=3)
    gone, _ = make_credential("gone")
    disabled, _ = make_credential("disabled", active=False)

    def instance(credential: Credential, lease: float, detached: bool = False) -> None:
        Instance.objects.create(
            credential=credential,
            channel_name=f"c-{uuid.uuid4().hex}",
            process="p",
            connected_at=now,
            lease_expires_at=now + timedelta(seconds=lease),
            detached_at=now if detached else None,
        )

    instance(live, 60)
    instance(live, 60)
    instance(live, 60, detached=True)  # may resume: not connected
    instance(gone, -1)  # its process stopped renewing the lease
    samples = scrape(staff)
    assert value(samples, "taskhub_instances", service="live") == 2
    assert value(samples, "taskhub_instances", service="gone") == 0
    assert labelled(samples, "taskhub_instances", "service") == {"live", "gone"}
    assert disabled.instances.count() == 0


def test_actions_beyond_the_cap_share_the_label_other(staff, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_ACTIONS", 2)
    hub = Hub([])
    for action, n in (("a:x", 3), ("b:x", 1), ("c:x", 2), ("d:x", 1)):
        for _ in range(n):
            hub.publish(action)
    for i in range(50):  # a client making up names grows no series
        hub.publish(f"junk{i}:x")
    samples = scrape(staff)
    published = "taskhub_tasks_published_total"
    assert labelled(samples, published, "action") == {"a:x", "b:x", "other"}
    assert value(samples, published, action="a:x") == 3
    assert value(samples, published, action="b:x") == 1
    assert value(samples, published, action="other") == 2 + 1 + 50
    assert labelled(samples, "taskhub_task_wait_seconds_count", "action") == {"a:x", "b:x", "other"}
    # The gauges keep the actions with the most unfinished tasks, in every process alike.
    assert value(samples, "taskhub_tasks", action="a:x", status="pending") == 3
    assert value(samples, "taskhub_tasks", action="c:x", status="pending") == 2
    assert value(samples, "taskhub_tasks", action="other", status="pending") == 1 + 1 + 50
    assert labelled(samples, "taskhub_tasks", "action") == {"a:x", "c:x", "other"}
    assert value(samples, "taskhub_tasks_waiting_for_subscriber", action="other") == 52


class FailingLayer:
    """A channel layer whose sends to "full" find the queue full, and whose other sends
    to "down" and group sends fail."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if channel == "full":
            raise ChannelFull(channel)
        if channel == "down":
            raise ConnectionError("Redis is down")
        self.sent.append(channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        raise ConnectionError("Redis is down")


class BrokenConsumer:
    async def dispatch(self, message: dict[str, Any]) -> None:
        raise RuntimeError("a bug in the consumer")


def test_notices_not_delivered_are_counted_by_reason(staff):
    layer = FailingLayer()
    notify.register("local-broken", BrokenConsumer())
    try:
        notices = [
            services.Notice("channel", "full", {"type": "taskhub.offer"}),
            services.Notice("channel", "down", {"type": "taskhub.offer"}),
            services.Notice("group", "g", {"type": "taskhub.relay"}),
            services.Notice("channel", "local-broken", {"type": "taskhub.offer"}),
            services.Notice("channel", "fine", {"type": "taskhub.offer"}),
        ]
        async_to_sync(notify.send_notices)(cast(BaseChannelLayer, layer), notices)
    finally:
        notify.unregister("local-broken")
    assert layer.sent == ["fine"]
    samples = scrape(staff)
    assert value(samples, "taskhub_layer_send_failures_total", reason="full") == 1
    assert value(samples, "taskhub_layer_send_failures_total", reason="error") == 3


# -- who may read them ------------------------------------------------------------------------


def test_an_anonymous_request_is_challenged(client):
    response = client.get(URL)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="taskhub"'
    assert b"taskhub_" not in response.content


def test_a_user_who_is_not_staff_is_refused(client):
    client.force_login(User.objects.create_user("someone", password="pw-someone-123"))
    response = client.get(URL)
    assert response.status_code == 403
    assert b"taskhub_" not in response.content


def test_an_inactive_staff_user_is_refused(client):
    user = User.objects.create_user("former", password="pw-former-123", is_staff=True)
    client.force_login(user)
    User.objects.filter(pk=user.pk).update(is_active=False)
    assert client.get(URL).status_code == 401  # Django's backend no longer loads the user


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}", TOKEN],
    ids=["longer", "shorter", "empty", "basic", "no-scheme"],
)
def test_a_wrong_token_is_refused(client, settings, authorization):
    settings.TASKHUB_METRICS_TOKEN = TOKEN
    response = client.get(URL, headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="taskhub", error="invalid_token"'
    assert b"taskhub_" not in response.content


def test_no_bearer_token_is_accepted_while_the_setting_is_none(client, settings):
    settings.TASKHUB_METRICS_TOKEN = None
    assert client.get(URL, headers={"Authorization": "Bearer None"}).status_code == 401
    assert client.get(URL, headers={"Authorization": "Bearer "}).status_code == 401


def test_the_token_is_accepted_with_any_case_of_scheme(client, settings):
    settings.TASKHUB_METRICS_TOKEN = TOKEN
    assert client.get(URL, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_only_get_and_head_are_served(staff):
    assert staff.post(URL).status_code == 405
    assert staff.head(URL).status_code == 200


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(staff):
    response = staff.get(URL, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.endswith(b"# EOF\n")
    assert "no-cache" in response["Cache-Control"]


def test_without_prometheus_client_the_hub_works_and_the_view_says_what_is_missing():
    """A subprocess where ``import prometheus_client`` fails, as without the extra."""
    code = f"""
import sys
sys.modules["prometheus_client"] = None  # makes every import of it fail
import django
django.setup()
from django.test import RequestFactory
from taskhub import metrics, notify, services
assert not metrics.AVAILABLE and metrics.EVENTS is None
metrics.observe(None, None, [], None)
metrics.send_failed("full")
factory = RequestFactory()
print(metrics.view(factory.get("/taskhub/metrics", HTTP_AUTHORIZATION="Bearer {TOKEN}")).status_code)
print(metrics.view(factory.get("/taskhub/metrics")).status_code)
"""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "TASKHUB_METRICS_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["501", "401"]


def test_every_metric_served_is_documented(staff):
    response = staff.get(URL)
    served = set()
    for family in text_string_to_metric_families(response.content.decode()):
        if not family.name.endswith("_created"):  # prometheus-client's timestamps of counters
            served.add(family.name + ("_total" if family.type == "counter" else ""))
    assert len(served) == 9
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for name in served:
        assert f"| `{name}` |" in docs, name
        assert name in (metrics.__doc__ or ""), name


def test_a_failure_to_count_never_fails_the_transition(staff, monkeypatch, events, caplog):
    hub = Hub(["mail:send"])
    hub.connect()

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug in the metrics")

    monkeypatch.setattr(events, "observe", broken)
    task_id = hub.run("mail:send", picked_up=1, ended=2, result="ok")
    assert TaskRecord.objects.get(pk=task_id).status == "success"
    assert "could not count a transition of task" in caplog.text


def test_a_scrape_fails_whole_when_the_database_cannot_be_read(monkeypatch):
    user = User.objects.create_user("ops", password="pw-ops-123", is_staff=True)
    client = HttpClient(raise_request_exception=False)
    client.force_login(user)

    def unreadable(*args: Any, **kwargs: Any) -> None:
        raise DatabaseError("the database is gone")

    monkeypatch.setattr(TaskRecord.objects, "filter", unreadable)
    response = client.get(URL)
    assert response.status_code == 500
    assert b"taskhub_tasks_published_total" not in response.content
