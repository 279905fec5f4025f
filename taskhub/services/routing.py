"""Who hears what: the notices a committed transition sends, and to whom.

The services layer returns :class:`Notice` lists; the consumer and the sweeper send them
after the write (:mod:`taskhub.notify`). The database names the channels: the publisher's
connection while it is connected, the instances of the services on the task, and the
task's group for its watchers. A lost notice is recovered from the database (``watch``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

from taskhub.conf import conf
from taskhub.core import machine
from taskhub.core.codes import RELAYED_KINDS, EventKind
from taskhub.core.commands import MISSING
from taskhub.core.messages import Offer, event_message
from taskhub.core.states import ACTIVE_ASSIGNMENT_STATES, AssignmentState
from taskhub.models import TaskRecord
from taskhub.store import AssignmentRow

#: The channel-layer message types the consumer handles.
OFFER = "taskhub.offer"
RELAY = "taskhub.relay"
CLOSE = "taskhub.close"


class Notice(NamedTuple):
    """A channel-layer message to send once the write it follows is committed."""

    kind: Literal["channel", "group"]
    #: The channel's or the group's name.
    name: str
    message: dict[str, Any]


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
) -> list[Notice]:
    """What to tell whom about ``events`` (numbered ``seqs``), once they are committed.

    Offers go to their instances (``offer_channels``: instance id to channel). The task
    events of one transition travel as one relay, in order, to each of the ``listening``
    channels directly and, if the task was ever watched, to the task's group. A relay
    carries the task's version, so that a connection that both listens and watches hears
    it once.
    """
    task_id = str(record.id)
    notices: list[Notice] = []
    relayed: list[dict[str, Any]] = []
    exclude: str | None = None
    for event, seq in zip(events, seqs, strict=True):
        if event.kind is EventKind.START and event.instance in offer_channels:
            offer = {"type": OFFER, "message": offer_message(record, event.attempt)}
            notices.append(Notice("channel", offer_channels[event.instance], offer))
        elif event.kind in RELAYED_KINDS:
            message = event_message(task_id, seq, event.kind, event.service, event.attempt, event.data)
            assert message is not None
            relayed.append(message.to_dict())
            if event.kind is EventKind.UPDATE:
                exclude = event.instance  # the sender knows its own update
    if relayed:
        relay = {"type": RELAY, "task": task_id, "version": record.version, "messages": relayed, "exclude": exclude}
        notices += [Notice("channel", channel, relay) for channel in listening]
        if record.watched:  # else the group is empty: on Redis, sending costs 2 commands
            notices.append(Notice("group", task_group(task_id), relay))
    return notices
