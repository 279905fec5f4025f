"""The ledger of what a connection forwarded (taskhub/recovery.py), on its own: each relay
heard once, each event once, and a relay that shows an earlier one was lost."""

from __future__ import annotations

from taskhub import recovery
from taskhub.recovery import Ledger


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
    assert ledger.caught_up("t", 5, [update(11), update(12)]) == [update(11), update(12)]
    assert ledger.relay("t", 4, 2, [update(11)]) == []  # the lost one, late after all
    assert ledger.relay("t", 6, 5, [update(13)]) == [update(13)]


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
