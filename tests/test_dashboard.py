"""Monitors (the dashboard's connection) through WebsocketCommunicator, with a Django
session in the handshake: who may monitor, what a monitor may read, that it changes
nothing, what it hears, and that nobody pays for the feed while no monitor is live."""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from taskhub import throttle
from taskhub.consumers import TaskHubConsumer
from taskhub.core.commands import MISSING
from taskhub.models import Assignment, Instance, Monitor, Subscription, TaskEvent, TaskRecord
from taskhub.services import queries, routing

from .conftest import TIMEOUT, Peer, make_credential, open_peer, pub_command

pytestmark = pytest.mark.django_db(transaction=True)

credential = database_sync_to_async(make_credential)


@pytest.fixture(autouse=True)
def _fresh_state():
    throttle.reset()
    routing.forget_presence()
    yield
    throttle.reset()
    routing.forget_presence()


@database_sync_to_async
def session_of(name: str = "operator", *, staff: bool = True, active: bool = True) -> str:
    """A logged-in session of a new user, as the admin's login makes it: its key."""
    user = get_user_model().objects.create_user(name, password="pw", is_staff=staff, is_active=active)
    browser = Client()
    browser.force_login(user)
    return str(browser.cookies["sessionid"].value)


async def monitor(session: str | None = None, *, welcome: bool = True) -> Peer:
    """A connection that says ``hello`` as a monitor, with the session's cookie."""
    headers = [(b"cookie", f"sessionid={session}".encode())] if session else []
    peer = await open_peer(expect_welcome=False, headers=headers)
    if welcome:
        peer.welcome = await peer.call({"type": "hello", "monitor": True})
        assert peer.welcome["type"] == "welcome", peer.welcome
    return peer


async def refused(peer: Peer) -> tuple[str, int]:
    """The error a refused monitor hears, and the close code that follows it."""
    error = await peer.call({"type": "hello", "monitor": True})
    close = await peer.comm.receive_output(timeout=TIMEOUT)
    return error["code"], close["code"]


@database_sync_to_async
def table_counts() -> dict[str, int]:
    models = (TaskRecord, TaskEvent, Assignment, Instance, Subscription, Monitor)
    return {model.__name__: model.objects.count() for model in models}


@database_sync_to_async
def task_state(task_id: str) -> tuple[Any, ...]:
    return TaskRecord.objects.values_list("status", "attempt", "version", "watched", "progress").get(pk=task_id)


async def parties(action: str = "mail:send") -> tuple[Peer, Peer]:
    """A worker subscribed to ``action`` and a caller that may publish it."""
    _, worker_key = await credential("mailer", sub=["mail"])
    _, caller_key = await credential("app", pub=["mail"])
    worker = await open_peer("mailer", worker_key)
    await worker.call({"type": "sub", "action": action})
    return worker, await open_peer("app", caller_key)


async def transitions_of(peer: Peer, task_id: str, until: str) -> list[dict[str, Any]]:
    """The ``transition`` messages of the task the monitor hears, up to the one with an
    event of kind ``until``."""
    heard = []
    while True:
        message = await peer.expect(lambda m: m["type"] == "transition" and m["task"]["id"] == task_id)
        heard.append(message)
        if any(e["kind"] == until for e in message["events"]):
            return heard


# -- who may monitor -------------------------------------------------------------------------


async def test_a_staff_session_is_welcomed_as_a_monitor_without_an_instance():
    peer = await monitor(await session_of("alice"))
    assert peer.welcome == {
        "type": "welcome",
        "v": 1,
        "monitor": True,
        "user": "alice",
        "max_message_size": 786432,
        "max_payload_size": 524288,
        "ref": "r",
    }
    counts = await table_counts()
    assert (counts["Instance"], counts["Subscription"], counts["Monitor"]) == (0, 0, 1)
    assert (await peer.call({"type": "ping"}))["type"] == "pong"
    again = await peer.call({"type": "hello", "monitor": True})
    assert again["code"] == "already_authenticated"
    await peer.close()
    assert (await table_counts())["Monitor"] == 0  # gone with its connection


