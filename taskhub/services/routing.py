"""Who hears what: the notices a committed transition sends, and to whom.

The services layer returns :class:`Notice` lists; the consumer and the sweeper send them
after the write (:mod:`taskhub.notify`). The database names the channels: the publisher's
connection while it is connected, the instances of the services on the task, and the
task's group for its watchers. A lost notice is recovered from the database (``watch``).

Monitors (staff dashboards) hear every transition of every task through one group,
:data:`MONITOR_GROUP`, but only while one is live somewhere: each monitor keeps a row in
the ``Monitor`` table, and each process reads that table at most once every
:data:`MONITOR_REFRESH` seconds (:func:`monitored`), so that with no dashboard open a
transition pays one clock reading and nothing is sent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

from django.db import DatabaseError, transaction
from django.utils import timezone

from taskhub.conf import conf
from taskhub.core import machine
from taskhub.core.codes import RELAYED_KINDS, EventKind
from taskhub.core.commands import MISSING
from taskhub.core.frames import encoded_size
from taskhub.core.messages import LoggedEvent, Offer, Transition, event_message
from taskhub.core.states import ACTIVE_ASSIGNMENT_STATES, AssignmentState, TaskStatus
from taskhub.models import Monitor, TaskRecord
from taskhub.store import AssignmentRow

log = logging.getLogger(__name__)

#: The channel-layer message types the consumer handles.
OFFER = "taskhub.offer"
RELAY = "taskhub.relay"
CLOSE = "taskhub.close"
MONITOR = "taskhub.monitor"

#: The channel-layer group of every monitor connection, on every process.
MONITOR_GROUP = "taskhub.monitors"
#: Seconds a process trusts what it last read of the monitors' presence: a monitor that
#: connects to another process is heard from within that.
MONITOR_REFRESH = 1.0
#: Bytes of one value of an event's data that a ``transition`` carries; a larger one
#: (an update's data, a result) is left out, and read with ``watch``.
MONITOR_VALUE_LIMIT = 4096


class Notice(NamedTuple):
    """A channel-layer message to send once the write it follows is committed."""

    kind: Literal["channel", "group"]
    #: The channel's or the group's name.
    name: str
    message: dict[str, Any]


class _Presence:
    """This process's knowledge of whether any monitor is live, anywhere."""

    def __init__(self) -> None:
        self.live = False
        #: ``time.monotonic()`` until which :attr:`live` is trusted.
        self.until = -math.inf
        self.lock = threading.Lock()


_presence = _Presence()


def monitored() -> bool:
    """Whether any monitor is live on any hub process, as this process last read it.

    Call from a database thread (it may read the ``Monitor`` table, at most once every
    :data:`MONITOR_REFRESH` seconds per process). Never raises: a failed read keeps what
    was known.
    """
    now = time.monotonic()
    if now < _presence.until:  # the hot path: one clock reading
        return _presence.live
    if not _presence.lock.acquire(blocking=False):
        return _presence.live  # another thread is reading it
    try:
        # A savepoint inside a caller's transaction, so that a failed read cannot spoil it.
        with transaction.atomic() if transaction.get_connection().in_atomic_block else contextlib.nullcontext():
            _presence.live = Monitor.objects.filter(lease_expires_at__gt=timezone.now()).exists()
    except DatabaseError:
        log.warning("could not read whether monitors are live; assuming %s", _presence.live, exc_info=True)
    finally:
        _presence.until = time.monotonic() + MONITOR_REFRESH
        _presence.lock.release()
    return _presence.live


def forget_presence() -> None:
    """Read the monitors' presence again on the next transition (tests)."""
    _presence.until = -math.inf


def monitor_lease(now: datetime) -> datetime:
    """When a monitor renewed ``now`` lapses: as a process's instances do
    (``TASKHUB_INSTANCE_LEASE``)."""
    return now + timedelta(seconds=conf.INSTANCE_LEASE)


