"""The services layer directly: what it persists and what it tells whom."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from typing import TypeVar

import pytest
from django.db import connection
from django.utils import timezone

from taskhub import services
from taskhub.core import machine
from taskhub.core.errors import UnknownTask
from taskhub.models import Instance, Subscription, TaskRecord
from taskhub.store import get_store

from .conftest import make_credential, pub_command, task_command

# Every test runs against the ORM's store and against the database's own (a differential test).
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("store_backend")]

T = TypeVar("T")


def not_none(value: T | None) -> T:
    """``value``, known to be there."""
    assert value is not None
    return value


def live_instance(credential, channel, subscribe=True):
    now = timezone.now()
    instance = Instance.objects.create(
        credential=credential,
        channel_name=channel,
        process="p",
        connected_at=now,
        lease_expires_at=now + timedelta(seconds=60),
    )
    if subscribe:
        Subscription.objects.create(instance=instance, action="mail:send")
    return instance


def relayed_to(notices):
    """``{channel or "group": [message types]}`` of a transition's relays."""
    return {
        (name if kind == "channel" else "group"): [m["type"] for m in message["messages"]]
        for kind, name, message in notices
        if message["type"] == "taskhub.relay"
    }


def two_services_and_a_publisher():
    """Services ``a`` and ``b``, each with a live instance subscribed to ``mail:send``
    (on ``chan-a`` and ``chan-b``), and ``app``'s publishing instance: ``(a, b, app,
    publisher)``."""
    a, _ = make_credential("a", sub=["mail"])
    b, _ = make_credential("b", sub=["mail"])
    app, _ = make_credential("app", pub=["mail"])
    live_instance(a, "chan-a")
    live_instance(b, "chan-b")
    return a, b, app, live_instance(app, "chan-app", subscribe=False)


def test_an_instance_whose_credential_no_longer_permits_the_action_is_not_offered_it():
    """Subscribed while it was allowed; an operator then narrowed its patterns. Each
    publish reads them anew (their parse is remembered by their text only)."""
    a, _, app, publisher = two_services_and_a_publisher()

    def offered_to() -> list[str]:
        _, _, notices = services.publish(
            app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now(), publisher.pk
        )
        return sorted(name for kind, name, m in notices if kind == "channel" and m["type"] == "taskhub.offer")

    assert offered_to() == ["chan-a", "chan-b"]
    a.sub_permissions = ["geo"]
    a.save()
    assert offered_to() == ["chan-b"]
    a.sub_permissions = ["mail"]
    a.save()
    assert offered_to() == ["chan-a", "chan-b"]


def test_task_events_go_to_the_publisher_the_services_on_the_task_and_the_watchers_if_any():
    a, b, app, publisher = two_services_and_a_publisher()
    task_id, created, notices = services.publish(
        app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now(), publisher.pk
    )
    assert created
    assert sorted(name for kind, name, _ in notices if kind == "channel") == ["chan-a", "chan-b"]
    assert relayed_to(notices) == {}

    def act(cred, channel, **cmd):
        return services.act(cred, task_command({"task": task_id, "attempt": 1, **cmd}), timezone.now(), channel)

    # The sender of an update does not get it back. Nobody watches: no group send.
    notices = act(a, "chan-a", type="update", progress=0.5)
    assert relayed_to(notices) == {"chan-app": ["update"], "chan-b": ["update"]}
    state = services.watch(app, task_id, 0)
    assert [e["kind"] for e in state["events"]] == ["init", "start", "start", "pickup", "update"]
    assert TaskRecord.objects.get(pk=task_id).watched
    # The winner's part is over; the other service is told; the watchers' group too.
    notices = act(a, "chan-a", type="return", result=1)
    expected = ["success", "end"]
    assert relayed_to(notices) == {"chan-app": expected, "chan-b": expected, "group": expected}
    # A late return is recorded, not relayed.
    assert relayed_to(act(b, "chan-b", type="return", result=2)) == {}