@pytest.mark.parametrize(
    ("who", "detail"),
    [
        ("anonymous", "log in to the admin first"),
        ("not staff", "is not staff"),
        # Django's session backend drops an inactive user's session: anonymous again.
        ("inactive staff", "log in to the admin first"),
    ],
)
async def test_others_are_refused_with_4001_and_register_nothing(who, detail):
    session = None
    if who != "anonymous":
        session = await session_of(staff=who == "inactive staff", active=who != "inactive staff")
    peer = await monitor(session, welcome=False)
    await peer.send({"type": "hello", "monitor": True, "ref": 7})
    error = await peer.recv()
    assert (error["type"], error["code"], error["ref"]) == ("error", "authentication_failed", 7)
    assert detail in error["detail"]
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 4001
    assert (await table_counts())["Monitor"] == 0


async def test_a_service_key_does_not_make_a_monitor_and_a_monitor_needs_no_key():
    _, key = await credential("svc")
    peer = await open_peer("svc", key)  # a service: authenticated at the handshake
    assert (await peer.call({"type": "hello", "monitor": True}))["code"] == "already_authenticated"
    assert (await peer.call({"type": "stats"}))["code"] == "permission_denied"
    await peer.close()
    # Without a session, a name and a key beside monitor: true are not read.
    stranger = await monitor(welcome=False)
    error = await stranger.call({"type": "hello", "monitor": True, "name": "svc", "key": key})
    assert error["code"] == "authentication_failed"


async def test_without_the_auth_middleware_the_refusal_says_what_to_add():
    communicator = WebsocketCommunicator(TaskHubConsumer.as_asgi(), "/ws/taskhub/")
    assert (await communicator.connect(timeout=TIMEOUT))[0]
    peer = Peer(communicator)
    error = await peer.call({"type": "hello", "monitor": True})
    assert error["code"] == "authentication_failed" and "AuthMiddlewareStack" in error["detail"]


@override_settings(TASKHUB_AUTH_FAILURES=2)
async def test_refused_monitors_count_as_failed_authentications():
    for _ in range(2):
        assert await refused(await monitor(welcome=False)) == ("authentication_failed", 4001)
    # Then even a staff session is turned away, as the right key is after wrong ones.
    assert await refused(await monitor(await session_of(), welcome=False)) == ("too_many_attempts", 4029)


@override_settings(TASKHUB_AUTH_TIMEOUT=0.2)
async def test_a_session_alone_is_no_hello_the_auth_timeout_still_closes():
    peer = await monitor(await session_of(), welcome=False)
    error = await peer.recv()
    assert error["code"] == "authentication_timeout"
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 4000


@override_settings(TASKHUB_INSTANCE_LEASE=0.3)
async def test_a_user_demoted_while_monitoring_is_closed_at_the_next_renewal():
    peer = await monitor(await session_of("bob"))
    await database_sync_to_async(get_user_model().objects.filter(username="bob").update)(is_staff=False)
    error = await peer.expect(lambda m: m["type"] == "error")
    assert error["code"] == "authentication_failed" and "may no longer monitor" in error["detail"]
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 4001
    assert (await table_counts())["Monitor"] == 0


@override_settings(TASKHUB_INSTANCE_LEASE=0.3)
async def test_a_live_monitor_renews_its_lease():
    peer = await monitor(await session_of())
    first = await database_sync_to_async(Monitor.objects.values_list("lease_expires_at", flat=True).get)()

    @database_sync_to_async
    def renewed() -> bool:
        return bool(Monitor.objects.filter(lease_expires_at__gt=first).exists())

    deadline = timezone.now() + timedelta(seconds=TIMEOUT)
    while not await renewed():
        assert timezone.now() < deadline, "the lease was not renewed"
        assert await peer.nothing()  # waits a moment; a monitor hears nothing meanwhile
    await peer.close()


