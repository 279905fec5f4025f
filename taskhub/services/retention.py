"""Retention: deleting old history in batches, events and assignments with their task.

Only finished tasks are ever deleted, by the status they finished in and how long ago
(``TaskRecord.finished_at``, indexed with the status for this). The settings say how
long each is kept (:data:`KEEP_SETTING`):

- ``success`` (a service returned a result): ``TASKHUB_KEEP_SUCCEEDED``;
- ``ended`` (no result, and no error: every service saw or dropped it, as with a
  notification nobody answers): ``TASKHUB_KEEP_SUCCEEDED`` too;
- ``failed``, whatever the reason (a worker's error, a timeout, a cancel):
  ``TASKHUB_KEEP_FAILED``, apart, because operators audit failures for longer.

A pending or started task is never deleted, however old. A failed task retried on
request runs again (its ``finished_at`` is cleared) and is out of reach until it
finishes again.

Each batch is one short transaction: it selects up to ``batch`` ids of the oldest tasks
of one status by the index, locking them (``FOR UPDATE SKIP LOCKED`` where the database
has it; SQLite's IMMEDIATE transactions hold the write lock instead), then deletes their
events, their assignments and the tasks themselves. Nothing is loaded into Python but the
ids. So a transition can never slip in between (a failed task retried meanwhile is
either retried first, and not deleted, or finds no task), and purgers in several hub
processes take disjoint batches instead of waiting for each other; a row deleted by
another purger first is not counted twice.

:func:`purge` is for the ``taskhub_purge`` command and scripts; :func:`expire_history`
applies the settings in a bounded number of batches, and the sweeper
(:mod:`taskhub.sweeper`) runs the same steps (:class:`Expiry`) one database call each.
:func:`remove_delivered` deletes a task published with ``autoremove`` once its result
reached its publisher.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import Q, QuerySet

from taskhub.conf import conf
from taskhub.core.states import TERMINAL_TASK_STATUSES, TaskStatus
from taskhub.models import Assignment, TaskEvent, TaskRecord

#: The statuses a purge may delete (success, failed, ended), in the order it takes them.
FINISHED = tuple(status for status in TaskStatus if status in TERMINAL_TASK_STATUSES)

#: The setting (``TASKHUB_<name>``) that says how long tasks of each status are kept.
KEEP_SETTING = {
    TaskStatus.SUCCESS: "KEEP_SUCCEEDED",
    TaskStatus.ENDED: "KEEP_SUCCEEDED",
    TaskStatus.FAILED: "KEEP_FAILED",
}

#: Batches :func:`expire_history` deletes at most per call, unless told otherwise, and
#: each sweeper pass: a batch of 100 tasks (the default) with 6 events each takes about
#: 6 ms (docs/retention.md), so a pass spends tens of milliseconds on a backlog, and goes
#: on with it in the next pass.
EXPIRE_BUDGET = 4


@dataclasses.dataclass
class Purged:
    """What a purge deleted (or, dry, would delete): rows counted by their task's status."""

    tasks: Counter[str] = dataclasses.field(default_factory=Counter)
    events: Counter[str] = dataclasses.field(default_factory=Counter)
    assignments: Counter[str] = dataclasses.field(default_factory=Counter)
    #: Transactions (or, dry, reads) it took.
    batches: int = 0
    #: Whether tasks old enough may be left: a ``limit`` or a budget stopped it.
    more: bool = False

    @property
    def total(self) -> int:
        """Tasks deleted, whatever their status."""
        return sum(self.tasks.values())

    def __iadd__(self, other: Purged) -> Purged:
        # Counter's += keeps positive counts only: a status with none is not listed.
        self.tasks += other.tasks
        self.events += other.events
        self.assignments += other.assignments
        self.batches += other.batches
        self.more = self.more or other.more
        return self


def cutoffs(now: datetime) -> dict[TaskStatus, datetime]:
    """The finished statuses the settings expire, each with the moment before which a
    task of that status finished is deleted; empty when both settings are ``None``."""
    found: dict[TaskStatus, datetime] = {}
    for status in FINISHED:
        keep = getattr(conf, KEEP_SETTING[status])
        if keep is not None:
            found[status] = now - timedelta(seconds=keep)
    return found


def _finished(status: TaskStatus, older_than: datetime) -> QuerySet[TaskRecord]:
    # Equality on the status and a range on finished_at: the taskhub_task_finished index,
    # read in its order, oldest first.
    return TaskRecord.objects.filter(status=status, finished_at__lt=older_than).order_by("finished_at")