def test_a_service_that_published_its_own_task_still_hears_its_outcome():
    me, _ = make_credential("me", sub=["mail"], pub=["mail"])
    instance = live_instance(me, "chan-me")
    task_id, _, _ = services.publish(
        me, pub_command({"type": "pub", "action": "mail:send"}), timezone.now(), instance.pk
    )
    cmd = {"type": "update", "task": task_id, "attempt": 1, "progress": 0.1}
    assert relayed_to(services.act(me, task_command(cmd), timezone.now(), "chan-me")) == {}
    cmd = {"type": "return", "task": task_id, "attempt": 1, "result": 1}
    notices = services.act(me, task_command(cmd), timezone.now(), "chan-me")
    assert relayed_to(notices) == {"chan-me": ["success", "end"]}


def test_a_released_instances_part_waits_for_another_and_nobody_is_told_yet():
    a, _ = make_credential("a", sub=["mail"])
    app, _ = make_credential("app", pub=["mail"])
    instance = live_instance(a, "chan-a")
    publisher = live_instance(app, "chan-app", subscribe=False)
    task_id, _, _ = services.publish(
        app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now(), publisher.pk
    )
    notices = services.release(instance.pk, timezone.now())
    assert relayed_to(notices) == {} and not [n for n in notices if n.name == "chan-a"]
    record = TaskRecord.objects.get(pk=task_id)
    assert record.status == "started"
    assert [(a.state, a.instance_id) for a in record.assignments.all()] == [("waiting", None)]
    assert list(record.events.values_list("kind", flat=True)) == ["init", "start", "lost"]
    assert not Instance.objects.filter(pk=instance.pk).exists()


def test_a_released_instances_part_goes_to_another_instance_of_its_service():
    a, _ = make_credential("a", sub=["mail"], max_instances=2)
    app, _ = make_credential("app", pub=["mail"])
    first = live_instance(a, "chan-a1")
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    second = live_instance(a, "chan-a2")
    notices = services.release(first.pk, timezone.now())
    offers = [(n.name, n.message["message"]["task"]) for n in notices if n.message["type"] == "taskhub.offer"]
    assert offers == [("chan-a2", task_id)]
    record = TaskRecord.objects.get(pk=task_id)
    assert list(record.assignments.values_list("state", "instance")) == [("offered", second.pk)]
    assert list(record.events.values_list("kind", "instance")) == [
        ("init", None),
        ("start", first.pk),
        ("lost", first.pk),
        ("start", second.pk),
    ]


@pytest.fixture
def from_a_connected_publisher():
    """A task offered to service "a", published by "app" from a live connection:
    ``(task id, a, app, the publisher's instance)``."""
    a, _ = make_credential("a", sub=["mail"])
    app, _ = make_credential("app", pub=["mail"])
    live_instance(a, "chan-a")
    publisher = live_instance(app, "chan-app", subscribe=False)
    task_id, _, _ = services.publish(
        app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now(), publisher.pk
    )
    return task_id, a, app, publisher


def test_a_publisher_that_disconnected_is_sent_nothing_more(from_a_connected_publisher):
    task_id, a, app, publisher = from_a_connected_publisher
    services.watch(app, task_id, 0)  # from another connection, say
    services.release(publisher.pk, timezone.now())
    cmd = {"type": "return", "task": task_id, "attempt": 1, "result": 1}
    notices = services.act(a, task_command(cmd), timezone.now(), "chan-a")
    assert relayed_to(notices) == {"group": ["success", "end"]}  # its watchers only


def test_a_re_sent_pub_marks_the_task_watched_for_the_connection_that_follows_it():
    app, _ = make_credential("app", pub=["mail"])
    cmd = {"type": "pub", "action": "mail:send", "task_id": "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"}
    task_id, created, _ = services.publish(app, pub_command(cmd), timezone.now())
    assert created and not TaskRecord.objects.get(pk=task_id).watched
    assert services.publish(app, pub_command(cmd), timezone.now())[:2] == (task_id, False)
    assert TaskRecord.objects.get(pk=task_id).watched


