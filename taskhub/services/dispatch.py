"""Dispatch: which instance of each subscribed service gets a task.

A task goes to every service subscribed to its action (fan-out across services) and, in
each, to exactly one live instance: the least recently assigned (round-robin) that has
room (an instance may announce a *concurrency*: most unfinished tasks at once). When
every instance of a subscribed service is busy, that service's part is *queued*, and goes
to the first of its instances with room (:func:`dispatch_waiting`, run when an instance
subscribes or finishes a task, and by every sweep). Dispatch reads the ``Subscription``
table, never the channel layer's groups, so each service gets one offer however many hub
processes there are.

An instance's room is read without a lock when its instance is chosen, so two
connections (or processes) offering at once could both find the last free slot. An offer
to an instance with a concurrency is therefore *reserved*: the transaction that writes it
locks the instance's row and counts its tasks again (:func:`full`), so the second offer
waits for the first and finds the instance full.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Collection, Iterable
from datetime import datetime

from django.db import connection
from django.db.models import Count, Q

from taskhub.core import machine
from taskhub.core.actions import permits
from taskhub.core.states import HELD_ASSIGNMENT_STATES, UNHELD_ASSIGNMENT_STATES, TaskStatus
from taskhub.models import Assignment, Instance, Subscription, TaskRecord
from taskhub.store import Store, get_store
from taskhub.store.base import Subscriber

from .routing import Notice
from .transitions import transition

#: Most waiting tasks one call of :func:`dispatch_waiting` offers.
DISPATCH_BATCH = 200

Offers = list[tuple[str, str | None]]


def choose_offers(store: Store, action: str, now: datetime) -> tuple[Offers, dict[str, str], frozenset[str]]:
    """One live instance with room per subscribed service, least recently assigned
    first; ``None`` for a service whose instances are all busy (its part is queued).

    The room is read without a lock: reserve the offers to instances with a concurrency
    (:func:`reserve`) in the transaction that writes them.

    Returns:
        ``(offers, channels, bounded)``: ``(service, instance id or None)`` pairs for
        :func:`taskhub.core.machine.start`, the instances' channel names by id, and
        those of the instances that announced a concurrency (:attr:`Subscriber.limited`,
        read with their room). The transition's write marks them assigned (from their
        ``start`` events).
    """
    chosen: dict[int, tuple[str, Subscriber | None]] = {}
    for sub in store.live_subscribers(action, now):
        current = chosen.get(sub.credential_id)
        if current is not None and current[1] is not None:
            continue  # this service has its instance
        if not _grants(tuple(sub.sub_permissions), action):
            continue
        if sub.busy:
            chosen.setdefault(sub.credential_id, (sub.name, None))
        else:
            chosen[sub.credential_id] = (sub.name, sub)
    offers: Offers = [(name, None if sub is None else str(sub.instance)) for name, sub in chosen.values()]
    picked = [sub for _, sub in chosen.values() if sub is not None]
    channels = {str(sub.instance): sub.channel_name for sub in picked}
    return offers, channels, frozenset(str(sub.instance) for sub in picked if sub.limited)


@functools.lru_cache(maxsize=4096)
def _grants(patterns: tuple[str, ...], action: str) -> bool:
    """:func:`~taskhub.core.actions.permits`, remembered: a publish asks it of every
    subscriber, and a service's patterns seldom change."""
    return permits(patterns, action)


def successor(
    store: Store, action: str, service: str, now: datetime, *, exclude: uuid.UUID | None = None
) -> Subscriber | None:
    """The live instance of ``service`` with room that should take over a part of a task
    of ``action``, or ``None``. An offer to it must be reserved (:func:`reserve`) if it
    announced a concurrency (``limited``, read without a lock: an instance's concurrency
    changes only when it is resumed)."""
    for sub in store.live_subscribers(action, now):
        if sub.name != service or sub.busy or sub.instance == exclude:
            continue
        if _grants(tuple(sub.sub_permissions), action):
            return sub
    return None


def full(instances: Collection[str]) -> frozenset[str]:
    """Those of ``instances`` that hold as many unfinished tasks as their concurrency
    allows, or are gone, counted under a lock on their rows.

    Call inside the transaction that writes the offers (``transaction.atomic()``, or a
    :func:`~.transitions.transition` with ``lock``): another offer to one of them, from
    any connection or process, waits for this transaction to end and then counts what it
    wrote. On SQLite the transaction holds the database's one write lock instead.

    Raises:
        TransactionManagementError: outside a transaction (on databases with row locks).
    """
    if not instances:
        return frozenset()
    ids = sorted(uuid.UUID(i) for i in instances)  # one order for every locker: no deadlock
    rows = Instance.objects.filter(pk__in=ids).order_by("pk")
    if connection.features.has_select_for_update:
        rows = rows.select_for_update()
    limits = dict(rows.values_list("pk", "concurrency"))
    held = dict(
        Assignment.objects.filter(instance__in=list(limits), state__in=HELD_ASSIGNMENT_STATES)
        .order_by()
        .values("instance")
        .annotate(n=Count("id"))
        .values_list("instance", "n")
    )
    # An instance gone meanwhile (released) has no room either.
    room = {pk: limit - held.get(pk, 0) if limit is not None else 1 for pk, limit in limits.items()}
    return frozenset(str(pk) for pk in ids if room.get(pk, 0) <= 0)