def delete_tasks(task_ids: Collection[uuid.UUID]) -> tuple[int, int, int]:
    """Delete these tasks with their events and assignments, in three statements.

    Call inside a transaction that holds the tasks (locked, or SQLite's write lock), with
    ids that are finished tasks: nothing here checks what they are. Ids already gone are
    skipped. Django's ``pre_delete`` and ``post_delete`` signals are not sent for these
    rows, as ``QuerySet.update()`` sends no ``post_save``.

    Returns:
        ``(tasks, events, assignments)`` deleted.
    """
    if not task_ids:
        return 0, 0, 0
    ids = list(task_ids)
    # The children first: their foreign keys are checked at commit on PostgreSQL and
    # SQLite, but at once on databases whose constraints are not deferred.
    events = _delete(TaskEvent.objects.filter(task_id__in=ids))
    assignments = _delete(Assignment.objects.filter(task_id__in=ids))
    tasks = _delete(TaskRecord.objects.filter(pk__in=ids))
    return tasks, events, assignments


def remove_delivered(task_id: str) -> bool:
    """Delete a task published with ``autoremove`` (events and assignments with it) once
    its result reached the publisher: call after forwarding its ``end`` to the publisher's
    connection, or answering the publisher's ``watch`` of it. Anything else (a task
    without ``autoremove``, one that did not succeed, one gone already) is left alone.

    Returns:
        Whether the task was deleted.
    """
    with transaction.atomic():
        chosen = TaskRecord.objects.filter(pk=task_id, autoremove=True, status=TaskStatus.SUCCESS)
        if connection.features.has_select_for_update:
            chosen = chosen.select_for_update()
        ids = list(chosen.values_list("pk", flat=True))
        return delete_tasks(ids)[0] > 0


def _delete(rows: QuerySet[TaskRecord] | QuerySet[TaskEvent] | QuerySet[Assignment]) -> int:
    # One DELETE ... WHERE: Django's delete() would load every task into Python to
    # collect what cascades, which is done above by hand (measured in docs/retention.md).
    return int(rows._raw_delete(rows.db))


def purge_batch(status: TaskStatus, older_than: datetime, size: int) -> Purged:
    """Delete up to ``size`` of the oldest tasks of ``status`` that finished before
    ``older_than``, with their events and assignments, in one transaction.

    Call from a database thread (:func:`taskhub.db.run`) or a script. Tasks another
    purger holds are skipped (they are being deleted), so fewer than ``size`` does not
    mean that none are left for good; ``more`` says whether a full batch was taken.

    Raises:
        ValueError: ``status`` is not a finished status.
    """
    status = _check_status(status)
    with transaction.atomic():
        tasks = _finished(status, older_than)
        if connection.features.has_select_for_update:
            tasks = tasks.select_for_update(skip_locked=connection.features.has_select_for_update_skip_locked)
        ids = list(tasks.values_list("id", flat=True)[:size])
        deleted, events, assignments = delete_tasks(ids)
    return _counted(status, deleted, events, assignments, more=len(ids) == size)


def count_batch(
    status: TaskStatus, older_than: datetime, size: int, after: tuple[datetime, uuid.UUID] | None = None
) -> tuple[Purged, tuple[datetime, uuid.UUID] | None]:
    """What :func:`purge_batch` would delete, read without a lock: up to ``size`` tasks
    from just after ``after`` (the last ``(finished_at, id)`` read), with their events
    and assignments.

    Returns:
        ``(counts, where the next batch starts)``; ``None`` once none is left.

    Raises:
        ValueError: ``status`` is not a finished status.
    """
    status = _check_status(status)
    tasks = _finished(status, older_than)
    if after is not None:
        finished_at, task_id = after
        tasks = tasks.filter(Q(finished_at__gt=finished_at) | Q(finished_at=finished_at, id__gt=task_id))
    # finished_at is never NULL here (finished_at < older_than); "if f" tells the type checker.
    rows = [(f, i) for f, i in tasks.order_by("finished_at", "id").values_list("finished_at", "id")[:size] if f]
    ids = [task_id for _, task_id in rows]
    events = TaskEvent.objects.filter(task_id__in=ids).count() if ids else 0
    assignments = Assignment.objects.filter(task_id__in=ids).count() if ids else 0
    purged = _counted(status, len(ids), events, assignments, more=len(ids) == size)
    return purged, (rows[-1] if purged.more else None)


