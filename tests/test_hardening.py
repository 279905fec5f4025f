"""Hardening (issue 14) through WebsocketCommunicator and the services: values no database
stores, crashes that must not leave an instance behind, the authentication timer, the
failed-authentication throttle, the database's two lanes and sweeps under backlog."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError
from django.test import override_settings
from django.utils import timezone

from taskhub import auth, consumers, db, notify, services, sweeper, throttle
from taskhub.core import machine
from taskhub.models import Instance, TaskRecord

from .conftest import TIMEOUT, make_credential, open_peer, pub_command

pytestmark = pytest.mark.django_db(transaction=True)

credential = database_sync_to_async(make_credential)
TASK = "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"


@pytest.fixture(autouse=True)
def no_throttle_left_over():
    throttle.reset()
    yield
    throttle.reset()


@database_sync_to_async
def table_sizes() -> tuple[int, int]:
    return TaskRecord.objects.count(), Instance.objects.filter(detached_at__isnull=True).count()


async def app_peer():
    _, key = await credential("app", pub=["mail"], sub=["mail"])
    return await open_peer("app", key)


# -- values the hub cannot carry: a coded error, nothing changed, the connection serves on ---


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type":"ping","ref":"\\ud800"}', "invalid_value"),
        ('{"type":"ping","ref":1,"pad":' + "[" * 1000 + "]" * 1000 + "}", "invalid_value"),
        ('{"type":"pub","action":"mail:send","timeout":' + "9" * 400 + "}", "invalid_value"),
        ('{"type":"pub","action":"mail:send","pickup_timeout":3e11}', "invalid_field"),
        ('{"type":"pub","action":"mail:send","pickup_timeout":1e308}', "invalid_field"),
        ('{"type":"pub","action":"mail:send","timeout":1e12}', "invalid_field"),
        ('{"type":"pub","action":"mail:send","payload":1e400}', "invalid_value"),
        ('{"type":"pub","action":"mail:send","payload":1e999}', "invalid_value"),
        ('{"type":"pub","action":"mail:send","payload":{"a":"\\udc00"}}', "invalid_value"),
        ('{"type":"pub","action":"mail:send","payload":"a\\u0000b"}', "invalid_value"),
        ('{"type":"pub","action":"mail:send","payload":{"a\\u0000":1}}', "invalid_value"),
        ('{"type":"sub","action":5}', "invalid_field"),
        ('{"type":"watch","task":"8D7F6A0E-3B7C-4F4E-9A51-2D6F0F1F6B2A"}', "invalid_field"),
        ('{"type":"watch","task":"8d7f6a0e3b7c4f4e9a512d6f0f1f6b2a"}', "invalid_field"),
    ],
)
async def test_values_no_database_stores_are_refused_and_change_nothing(frame, code):
    peer = await app_peer()
    await peer.send(frame)
    error = await peer.recv()
    assert (error["type"], error["code"]) == ("error", code), error
    assert await table_sizes() == (0, 1)
    assert (await peer.call({"type": "ping"}))["type"] == "pong"
    await peer.close()


async def test_update_data_and_results_with_bad_strings_are_refused_and_the_task_goes_on():
    peer = await app_peer()
    assert (await peer.call({"type": "sub", "action": "mail:send"}))["type"] == "ack"
    task_id = (await peer.call({"type": "pub", "action": "mail:send"}))["task"]
    offer = await peer.recv()
    assert offer["type"] == "task"
    for frame in (
        {"type": "update", "task": task_id, "attempt": 1, "data": "\x00"},
        {"type": "return", "task": task_id, "attempt": 1, "result": ["\ud800"]},
        {"type": "fail", "task": task_id, "attempt": 1, "error": "bad \x00 text"},
    ):
        assert (await peer.call(frame))["code"] == "invalid_value"
    assert (await peer.call({"type": "return", "task": task_id, "attempt": 1, "result": "fine"}))["type"] == "ack"
    assert (await database_sync_to_async(TaskRecord.objects.get)(pk=task_id)).status == "success"
    await peer.close()


# -- the authentication timer ---------------------------------------------------------------


@override_settings(TASKHUB_AUTH_TIMEOUT=0.3)
@pytest.mark.parametrize("name", ["\\u0000", "\\ud800", "nobody"])
async def test_a_failed_hello_never_leaves_the_connection_open_unauthenticated(name):
    peer = await open_peer(expect_welcome=False)
    await peer.send('{"type":"hello","name":"' + name + '","key":"k"}')
    error = await peer.recv()
    assert error["code"] in {"invalid_value", "authentication_failed"}
    if error["code"] == "invalid_value":  # refused before authentication: the timer runs on
        assert (await peer.recv())["code"] == "authentication_timeout"
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] in {4000, 4001}


@override_settings(TASKHUB_AUTH_TIMEOUT=0.3)
async def test_a_hello_that_fails_inside_the_hub_is_refused_with_1011(monkeypatch):
    _, key = await credential("svc")

    def broken(name: str, key: str) -> Any:
        raise RuntimeError("the database is down")

    monkeypatch.setattr(services, "authenticate", broken)
    peer = await open_peer(expect_welcome=False)
    answer = await peer.call({"type": "hello", "name": "svc", "key": key})
    assert answer["code"] == "internal_error"
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 1011
    assert await table_sizes() == (0, 0)


# -- no instance outlives its connection ----------------------------------------------------


async def test_a_consumer_that_fails_closes_with_1011_and_its_instance_is_detached():
    peer = await app_peer()
    channel = await database_sync_to_async(lambda: Instance.objects.get().channel_name)()
    # A layer message the consumer cannot handle (a bug, as far as it knows).
    await notify.send_notices(None, [services.Notice("channel", channel, {"type": "taskhub.relay"})])
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 1011
    await peer.close()
    assert await table_sizes() == (0, 0)


async def test_a_consumer_that_ends_without_a_disconnect_detaches_its_instance():
    peer = await app_peer()
    # A cleanup an earlier test's loop closed on stays in the set: only this one's is awaited.
    earlier = set(consumers._cleanups)
    peer.comm.future.cancel()  # what a server does to an application that would not stop
    with pytest.raises(asyncio.CancelledError):
        await peer.comm.future
    await asyncio.wait_for(asyncio.gather(*(consumers._cleanups - earlier)), TIMEOUT)
    assert await table_sizes() == (0, 0)


def test_the_sweeper_detaches_instances_whose_connection_this_process_no_longer_has():
    app, _ = make_credential("app")
    now = timezone.now()
    for channel in ("alive", "crashed"):
        services.connect(app if channel == "alive" else make_credential("b")[0], channel, "p", "", now)
    later = now + timedelta(seconds=5)
    services.renew_leases("p", later, frozenset({"alive"}))
    alive, crashed = (Instance.objects.get(credential__name=n) for n in ("app", "b"))
    assert alive.detached_at is None and alive.lease_expires_at > later
    assert crashed.detached_at == later and crashed.channel_name == ""


# -- the failed-authentication throttle -----------------------------------------------------


def test_the_throttle_counts_per_address_and_per_name_within_the_window(settings):
    settings.TASKHUB_AUTH_FAILURES, settings.TASKHUB_AUTH_FAILURE_WINDOW = 3, 60.0
    for i in range(3):
        throttle.check("10.0.0.1", f"n{i}", 100.0)
        throttle.settle("10.0.0.1", f"n{i}", 100.0, failed=True)
    with pytest.raises(Exception, match="from this address: try again in 60 s") as info:
        throttle.check("10.0.0.1", "other", 100.0)
    assert info.value.code == "too_many_attempts"  # type: ignore[attr-defined]
    throttle.check("10.0.0.2", "other", 100.0)  # another address may still try
    throttle.check("10.0.0.1", "other", 160.0)  # and this one once the window has passed
    for address in ("a", "b", "c"):
        throttle.check(address, "target", 200.0)
        throttle.settle(address, "target", 200.0, failed=True)
    with pytest.raises(Exception, match="for 'target'"):
        throttle.check("d", "target", 200.0)


def test_attempts_in_flight_count_against_the_limit(settings):
    # Hellos sent at once must not all get through before the first one fails.
    settings.TASKHUB_AUTH_FAILURES = 3
    assert all(throttle.check("10.0.0.1", "svc", 1.0) for _ in range(3))
    assert throttle.check("10.0.0.1", "svc", 1.0) is False  # wait: three are in flight
    for _ in range(3):  # they all succeed: nothing is held against the address
        throttle.settle("10.0.0.1", "svc", 1.0, failed=False)
    assert throttle.check("10.0.0.1", "svc", 1.0) is True


async def test_a_burst_of_right_keys_queues_and_a_burst_of_wrong_ones_stops_at_the_limit(settings):
    settings.TASKHUB_AUTH_FAILURES = 3
    admitted: list[int] = []

    async def attempt(i: int) -> None:
        await throttle.admit("10.0.0.1", "svc")
        admitted.append(i)

    right = [asyncio.ensure_future(attempt(i)) for i in range(10)]
    await asyncio.wait_for(until(lambda: len(admitted) == 3), TIMEOUT)
    while len(admitted) < 10:  # each success lets one more in; none is refused
        seen = len(admitted)
        throttle.settle("10.0.0.1", "svc", 1.0, failed=False)
        await asyncio.wait_for(until(lambda n=seen: len(admitted) > n), TIMEOUT)
    for _ in range(3):
        throttle.settle("10.0.0.1", "svc", 1.0, failed=False)
    await asyncio.gather(*right)

    admitted.clear()
    wrong = [asyncio.ensure_future(attempt(i)) for i in range(10)]
    await asyncio.wait_for(until(lambda: len(admitted) == 3), TIMEOUT)
    for _ in range(3):  # the three in flight fail: the seven waiting are refused
        throttle.settle("10.0.0.1", "svc", time.monotonic(), failed=True)
    results = await asyncio.wait_for(asyncio.gather(*wrong, return_exceptions=True), TIMEOUT)
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 7 and all(e.code == "too_many_attempts" for e in refused)  # type: ignore[attr-defined]


async def test_a_burst_waits_in_order_and_each_settle_wakes_only_whom_it_made_room_for(monkeypatch, settings):
    # 2,000 right keys from one address at once (a fleet reconnecting through one NAT):
    # before, every settle woke every waiting attempt to check again, 290,000 checks that
    # stalled the hub's other connections for seconds.
    settings.TASKHUB_AUTH_FAILURES = 3
    checks = 0
    real = throttle._full

    def counted(*args: Any) -> Any:
        nonlocal checks
        checks += 1
        return real(*args)

    monkeypatch.setattr(throttle, "_full", counted)
    admitted: list[int] = []

    async def attempt(i: int) -> None:
        await throttle.admit("10.0.0.1", "svc")
        admitted.append(i)

    burst = [asyncio.ensure_future(attempt(i)) for i in range(500)]
    await asyncio.wait_for(until(lambda: len(admitted) == 3), TIMEOUT)
    while len(admitted) < 500:
        seen = len(admitted)
        throttle.settle("10.0.0.1", "svc", 1.0, failed=False)
        await asyncio.wait_for(until(lambda n=seen: len(admitted) > n), TIMEOUT)
    await asyncio.gather(*burst)
    assert admitted == list(range(500))  # in the order they came
    assert checks < 3 * 500  # a few per attempt, not one per attempt waiting per settle


async def test_a_waiter_blocked_by_its_name_is_let_in_when_that_name_settles(settings):
    settings.TASKHUB_AUTH_FAILURES = 2
    assert throttle.check("10.0.0.1", "svc", 1.0) and throttle.check("10.0.0.2", "svc", 1.0)
    waiting = asyncio.ensure_future(throttle.admit("10.0.0.3", "svc"))  # its address has room
    await asyncio.wait_for(until(lambda: sum(map(len, throttle._waiting.values())) == 1), TIMEOUT)
    assert not waiting.done()
    throttle.settle("10.0.0.2", "svc", 1.0, failed=False)
    await asyncio.wait_for(waiting, TIMEOUT)


async def test_an_attempt_cancelled_as_it_was_let_in_gives_its_room_to_the_next(settings):
    settings.TASKHUB_AUTH_FAILURES = 1
    assert throttle.check("10.0.0.1", "svc", 1.0)
    first = asyncio.ensure_future(throttle.admit("10.0.0.1", "svc"))
    second = asyncio.ensure_future(throttle.admit("10.0.0.1", "svc"))
    await asyncio.wait_for(until(lambda: sum(map(len, throttle._waiting.values())) == 2), TIMEOUT)
    throttle.settle("10.0.0.1", "svc", 1.0, failed=False)  # lets the first in...
    first.cancel()  # ...whose client hung up before it could go on
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, TIMEOUT)  # its room went to the second
    assert throttle.check("10.0.0.1", "svc", 1.0) is False  # and only to the second


async def until(condition: Any) -> None:
    """Until ``condition()`` holds, letting the event loop run the attempts."""
    while not condition():
        await asyncio.sleep(0)


def test_the_throttle_forgets_the_oldest_beyond_its_bound(monkeypatch, settings):
    monkeypatch.setattr(throttle, "MAX_KEYS", 10)
    settings.TASKHUB_AUTH_FAILURES = 100
    for i in range(20):
        throttle.check(f"10.0.0.{i}", f"name{i}", 1.0)
        throttle.settle(f"10.0.0.{i}", f"name{i}", 1.0, failed=True)
    assert len(throttle._failures) <= 10


@override_settings(TASKHUB_AUTH_FAILURES=3)
async def test_too_many_failed_hellos_refuse_even_the_right_key_with_4029():
    _, key = await credential("svc")
    for _ in range(3):
        peer = await open_peer("svc", "wrong-key-wrong-key", expect_welcome=False)
        assert (await peer.recv())["code"] == "authentication_failed"
    peer = await open_peer("svc", key, expect_welcome=False)
    error = await peer.recv()
    assert error["code"] == "too_many_attempts" and "try again in" in error["detail"]
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 4029
    assert await table_sizes() == (0, 0)


def test_unknown_names_and_wrong_keys_take_the_same_path(monkeypatch):
    make_credential("svc")
    verified: list[str] = []
    real = auth.verify_key

    def verify(key: str, stored: str) -> bool:
        verified.append(key)
        return real(key, stored)

    monkeypatch.setattr(services.instances, "verify_key", verify)
    for name in ("svc", "nobody"):
        with pytest.raises(Exception, match="invalid name or key"):
            services.authenticate(name, "wrong-key-wrong-key")
    assert verified == ["wrong-key-wrong-key"] * 2


# -- the database's two lanes ---------------------------------------------------------------


@override_settings(TASKHUB_SQLITE_INLINE=False, TASKHUB_DB_THREADS=1)
async def test_deferred_calls_wait_behind_every_urgent_call():
    gate, blocker, order = await occupied()  # the database thread is busy
    # Connects queue first, then commands of established connections.
    deferred = [asyncio.ensure_future(db.run_deferred(order.append, f"connect{i}")) for i in range(20)]
    urgent = [asyncio.ensure_future(db.run(order.append, f"command{i}")) for i in range(3)]
    await asyncio.wait_for(queued(24), TIMEOUT)
    gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *deferred, *urgent), TIMEOUT)
    assert order[:3] == ["command0", "command1", "command2"]
    assert sorted(order[3:]) == sorted(f"connect{i}" for i in range(20))


async def occupied() -> tuple[threading.Event, asyncio.Future[None], list[str]]:
    """The database thread busy until the returned gate is set; the blocking call; a list
    that the calls under test append to, in the order they run."""
    entered, gate = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        gate.wait(TIMEOUT)

    blocker = asyncio.ensure_future(db.run(block))
    await asyncio.to_thread(entered.wait, TIMEOUT)
    return gate, blocker, []


async def queued(calls: int) -> None:
    """Until ``calls`` database calls wait (each task has taken its first step)."""
    while db._get_pool().pending < calls:
        await asyncio.sleep(0)


@override_settings(TASKHUB_SQLITE_INLINE=False, TASKHUB_DB_THREADS=1)
async def test_a_deferred_call_is_not_starved_by_a_stream_of_urgent_ones():
    gate, blocker, order = await occupied()
    deferred = asyncio.ensure_future(db.run_deferred(order.append, "connect"))
    urgent = [asyncio.ensure_future(db.run(order.append, f"command{i}")) for i in range(3 * db.DEFERRED_EVERY)]
    await asyncio.wait_for(queued(2 + 3 * db.DEFERRED_EVERY), TIMEOUT)
    gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, deferred, *urgent), TIMEOUT)
    assert order.index("connect") <= db.DEFERRED_EVERY


async def test_deferred_calls_run_on_the_database_thread_even_when_it_is_idle():
    # Inline, a burst of connects would run back to back on the event loop's thread.
    name = await db.run_deferred(lambda: threading.current_thread().name)
    assert name.startswith("taskhub-db")


# -- sweeps under backlog -------------------------------------------------------------------


def test_a_sweep_expires_a_backlog_far_larger_than_a_batch():
    app, _ = make_credential("app", pub=["mail"])
    now = timezone.now()
    count = 5 * services.SWEEP_BATCH + 7
    for _ in range(count):
        services.publish(app, pub_command({"type": "pub", "action": "mail:send", "pickup_timeout": 1}), now)
    services.sweep("p", now + timedelta(seconds=2))
    assert TaskRecord.objects.filter(status="failed").count() == count


async def test_the_sweeper_expires_a_backlog_in_one_pass_and_skips_a_task_it_cannot_expire(monkeypatch):
    app, _ = await credential("app", pub=["mail"])
    now = timezone.now()

    def publish_many() -> list[str]:
        command = pub_command({"type": "pub", "action": "mail:send", "pickup_timeout": 1})
        return [services.publish(app, command, now)[0] for _ in range(3 * services.SWEEP_BATCH)]

    ids = await database_sync_to_async(publish_many)()
    broken = ids[0]
    real = machine.expire

    def expire(task: Any, when: Any) -> Any:
        if str(task.id) == broken:
            raise RuntimeError("a bug")
        return real(task, when)

    monkeypatch.setattr(machine, "expire", expire)
    await asyncio.wait_for(sweeper.sweep_once(now + timedelta(seconds=2)), TIMEOUT)
    statuses = await database_sync_to_async(lambda: dict(TaskRecord.objects.values_list("id", "status")))()
    assert statuses.pop(uuid.UUID(broken)) == "pending"
    assert set(statuses.values()) == {"failed"}


# -- nothing of a task reaches a connection that may not see it -----------------------------


@pytest.mark.parametrize("command", ["watch", "retry"])
async def test_a_refused_watch_or_retry_hears_nothing_of_the_task_even_from_the_sweeper(command):
    _, wkey = await credential("w", sub=["mail"])
    w = await open_peer("w", wkey)
    await w.call({"type": "sub", "action": "mail:send"})
    app = await app_peer()
    _, skey = await credential("stranger", pub=["mail"])
    stranger = await open_peer("stranger", skey)
    task_id = (await app.call({"type": "pub", "action": "mail:send"}))["task"]
    assert (await w.recv())["type"] == "task"
    assert (await stranger.call({"type": command, "task": task_id}))["code"] == "unknown_task"
    await w.call({"type": "update", "task": task_id, "attempt": 1, "data": "secret progress"})
    await w.call({"type": "return", "task": task_id, "attempt": 1, "result": "SECRET"})
    await sweeper.sweep_once()  # recovery: sends each connection what it missed of its tasks
    assert await stranger.nothing()
    for peer in (w, app, stranger):
        await peer.close()


# -- release and resume race safely ---------------------------------------------------------


@override_settings(TASKHUB_RESUME_GRACE=10.0)
def test_an_instance_resumed_after_the_sweeper_listed_it_is_not_released():
    a, _ = make_credential("a", sub=["mail"])
    now = timezone.now()
    session = services.connect(a, "chan-1", "p", "", now)
    services.detach(session.instance.pk, "chan-1", now)
    later = now + timedelta(seconds=11)
    assert services.instances.lapsed(later, 10) == [session.instance.pk]  # the sweeper reads...
    resumed = services.connect(a, "chan-2", "q", "", later, resume=session.token)  # ...the client is back
    assert resumed.resumed
    assert services.release(session.instance.pk, later, only_if_gone=True) == []  # ...nothing happens
    assert Instance.objects.get(pk=session.instance.pk).channel_name == "chan-2"


@override_settings(TASKHUB_INSTANCE_LEASE=10.0, TASKHUB_RESUME_GRACE=10.0)
def test_instances_of_a_dead_process_get_the_resume_grace_after_their_lease():
    a, _ = make_credential("a")
    now = timezone.now()
    session = services.connect(a, "chan-1", "dead", "", now)
    assert services.instances.lapsed(now + timedelta(seconds=15), 10) == []  # lapsed, still resumable
    assert services.connect(a, "chan-2", "q", "", now + timedelta(seconds=15), resume=session.token).resumed
    services.detach(session.instance.pk, "chan-2", now + timedelta(seconds=15))
    assert services.instances.lapsed(now + timedelta(seconds=26), 10) == [session.instance.pk]


# -- browser origins ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("debug", "hosts", "origin", "accepted"),
    [
        (True, [], "http://localhost:3000", True),
        (True, [], "http://127.0.0.1", True),
        (True, [], "http://evil.example", False),
        (False, [], "http://localhost", False),
        (False, ["hub.example.org"], "https://hub.example.org", True),
        (False, ["hub.example.org"], "https://evil.example", False),
    ],
)
async def test_browser_origins_are_checked_against_allowed_hosts(settings, debug, hosts, origin, accepted):
    from channels.testing import WebsocketCommunicator

    from hubproject.asgi import application

    settings.DEBUG, settings.ALLOWED_HOSTS = debug, hosts
    communicator = WebsocketCommunicator(application, "/ws/taskhub/", headers=[(b"origin", origin.encode())])
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected is accepted
    await communicator.disconnect()


@override_settings(TASKHUB_RESUME_GRACE=1.0)
async def test_an_instance_that_cannot_be_released_does_not_stop_the_sweep(monkeypatch):
    from taskhub.services import sweeping

    app, _ = await credential("app", pub=["mail"])
    now = timezone.now()

    def setup() -> tuple[Any, str]:
        session = services.connect(make_credential("w", sub=["mail"])[0], "chan-w", "p", "", now)
        services.detach(session.instance.pk, "chan-w", now)
        command = pub_command({"type": "pub", "action": "mail:send", "pickup_timeout": 1})
        return session.instance.pk, services.publish(app, command, now)[0]

    stuck, task_id = await database_sync_to_async(setup)()
    real = services.release  # what the sweeper calls, patched below

    def release(instance_id: Any, when: Any, **kwargs: Any) -> Any:
        if instance_id == stuck:
            raise RuntimeError("a bug")
        return real(instance_id, when, **kwargs)

    monkeypatch.setattr(sweeping, "release", release)
    await asyncio.wait_for(sweeper.sweep_once(now + timedelta(seconds=5)), TIMEOUT)
    assert (await database_sync_to_async(TaskRecord.objects.get)(pk=task_id)).status == "failed"


def locked() -> OperationalError:
    return OperationalError("database is locked")  # what SQLite says, inline, while another connection writes


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch runs inline, on the event loop's thread (taskhub.db), where the lock is
    not waited for."""
    monkeypatch.setattr(db._local, "inline", True, raising=False)