async def test_bye_ends_a_monitor_with_1000():
    peer = await monitor(await session_of())
    assert (await peer.call({"type": "bye"}))["type"] == "ack"
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 1000
    assert (await table_counts())["Monitor"] == 0


# -- a monitor reads everything and changes nothing ------------------------------------------


async def test_every_command_that_changes_something_is_refused_and_changes_nothing():
    worker, caller = await parties()
    task_id = (await caller.call({"type": "pub", "action": "mail:send", "payload": [1]}))["task"]
    await worker.recv()
    await worker.call({"type": "pickup", "task": task_id, "attempt": 1})
    peer = await monitor(await session_of())
    before, state = await table_counts(), await task_state(task_id)
    work = {"task": task_id, "attempt": 1}
    commands: list[dict[str, Any]] = [
        {"type": "pub", "action": "mail:send", "payload": 1},
        {"type": "sub", "action": "mail:send"},
        {"type": "unsub", "action": "mail:send"},
        {"type": "cancel", "task": task_id},
        {"type": "retry", "task": task_id},
        {"type": "pickup", **work},
        {"type": "update", **work, "progress": 1},
        {"type": "touch", **work},
        {"type": "return", **work, "result": "forged"},
        {"type": "drop", **work},
        {"type": "fail", **work, "error": "forged"},
    ]
    for command in commands:
        answer = await peer.call(command)
        assert (answer["type"], answer["code"]) == ("error", "permission_denied"), command
        assert command["type"] in answer["detail"]
    assert await table_counts() == before
    assert await task_state(task_id) == state
    await worker.call({"type": "return", **work, "result": "real"})
    assert (await caller.expect(lambda m: m["type"] == "success"))["result"] == "real"
    for p in (peer, worker, caller):
        await p.close()


async def test_a_monitor_lists_watches_and_reads_the_payload_of_every_task():
    worker, caller = await parties()
    _, other_key = await credential("other", pub=["mail"])
    other = await open_peer("other", other_key)
    first = (await caller.call({"type": "pub", "action": "mail:send", "payload": {"to": "a"}}))["task"]
    second = (await other.call({"type": "pub", "action": "mail:other", "payload": "x"}))["task"]
    await worker.recv()
    await worker.call({"type": "update", "task": first, "attempt": 1, "progress": 0.25})
    peer = await monitor(await session_of())

    listed = await peer.call({"type": "tasks"})
    assert [t["id"] for t in listed["tasks"]] == [second, first]  # every publisher's, newest first
    row = listed["tasks"][1]
    assert (row["status"], row["progress"], row["publisher"]) == ("started", 0.25, "app")
    assert row["services"] == [{"service": "mailer", "state": "picked_up"}]
    assert row["version"] == (await task_state(first))[2] and row["started_at"] is not None
    assert listed["tasks"][0]["services"] == []  # nobody subscribed to mail:other
    assert [t["id"] for t in (await peer.call({"type": "tasks", "service": "mailer"}))["tasks"]] == [first]
    assert [t["id"] for t in (await peer.call({"type": "tasks", "status": "pending"}))["tasks"]] == [second]
    assert (await peer.call({"type": "tasks", "service": "bad name"}))["code"] == "invalid_field"

    state = await peer.call({"type": "watch", "task": first})
    assert [e["kind"] for e in state["events"]] == ["init", "start", "pickup", "update"]
    assert state["task"]["services"] == [{"service": "mailer", "state": "picked_up"}]
    assert (await task_state(first))[3] is False  # a monitor's watch marks nothing
    assert (await peer.call({"type": "get_payload", "task": second}))["payload"] == "x"
    unknown = "00000000-0000-4000-8000-000000000000"
    assert (await peer.call({"type": "watch", "task": unknown}))["code"] == "unknown_task"
    assert (await peer.call({"type": "get_payload", "task": unknown}))["code"] == "unknown_task"
    for p in (peer, worker, caller, other):
        await p.close()


