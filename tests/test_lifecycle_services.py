"""The services layer's delivery features against every store: touch, again, cancel,
retry, listing, sessions (connect, resume, detach, release)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from taskhub import services
from taskhub.core.errors import InvalidTransition, UnknownTask
from taskhub.models import Instance, TaskEvent, TaskRecord
from taskhub.services import queries

from .conftest import make_credential, pub_command, task_command
from .test_services import live_instance, relayed_to

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("store_backend")]


def publish(app: Any, **fields: Any) -> str:
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send", **fields}), timezone.now())
    return task_id


@pytest.fixture
def offered():
    """A task offered to service "a": ``(task id, a, a's instance, app)``."""
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    instance = live_instance(a, "chan-a")
    return publish(app, heartbeat_timeout=5), a, instance, app


def test_a_touch_moves_the_heartbeat_deadline_and_records_nothing(offered):
    task_id, a, instance, _ = offered
    now = timezone.now()
    services.act(a, task_command({"type": "pickup", "task": task_id, "attempt": 1}), now, "chan-a", instance.pk)
    later = now + timedelta(seconds=3)
    touch = task_command({"type": "touch", "task": task_id, "attempt": 1})
    notices = services.act(a, touch, later, "chan-a", instance.pk)
    assert relayed_to(notices) == {}
    record = TaskRecord.objects.get(pk=task_id)
    assert record.heartbeat_deadline == later + timedelta(seconds=5) == record.deadline
    assert list(record.events.values_list("kind", flat=True)) == ["init", "start", "pickup"]


def test_a_command_sent_again_is_applied_once(offered):
    task_id, a, instance, _ = offered
    update = {"type": "update", "task": task_id, "attempt": 1, "data": "once", "ref": 7}
    services.act(a, task_command(update), timezone.now(), "chan-a", instance.pk)
    assert services.act(a, task_command({**update, "again": True}), timezone.now(), "chan-a", instance.pk) == []
    assert TaskEvent.objects.filter(task_id=task_id, kind="update").count() == 1
    # Another ref sent again is new: it is applied.
    services.act(a, task_command({**update, "ref": 8, "again": True}), timezone.now(), "chan-a", instance.pk)
    assert TaskEvent.objects.filter(task_id=task_id, kind="update").count() == 2


def test_a_touch_sent_again_once_the_part_is_over_changes_nothing_and_is_not_refused(offered):
    # A touch records no event: one sent again after a reconnect may have been applied.
    task_id, a, instance, _ = offered
    now = timezone.now()
    ret = task_command({"type": "return", "task": task_id, "attempt": 1, "ref": 3})
    services.act(a, ret, now, "chan-a", instance.pk)
    touch = {"type": "touch", "task": task_id, "attempt": 1, "ref": 2}
    assert services.act(a, task_command({**touch, "again": True}), now, "chan-a", instance.pk) == []
    with pytest.raises(InvalidTransition):  # sent once, it is refused as before
        services.act(a, task_command(touch), now, "chan-a", instance.pk)
    assert list(TaskRecord.objects.get(pk=task_id).events.values_list("kind", flat=True))[-2:] == ["success", "end"]


def test_a_command_sent_again_for_a_task_that_is_gone_changes_nothing(offered):
    task_id, a, instance, _ = offered
    TaskRecord.objects.filter(pk=task_id).delete()  # removed after its end (autoremove, retention)
    ret = {"type": "return", "task": task_id, "attempt": 1, "result": 1, "ref": 4}
    assert services.act(a, task_command({**ret, "again": True}), timezone.now(), "chan-a", instance.pk) == []
    with pytest.raises(UnknownTask):
        services.act(a, task_command(ret), timezone.now(), "chan-a", instance.pk)
    assert not TaskRecord.objects.filter(pk=task_id).exists()


def test_a_command_of_an_instance_the_task_was_taken_from_is_refused(offered):
    task_id, a, instance, _ = offered
    other = live_instance(a, "chan-other", subscribe=False)
    with pytest.raises(InvalidTransition) as info:
        services.act(a, task_command({"type": "pickup", "task": task_id, "attempt": 1}), timezone.now(), "x", other.pk)
    assert info.value.code == "stale_attempt"
    assert TaskRecord.objects.get(pk=task_id).events.count() == 2  # init, start: nothing written


def test_the_publisher_cancels_and_the_services_are_told(offered):
    task_id, a, instance, app = offered
    with pytest.raises(UnknownTask):
        services.cancel(a, task_id, timezone.now(), "a")  # not a's to cancel
    notices = services.cancel(app, task_id, timezone.now(), "app")
    # The canceller's connection may be another than the publisher's: the group hears it too.
    assert relayed_to(notices) == {"chan-a": ["fail", "end"], "group": ["fail", "end"]}
    record = TaskRecord.objects.get(pk=task_id)
    assert (record.status, record.failure_reason, record.failure_detail) == ("failed", "cancelled", "cancelled by app")
    with pytest.raises(InvalidTransition):
        services.cancel(app, task_id, timezone.now(), "app")
    # An operator (no credential) may cancel any task.
    other = publish(app)
    services.cancel(None, other, timezone.now(), "operator")
    assert TaskRecord.objects.get(pk=other).failure_detail == "cancelled by operator"


def test_a_failed_task_retried_on_request_is_offered_again_at_once(offered):
    task_id, a, instance, app = offered
    services.act(a, task_command({"type": "fail", "task": task_id, "attempt": 1, "error": "x"}), timezone.now())
    with pytest.raises(UnknownTask):
        services.retry(a, task_id, timezone.now(), "a")
    notices = services.retry(app, task_id, timezone.now(), "app")
    offers = [n.message["message"] for n in notices if n.message["type"] == "taskhub.offer"]
    assert [(o["task"], o["attempt"]) for o in offers] == [(task_id, 2)]
    record = TaskRecord.objects.get(pk=task_id)
    assert (record.status, record.attempt, record.failure_reason) == ("started", 2, "")
    kinds = list(record.events.values_list("kind", "attempt"))
    assert kinds[-2:] == [("retry", 1), ("start", 2)]
    with pytest.raises(InvalidTransition):
        services.retry(app, task_id, timezone.now(), "app")


def test_a_retry_waits_for_its_backoff_before_it_is_offered(offered):
    task_id, a, instance, app = offered
    retrying = publish(app, retries=1, retry_backoff=10)
    now = timezone.now()
    services.act(a, task_command({"type": "fail", "task": retrying, "attempt": 1, "error": "x"}), now)
    record = TaskRecord.objects.get(pk=retrying)
    assert (record.status, record.attempt) == ("pending", 2)
    assert record.retry_at is not None
    assert now + timedelta(seconds=5) <= record.retry_at <= now + timedelta(seconds=10)
    assert services.dispatch_waiting(now + timedelta(seconds=4))[0] == 0  # not due
    due = record.retry_at + timedelta(milliseconds=1)
    services.sweep("p", due)
    assert TaskRecord.objects.get(pk=retrying).status == "started"


def test_listing_shows_what_was_published_or_offered_and_nothing_else(offered):
    task_id, a, instance, app = offered
    stranger, _ = make_credential("stranger", sub=["log"], pub=["log"])
    wildcard, _ = make_credential("wild", sub=["mail:*"])

    def listed(credential: Any, **options: Any) -> list[str]:
        found, more = queries.listed(
            credential, status=options.get("status"), action=None, limit=options.get("limit", 100)
        )
        assert not more
        return [t["id"] for t in found]

    second = publish(app)
    assert listed(app) == [second, task_id]  # newest first
    assert listed(a) == [second, task_id]  # offered to a
    # May subscribe to mail:*, but was never offered these: they are not its to see, as
    # watch says too.
    assert listed(wildcard) == []
    with pytest.raises(UnknownTask):
        services.watch(wildcard, task_id, 0, follow=False)
    assert listed(stranger) == []
    assert listed(app, limit=1) == [second]
    assert listed(app, status="success") == []


def test_a_session_is_resumed_with_its_token_and_keeps_its_tasks(offered):
    _, _, _, app = offered
    a, _ = make_credential("b", sub=["mail"], max_instances=3)
    now = timezone.now()
    session = services.connect(a, "chan-1", "p", "127.0.0.1", now)
    assert not session.resumed and session.token.startswith(session.instance.pk.hex + ".")
    assert services.detach(session.instance.pk, "chan-1", now)
    # A wrong token, or another credential's, gets a new instance.
    wrong = services.connect(a, "chan-2", "p", "", now, resume=session.token[:-2] + "xx")
    assert not wrong.resumed and wrong.instance.pk != session.instance.pk
    services.release(wrong.instance.pk, now)
    stranger = services.connect(app, "chan-x", "p", "", now, resume=session.token)  # not app's instance
    assert not stranger.resumed and stranger.instance.pk != session.instance.pk
    resumed = services.connect(a, "chan-3", "q", "", now, resume=session.token)
    assert resumed.resumed and resumed.instance.pk == session.instance.pk
    assert resumed.token == session.token  # the instance's token for its life
    instance = Instance.objects.get(pk=session.instance.pk)
    assert (instance.channel_name, instance.process, instance.detached_at) == ("chan-3", "q", None)
    # The old connection's late detach changes nothing now.
    assert not services.detach(session.instance.pk, "chan-1", now)


def test_resuming_an_attached_instance_supersedes_its_connection():
    a, _ = make_credential("b", sub=["mail"])
    session = services.connect(a, "chan-1", "p", "", timezone.now())
    again = services.connect(a, "chan-2", "p", "", timezone.now(), resume=session.token)
    assert again.resumed and again.superseded == "chan-1"


def test_a_new_connection_releases_the_longest_detached_instance_when_slots_are_full(offered):
    task_id, a, instance, app = offered
    Instance.objects.filter(pk=instance.pk).update(detached_at=timezone.now())
    session = services.connect(a, "chan-new", "p", "", timezone.now())
    assert not Instance.objects.filter(pk=instance.pk).exists()
    assert TaskRecord.objects.get(pk=task_id).assignments.get().state == "waiting"
    # The new instance subscribes: the task waiting for an instance of the service is its.
    _, notices = services.subscribe(session.instance.pk, a, "mail:send", timezone.now())
    assert [(n.name, n.message["message"]["task"]) for n in notices] == [("chan-new", task_id)]


def test_detached_instances_are_released_after_the_grace(offered, settings):
    task_id, a, instance, app = offered
    settings.TASKHUB_RESUME_GRACE = 10
    now = timezone.now()
    assert services.detach(instance.pk, "chan-a", now)
    services.sweep("p", now + timedelta(seconds=9))
    assert Instance.objects.filter(pk=instance.pk).exists()
    services.sweep("p", now + timedelta(seconds=11))
    assert not Instance.objects.filter(pk=instance.pk).exists()
    assert TaskRecord.objects.get(pk=task_id).assignments.get().state == "waiting"