def add_monitor(user: str, channel_name: str, process: str, remote_addr: str, now: datetime) -> uuid.UUID:
    """Record a live monitor (and forget those that lapsed); this process hears of it at
    once, the others within :data:`MONITOR_REFRESH` seconds. Returns its id, for
    :func:`renew_monitor` and :func:`remove_monitor`."""
    Monitor.objects.filter(lease_expires_at__lte=now).delete()
    monitor = Monitor.objects.create(
        user=user[:150],
        channel_name=channel_name,
        process=process,
        remote_addr=remote_addr[:100],
        connected_at=now,
        lease_expires_at=monitor_lease(now),
    )
    _presence.live, _presence.until = True, time.monotonic() + MONITOR_REFRESH
    return monitor.pk


def renew_monitor(monitor_id: uuid.UUID, now: datetime) -> bool:
    """Renew a monitor's lease; ``False`` if its row is gone (it lapsed and was removed)."""
    return bool(Monitor.objects.filter(pk=monitor_id).update(lease_expires_at=monitor_lease(now)))


def remove_monitor(monitor_id: uuid.UUID) -> None:
    """The monitor left: other processes stop sending to the group within
    :data:`MONITOR_REFRESH` seconds once no monitor is left."""
    Monitor.objects.filter(pk=monitor_id).delete()


def task_group(task_id: str | uuid.UUID) -> str:
    """The channel-layer group of a task's watchers, named by the id's hex form."""
    return f"taskhub.task.{uuid.UUID(str(task_id)).hex}"


# Assignment states whose instance hears the task's events.
_LISTENING = frozenset({*ACTIVE_ASSIGNMENT_STATES, AssignmentState.SEEN})


def listeners(
    publisher_channel: str | None,
    rows: Sequence[AssignmentRow],
    task: machine.Task,
    events: Sequence[machine.Event],
    sender: str | None,
) -> list[str]:
    """The channels that hear a transition's task events, besides the task's watchers.

    The publisher's connection while it is connected, and the instances of the services
    still on the task before the transition (so that services told of another's success
    hear it). The sender of an update does not get it back; a service whose own return,
    drop or fail this is hears no more of the task, unless it published it. Instances
    lost in this transition are gone.
    """
    lost = {(a.service, a.attempt) for a in task.assignments if a.state is AssignmentState.LOST}
    channels = {
        row.channel
        for row in rows
        if row.channel and row.state in _LISTENING and (row.service, row.attempt) not in lost
    }
    update = any(e.kind is EventKind.UPDATE for e in events)
    if sender is not None:
        channels.discard(sender)  # its own command is no news to it
    # The publisher hears the outcome even of its own command, but not its own update.
    if publisher_channel and not (update and publisher_channel == sender):
        channels.add(publisher_channel)
    return sorted(channels)


def offer_message(record: TaskRecord, attempt: int) -> dict[str, Any]:
    """The ``task`` message that offers ``record`` to one instance: with its payload
    when that is small enough (``TASKHUB_INLINE_PAYLOAD_SIZE``)."""
    return Offer(
        task=str(record.id),
        action=record.action,
        attempt=attempt,
        publisher=record.publisher_name,
        payload_size=record.payload_size,
        payload=record.payload if record.payload_size <= conf.INLINE_PAYLOAD_SIZE else MISSING,
    ).to_dict()


