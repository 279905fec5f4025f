"""The services layer's answers to the delivery review, against every store: hand-overs
after the pickup timeout, parts queued for a busy service, reserved offers, watchers of
retries, re-sent offers, and when a task last finished."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from taskhub import services
from taskhub.models import Instance, TaskRecord
from taskhub.services import dispatch, queries
from taskhub.store.base import Subscriber

from .conftest import make_credential, pub_command, task_command
from .test_services import live_instance, relayed_to

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("store_backend")]


def publish(app: Any, now: Any = None, **fields: Any) -> str:
    command = pub_command({"type": "pub", "action": "mail:send", **fields})
    task_id, _, _ = services.publish(app, command, now or timezone.now())
    return task_id


def act(credential: Any, task_id: str, type_: str, now: Any, instance: Instance | None = None, **fields: Any) -> Any:
    command = task_command({"type": type_, "task": task_id, "attempt": fields.pop("attempt", 1), **fields})
    return services.act(
        credential, command, now, instance.channel_name if instance else None, instance.pk if instance else None
    )


def offers_in(notices: list[Any]) -> list[tuple[str, str, int]]:
    """``(channel, task, attempt)`` of the offers among ``notices``."""
    return [
        (n.name, n.message["message"]["task"], n.message["message"]["attempt"])
        for n in notices
        if n.message["type"] == "taskhub.offer"
    ]


def busy_worker(concurrency: int = 1) -> tuple[Any, Instance, Any]:
    """Service "a" with one instance of ``concurrency`` that holds a task already:
    ``(a, its instance, the publisher app)``."""
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    instance = live_instance(a, "chan-a")
    Instance.objects.filter(pk=instance.pk).update(concurrency=concurrency)
    for _ in range(concurrency):
        publish(app)
    return a, instance, app


def test_a_part_handed_over_after_its_pickup_timeout_is_offered_and_does_not_expire():
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"], max_instances=2)
    first = live_instance(a, "chan-a1")
    now = timezone.now()
    task_id = publish(app, now, pickup_timeout=5, timeout=100)
    act(a, task_id, "pickup", now, first)
    second = live_instance(a, "chan-a2")
    # It runs well past its pickup timeout, then its instance is released.
    later = now + timedelta(seconds=30)
    notices = services.release(first.pk, later)
    assert offers_in(notices) == [("chan-a2", task_id, 1)]
    services.sweep("p", later + timedelta(seconds=1))
    record = TaskRecord.objects.get(pk=task_id)
    assert record.status == "started"
    assert list(record.assignments.values_list("state", "instance")) == [("offered", second.pk)]
    assert record.deadline == later + timedelta(seconds=5)  # the successor's own pickup timeout
    assert "seen" not in record.events.values_list("kind", flat=True)


def test_a_part_queued_for_a_busy_service_fails_with_pickup_timeout_and_is_not_retried():
    a, instance, app = busy_worker()
    now = timezone.now()
    task_id = publish(app, now, pickup_timeout=5, retries=3)
    record = TaskRecord.objects.get(pk=task_id)
    assert (record.status, record.assignments.get().state) == ("started", "queued")
    services.sweep("p", now + timedelta(seconds=6))
    record = TaskRecord.objects.get(pk=task_id)
    assert (record.status, record.failure_reason, record.attempt) == ("failed", "pickup_timeout", 1)
    assert record.failure_detail == "no instance of a had room within the pickup timeout"
    assert record.assignments.get().state == "expired"
    assert list(record.events.values_list("kind", flat=True)) == ["init", "fail", "end"]


def test_a_queued_part_goes_to_the_instance_once_it_has_room():
    a, instance, app = busy_worker()
    (held,) = TaskRecord.objects.values_list("id", flat=True)
    queued = publish(app)
    act(a, str(held), "return", timezone.now(), instance, result=1)
    started, notices = services.dispatch_waiting(timezone.now())
    assert offers_in(notices) == [("chan-a", queued, 1)]
    assert TaskRecord.objects.get(pk=queued).assignments.get().state == "offered"


def test_an_offer_chosen_on_a_stale_read_of_the_instances_room_is_queued(monkeypatch):
    """Another connection took the instance's last slot between the choice and the write
    (``tests/test_races.py`` races it for real): the write's own count queues the part."""
    a, instance, app = busy_worker()
    stale = [("a", str(instance.pk))]
    chosen = (stale, {str(instance.pk): "chan-a"}, frozenset([str(instance.pk)]))  # it has a concurrency
    monkeypatch.setattr("taskhub.services.commands.choose_offers", lambda *args: chosen)
    task_id, _, notices = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    assert offers_in(notices) == []
    assert TaskRecord.objects.get(pk=task_id).assignments.get().state == "queued"
    # So is a queued part handed to an instance found with room a moment before.
    stale_heir = Subscriber(instance.pk, "chan-a", a.pk, "a", ["mail"], busy=False, limited=True)
    monkeypatch.setattr(dispatch, "successor", lambda *args, **kwargs: stale_heir)
    assert services.dispatch_waiting(timezone.now()) == (0, [])
    assert TaskRecord.objects.get(pk=task_id).assignments.get().state == "queued"