def test_watching_a_task_that_is_not_yours_changes_nothing():
    app, _ = make_credential("app", pub=["mail"])
    other, _ = make_credential("other", pub=["mail"])
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    with pytest.raises(UnknownTask):
        services.watch(other, task_id, 0)
    assert not TaskRecord.objects.get(pk=task_id).watched


def test_a_conflicting_write_is_retried_on_the_fresh_row():
    app, _ = make_credential("app", pub=["mail"])
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    calls = []

    def decide(task):
        calls.append(task.status)
        if len(calls) == 1:  # another process moves the task between our read and our write
            TaskRecord.objects.filter(pk=task_id).update(version=99)
        return machine.expire(task, timezone.now() + timedelta(days=1))

    services.transition(task_id, decide, timezone.now())
    assert len(calls) == 2  # the conflict was detected and the decision taken again
    record = TaskRecord.objects.get(pk=task_id)
    # The bump ran inside the attempt's transaction and rolled back with it; the retry
    # applied the transition once, events included.
    assert (record.status, record.failure_reason, record.version) == ("failed", "pickup_timeout", 1)
    assert list(record.events.values_list("kind", flat=True)) == ["init", "fail", "end"]


def test_an_assignments_updated_at_says_when_its_state_last_changed():
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    live_instance(a, "chan-a")
    start = timezone.now()
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), start)

    def act(at, **cmd):
        services.act(a, task_command({"task": task_id, "attempt": 1, **cmd}), at)
        return TaskRecord.objects.get(pk=task_id).assignments.get()

    picked = start + timedelta(seconds=1)
    assert act(picked, type="pickup").updated_at == picked
    # Progress changes no state: the row keeps the time of the pickup.
    row = act(picked + timedelta(seconds=1), type="update", progress=0.5)
    assert (row.state, row.updated_at) == ("picked_up", picked)
    returned = picked + timedelta(seconds=2)
    assert act(returned, type="return").updated_at == returned


@pytest.mark.parametrize("prepared", [True, False])
def test_the_store_reads_rows_as_the_orm_does(prepared, settings):
    settings.TASKHUB_PREPARED_STATEMENTS = prepared  # PostgreSQL only
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    live_instance(a, "chan-a")
    task_id, _, _ = services.publish(
        app,
        pub_command({"type": "pub", "action": "mail:send", "payload": {"é": [1, None]}, "timeout": 9}),
        timezone.now(),
    )
    services.act(
        a, task_command({"type": "return", "task": task_id, "attempt": 1, "result": {"ok": [True]}}), timezone.now()
    )
    record, rows, publisher_channel = not_none(get_store().load_task(task_id, with_payload=True))
    assert publisher_channel is None  # published with no instance (from a shell, say)
    orm = TaskRecord.objects.get(pk=task_id)
    for field in TaskRecord._meta.concrete_fields:
        assert getattr(record, field.attname) == getattr(orm, field.attname), field.attname
    assert [tuple(r) for r in rows] == [
        (r.pk, r.service, r.instance_id, r.attempt, r.state, r.detail, "chan-a") for r in orm.assignments.order_by("pk")
    ]
    assert not_none(get_store().load_task(task_id)).record.payload is None  # loaded only for offers
    assert get_store().load_task("not-a-uuid") is None
    assert get_store().load_task("8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a") is None


@pytest.fixture
def offered_to_two():
    """A task offered to the services "a" and "b": ``(task id, a, b)``."""
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    b, _ = make_credential("b", sub=["mail"])
    live_instance(a, "chan-a")
    live_instance(b, "chan-b")
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    return task_id, a, b


def act(credential, task_id, type, **fields):
    """The service's command on the task's first attempt."""
    return services.act(
        credential, task_command({"type": type, "task": task_id, "attempt": 1, **fields}), timezone.now()
    )


