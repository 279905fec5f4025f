"""Dispatch: which instance of each subscribed service gets a task.

A task goes to every service subscribed to its action (fan-out across services) and, in
each, to exactly one live instance: the least recently assigned (round-robin). Dispatch
reads the ``Subscription`` table, never the channel layer's groups, so each service gets
one offer however many hub processes there are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from taskhub.core import machine
from taskhub.core.actions import permits
from taskhub.core.states import TaskStatus
from taskhub.models import Subscription, TaskRecord
from taskhub.store import Store, get_store

from .routing import Notice
from .transitions import transition

#: Most waiting tasks one call of :func:`dispatch_waiting` offers.
DISPATCH_BATCH = 200

Offers = list[tuple[str, str]]


def choose_offers(store: Store, action: str, now: datetime) -> tuple[Offers, dict[str, str]]:
    """One live instance per subscribed service, least recently assigned first.

    Returns:
        ``(offers, channels)``: ``(service, instance id)`` pairs for
        :func:`taskhub.core.machine.start`, and the instances' channel names by id.
        The transition's write marks them assigned (from their ``start`` events).
    """
    chosen: dict[int, tuple[str, str, str]] = {}
    for sub in store.live_subscribers(action, now):
        if sub.credential_id not in chosen and permits(sub.sub_permissions, action):
            chosen[sub.credential_id] = (sub.name, str(sub.instance), sub.channel_name)
    offers = [(service, instance) for service, instance, _ in chosen.values()]
    return offers, {instance: channel for _, instance, channel in chosen.values()}


def start(task_id: uuid.UUID | str, action: str, now: datetime) -> list[Notice]:
    """Offer a pending task to its action's subscribers, if it has any and is pending."""
    offers, channels = choose_offers(get_store(), action, now)
    if not offers:
        return []

    def decide(task: machine.Task) -> list[machine.Event]:
        if task.status is not TaskStatus.PENDING:
            return []  # another process offered it first
        return machine.start(task, offers, now)

    return transition(task_id, decide, now, channels, with_payload=True)


def dispatch_waiting(now: datetime, actions: Iterable[str] | None = None) -> tuple[int, list[Notice]]:
    """Offer pending tasks whose action has a live subscriber, oldest first.

    Called when a service subscribes (for its actions), and by the sweeper to recover
    from races and from notices the layer dropped.

    Returns:
        ``(number of tasks offered, notices)``.
    """
    live = Subscription.objects.filter(instance__lease_expires_at__gt=now).values("action")
    pending = TaskRecord.objects.filter(status=TaskStatus.PENDING, action__in=live)
    if actions is not None:
        pending = pending.filter(action__in=list(actions))
    started, notices = 0, []
    for task_id, action in list(pending.order_by("created_at").values_list("id", "action")[:DISPATCH_BATCH]):
        more = start(task_id, action, now)
        started += bool(more)
        notices += more
    return started, notices