async def test_tasks_with_a_service_filter_stays_within_a_credentials_own_tasks():
    worker, caller = await parties()
    mine = (await caller.call({"type": "pub", "action": "mail:send"}))["task"]
    _, other_key = await credential("other", pub=["mail"])
    other = await open_peer("other", other_key)
    await other.call({"type": "pub", "action": "mail:send"})  # offered to mailer too
    listed = await caller.call({"type": "tasks", "service": "mailer"})
    assert [t["id"] for t in listed["tasks"]] == [mine]
    assert "services" not in listed["tasks"][0]  # the monitors' fields are theirs
    assert len((await worker.call({"type": "tasks", "service": "mailer"}))["tasks"]) == 2
    for p in (worker, caller, other):
        await p.close()


async def test_stats_counts_services_instances_actions_and_waiting_tasks():
    worker, caller = await parties()
    done = (await caller.call({"type": "pub", "action": "mail:send"}))["task"]
    await worker.recv()
    await worker.call({"type": "return", "task": done, "attempt": 1, "result": 1})
    running = (await caller.call({"type": "pub", "action": "mail:send"}))["task"]
    await worker.recv()
    await worker.call({"type": "pickup", "task": running, "attempt": 1})
    waiting = (await caller.call({"type": "pub", "action": "mail:nobody"}))["task"]
    await credential("idle", sub=["mail"], active=False)
    peer = await monitor(await session_of())

    stats = await peer.call({"type": "stats"})
    assert stats["type"] == "stats" and stats["monitors"] == 1 and "more" not in stats
    services = {s["name"]: s for s in stats["services"]}
    assert set(services) == {"mailer", "app"}  # a disabled credential without instances is left out
    (instance,) = services["mailer"]["instances"]
    assert (instance["subscriptions"], instance["holding"], instance["detached_at"]) == (["mail:send"], 1, None)
    actions = {a["action"]: a for a in stats["actions"]}
    send = actions["mail:send"]
    assert (send["pending"], send["started"], send["subscribers"]) == (0, 1, 1)
    assert send["minute"] == send["hour"] == {"published": 2, "success": 1, "failed": 0, "ended": 0}
    assert (actions["mail:nobody"]["pending"], actions["mail:nobody"]["subscribers"]) == (0 + 1, 0)
    assert stats["waiting"]["count"] == 1 and [t["id"] for t in stats["waiting"]["tasks"]] == [waiting]
    for p in (peer, worker, caller):
        await p.close()


def test_rates_count_each_window_apart():
    make_credential("app", pub=["mail"])
    now = timezone.now()
    for minutes, status in ((0.5, "success"), (30, "failed"), (90, "success")):
        at = now - timedelta(minutes=minutes)
        TaskRecord.objects.create(
            action="mail:send", publisher_name="app", status=status, created_at=at, finished_at=at
        )
    (send,) = queries.stats(now)["actions"]
    assert send["minute"] == {"published": 1, "success": 1, "failed": 0, "ended": 0}
    assert send["hour"] == {"published": 2, "success": 1, "failed": 1, "ended": 0}


# -- the feed --------------------------------------------------------------------------------