@override_settings(TASKHUB_RESUME_GRACE=1.0)
@pytest.mark.usefixtures("inline")
def test_sqlite_locked_mid_batch_ends_the_release_batch_with_what_it_did(monkeypatch):
    """The lock is not one instance's trouble: the batch stops instead of logging every
    later instance as broken, and the next batch starts after the last one released."""
    from taskhub.services import sweeping

    w, _ = make_credential("w", sub=["mail"], max_instances=3)
    now = timezone.now()
    for channel in ("chan-1", "chan-2", "chan-3"):
        services.detach(services.connect(w, channel, "p", "", now).instance.pk, channel, now)
    first, second, third = services.instances.lapsed(now + timedelta(seconds=5), 10)
    real = services.release

    def release(instance_id: Any, when: Any, **kwargs: Any) -> Any:
        if instance_id == second:
            raise locked()
        return real(instance_id, when, **kwargs)

    monkeypatch.setattr(sweeping, "release", release)
    assert services.release_lapsed(now + timedelta(seconds=5), 10) == ([], first)
    assert set(Instance.objects.values_list("pk", flat=True)) == {second, third}


@override_settings(TASKHUB_RESUME_GRACE=1.0)
@pytest.mark.usefixtures("inline")
def test_sqlite_locked_at_the_first_instance_is_raised_so_the_batch_runs_again(monkeypatch):
    from taskhub.services import sweeping

    w, _ = make_credential("w", sub=["mail"])
    now = timezone.now()
    services.detach(services.connect(w, "chan-1", "p", "", now).instance.pk, "chan-1", now)
    monkeypatch.setattr(sweeping, "release", lambda *args, **kwargs: (_ for _ in ()).throw(locked()))
    with pytest.raises(OperationalError):
        services.release_lapsed(now + timedelta(seconds=5), 10)
    assert Instance.objects.count() == 1