def test_a_finished_task_is_loaded_with_the_acting_services_assignments_only(offered_to_two):
    store = get_store()
    task_id, a, b = offered_to_two
    assert [r.service for r in not_none(store.load_task(task_id, service="b")).assignments] == ["a", "b"]  # running
    act(a, task_id, "return", result=1)
    assert [r.service for r in not_none(store.load_task(task_id, service="b")).assignments] == ["b"]
    assert [r.service for r in not_none(store.load_task(task_id)).assignments] == ["a", "b"]
    # b's late return is recorded against its own assignment, as before.
    act(b, task_id, "return", result=2)
    record = TaskRecord.objects.get(pk=task_id)
    assert (record.status, record.result) == ("success", 1)
    assert list(record.events.values_list("kind", "service"))[-1] == ("late_return", "b")


def test_a_late_return_is_recorded_without_touching_the_tasks_row(offered_to_two):
    task_id, a, b = offered_to_two
    act(a, task_id, "return", result=1)
    before = TaskRecord.objects.values().get(pk=task_id)
    act(b, task_id, "return", result=2)
    assert TaskRecord.objects.values().get(pk=task_id) == before  # version included
    assert not_none(TaskRecord.objects.get(pk=task_id).events.last()).kind == "late_return"


def test_an_update_that_changes_no_column_still_moves_the_version_its_relay_carries(from_a_connected_publisher):
    """Connections hear a relay once per version: an update without ``progress``
    changes no column of the task, yet its relay must not look like the last one."""
    task_id, a, _, _ = from_a_connected_publisher
    versions = []
    for step in range(2):
        notices = act(a, task_id, "update", data={"step": step})
        (version,) = {message["version"] for _, _, message in notices if message["type"] == "taskhub.relay"}
        versions.append(version)
    assert versions[1] == versions[0] + 1 == TaskRecord.objects.get(pk=task_id).version


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's")
@pytest.mark.parametrize("prepared", [True, False])
def test_on_postgresql_the_hot_path_is_prepared_unless_turned_off(prepared, settings, store_backend):
    if store_backend == "orm":
        pytest.skip("the ORM's store prepares nothing")
    settings.TASKHUB_PREPARED_STATEMENTS = prepared
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # psycopg forgets its own records of them too
    app, _ = make_credential("app", pub=["mail"])
    a, _ = make_credential("a", sub=["mail"])
    live_instance(a, "chan-a")
    for _ in range(2):
        task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
        services.act(a, task_command({"type": "return", "task": task_id, "attempt": 1}), timezone.now())
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared_now = [text for (text,) in cursor.fetchall()]
    table = TaskRecord._meta.db_table
    # A transition's writes go as one statement, its steps as CTEs (store.postgresql).
    assert any(f'w0 AS (INSERT INTO "{table}"' in text for text in prepared_now) is prepared
    assert any(f'w0 AS (UPDATE "{table}"' in text for text in prepared_now) is prepared


@pytest.fixture
def fan_out_of_20_at_50_parameters(monkeypatch, request):
    """SQLite takes 32,766 parameters per statement, PostgreSQL 65,535: a fan-out to some
    four thousand services reaches that. A limit of 50 (enforced by SQLite itself) shows
    the batches on 20 services. Returns ``(app, the services)``."""
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        raw = connection.connection
        before = raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)
        request.addfinalizer(lambda: raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before))
    monkeypatch.setattr(get_store(), "max_params", 50, raising=False)
    monkeypatch.setattr(connection.features, "max_query_params", 50)  # the ORM batches by it
    app, _ = make_credential("app", pub=["mail"])
    for i in range(20):
        service, _ = make_credential(f"s{i}", sub=["mail"])
        live_instance(service, f"chan-{i}")
    return app


def test_a_fan_out_wider_than_the_databases_parameter_limit_is_written_in_batches(fan_out_of_20_at_50_parameters):
    app = fan_out_of_20_at_50_parameters
    task_id, _, notices = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    assert sorted(n[1] for n in notices if n[2]["type"] == "taskhub.offer") == sorted(f"chan-{i}" for i in range(20))
    record = TaskRecord.objects.get(pk=task_id)
    assert sorted(record.assignments.values_list("service", flat=True)) == sorted(f"s{i}" for i in range(20))
    assert list(record.events.values_list("kind", flat=True)) == ["init"] + ["start"] * 20


