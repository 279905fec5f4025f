"""A relay the channel layer loses, then a later one arriving: the connection reads what it
missed from the database at once, in order, before forwarding what came after (not at the
next sweep, and not never). For the publisher, a watcher, a service whose own update shows
the loss, and a monitor following a task; and the sweeper's recovery of a lost last relay
still removes a task published with ``autoremove``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async

from taskhub import notify, sweeper
from taskhub.models import Instance, Monitor
from taskhub.services.routing import MONITOR, RELAY

from .conftest import TIMEOUT, Peer, make_credential, open_peer
from .test_autoremove import gone
from .test_dashboard import _fresh_state, monitor, session_of  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

credential = database_sync_to_async(make_credential)
Rule = Callable[[str, dict[str, Any]], bool]


@pytest.fixture
def lose(monkeypatch: pytest.MonkeyPatch) -> list[Rule]:
    """Rules for layer messages to lose: each loses the first message it matches."""
    rules: list[Rule] = []
    real = notify._send

    async def send(layer: Any, channel: str, message: dict[str, Any]) -> None:
        for rule in rules:
            if rule(channel, message):
                rules.remove(rule)
                return
        await real(layer, channel, message)

    monkeypatch.setattr(notify, "_send", send)
    return rules


@database_sync_to_async
def channel_of(peer: Peer) -> str:
    return str(Instance.objects.get(pk=peer.welcome["instance"]).channel_name)


def update_to(channel: str, data: Any, kind: str = RELAY) -> Rule:
    """The relay (or monitors' feed message) of the update with ``data``, to ``channel``."""

    def rule(to: str, message: dict[str, Any]) -> bool:
        if to != channel or message["type"] != kind:
            return False
        if kind == MONITOR:
            return any(e["kind"] == "update" and e["data"]["data"] == data for e in message["message"]["events"])
        return any(m["type"] == "update" and m["data"] == data for m in message["messages"])

    return rule


async def started(action: str = "mail:send", **pub: Any) -> tuple[Peer, Peer, str, str]:
    """A worker that picked up a task, the caller that published it, the task's id and
    the caller's key (for a second connection)."""
    _, worker_key = await credential("mailer", sub=["mail"])
    _, caller_key = await credential("app", pub=["mail"], max_instances=2)
    worker = await open_peer("mailer", worker_key)
    await worker.call({"type": "sub", "action": action})
    caller = await open_peer("app", caller_key)
    task_id = (await caller.call({"type": "pub", "action": action, **pub}))["task"]
    await worker.expect(lambda m: m["type"] == "task")
    await worker.call({"type": "pickup", "task": task_id, "attempt": 1})
    return worker, caller, task_id, caller_key


async def updates_until(peer: Peer, last: Any) -> list[Any]:
    """The data of the task updates ``peer`` hears, up to the one with ``last``."""
    heard: list[Any] = []
    while not heard or heard[-1] != last:
        heard.append((await peer.expect(lambda m: m["type"] == "update"))["data"])
    return heard


async def test_the_publisher_hears_an_update_whose_relay_was_lost_when_the_next_arrives(lose):
    worker, caller, task_id, _ = await started()
    lose.append(update_to(await channel_of(caller), "one"))
    await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": "one"})
    await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": "two"})
    assert await updates_until(caller, "two") == ["one", "two"]  # no sweep ran
    assert not lose, "the relay was not lost"
    await worker.call({"type": "return", "task": task_id, "attempt": 1, "result": 1})
    assert (await caller.expect(lambda m: m["type"] == "success"))["result"] == 1
    await caller.expect(lambda m: m["type"] == "end")
    assert await caller.nothing()  # and nothing twice
    await worker.close()
    await caller.close()


async def test_a_watcher_hears_an_update_whose_relay_was_lost_when_the_next_arrives(lose):
    worker, caller, task_id, key = await started()
    await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": "zero"})
    watcher = await open_peer("app", key)
    state = await watcher.call({"type": "watch", "task": task_id})
    assert [e["data"]["data"] for e in state["events"] if e["kind"] == "update"] == ["zero"]
    lose.append(update_to(await channel_of(watcher), "one"))
    for data in ("one", "two", "three"):
        await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": data})
    # What the watch read is not sent again: the read after the loss starts where it ended.
    assert await updates_until(watcher, "three") == ["one", "two", "three"]
    assert await updates_until(caller, "three") == ["zero", "one", "two", "three"]
    assert not lose
    for peer in (worker, caller, watcher):
        await peer.close()


async def test_a_service_whose_own_update_shows_a_lost_relay_hears_what_it_missed(lose):
    # Two services on one task: each hears the other's updates.
    _, a_key = await credential("a", sub=["mail"])
    _, b_key = await credential("b", sub=["mail"])
    _, caller_key = await credential("app", pub=["mail"])
    a, b = await open_peer("a", a_key), await open_peer("b", b_key)
    for service in (a, b):
        await service.call({"type": "sub", "action": "mail:send"})
    caller = await open_peer("app", caller_key)
    task_id = (await caller.call({"type": "pub", "action": "mail:send"}))["task"]
    for service in (a, b):
        await service.expect(lambda m: m["type"] == "task")
        await service.call({"type": "pickup", "task": task_id, "attempt": 1})
    lose.append(update_to(await channel_of(b), "from a"))
    await a.call({"type": "update", "task": task_id, "attempt": 1, "data": "from a"})
    # b's own update comes after the one it never heard: the hub sends that one now,
    # where before b's ledger moved past it and no sweep would ever look for it again.
    await b.send({"type": "update", "task": task_id, "attempt": 1, "data": "from b", "ref": "u"})
    heard = [await b.recv()]
    while heard[-1].get("ref") != "u":
        heard.append(await b.recv())
    assert [m["data"] for m in heard if m["type"] == "update"] == ["from a"]
    assert heard[-1]["type"] == "ack"
    assert not lose
    await sweeper.sweep_once()
    assert await b.nothing()  # and the sweeper does not send it again
    for peer in (a, b, caller):
        await peer.close()


async def test_a_monitor_following_a_task_hears_an_update_whose_feed_was_lost(lose):
    peer = await monitor(await session_of())
    worker, caller, task_id, _ = await started()
    await peer.call({"type": "watch", "task": task_id})
    channel = await database_sync_to_async(lambda: Monitor.objects.get().channel_name)()
    lose.append(update_to(channel, "one", MONITOR))
    for data in ("one", "two"):
        await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": data})
    assert await updates_until(peer, "two") == ["one", "two"]
    assert not lose
    for p in (peer, worker, caller):
        await p.close()


async def test_a_lost_last_relay_sent_by_the_sweeper_still_removes_an_autoremove_task(lose):
    worker, caller, task_id, _ = await started(autoremove=True)
    lose.append(lambda to, m: m["type"] == RELAY and any(x["type"] == "end" for x in m["messages"]))
    await worker.call({"type": "return", "task": task_id, "attempt": 1, "result": {"sent": 1}})
    assert not lose
    await sweeper.sweep_once()  # recovery (or the process's own sweeper, first)
    assert (await caller.expect(lambda m: m["type"] == "success"))["result"] == {"sent": 1}
    await caller.expect(lambda m: m["type"] == "end")
    await asyncio.wait_for(gone(task_id), TIMEOUT)
    await worker.close()
    await caller.close()


async def test_an_end_read_after_a_lost_relay_still_removes_an_autoremove_task(lose):
    worker, caller, task_id, _ = await started(autoremove=True)
    lose.append(update_to(await channel_of(caller), "one"))
    await worker.call({"type": "update", "task": task_id, "attempt": 1, "data": "one"})
    await worker.call({"type": "return", "task": task_id, "attempt": 1, "result": {"sent": 1}})
    # The success and end relay shows the gap: the update, the success and the end are
    # read from the database, in order, and the task goes as after a live end.
    heard = [await caller.expect(lambda m: m["type"] in ("update", "success", "end")) for _ in range(3)]
    assert [m["type"] for m in heard] == ["update", "success", "end"]
    assert heard[1]["result"] == {"sent": 1}
    await asyncio.wait_for(gone(task_id), TIMEOUT)
    assert await caller.nothing()
    await worker.close()
    await caller.close()


async def test_a_publisher_hears_a_task_retried_from_elsewhere_after_it_heard_the_end():
    worker, caller, task_id, key = await started()
    await worker.call({"type": "fail", "task": task_id, "attempt": 1, "error": "boom"})
    assert (await caller.expect(lambda m: m["type"] == "end"))["status"] == "failed"
    operator = await open_peer("app", key)  # the same service, another connection
    assert (await operator.call({"type": "retry", "task": task_id}))["type"] == "ack"
    offer = await worker.expect(lambda m: m["type"] == "task")
    await worker.call({"type": "return", "task": task_id, "attempt": offer["attempt"], "result": "second time"})
    # The publisher's connection forwarded the first end, and still hears the task again.
    assert (await caller.expect(lambda m: m["type"] == "success"))["result"] == "second time"
    assert (await caller.expect(lambda m: m["type"] == "end"))["status"] == "success"
    for peer in (worker, caller, operator):
        await peer.close()