def overdue_locked_at(monkeypatch: pytest.MonkeyPatch, count: int, where: int) -> tuple[list[uuid.UUID], Any]:
    """``count`` tasks past their pickup timeout, the ``where``-th of which finds SQLite
    locked when it is expired; and when to expire them."""
    app, _ = make_credential("app", pub=["mail"])
    now = timezone.now()
    command = pub_command({"type": "pub", "action": "mail:send", "pickup_timeout": 1})
    ids = [uuid.UUID(services.publish(app, command, now)[0]) for _ in range(count)]
    real = machine.expire

    def expire(task: Any, when: Any) -> Any:
        if str(task.id) == str(ids[where]):
            raise locked()
        return real(task, when)

    monkeypatch.setattr(machine, "expire", expire)
    return ids, now + timedelta(seconds=2)


@pytest.mark.parametrize("where", [0, 1])
@pytest.mark.usefixtures("inline")
def test_sqlite_locked_while_expiring_is_raised_first_and_ends_the_batch_after(monkeypatch, where):
    ids, now = overdue_locked_at(monkeypatch, 3, where)
    if where == 0:
        with pytest.raises(OperationalError):
            services.expire(ids, now)
    else:
        services.expire(ids, now)
    statuses = [TaskRecord.objects.get(pk=task_id).status for task_id in ids]
    assert statuses == (["pending"] * 3 if where == 0 else ["failed", "pending", "pending"])