def reserve(offers: Offers, bounded: Collection[str]) -> Offers:
    """``offers`` with those to a full instance among ``bounded`` (:func:`choose_offers`)
    queued instead. Call as :func:`full` says."""
    taken = full([i for _, i in offers if i is not None and i in bounded])
    return [(service, None if instance in taken else instance) for service, instance in offers]


def start(task_id: uuid.UUID | str, action: str, now: datetime) -> list[Notice]:
    """Offer a pending task to its action's subscribers, if it has any and is pending."""
    offers, channels, bounded = choose_offers(get_store(), action, now)
    if not offers:
        return []

    def decide(task: machine.Task) -> list[machine.Event]:
        if task.status is not TaskStatus.PENDING or (task.retry_at is not None and task.retry_at > now):
            return []  # another process offered it first, or its retry is not due
        return machine.start(task, reserve(offers, bounded) if bounded else offers, now)

    return transition(task_id, decide, now, channels, with_payload=True, lock=bool(bounded))


def release_task(
    task_id: uuid.UUID | str, action: str, service: str, instance: uuid.UUID, now: datetime
) -> list[Notice]:
    """The instance of ``service`` is gone for good: its part in the task goes to another
    live instance of the service with room, or waits for one
    (:func:`taskhub.core.machine.release_instance`)."""
    heir = successor(get_store(), action, service, now, exclude=instance)
    heirs, channels = ({service: str(heir.instance)}, {str(heir.instance): heir.channel_name}) if heir else ({}, {})
    bounded = frozenset(heirs.values()) if heir is not None and heir.limited else frozenset()

    def decide(task: machine.Task) -> list[machine.Event]:
        room = heirs if not bounded or not full(bounded) else {}
        return machine.release_instance(task, str(instance), room, now)

    return transition(task_id, decide, now, channels, with_payload=bool(heirs), lock=bool(bounded))


def dispatch_waiting(now: datetime, actions: Iterable[str] | None = None) -> tuple[int, list[Notice]]:
    """Offer what waits: pending tasks whose action has a live subscriber (oldest first,
    their retry due), and parts of started tasks whose instance was lost or busy (waiting
    or queued), to a live instance of their service with room.

    Called when a service subscribes (for its actions), when an instance with a
    concurrency finishes a task, and by the sweeper, which also recovers from races and
    from notices the layer dropped.

    Returns:
        ``(number of tasks offered, notices)``.
    """
    live = Subscription.objects.filter(instance__lease_expires_at__gt=now, instance__detached_at__isnull=True)
    pending = TaskRecord.objects.filter(status=TaskStatus.PENDING, action__in=live.values("action")).filter(
        Q(retry_at__isnull=True) | Q(retry_at__lte=now)
    )
    waiting = Assignment.objects.filter(
        state__in=UNHELD_ASSIGNMENT_STATES, task__status=TaskStatus.STARTED, task__action__in=live.values("action")
    )
    if actions is not None:
        pending = pending.filter(action__in=list(actions))
        waiting = waiting.filter(task__action__in=list(actions))
    started, notices = 0, []
    for task_id, action in list(pending.order_by("created_at").values_list("id", "action")[:DISPATCH_BATCH]):
        more = start(task_id, action, now)
        started += bool(more)
        notices += more
    store = get_store()
    parts = waiting.order_by("task__created_at").values_list("task_id", "task__action", "service")
    for task_id, action, service in list(parts[:DISPATCH_BATCH]):
        heir = successor(store, action, service, now)
        if heir is None:
            continue
        instance, channel, bounded = str(heir.instance), heir.channel_name, heir.limited
        decide = _offering(service, instance, now, bounded)
        more = transition(task_id, decide, now, {instance: channel}, with_payload=True, lock=bounded)
        started += bool(more)
        notices += more
    return started, notices


def _offering(
    service: str, instance: str, now: datetime, bounded: bool
) -> Callable[[machine.Task], list[machine.Event]]:
    """The decision that hands the service's waiting part to ``instance`` (``bounded``: it
    has a concurrency, checked again under its lock)."""

    def decide(task: machine.Task) -> list[machine.Event]:
        if task.status is not TaskStatus.STARTED or not any(
            a.service == service and a.state in UNHELD_ASSIGNMENT_STATES for a in task.current()
        ):
            return []  # another process offered it first
        if bounded and full([instance]):
            return []  # another offer took its last slot meanwhile
        return machine.offer_waiting(task, service, instance, now)

    return decide