def notices_for(
    record: TaskRecord,
    events: Sequence[machine.Event],
    seqs: Sequence[int],
    offer_channels: dict[str, str],
    listening: Iterable[str] = (),
    *,
    prev: int = 0,
) -> list[Notice]:
    """What to tell whom about ``events`` (numbered ``seqs``), once they are committed.

    Offers go to their instances (``offer_channels``: instance id to channel). The task
    events of one transition travel as one relay, in order, to each of the ``listening``
    channels directly and, if the task was ever watched, to the task's group. A relay
    carries the task's version, so that a connection that both listens and watches hears
    it once, and ``prev``, the version of the task's relay before it (its
    ``relayed_version`` before this transition), so that a connection that missed one
    reads what it missed from the database (:class:`~taskhub.recovery.Ledger`). Offers
    and the monitors' feed carry it too, and an offer the seq before this transition's
    events: what its instance hears of the task starts there.
    """
    task_id = str(record.id)
    notices: list[Notice] = []
    relayed: list[dict[str, Any]] = []
    exclude: str | None = None
    offers: dict[int, dict[str, Any]] = {}  # by attempt: a fan-out's services get one offer
    for event, seq in zip(events, seqs, strict=True):
        if event.kind is EventKind.START and event.instance in offer_channels:
            offer = offers.get(event.attempt)
            if offer is None:
                offered = offer_message(record, event.attempt)
                offer = offers[event.attempt] = {"type": OFFER, "message": offered, "prev": prev, "since": seqs[0] - 1}
            notices.append(Notice("channel", offer_channels[event.instance], offer))
        elif event.kind in RELAYED_KINDS:
            message = event_message(task_id, seq, event.kind, event.service, event.attempt, event.data)
            assert message is not None
            relayed.append(message.to_dict())
            if event.kind is EventKind.UPDATE:
                exclude = event.instance  # the sender knows its own update
    if relayed:
        relay = {
            "type": RELAY,
            "task": task_id,
            "version": record.version,
            "prev": prev,
            "messages": relayed,
            "exclude": exclude,
        }
        if record.autoremove and record.status == TaskStatus.SUCCESS and record.publisher_instance_id:
            # The publisher's connection deletes the task once it has forwarded the end.
            relay["remove_by"] = str(record.publisher_instance_id)
        notices += [Notice("channel", channel, relay) for channel in listening]
        if record.watched:  # else the group is empty: on Redis, sending costs 2 commands
            notices.append(Notice("group", task_group(task_id), relay))
    if events and monitored():
        feed = {
            "type": MONITOR,
            "message": transition_message(record, events, seqs),
            "version": record.version,
            "prev": prev,
        }
        notices.append(Notice("group", MONITOR_GROUP, feed))
    return notices


def transition_message(record: TaskRecord, events: Sequence[machine.Event], seqs: Sequence[int]) -> dict[str, Any]:
    """The ``transition`` message monitors hear: the task after it, the events it wrote.

    Their ``at`` is now: the events were written a moment ago (``watch`` has the
    database's times).
    """
    at = timezone.now().isoformat()
    task = {
        "id": str(record.id),
        "action": record.action,
        "status": record.status,
        "attempt": record.attempt,
        "publisher": record.publisher_name,
        "progress": record.progress,
        "has_result": record.has_result,
        "failure_reason": record.failure_reason,
        "failure_detail": record.failure_detail,
        "retries": record.retries,
        "version": record.version,
        "created_at": record.created_at.isoformat(),
        "started_at": record.started_at.isoformat() if record.started_at else None,
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
    }
    logged = []
    for event, seq in zip(events, seqs, strict=True):
        data, omitted = _fitting(event.data)
        entry = LoggedEvent(
            seq=seq, kind=event.kind.value, service=event.service, attempt=event.attempt, data=data, at=at
        ).to_dict()
        if omitted:
            entry["omitted"] = omitted
        logged.append(entry)
    return Transition(task=task, events=logged).to_dict()


def _fitting(data: Any) -> tuple[Any, list[str]]:
    """An event's data with each value over :data:`MONITOR_VALUE_LIMIT` bytes set to
    ``None``, and the keys of those left out."""
    if not isinstance(data, dict):
        return data, []
    omitted = [key for key, value in data.items() if encoded_size(value) > MONITOR_VALUE_LIMIT]
    if not omitted:
        return data, []
    return {key: None if key in omitted else value for key, value in data.items()}, omitted