def test_on_the_database_thread_a_lock_that_outlasted_its_wait_is_one_tasks_failure(monkeypatch, caplog):
    ids, now = overdue_locked_at(monkeypatch, 2, 0)
    services.expire(ids, now)
    assert [TaskRecord.objects.get(pk=task_id).status for task_id in ids] == ["pending", "failed"]
    assert "could not expire task" in caplog.text


# -- handshake headers ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["\u00b9".encode("latin-1"), b"9" * 23, b"0", b"-1", b"100001", b"two"])
async def test_a_bad_concurrency_header_is_refused_with_a_coded_error(value):
    _, key = await credential("svc")
    headers = [(b"taskhub-concurrency", value)]
    peer = await open_peer("svc", key, expect_welcome=False, headers=headers)
    error = await peer.recv()
    assert (error["code"], "TaskHub-Concurrency" in error["detail"]) == ("invalid_field", True)
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 4001
    assert await table_sizes() == (0, 0)


@pytest.mark.parametrize("name", ["svc\x00", "x" * 5000, "\u00e9\x00"])
async def test_a_basic_auth_name_no_database_holds_is_an_unknown_name(name):
    await credential("svc")
    peer = await open_peer(name, "wrong-key-wrong-key", expect_welcome=False)
    assert (await peer.recv())["code"] == "authentication_failed"
    assert (await peer.comm.receive_output(timeout=TIMEOUT))["code"] == 4001


