"""Sweeping: what each hub process does every ``TASKHUB_SWEEP_INTERVAL``.

Any process may sweep and they race safely: deadlines are columns every process reads,
and expiring a task is a transition like any other.

A pass is made of steps, each done in batches until nothing is left, so that a deadline
holds within about a sweep interval whatever the backlog (20,000 tasks timing out
together are all expired in the pass that finds them). The sweeper
(:mod:`taskhub.sweeper`) runs each batch as its own database call, so connections'
commands interleave with a long pass; :func:`sweep` runs a whole pass at once, for tests
and scripts.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from datetime import datetime

from django.db.models import Q

from taskhub.core import machine
from taskhub.core.states import TaskStatus
from taskhub.db import refused_inline
from taskhub.models import TaskRecord

from .dispatch import DISPATCH_BATCH, dispatch_waiting
from .instances import lapsed, release, renew_leases
from .routing import Notice
from .transitions import transition

log = logging.getLogger("taskhub.services")

#: Tasks expired, or instances released, per database call: small enough that a call
#: holds up other connections' commands for a few milliseconds only.
SWEEP_BATCH = 50


def release_lapsed(
    now: datetime, limit: int = SWEEP_BATCH, after: uuid.UUID | None = None
) -> tuple[list[Notice], uuid.UUID | None]:
    """Release up to ``limit`` instances that are gone, from just after ``after``:
    detached, or their lease lapsed (their process died), longer than the resume grace
    ago; their tasks go to other instances. One that cannot be released is logged and
    skipped (the next pass tries again).

    SQLite's lock held by another connection, met inline (:mod:`taskhub.db`), ends the
    batch early instead: it is raised at the batch's first instance, so that the call
    runs again on the database thread, and later the batch returns what it did.

    Returns:
        ``(notices, where the next batch starts)``; ``None`` once none is left.
    """
    notices: list[Notice] = []
    gone = lapsed(now, limit, after)
    for i, instance_id in enumerate(gone):
        log.info("instance %s is gone (resume grace over); releasing its tasks", instance_id)
        try:
            notices += release(instance_id, now, only_if_gone=True)
        except Exception as exc:
            if refused_inline(exc):
                if i == 0:
                    raise
                return notices, gone[i - 1]
            log.exception("could not release instance %s", instance_id)
    return notices, (gone[-1] if len(gone) == limit else None)


#: Where a pass's walk through overdue tasks stands: the last ``(deadline, id)`` read.
Cursor = tuple[datetime, uuid.UUID]


def overdue(now: datetime, limit: int, after: Cursor | None = None) -> list[Cursor]:
    """Up to ``limit`` unfinished tasks whose deadline has passed, as ``(deadline, id)``
    in that order, from just after ``after``: a pass walks through them once, so a task
    that cannot be expired is not read again and again."""
    tasks = TaskRecord.objects.filter(deadline__lte=now, status__in=[TaskStatus.PENDING, TaskStatus.STARTED])
    if after is not None:
        deadline, task_id = after
        tasks = tasks.filter(Q(deadline__gt=deadline) | Q(deadline=deadline, id__gt=task_id))
    rows = tasks.order_by("deadline", "id").values_list("deadline", "id")[:limit]
    return [(deadline, task_id) for deadline, task_id in rows if deadline is not None]


def expire(task_ids: Collection[uuid.UUID], now: datetime) -> list[Notice]:
    """Apply the deadlines of these tasks (a timeout, a retry, a heartbeat missed); a
    task that moved on meanwhile is left as it is, and one whose transition fails is
    logged and skipped (it stays overdue: the next pass tries again).

    SQLite's lock held by another connection, met inline (:mod:`taskhub.db`), is raised
    at the batch's first task, so that the call runs again on the database thread;
    later, the batch ends, and the rest stay overdue for the next pass.
    """
    notices: list[Notice] = []
    for i, task_id in enumerate(task_ids):
        try:
            notices += transition(task_id, lambda task: machine.expire(task, now), now)
        except Exception as exc:
            if refused_inline(exc):
                if i == 0:
                    raise
                break
            # One task's trouble (a bug) must not stop every other deadline.
            log.exception("could not expire task %s", task_id)
    return notices


def offer_waiting(now: datetime) -> tuple[list[Notice], bool]:
    """Offer a batch of what waits for a subscriber or an instance
    (:func:`~.dispatch.dispatch_waiting`).

    Returns:
        ``(notices, whether more may be left)``.
    """
    started, notices = dispatch_waiting(now)
    return notices, started >= DISPATCH_BATCH


def sweep(process: str, now: datetime, channels: Collection[str] | None = None) -> tuple[list[Notice], list[str]]:
    """A whole pass at once: renew ``process``'s leases (of its instances on one of
    ``channels``, or all), release instances that are gone, expire overdue tasks, offer what
    waits.

    Returns:
        ``(notices, channel names of this process's instances to close)``; those are
        instances of credentials an operator disabled.
    """
    to_close = renew_leases(process, now, channels)
    notices: list[Notice] = []
    after = None
    while True:
        batch, after = release_lapsed(now, SWEEP_BATCH, after)
        notices += batch
        if after is None:
            break
    cursor = None
    while due := overdue(now, SWEEP_BATCH, cursor):
        notices += expire([task_id for _, task_id in due], now)
        cursor = due[-1]
    more = True
    while more:
        batch, more = offer_waiting(now)
        notices += batch
    return notices, to_close
