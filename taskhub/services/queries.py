"""The read side: tasks and their events as the protocol shows them.

What a credential may see is decided here once: the tasks it published, and the tasks
offered to its service. Anything else answers ``unknown_task``, the same answer as for a
task that does not exist. A monitor (a staff session, passed as ``credential=None``) sees
every task, and reads what the dashboard shows (:func:`stats`).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Count, Exists, OuterRef, Q

from taskhub.conf import conf
from taskhub.core.codes import RELAYED_KINDS, EventKind
from taskhub.core.errors import UnknownTask
from taskhub.core.frames import encoded_size
from taskhub.core.messages import LoggedEvent, TaskSnapshot, event_message
from taskhub.core.states import HELD_ASSIGNMENT_STATES, AssignmentState, TaskStatus
from taskhub.models import Assignment, Credential, Instance, Monitor, Subscription, TaskEvent, TaskRecord

from .routing import offer_message


def visible_task(credential: Credential | None, task_id: str, *, lock: bool = False) -> TaskRecord:
    """The task, if the credential published it or works on it (``None``, a monitor:
    any task).

    ``lock`` locks its row (``SELECT ... FOR UPDATE``, as transitions under the lock do)
    inside the caller's ``atomic()``.

    Raises:
        UnknownTask: otherwise (the same answer as for a task that does not exist).
    """
    tasks = TaskRecord.objects.all()
    if lock and connection.features.has_select_for_update:
        tasks = tasks.select_for_update(of=("self",) if connection.features.has_select_for_update_of else ())
    record = tasks.filter(pk=task_id).first()
    if record is None or not (
        credential is None
        or record.publisher_id == credential.pk
        or record.assignments.filter(service=credential.name).exists()
    ):
        raise UnknownTask(f"no task {task_id} of yours")
    return record


def answer_budget() -> int:
    """Bytes the items of one ``state`` or ``tasks`` answer may take: the hub's message
    size (its peers' frame limit is at least that), less room for the envelope."""
    return int(conf.MAX_MESSAGE_SIZE) - ENVELOPE


#: Bytes kept for what surrounds a page's items in its message.
ENVELOPE = 1024


def listed(
    credential: Credential | None,
    *,
    status: str | None,
    action: str | None,
    limit: int,
    service: str | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """The tasks the credential published or was offered, newest first (``tasks``): those
    :func:`visible_task` shows it, and no other; with ``service``, those offered to that
    service among them.

    For a monitor (``credential=None``): every task, each as :func:`monitor_snapshot`
    shows it, without its result (``watch`` has it), so that a page holds more of them.

    Returns:
        ``(snapshots, more)``: ``more`` when the list was cut to fit one message.
    """
    tasks = TaskRecord.objects.all()
    if credential is not None:
        offered = Assignment.objects.filter(task=OuterRef("pk"), service=credential.name)
        tasks = tasks.filter(Q(publisher=credential) | Exists(offered))
    if service is not None:
        tasks = tasks.filter(Exists(Assignment.objects.filter(task=OuterRef("pk"), service=service)))
    if status is not None:
        tasks = tasks.filter(status=status)
    if action is not None:
        tasks = tasks.filter(action=action)
    tasks = tasks.order_by("-created_at")
    if credential is not None:
        return _page(task_snapshot(record) for record in tasks.defer("payload")[:limit].iterator(chunk_size=100))
    records = list(tasks.defer("payload", "result")[:limit])
    parts = services_on(records)
    return _page(monitor_snapshot(record, parts.get(record.pk, []), with_result=False) for record in records)


def _page(snapshots: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """As many of ``snapshots`` as one answer holds, and whether some were left out."""
    budget, used = answer_budget(), 0
    page: list[dict[str, Any]] = []
    for snapshot in snapshots:
        size = encoded_size(snapshot) + 1
        if page and used + size > budget:
            return page, True
        page.append(snapshot)
        used += size
    return page, False


def services_on(records: list[TaskRecord]) -> dict[uuid.UUID, list[dict[str, str]]]:
    """The services on each task's current attempt, and where each is with it
    (``{"service": …, "state": …}``, in the order they were offered)."""
    attempts = {record.pk: record.attempt for record in records}
    found: dict[uuid.UUID, list[dict[str, str]]] = defaultdict(list)
    ids = list(attempts)
    for start in range(0, len(ids), 500):
        rows = (
            Assignment.objects.filter(task_id__in=ids[start : start + 500])
            .order_by("id")
            .values_list("task_id", "service", "attempt", "state")
        )
        for task_id, service, attempt, state in rows:
            if attempt == attempts[task_id]:
                found[task_id].append({"service": service, "state": state})
    return found


def monitor_snapshot(record: TaskRecord, services: list[dict[str, str]], *, with_result: bool = True) -> dict[str, Any]:
    """A task as a monitor reads it: :func:`task_snapshot` with its ``version`` (what a
    ``transition`` carries: a higher one is newer), when it was first offered
    (``started_at``) and the ``services`` on its current attempt (:func:`services_on`).
    ``with_result`` false leaves the result out (``null``; ``has_result`` still says)."""
    snapshot = task_snapshot(record) if with_result else task_snapshot(record, result=None)
    snapshot.update(
        version=record.version,
        started_at=record.started_at.isoformat() if record.started_at else None,
        services=services,
    )
    return snapshot


def state_page(record: TaskRecord, since: int, *, monitor: bool = False) -> dict[str, Any]:
    """The fields of a ``state`` message: the task's snapshot (a monitor's:
    :func:`monitor_snapshot`) and its events with a ``seq`` above ``since``, oldest first,
    as many as one message holds.

    A page that cannot hold the events and the task's result too leaves the result out
    and says ``more``: the next page, from its last event, has it. Each page holds one
    event at least, so that a reader that follows ``more`` gets to the end.
    """
    parts = services_on([record]).get(record.pk, []) if monitor else None
    snapshot = task_snapshot(record) if parts is None else monitor_snapshot(record, parts)
    slim = {**snapshot, "result": None}
    budget, used = answer_budget(), 0
    room = budget - encoded_size(slim)
    events: list[dict[str, Any]] = []
    more = False
    rows = record.events.filter(id__gt=since).order_by("id").iterator(chunk_size=100)
    for e in rows:
        event = LoggedEvent(
            seq=e.id, kind=e.kind, service=e.service, attempt=e.attempt, data=e.data, at=e.created_at.isoformat()
        ).to_dict()
        size = encoded_size(event) + 1
        if events and used + size > room:
            more = True
            break
        events.append(event)
        used += size
    if used + encoded_size(snapshot) > budget:  # the result does not fit beside the events
        return {"task": slim, "events": events, "more": True}
    return {"task": snapshot, "events": events, "more": more}


_RECORDED = object()


def task_snapshot(record: TaskRecord, result: Any = _RECORDED) -> dict[str, Any]:
    """A task as the protocol shows it (the ``task`` of a ``state`` message); ``result``
    replaces its result (``None``: to leave a result that was not loaded out)."""
    return TaskSnapshot(
        id=str(record.id),
        action=record.action,
        status=record.status,
        attempt=record.attempt,
        publisher=record.publisher_name,
        progress=record.progress,
        has_result=record.has_result,
        result=record.result if result is _RECORDED else result,
        failure_reason=record.failure_reason,
        failure_detail=record.failure_detail,
        retries=record.retries,
        retry_at=record.retry_at.isoformat() if record.retry_at else None,
        created_at=record.created_at.isoformat(),
        finished_at=record.finished_at.isoformat() if record.finished_at else None,
    ).to_dict()


# -- what the layer may have lost (taskhub.recovery) ---------------------------------------


def offered_to(process: str) -> list[tuple[uuid.UUID, uuid.UUID, int]]:
    """``(instance, task, attempt)`` of the offers that instances of ``process`` have not
    picked up yet, in tasks still running."""
    return list(
        Assignment.objects.filter(
            instance__process=process, state=AssignmentState.OFFERED, task__status=TaskStatus.STARTED
        ).values_list("instance_id", "task_id", "attempt")
    )


def offer_of(task_id: uuid.UUID, attempt: int, instance: uuid.UUID | None = None) -> dict[str, Any] | None:
    """The offer message of the task's attempt, while the task runs that attempt and its
    part is still offered to ``instance`` (to some instance, if ``None``): not picked up,
    finished or handed to another instance since :func:`offered_to` read it."""
    offered = Assignment.objects.filter(task=OuterRef("pk"), attempt=attempt, state=AssignmentState.OFFERED)
    if instance is not None:
        offered = offered.filter(instance=instance)
    record = TaskRecord.objects.filter(Exists(offered), pk=task_id, status=TaskStatus.STARTED, attempt=attempt).first()
    return None if record is None else offer_message(record, attempt)


def versions(task_ids: list[str]) -> dict[str, tuple[int, str | None]]:
    """The current version of each of the tasks (those that still exist), and the
    instance that removes it once its publisher has the result (``remove_by`` of a relay:
    a task published with ``autoremove`` that succeeded), or ``None``."""
    found: dict[str, tuple[int, str | None]] = {}
    for start in range(0, len(task_ids), 500):
        rows = TaskRecord.objects.filter(pk__in=task_ids[start : start + 500]).values_list(
            "id", "version", "autoremove", "status", "publisher_instance_id"
        )
        for pk, version, autoremove, status, publisher in rows:
            removable = autoremove and status == TaskStatus.SUCCESS and publisher is not None
            found[str(pk)] = (version, str(publisher) if removable else None)
    return found


def relayed_since(task_id: str, seq: int, instance: uuid.UUID | None) -> list[dict[str, Any]]:
    """The live messages of the task's relayed events after ``seq``, but the updates of
    ``instance`` (which knows its own)."""
    events = TaskEvent.objects.filter(task_id=uuid.UUID(task_id), id__gt=seq, kind__in=RELAYED_KINDS)
    if instance is not None:  # in the query: a long task's own updates would all be read
        events = events.exclude(kind=EventKind.UPDATE, instance=instance)
    messages = []
    for e in events.order_by("id"):
        message = event_message(str(task_id), e.id, e.kind, e.service, e.attempt, e.data)
        if message is not None:
            messages.append(message.to_dict())
    return messages


# -- what monitors read (the dashboard) ----------------------------------------------------

#: Most credentials, instances per credential, actions and waiting tasks one ``stats``
#: answer lists.
STATS_SERVICES = 200
STATS_INSTANCES = 50
STATS_ACTIONS = 200
STATS_WAITING = 50
#: The rates' windows: a minute and an hour.
MINUTE, HOUR = timedelta(minutes=1), timedelta(hours=1)


def stats(now: datetime) -> dict[str, Any]:
    """What the dashboard shows beside the tasks, for monitors (``stats``), from the
    database at ``now``:

    - ``services``: the active credentials, and any with live instances, each with its
      live instances (their subscriptions, and how many tasks each holds);
    - ``actions``: per action, its tasks ``pending`` and ``started`` now, its subscribed
      live instances, and per window (``minute``, ``hour``) the tasks ``published`` and
      those that finished, by status (``success``, ``failed``, ``ended``);
    - ``waiting``: the tasks waiting for a subscriber (pending, and not for a retry's
      backoff), oldest first, and their ``count``;
    - ``monitors``: how many monitors are live.

    Each list is capped (:data:`STATS_SERVICES` and the others); ``more`` says one was.
    """
    services, subscribers, services_cut = _services(now)
    actions = _actions(now, subscribers)
    waiting = TaskRecord.objects.filter(Q(retry_at__isnull=True) | Q(retry_at__lte=now), status=TaskStatus.PENDING)
    oldest = list(waiting.defer("payload", "result").order_by("created_at")[:STATS_WAITING])
    return {
        "at": now.isoformat(),
        "services": services,
        "actions": actions[:STATS_ACTIONS],
        "waiting": {
            "count": len(oldest) if len(oldest) < STATS_WAITING else waiting.count(),
            "tasks": [task_snapshot(record, result=None) for record in oldest],
        },
        "monitors": Monitor.objects.filter(lease_expires_at__gt=now).count(),
        "more": services_cut or len(actions) > STATS_ACTIONS,
    }


def _services(now: datetime) -> tuple[list[dict[str, Any]], dict[str, int], bool]:
    """``(services, live subscribers by action, whether a list was cut)`` for :func:`stats`."""
    cut = False
    instances: dict[int, list[dict[str, Any]]] = defaultdict(list)
    by_id: dict[uuid.UUID, dict[str, Any]] = {}
    for instance in Instance.objects.filter(lease_expires_at__gt=now).order_by("connected_at"):
        if len(instances[instance.credential_id]) >= STATS_INSTANCES:
            cut = True
            continue
        entry: dict[str, Any] = {
            "id": str(instance.pk),
            "process": instance.process,
            "remote_addr": instance.remote_addr,
            "connected_at": instance.connected_at.isoformat(),
            "detached_at": instance.detached_at.isoformat() if instance.detached_at else None,
            "concurrency": instance.concurrency,
            "subscriptions": [],
            "holding": 0,
        }
        instances[instance.credential_id].append(entry)
        by_id[instance.pk] = entry
    subscribers: dict[str, int] = defaultdict(int)
    subscriptions = Subscription.objects.filter(instance__lease_expires_at__gt=now).order_by("action")
    for instance_id, action in subscriptions.values_list("instance_id", "action"):
        subscribers[action] += 1
        if instance_id in by_id:
            by_id[instance_id]["subscriptions"].append(action)
    held = Assignment.objects.filter(instance_id__in=list(by_id), state__in=sorted(HELD_ASSIGNMENT_STATES))
    for instance_id, n in held.values_list("instance_id").annotate(n=Count("id")).order_by():
        by_id[instance_id]["holding"] = n
    credentials = Credential.objects.filter(Q(is_active=True) | Q(pk__in=list(instances))).order_by("name")
    services = [
        {
            "id": credential.pk,
            "name": credential.name,
            "active": credential.is_active,
            "max_instances": credential.max_instances,
            "instances": instances.get(credential.pk, []),
        }
        for credential in credentials[: STATS_SERVICES + 1]
    ]
    return services[:STATS_SERVICES], subscribers, cut or len(services) > STATS_SERVICES


def _actions(now: datetime, subscribers: dict[str, int]) -> list[dict[str, Any]]:
    """Every action with unfinished tasks, tasks in the last hour or live subscribers, and
    its counts (for :func:`stats`), by name."""
    actions: dict[str, dict[str, Any]] = {}

    def of(name: str) -> dict[str, Any]:
        if name not in actions:
            empty = {"published": 0, "success": 0, "failed": 0, "ended": 0}
            actions[name] = {
                "action": name,
                "pending": 0,
                "started": 0,
                "subscribers": 0,
                "minute": dict(empty),
                "hour": dict(empty),
            }
        return actions[name]

    unfinished = TaskRecord.objects.filter(status__in=[TaskStatus.PENDING, TaskStatus.STARTED])
    for name, status, n in unfinished.values_list("action", "status").annotate(n=Count("id")).order_by():
        of(name)[status] = n
    published = (
        TaskRecord.objects.filter(created_at__gt=now - HOUR)
        .values_list("action")
        .annotate(minute=Count("id", filter=Q(created_at__gt=now - MINUTE)), hour=Count("id"))
        .order_by()
    )
    for name, minute, hour in published:
        of(name)["minute"]["published"], of(name)["hour"]["published"] = minute, hour
    finished = (
        TaskRecord.objects.filter(
            status__in=[TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.ENDED], finished_at__gt=now - HOUR
        )
        .values_list("action", "status")
        .annotate(minute=Count("id", filter=Q(finished_at__gt=now - MINUTE)), hour=Count("id"))
        .order_by()
    )
    for name, status, minute, hour in finished:
        of(name)["minute"][status], of(name)["hour"][status] = minute, hour
    for name, n in subscribers.items():
        of(name)["subscribers"] = n
    return [actions[name] for name in sorted(actions)]