# -- answers stay within the message size ----------------------------------------------------


async def answer_text(peer: Any, ref: str) -> str:
    """The raw text of the answer with ``ref`` (task events that come first are skipped)."""
    while True:
        text = (await peer.comm.receive_output(timeout=TIMEOUT))["text"]
        if json.loads(text).get("ref") == ref:
            return str(text)


@override_settings(TASKHUB_MAX_MESSAGE_SIZE=4000, TASKHUB_MAX_PAYLOAD_SIZE=1500, TASKHUB_INLINE_PAYLOAD_SIZE=500)
async def test_a_long_history_comes_in_pages_each_within_the_message_size():
    peer = await app_peer()
    await peer.call({"type": "sub", "action": "mail:send"})
    task_id = (await peer.call({"type": "pub", "action": "mail:send"}))["task"]
    assert (await peer.recv())["type"] == "task"
    for i in range(6):
        await peer.call({"type": "update", "task": task_id, "attempt": 1, "data": str(i) * 1000})
    await peer.call({"type": "return", "task": task_id, "attempt": 1, "result": "r" * 1400})
    since, kinds, data, pages = 0, [], [], 0
    while True:
        await peer.send({"type": "watch", "task": task_id, "since": since, "follow": False, "ref": "w"})
        text = await answer_text(peer, "w")
        assert len(text.encode()) <= 4000
        page = json.loads(text)
        pages += 1
        kinds += [e["kind"] for e in page["events"]]
        data += [e["data"]["data"] for e in page["events"] if e["kind"] == "update"]
        if not page.get("more"):
            break
        assert page["events"], "a page that says more holds an event"
        since = page["events"][-1]["seq"]
    assert pages > 2
    assert kinds == ["init", "start", "pickup", *["update"] * 6, "success", "end"]
    assert data == [str(i) * 1000 for i in range(6)]
    assert page["task"]["result"] == "r" * 1400  # the last page has the result
    await peer.close()


@override_settings(TASKHUB_MAX_MESSAGE_SIZE=4000, TASKHUB_MAX_PAYLOAD_SIZE=1500, TASKHUB_INLINE_PAYLOAD_SIZE=500)
async def test_a_task_list_is_cut_to_the_message_size_and_says_so():
    peer = await app_peer()
    await peer.call({"type": "sub", "action": "mail:send"})
    for _ in range(6):
        task_id = (await peer.call({"type": "pub", "action": "mail:send"}))["task"]
        assert (await peer.recv())["type"] == "task"
        await peer.call({"type": "return", "task": task_id, "attempt": 1, "result": "r" * 1400})
    await peer.send({"type": "tasks", "ref": "t"})
    text = await answer_text(peer, "t")
    answer = json.loads(text)
    assert len(text.encode()) <= 4000
    assert answer["more"] is True and 0 < len(answer["tasks"]) < 6
    await peer.close()