async def test_a_monitor_hears_every_transition_of_every_task():
    peer = await monitor(await session_of())
    worker, caller = await parties()
    task_id = (await caller.call({"type": "pub", "action": "mail:send", "payload": 1}))["task"]
    await worker.recv()
    await worker.call({"type": "pickup", "task": task_id, "attempt": 1})
    await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": {"n": 1}, "progress": 0.5})
    await worker.call({"type": "return", "task": task_id, "attempt": 1, "result": "done"})
    heard = await transitions_of(peer, task_id, "end")
    kinds = [[e["kind"] for e in m["events"]] for m in heard]
    assert kinds == [["init", "start"], ["pickup"], ["update"], ["success", "end"]]
    assert [m["task"]["status"] for m in heard] == ["started", "started", "started", "success"]
    versions = [m["task"]["version"] for m in heard]
    assert versions == sorted(set(versions))  # each newer than the last
    update = heard[2]
    assert update["task"]["progress"] == 0.5
    assert update["events"][0]["data"] == {"data": {"n": 1}, "progress": 0.5}
    assert update["events"][0]["service"] == "mailer"
    seqs = [e["seq"] for e in (await peer.call({"type": "watch", "task": task_id}))["events"]]
    assert [e["seq"] for m in heard for e in m["events"]] == seqs  # the seqs watch replays
    for p in (peer, worker, caller):
        await p.close()


async def test_a_value_too_large_for_the_feed_is_left_out_and_read_with_watch():
    peer = await monitor(await session_of())
    worker, caller = await parties()
    task_id = (await caller.call({"type": "pub", "action": "mail:send"}))["task"]
    await worker.recv()
    big = "x" * (routing.MONITOR_VALUE_LIMIT + 1)
    await peer.call({"type": "watch", "task": task_id})  # and follow it, as a watcher does
    await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": big, "progress": 0.9})
    transition = await peer.expect(lambda m: m["type"] == "transition" and m["events"][-1]["kind"] == "update")
    pickup, event = transition["events"]  # an update picks the task up
    assert pickup["kind"] == "pickup" and "omitted" not in pickup
    assert event["data"] == {"data": None, "progress": 0.9} and event["omitted"] == ["data"]
    relayed = await peer.expect(lambda m: m["type"] == "update")  # the watcher's message has it all
    assert relayed["data"] == big and relayed["progress"] == 0.9
    await worker.call({"type": "return", "task": task_id, "attempt": 1, "result": "ok"})
    assert [(await peer.expect(lambda m: m["type"] in ("success", "end")))["type"] for _ in range(2)] == [
        "success",
        "end",
    ]
    for p in (peer, worker, caller):
        await p.close()


async def test_a_service_connection_does_not_hear_the_monitors_feed():
    peer = await monitor(await session_of())
    worker, caller = await parties()
    _, key = await credential("bystander", sub=["other"])
    bystander = await open_peer("bystander", key)
    task_id = (await caller.call({"type": "pub", "action": "mail:send"}))["task"]
    await worker.recv()
    await transitions_of(peer, task_id, "start")
    assert await bystander.nothing() and await caller.nothing()
    for p in (peer, worker, caller, bystander):
        await p.close()


# -- the hot path without monitors -------------------------------------------------------------


def publish_one(action: str = "mail:send") -> list[routing.Notice]:
    from taskhub import services

    cred = make_credential(f"app{TaskRecord.objects.count()}", pub=["mail"])[0]
    _, _, notices = services.publish(cred, pub_command({"type": "pub", "action": action}), timezone.now())
    return notices


def to_monitors(notices: list[routing.Notice]) -> list[routing.Notice]:
    return [n for n in notices if n.name == routing.MONITOR_GROUP]


def presence_reads(captured: CaptureQueriesContext) -> int:
    return sum(Monitor._meta.db_table in q["sql"] for q in captured.captured_queries)


