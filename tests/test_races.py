"""Transitions racing on one task from several database connections at once, as the
commands of several connections (or hub processes) do: each happens exactly once.

On PostgreSQL transitions read without a lock and fence their writes; on SQLite they
queue for the write lock. Both must come out the same.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings
from django.utils import timezone

from taskhub import services
from taskhub.core import machine
from taskhub.core.errors import ProtocolError
from taskhub.models import Assignment, Instance, TaskRecord
from taskhub.services.dispatch import choose_offers
from taskhub.store import get_store

from .conftest import TIMEOUT, make_credential, pub_command, task_command
from .test_services import live_instance

# Each thread commits on its own connection; against every store (see conftest.store_backend).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("store_backend")]


def race(work: list[Callable[[], Any]]) -> list[Any]:
    """Run each callable on its own thread (and connection), all released at once;
    return their results, or the exceptions they raised."""
    barrier = threading.Barrier(len(work))
    results: list[Any] = [None] * len(work)

    def run(i: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            results[i] = work[i]()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    return results


def fan_out(services_count: int) -> tuple[str, list[Any]]:
    app, _ = make_credential("app", pub=["mail"])
    workers = []
    for i in range(services_count):
        worker, _ = make_credential(f"s{i}", sub=["mail"])
        live_instance(worker, f"chan-{i}")
        workers.append(worker)
    task_id, _, _ = services.publish(app, pub_command({"type": "pub", "action": "mail:send"}), timezone.now())
    return task_id, workers


def command(credential: Any, task_id: str, type_: str, **fields: Any) -> Callable[[], Any]:
    cmd = task_command({"type": type_, "task": task_id, "attempt": 1, **fields})
    return lambda: services.act(credential, cmd, timezone.now(), f"chan-{credential.name[1:]}")


def test_of_racing_returns_the_first_completes_the_task_and_the_rest_are_recorded_late():
    task_id, workers = fan_out(8)
    results = race([command(w, task_id, "return", result=w.name) for w in workers])
    assert not [r for r in results if isinstance(r, Exception)]
    record = TaskRecord.objects.get(pk=task_id)
    kinds = list(record.events.values_list("kind", flat=True))
    assert kinds.count("success") == 1 and kinds.count("end") == 1
    assert kinds.count("late_return") == 7
    (winner,) = record.events.filter(kind="success").values_list("service", flat=True)
    assert (record.status, record.result) == ("success", winner)
    # The winner's relay told the others; each service's outcome is recorded once.
    states = dict(record.assignments.values_list("service", "state"))
    assert states.pop(winner) == "returned" and set(states.values()) == {"told"}


def test_racing_updates_are_each_persisted_once_and_relayed_with_versions_of_their_own():
    task_id, workers = fan_out(6)
    per_worker = 10

    def updates(worker: Any) -> Callable[[], list[int]]:
        def run() -> list[int]:
            versions = []
            for step in range(per_worker):
                notices = command(worker, task_id, "update", data=step, progress=step / per_worker)()
                versions += [m["version"] for _, _, m in notices if m["type"] == "taskhub.relay"]
            return versions

        return run

    results = race([updates(w) for w in workers])
    assert not [r for r in results if isinstance(r, Exception)]
    record = TaskRecord.objects.get(pk=task_id)
    assert record.events.filter(kind="update").count() == 6 * per_worker
    assert record.events.filter(kind="pickup").count() == 6  # each worker's first update picked it up
    relayed = {version for versions in results for version in set(versions)}
    assert len(relayed) == 6 * per_worker  # no two transitions shared a version
    assert max(relayed) == record.version


def test_a_racing_drop_and_return_of_one_service_apply_one_of_them():
    """Two connections of one service (or a re-sent command) finish the same assignment:
    the second finds it finished and is refused."""
    task_id, (worker,) = fan_out(1)
    results = race([command(worker, task_id, "drop"), command(worker, task_id, "return", result=1)])
    refused = [r for r in results if isinstance(r, ProtocolError)]
    assert len(refused) == 1 and refused[0].code == "invalid_transition"
    record = TaskRecord.objects.get(pk=task_id)
    assert record.status in ("success", "ended")
    assert list(record.events.values_list("kind", flat=True))[-1] == "end"
    assert record.events.filter(kind__in=["drop", "success"]).count() == 1


def test_a_transition_whose_fences_keep_failing_takes_the_lock(monkeypatch):
    """A task that other connections keep moving cannot starve a transition: after
    ``OPTIMISTIC_ATTEMPTS`` fences that did not hold, it reads under the lock."""
    store = get_store()
    if not store.optimistic:
        pytest.skip("this store's transitions lock on read")
    task_id, (worker,) = fan_out(1)
    locks: list[bool] = []
    load = store.load_task

    def recording_load(*args: Any, lock: bool = True, **kwargs: Any) -> Any:
        locks.append(lock)
        return load(*args, lock=lock, **kwargs)

    monkeypatch.setattr(store, "load_task", recording_load)

    def decide(task: Any) -> Any:
        if len(locks) <= services.OPTIMISTIC_ATTEMPTS:  # another connection moves it on
            race([lambda: TaskRecord.objects.filter(pk=task_id).update(version=100 + len(locks))])
        return machine.pickup(task, worker.name, 1, timezone.now())

    services.transition(task_id, decide, timezone.now(), service=worker.name)
    assert locks == [False] * services.OPTIMISTIC_ATTEMPTS + [True]
    record = TaskRecord.objects.get(pk=task_id)
    assert list(record.events.values_list("kind", flat=True)).count("pickup") == 1
    assert record.version == 100 + services.OPTIMISTIC_ATTEMPTS + 1


def test_racing_offers_never_give_an_instance_more_tasks_than_its_concurrency(monkeypatch):
    """Two connections publish at once to a service whose one instance has room for one
    more task: both choose it on the same read, and the writes count again under the
    instance's lock, so one offer is made and the other part is queued."""
    app, _ = make_credential("app", pub=["mail"])
    worker, _ = make_credential("s0", sub=["mail"])
    instance = live_instance(worker, "chan-0")
    Instance.objects.filter(pk=instance.pk).update(concurrency=1)
    both_chose = threading.Barrier(2)

    def choose_then_wait(*args: Any) -> Any:
        chosen = choose_offers(*args)
        both_chose.wait(TIMEOUT)  # neither writes before the other has read the room
        return chosen

    monkeypatch.setattr("taskhub.services.commands.choose_offers", choose_then_wait)
    pub = pub_command({"type": "pub", "action": "mail:send"})
    results = race([lambda: services.publish(app, pub, timezone.now()) for _ in range(2)])
    assert not [r for r in results if isinstance(r, Exception)]
    states = sorted(Assignment.objects.values_list("state", flat=True))
    assert states == ["offered", "queued"]
    assert sum(len([n for n in notices if n.kind == "channel"]) for _, _, notices in results) == 1


@override_settings(TASKHUB_RESUME_GRACE=10.0)
def test_a_resume_racing_the_sweepers_release_either_wins_or_finds_the_instance_gone():
    a, _ = make_credential("a", sub=["mail"])
    for _ in range(10):
        now = timezone.now()
        session = services.connect(a, "chan-1", "p", "", now)
        services.subscribe(session.instance.pk, a, "mail:send", now)
        services.detach(session.instance.pk, "chan-1", now)
        later = now + timedelta(seconds=11)
        resumed, _ = race(
            [
                functools.partial(services.connect, a, "chan-2", "q", "", later, resume=session.token),
                functools.partial(services.release, session.instance.pk, later, only_if_gone=True),
            ]
        )
        alive = Instance.objects.filter(pk=session.instance.pk).first()
        if resumed.resumed:  # the resume won: the instance, its subscriptions are intact
            assert alive is not None and alive.channel_name == "chan-2"
            assert alive.subscriptions.count() == 1
        else:  # the release won: the client got a new instance
            assert alive is None and resumed.instance.pk != session.instance.pk
        Instance.objects.all().delete()