def test_a_transition_wider_than_the_parameter_limit_is_still_fenced(fan_out_of_20_at_50_parameters):
    """A pickup timeout on the fan-out writes 20 assignments and events: on PostgreSQL the
    fence and the rest then go in a transaction."""
    app = fan_out_of_20_at_50_parameters
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    later = timezone.now() + timedelta(days=1)
    services.transition(task_id, lambda task: machine.expire(task, later), later)
    record = TaskRecord.objects.get(pk=task_id)
    assert (record.status, record.version) == ("ended", 1)
    assert set(record.assignments.values_list("state", flat=True)) == {"seen"}
    assert list(record.events.values_list("kind", flat=True)) == ["init"] + ["start"] * 20 + ["seen"] * 20 + ["end"]


@pytest.fixture
def optimistic_store(store_backend):
    """Skip unless transitions read without a lock (PostgreSQL's own store)."""
    if not get_store().optimistic:
        pytest.skip("this store's transitions lock on read")


optimistic = pytest.mark.usefixtures("optimistic_store")


@optimistic
def test_a_transition_that_read_no_watchers_tells_those_who_came_before_it_wrote(from_a_connected_publisher):
    """PostgreSQL reads a task without a lock: a watch can land between a transition's
    read and its write, and the write reads the flag back."""
    task_id, a, _, _ = from_a_connected_publisher

    def decide(task):
        TaskRecord.objects.filter(pk=task_id).update(watched=True)  # another connection's watch
        return machine.return_result(task, "a", 1, "ok", timezone.now())

    notices = services.transition(task_id, decide, timezone.now(), sender="chan-a", service="a")
    assert relayed_to(notices) == {"chan-app": ["success", "end"], "group": ["success", "end"]}


@optimistic
def test_a_publisher_gone_between_a_transitions_read_and_its_write_is_sent_nothing(from_a_connected_publisher):
    task_id, a, _, publisher = from_a_connected_publisher

    def decide(task):
        Instance.objects.filter(pk=publisher.pk).delete()
        return machine.return_result(task, "a", 1, "ok", timezone.now())

    notices = services.transition(task_id, decide, timezone.now(), sender="chan-a", service="a")
    assert relayed_to(notices) == {}


@optimistic
@pytest.mark.django_db(transaction=True)  # the purge commits while the transition runs
def test_a_command_on_a_task_deleted_between_read_and_write_finds_no_task(offered_to_two):
    """A late return writes an event alone; its fence is the task's row still being there."""
    task_id, a, b = offered_to_two
    act(a, task_id, "return", result=1)

    def decide(task):
        TaskRecord.objects.filter(pk=task_id).delete()  # retention purged it meanwhile
        return machine.return_result(task, "b", 1, 2, timezone.now())

    with pytest.raises(UnknownTask):
        services.transition(task_id, decide, timezone.now(), service="b")


@pytest.mark.usefixtures("store_backend")
def test_the_offers_chosen_name_the_instances_that_announced_a_concurrency():
    """Publishing reserves an offer to such an instance under a lock; the choice says which
    they are from the same read as their room (it was a query of its own per publish)."""
    from taskhub.services.dispatch import choose_offers, successor

    now = timezone.now()
    sessions = {}
    for name, concurrency in (("a", 2), ("b", None)):
        credential, _ = make_credential(name, sub=["mail"])
        session = services.connect(credential, f"chan-{name}", "p", "", now, concurrency=concurrency)
        services.subscribe(session.instance.pk, credential, "mail:send", now)
        sessions[name] = str(session.instance.pk)
    offers, channels, bounded = choose_offers(get_store(), "mail:send", now)
    assert sorted(offers) == [("a", sessions["a"]), ("b", sessions["b"])]
    assert channels == {sessions["a"]: "chan-a", sessions["b"]: "chan-b"}
    assert bounded == {sessions["a"]}
    heirs = [successor(get_store(), "mail:send", name, now) for name in ("a", "b")]
    assert [(str(h.instance), h.limited) for h in heirs if h] == [(sessions["a"], True), (sessions["b"], False)]