def test_a_released_part_is_not_handed_to_an_heir_that_became_full(monkeypatch):
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"], max_instances=2)
    first = live_instance(a, "chan-a1")
    task_id = publish(app)
    heir = live_instance(a, "chan-a2")
    Instance.objects.filter(pk=heir.pk).update(concurrency=1)
    publish(app)  # the heir's one slot is taken (least recently assigned goes next)
    assert heir.assignments.filter(state="offered").count() == 1
    stale_heir = Subscriber(heir.pk, "chan-a2", heir.credential_id, "a", ["mail"], busy=False, limited=True)
    monkeypatch.setattr(dispatch, "successor", lambda *args, **kwargs: stale_heir)
    notices = dispatch.release_task(task_id, "mail:send", "a", first.pk, timezone.now())
    assert offers_in(notices) == []
    assert TaskRecord.objects.get(pk=task_id).assignments.get().state == "waiting"


def test_a_retry_from_another_connection_is_heard_live_by_its_group():
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    live_instance(a, "chan-a")
    task_id = publish(app)
    act(a, task_id, "fail", timezone.now(), error="boom")
    assert not TaskRecord.objects.get(pk=task_id).watched
    notices = services.retry(app, task_id, timezone.now(), "app")
    assert relayed_to(notices) == {"group": ["retry"]}
    assert TaskRecord.objects.get(pk=task_id).watched


def test_an_offer_is_sent_again_only_while_it_is_still_offered_to_that_instance():
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"], max_instances=2)
    first = live_instance(a, "chan-a1")
    task_id = publish(app)
    pk = TaskRecord.objects.get(pk=task_id).pk
    assert queries.offer_of(pk, 1, first.pk) is not None
    second = live_instance(a, "chan-a2")
    services.release(first.pk, timezone.now())  # handed over to the second
    assert queries.offer_of(pk, 1, first.pk) is None
    offer = queries.offer_of(pk, 1, second.pk)
    assert offer is not None and (offer["task"], offer["attempt"]) == (task_id, 1)
    act(a, task_id, "pickup", timezone.now(), second)
    assert queries.offer_of(pk, 1, second.pk) is None  # picked up: nothing to send again
    assert queries.offer_of(pk, 1) is None


def test_a_task_retried_on_request_is_unfinished_until_it_ends_again():
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    live_instance(a, "chan-a")
    now = timezone.now()
    task_id = publish(app, now)
    act(a, task_id, "fail", now + timedelta(seconds=1), error="boom")
    assert TaskRecord.objects.get(pk=task_id).finished_at == now + timedelta(seconds=1)
    services.retry(app, task_id, now + timedelta(seconds=2), "app")
    assert TaskRecord.objects.get(pk=task_id).finished_at is None
    act(a, task_id, "return", now + timedelta(seconds=3), attempt=2, result="r")
    record = TaskRecord.objects.get(pk=task_id)
    assert (record.status, record.finished_at) == ("success", now + timedelta(seconds=3))
