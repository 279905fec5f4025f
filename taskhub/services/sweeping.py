"""Sweeping: what each hub process does every ``TASKHUB_SWEEP_INTERVAL``.

Any process may sweep and they race safely: deadlines are columns every process reads,
and expiring a task is a transition like any other.
"""

from __future__ import annotations

import logging
from datetime import datetime

from taskhub.core import machine
from taskhub.core.states import TaskStatus
from taskhub.models import TaskRecord

from .dispatch import DISPATCH_BATCH, dispatch_waiting
from .instances import lapsed, release, renew_leases
from .routing import Notice
from .transitions import transition

log = logging.getLogger("taskhub.services")


def sweep(process: str, now: datetime) -> tuple[list[Notice], list[str]]:
    """One pass of a hub process's sweeper.

    Renews the leases of ``process``'s instances, releases instances that are gone (their
    lease lapsed, or their resume grace passed: their tasks go to other instances),
    expires overdue tasks, and offers what waits for a subscriber or an instance.

    Returns:
        ``(notices, channel names of this process's instances to close)``; those are
        instances of credentials an operator disabled.
    """
    to_close = renew_leases(process, now)
    notices: list[Notice] = []
    for instance_id in lapsed(now, DISPATCH_BATCH):
        log.warning("instance %s is gone (lease or resume grace over); releasing its tasks", instance_id)
        notices += release(instance_id, now)
    overdue = TaskRecord.objects.filter(deadline__lte=now, status__in=[TaskStatus.PENDING, TaskStatus.STARTED])
    for task_id in list(overdue.order_by("deadline").values_list("id", flat=True)[:DISPATCH_BATCH]):
        notices += transition(task_id, lambda task: machine.expire(task, now), now)
    notices += dispatch_waiting(now)[1]
    return notices, to_close