def test_without_a_live_monitor_nothing_is_sent_and_the_presence_is_read_once_a_second(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(routing, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    with CaptureQueriesContext(connection) as first:
        assert to_monitors(publish_one()) == []
    with CaptureQueriesContext(connection) as then:
        assert to_monitors(publish_one()) == []
        assert to_monitors(publish_one()) == []
    assert (presence_reads(first), presence_reads(then)) == (1, 0)
    clock[0] += routing.MONITOR_REFRESH
    with CaptureQueriesContext(connection) as later:
        assert to_monitors(publish_one()) == []
    assert presence_reads(later) == 1


def test_a_monitor_of_another_process_is_heard_of_after_the_refresh(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(routing, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    assert to_monitors(publish_one()) == []
    now = timezone.now()
    Monitor.objects.create(
        user="op", channel_name="elsewhere", process="another", connected_at=now, lease_expires_at=now + timedelta(1)
    )
    assert to_monitors(publish_one()) == []  # what this process read a moment ago still holds
    clock[0] += routing.MONITOR_REFRESH
    (notice,) = to_monitors(publish_one())
    assert notice.kind == "group" and notice.message["type"] == routing.MONITOR
    assert json.loads(json.dumps(notice.message["message"]))["type"] == "transition"
    # A monitor whose lease lapsed (its process died) is live no more.
    Monitor.objects.update(lease_expires_at=now - timedelta(seconds=1))
    clock[0] += routing.MONITOR_REFRESH
    assert to_monitors(publish_one()) == []


def test_a_failed_read_of_the_presence_keeps_what_was_known(monkeypatch):
    from django.db import DatabaseError

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseError("down")

    # Known live: a failed read keeps it live (and known not live, not live).
    now = timezone.now()
    Monitor.objects.create(
        user="op", channel_name="c0", process="p", connected_at=now, lease_expires_at=now + timedelta(1)
    )
    routing.forget_presence()
    assert routing.monitored() is True
    monkeypatch.setattr(Monitor.objects, "filter", broken)
    routing.forget_presence()
    assert routing.monitored() is True
    monkeypatch.undo()
    Monitor.objects.all().delete()
    routing.forget_presence()
    assert routing.monitored() is False
    monkeypatch.setattr(Monitor.objects, "filter", broken)
    routing.forget_presence()
    assert routing.monitored() is False
    monkeypatch.undo()
    routing.forget_presence()
    now = timezone.now()
    Monitor.objects.create(user="op", channel_name="c", process="p", connected_at=now, lease_expires_at=now)
    assert routing.monitored() is False  # lapsed the moment it was written


# -- the protocol's new frames, as the core reads and writes them ------------------------------


def test_a_monitor_hello_needs_no_name_or_key_and_its_flag_is_checked():
    from taskhub.core.commands import Hello, parse_command
    from taskhub.core.errors import InvalidMessage

    hello = parse_command({"type": "hello", "monitor": True, "ref": 1})
    assert isinstance(hello, Hello) and hello.monitor is True and hello.ref == 1
    with pytest.raises(InvalidMessage, match="'monitor' must be true or false"):
        parse_command({"type": "hello", "monitor": "yes"})
    with pytest.raises(InvalidMessage, match="'name' is required"):
        parse_command({"type": "hello", "monitor": False})  # a service's hello, then
    assert Hello.build(name="svc", key="k").to_dict() == {"type": "hello", "name": "svc", "key": "k"}


def test_the_monitors_messages_read_back_as_they_were_written():
    from taskhub.core.errors import InvalidMessage
    from taskhub.core.messages import Stats, Transition, Welcome, parse_message

    welcome = Welcome(monitor=True, user="alice", resumed=MISSING, max_message_size=10, ref=1).to_dict()
    assert welcome == {"type": "welcome", "v": 1, "monitor": True, "user": "alice", "max_message_size": 10, "ref": 1}
    parsed = parse_message(welcome)
    assert isinstance(parsed, Welcome) and (parsed.monitor, parsed.user, parsed.instance) == (True, "alice", MISSING)
    with pytest.raises(InvalidMessage, match="without 'service'"):
        parse_message({"type": "welcome", "instance": "i"})  # a service's welcome names both
    transition = Transition(task={"id": "t", "version": 2}, events=[{"seq": 3, "kind": "init"}])
    assert parse_message(transition.to_dict()) == transition
    stats = Stats(services=[], actions=[], waiting={"count": 0, "tasks": []}, monitors=1, at="now", ref="r")
    assert parse_message(stats.to_dict()) == stats