def _counted(status: TaskStatus, tasks: int, events: int, assignments: int, *, more: bool) -> Purged:
    """One batch's counts; a status with none is not listed."""
    # Unary + drops zero counts.
    return Purged(
        +Counter({status.value: tasks}),
        +Counter({status.value: events}),
        +Counter({status.value: assignments}),
        batches=1,
        more=more,
    )


def purge(
    *,
    statuses: Iterable[TaskStatus | str] = FINISHED,
    older_than: datetime,
    batch: int | None = None,
    dry_run: bool = False,
    limit: int | None = None,
) -> Purged:
    """Delete the tasks of ``statuses`` that finished before ``older_than``, with their
    events and assignments, ``batch`` tasks per transaction (``TASKHUB_PURGE_BATCH``),
    oldest first, at most ``limit`` in all; or with ``dry_run`` count what it would delete.

    Call from synchronous code: the ``taskhub_purge`` command, a script, a periodic job
    of your own. It runs until nothing is left, so it may take a while on a big backlog;
    each batch is committed as it goes, so stopping it half-way loses nothing. The hub
    keeps serving meanwhile: the batches are short.

    Raises:
        ValueError: a status is not finished (pending and started tasks are never
            purged), or ``batch`` or ``limit`` is not a positive integer.
    """
    chosen = list(dict.fromkeys(_check_status(s) for s in statuses))
    size = conf.PURGE_BATCH if batch is None else batch
    for name, value in (("batch", size), ("limit", limit)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    purged = Purged()
    left = limit
    for status in chosen:
        after = None
        while left is None or left > 0:
            take = size if left is None else min(size, left)
            if dry_run:
                step, after = count_batch(status, older_than, take, after)
            else:
                step = purge_batch(status, older_than, take)
            purged += dataclasses.replace(step, more=False)
            if left is not None:
                left -= step.tasks[status.value]
            if not step.more:
                break
        else:
            # The limit is spent, maybe before the end of this status or the next ones.
            purged.more = True
            break
    return purged


class Expiry:
    """One run of the settings' retention (``TASKHUB_KEEP_SUCCEEDED``,
    ``TASKHUB_KEEP_FAILED``) at ``now``, a batch per :meth:`step`.

    The sweeper runs :meth:`step` on a database thread, one call per batch, as long as
    its budget lasts and :attr:`done` is false; :func:`expire_history` runs it in a loop.
    """

    def __init__(self, now: datetime) -> None:
        self.cutoffs = cutoffs(now)
        self.size = conf.PURGE_BATCH
        #: The statuses that may have tasks to delete, the next batch's first.
        self.left = list(self.cutoffs)

    @property
    def done(self) -> bool:
        """Whether every status is done: a batch found fewer tasks than it could take."""
        return not self.left

    def step(self) -> Purged:
        """Delete the next batch: the next status's, in turn (a backlog of one status
        does not hold up the other's); a status with nothing to delete costs one indexed
        query and is done. Returns what it deleted, nothing once :attr:`done`."""
        purged = Purged()
        for _ in range(len(self.left)):
            status = self.left.pop(0)
            batch = purge_batch(status, self.cutoffs[status], self.size)
            purged += batch
            if batch.more:
                self.left.append(status)
            if batch.total:
                break
        purged.more = not self.done
        return purged


def expire_history(now: datetime, budget: int = EXPIRE_BUDGET) -> Purged:
    """Apply ``TASKHUB_KEEP_SUCCEEDED`` and ``TASKHUB_KEEP_FAILED`` at ``now``: delete
    tasks that finished longer ago than they say, in at most ``budget`` batches of
    ``TASKHUB_PURGE_BATCH``; ``more`` says whether some may be left for the next call.

    Call from synchronous code (tests, scripts, a periodic job of your own); the hub's
    sweepers do it already, a batch per database call. With both settings ``None`` it
    does nothing, without a query; with nothing to delete it costs one indexed query per
    status concerned.
    """
    expiry = Expiry(now)
    purged = Purged()
    for _ in range(budget):
        if expiry.done:
            break
        purged += expiry.step()
    purged.more = not expiry.done
    return purged


def _check_status(status: TaskStatus | str) -> TaskStatus:
    """The finished status named ``status``.

    Raises:
        ValueError: it names no status, or one of an unfinished task.
    """
    try:
        value = TaskStatus(status)
    except ValueError:
        value = None
    if value not in FINISHED:
        names = ", ".join(FINISHED)
        raise ValueError(f"{status!r} is not a finished status: tasks are purged only when {names}")
    assert value is not None
    return value
