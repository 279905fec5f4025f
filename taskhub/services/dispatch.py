"""Dispatch: which instance of each subscribed service gets a task.

A task goes to every service subscribed to its action (fan-out across services) and, in
each, to exactly one live instance: the least recently assigned (round-robin) that has
room (an instance may announce a *concurrency*: most unfinished tasks at once). When
every instance of a subscribed service is busy, that service's part *waits*, and goes to
the first of its instances with room (:func:`dispatch_waiting`, run when an instance
subscribes or finishes a task, and by every sweep). Dispatch reads the ``Subscription``
table, never the channel layer's groups, so each service gets one offer however many hub
processes there are.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime

from django.db.models import Q

from taskhub.core import machine
from taskhub.core.actions import permits
from taskhub.core.states import AssignmentState, TaskStatus
from taskhub.models import Assignment, Subscription, TaskRecord
from taskhub.store import Store, get_store

from .routing import Notice
from .transitions import transition

#: Most waiting tasks one call of :func:`dispatch_waiting` offers.
DISPATCH_BATCH = 200

Offers = list[tuple[str, str | None]]


def choose_offers(store: Store, action: str, now: datetime) -> tuple[Offers, dict[str, str]]:
    """One live instance with room per subscribed service, least recently assigned
    first; ``None`` for a service whose instances are all busy (its part waits).

    Returns:
        ``(offers, channels)``: ``(service, instance id or None)`` pairs for
        :func:`taskhub.core.machine.start`, and the instances' channel names by id.
        The transition's write marks them assigned (from their ``start`` events).
    """
    chosen: dict[int, tuple[str, str | None, str]] = {}
    for sub in store.live_subscribers(action, now):
        current = chosen.get(sub.credential_id)
        if current is not None and current[1] is not None:
            continue  # this service has its instance
        if not permits(sub.sub_permissions, action):
            continue
        if sub.busy:
            chosen.setdefault(sub.credential_id, (sub.name, None, ""))
        else:
            chosen[sub.credential_id] = (sub.name, str(sub.instance), sub.channel_name)
    offers = [(service, instance) for service, instance, _ in chosen.values()]
    return offers, {instance: channel for _, instance, channel in chosen.values() if instance is not None}


def successor(
    store: Store, action: str, service: str, now: datetime, *, exclude: uuid.UUID | None = None
) -> tuple[str, str] | None:
    """The live instance of ``service`` with room that should take over a part of a task
    of ``action``: ``(instance id, channel name)``, or ``None``."""
    for sub in store.live_subscribers(action, now):
        if sub.name == service and not sub.busy and sub.instance != exclude and permits(sub.sub_permissions, action):
            return str(sub.instance), sub.channel_name
    return None


def start(task_id: uuid.UUID | str, action: str, now: datetime) -> list[Notice]:
    """Offer a pending task to its action's subscribers, if it has any and is pending."""
    offers, channels = choose_offers(get_store(), action, now)
    if not offers:
        return []

    def decide(task: machine.Task) -> list[machine.Event]:
        if task.status is not TaskStatus.PENDING or (task.retry_at is not None and task.retry_at > now):
            return []  # another process offered it first, or its retry is not due
        return machine.start(task, offers, now)

    return transition(task_id, decide, now, channels, with_payload=True)


def dispatch_waiting(now: datetime, actions: Iterable[str] | None = None) -> tuple[int, list[Notice]]:
    """Offer what waits: pending tasks whose action has a live subscriber (oldest first,
    their retry due), and parts of started tasks whose instance was lost or busy, to a
    live instance of their service with room.

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
        state=AssignmentState.WAITING, task__status=TaskStatus.STARTED, task__action__in=live.values("action")
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
        instance, channel = heir
        more = transition(task_id, _offering(service, instance, now), now, {instance: channel}, with_payload=True)
        started += bool(more)
        notices += more
    return started, notices


def _offering(service: str, instance: str, now: datetime) -> Callable[[machine.Task], list[machine.Event]]:
    """The decision that hands the service's waiting part to ``instance``."""

    def decide(task: machine.Task) -> list[machine.Event]:
        if task.status is not TaskStatus.STARTED or not any(
            a.service == service and a.state is AssignmentState.WAITING for a in task.current()
        ):
            return []  # another process offered it first
        return machine.offer_waiting(task, service, instance, now)

    return decide
