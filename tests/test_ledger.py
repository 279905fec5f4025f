"""The ledger of what a connection forwarded (taskhub/recovery.py), on its own: each relay
heard once, each event once, and a relay that shows an earlier one was lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from taskhub import db, recovery
from taskhub.recovery import Ledger, catch_up
from tests.conftest import TIMEOUT


def update(seq: int) -> dict[str, object]:
    return {"type": "update", "task": "t", "seq": seq, "data": seq}


def test_a_relay_is_forwarded_once_and_an_older_one_not_at_all():
    ledger = Ledger()
    ledger.start("t", 0)
    assert ledger.relay("t", 2, 0, [update(10)]) == [update(10)]
    assert ledger.relay("t", 2, 0, [update(10)]) == []  # as watcher and as publisher
    assert ledger.relay("t", 1, 0, [update(9)]) == []  # read already when it came late


def test_an_event_heard_in_another_relay_is_not_forwarded_twice():
    ledger = Ledger()
    ledger.start("t", 0)
    assert ledger.relay("t", 3, 0, [update(10), update(11)]) == [update(10), update(11)]
    assert ledger.relay("t", 4, 3, [update(11), update(12)]) == [update(12)]


def test_a_relay_whose_previous_was_not_heard_asks_for_the_database():
    ledger = Ledger()
    ledger.start("t", 0)
    assert ledger.relay("t", 2, 0, [update(10)]) == [update(10)]
    assert ledger.relay("t", 5, 4, [update(12)]) is None  # the relay of version 4 was lost
    assert ledger.get("t").version == 2  # nothing moved: the read starts after seq 10
    assert ledger.get("t").seq == 10


def test_a_task_heard_of_midway_takes_its_first_relay_as_it_comes():
    # Followed without knowing which relays came before (a re-sent pub): no loss is
    # assumed until one relay was heard.
    ledger = Ledger()
    ledger.get("t")
    assert ledger.relay("t", 7, 6, [update(20)]) == [update(20)]
    assert ledger.relay("t", 9, 8, [update(22)]) is None


def test_an_offer_or_a_watch_starts_the_ledger_where_the_read_was():
    ledger = Ledger()
    ledger.start("t", 4, 30)  # an offer: relays up to 4 and events up to seq 30 came before it
    assert ledger.relay("t", 4, 2, [update(29)]) == []
    assert ledger.relay("t", 6, 4, [update(29), update(31)]) == [update(31)]
    ledger.start("t", 5, 0)  # a later read that saw less moves nothing back
    assert (ledger.get("t").version, ledger.get("t").seq) == (6, 31)


def test_a_relay_without_its_messages_asks_for_the_database():
    ledger = Ledger()
    ledger.start("t", 0)
    assert ledger.relay("t", 2, 0, None) is None  # a monitor's feed that left a value out
    assert ledger.relay("t", 0, 0, None) == []  # but not for one heard already


def test_an_offer_is_forwarded_once_per_attempt():
    ledger = Ledger()
    assert ledger.offer("t", 1) and not ledger.offer("t", 1)
    assert ledger.offer("t", 2)


def test_memory_is_bounded_and_the_least_recently_heard_task_goes_first(monkeypatch):
    monkeypatch.setattr(recovery, "REMEMBERED", 3)
    ledger = Ledger()
    for task in "abc":
        ledger.start(task, 0)
    ledger.get("a")  # heard again: now the most recent
    ledger.start("d", 0)
    assert list(ledger.tasks) == ["c", "a", "d"]
    ledger.forget("c")
    assert list(ledger.tasks) == ["a", "d"]


class Database:
    """``db.run`` for :func:`catch_up`: the task's relayed events after a seq, each read
    held until the test lets it go."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.reads: list[int] = []
        self.reading = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()

    async def run(self, func: Any, task_id: str, since: int, instance: Any) -> list[dict[str, Any]]:
        self.reads.append(since)
        self.reading.set()
        await self.go.wait()
        return [e for e in self.events if e["seq"] > since]


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> Database:
    database = Database([])
    monkeypatch.setattr(db, "run", database.run)
    return database


async def test_a_catch_up_reads_after_the_last_seq_heard_and_moves_on(database):
    ledger = Ledger()
    ledger.start("t", 0)
    assert ledger.relay("t", 2, 0, [update(10)]) == [update(10)]
    database.events = [update(10), update(11), update(12)]
    assert ledger.relay("t", 5, 4, [update(12)]) is None
    assert await catch_up(ledger, "t", 5, None) == [update(11), update(12)]
    assert database.reads == [10]
    assert ledger.relay("t", 4, 2, [update(11)]) == []  # the lost one, late after all
    assert ledger.relay("t", 6, 5, [update(13)]) == [update(13)]


async def test_relays_that_come_during_a_catch_up_are_read_after_it_in_order_once(database):
    ledger = Ledger()
    ledger.start("t", 0)
    database.events = [update(10), update(11)]
    database.go.clear()
    assert ledger.relay("t", 3, 2, [update(11)]) is None
    reading = asyncio.ensure_future(catch_up(ledger, "t", 3, None))
    await asyncio.wait_for(database.reading.wait(), TIMEOUT)  # the read is under way
    # Two more relays while the read waits: both are left to it, one with a gap of its own.
    assert ledger.relay("t", 4, 3, [update(12)]) == []
    assert ledger.relay("t", 6, 5, [update(14)]) == []
    database.events += [update(12), update(13), update(14)]  # committed before they were sent
    database.go.set()
    forwarded = await asyncio.wait_for(reading, TIMEOUT)
    assert [m["seq"] for m in forwarded] == [10, 11, 12, 13, 14]
    assert (ledger.get("t").version, ledger.get("t").seq) == (6, 14)


async def test_a_task_forgotten_during_a_catch_up_gets_nothing_from_it(database):
    ledger = Ledger()
    ledger.start("t", 0)
    database.events = [update(10), {"type": "end", "task": "t", "seq": 11}]
    database.go.clear()
    assert ledger.relay("t", 3, 2, []) is None
    reading = asyncio.ensure_future(catch_up(ledger, "t", 3, None))
    await asyncio.wait_for(database.reading.wait(), TIMEOUT)  # the read is under way
    ledger.forget("t")  # the worker's own return, say
    database.go.set()
    assert await asyncio.wait_for(reading, TIMEOUT) == []
    assert "t" not in ledger.tasks  # and no entry made again


def test_a_late_relay_of_a_task_that_is_gone_is_dropped_and_news_brings_it_back():
    ledger = Ledger()
    ledger.start("t", 0)
    end = {"type": "end", "task": "t", "seq": 11}
    assert ledger.relay("t", 2, 0, [update(10), end]) == [update(10), end]
    ledger.forget("t")  # its end was forwarded
    assert ledger.relay("t", 2, 0, [update(10), end]) == []  # the same relay, as a watcher
    assert ledger.relay("t", 3, 2, [end]) == []  # nothing it has not heard
    assert "t" not in ledger.tasks
    # Retried: the task moves on, and its entry comes back as it was.
    retry = {"type": "retry", "task": "t", "seq": 12}
    assert ledger.relay("t", 5, 3, [retry]) == [retry]
    assert "t" not in ledger.gone and (ledger.get("t").version, ledger.get("t").seq) == (5, 12)


def test_following_a_task_again_starts_from_what_was_heard_of_it():
    ledger = Ledger()
    ledger.start("t", 4, 20)
    ledger.forget("t")
    heard = ledger.get("t")  # watched again, a pub sent again
    assert (heard.version, heard.seq, heard.known) == (4, 20, True)
