"""What each connection heard, and what the database says it missed.

The channel layer may drop a message (a full channel, an expired one, a Redis restart).
The database has what every message said, so nothing waits on a lost one: each hub
process, on every sweep, compares what its connections heard with the database and
sends them what they missed (:func:`recover`):

- an offer still waiting for its instance's pickup that the connection never forwarded;
- the task events (``update``, ``success``, ``retry``, ``fail``, ``end``) of the tasks a
  connection published, was offered or watches, newer than the last it heard.

Each connection keeps a :class:`Ledger` of what it forwarded of the tasks it follows
until their ``end``; memory stays bounded (:data:`REMEMBERED` tasks, the least recently
heard forgotten first).
"""

from __future__ import annotations

import collections
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import db
from .services import queries
from .services.routing import OFFER, RELAY

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)

#: Tasks a connection remembers hearing of.
REMEMBERED = 1000


@dataclass
class Heard:
    """What a connection forwarded of one task: the version of the last relay it heard
    and the last event's seq."""

    version: int = 0
    seq: int = 0
    offered: int = 0  # the attempt it last forwarded an offer of
    succeeded: bool = False  # it forwarded the task's success (its result)
    # Whether ``version`` says which relays came before (it heard the task from its
    # publish, its offer or a watch's read, or heard one relay since): only then can a
    # relay tell it that it missed one.
    known: bool = False
    # The instance that deletes the task once its end is forwarded (a relay's remove_by).
    remove_by: str | None = None
    # A catch-up read is under way; the newest relay that came meanwhile (read again).
    reading: bool = False
    pending: int = 0


class Ledger:
    """What one connection forwarded, task by task (least recently heard first), and what
    it had heard of the tasks it is done with (``gone``: their end forwarded, its part
    over, or no longer watched): a late relay of one of those with nothing new is dropped,
    and one with news (a task retried, say) brings the entry back, as it was."""

    def __init__(self) -> None:
        self.tasks: collections.OrderedDict[str, Heard] = collections.OrderedDict()
        self.gone: collections.OrderedDict[str, Heard] = collections.OrderedDict()

    def get(self, task_id: str) -> Heard:
        """The task's entry, created if new (or brought back, if it was gone), moved to
        the most recent end."""
        heard = self.tasks.get(task_id)
        if heard is None:
            heard = self.tasks[task_id] = self.gone.pop(task_id) if task_id in self.gone else Heard()
            if len(self.tasks) > REMEMBERED:
                self.tasks.popitem(last=False)
        else:
            self.tasks.move_to_end(task_id)
        return heard

    def start(self, task_id: str, version: int, seq: int = 0) -> Heard:
        """Hear of the task from here on: every relay up to ``version`` and every event
        up to ``seq`` are accounted for (a publish, an offer, a watch's read)."""
        heard = self.get(task_id)
        heard.version, heard.seq, heard.known = max(heard.version, version), max(heard.seq, seq), True
        return heard

    def relay(
        self,
        task_id: str,
        version: int,
        prev: int,
        messages: Iterable[dict[str, Any]] | None,
        remove_by: str | None = None,
    ) -> list[dict[str, Any]] | None:
        """The messages of a relay to forward: none if this version was heard already (as
        publisher or worker and as watcher), or if it brings nothing new of a task that is
        gone, else those with a seq not heard yet.

        Returns ``None`` when a relay before this one was lost (``prev``, the version of
        the task's relay before it, is above the last one heard), or when the relay's
        ``messages`` are not at hand (``None``): then :func:`catch_up`. While a catch-up
        read is under way, a newer relay is left to it (it reads again).
        """
        gone = self.gone.get(task_id)
        if gone is not None:
            if remove_by is not None:
                gone.remove_by = remove_by
            if version <= gone.version:
                return []
            if messages is not None and prev <= gone.version and all(m.get("seq", 0) <= gone.seq for m in messages):
                gone.version = version  # late news of what it heard (a catch-up read the end)
                return []
        heard = self.get(task_id)
        if remove_by is not None:
            heard.remove_by = remove_by
        if version <= heard.version:
            return []
        if heard.reading:
            heard.pending = max(heard.pending, version)
            return []
        if messages is None or (heard.known and prev > heard.version):
            return None
        return _fresh(heard, version, messages)

    def offer(self, task_id: str, attempt: int) -> bool:
        """Record an offer forwarded; ``False`` if this one was forwarded already."""
        heard = self.get(task_id)
        if heard.offered >= attempt:
            return False
        heard.offered = attempt
        return True

    def forget(self, task_id: str) -> None:
        """Done with the task (its end forwarded, its part over, no longer watched): drop
        its entry, keeping what was heard of it among the ``gone``."""
        heard = self.tasks.pop(task_id, None)
        if heard is not None:
            self.gone[task_id] = heard
            if len(self.gone) > REMEMBERED:
                self.gone.popitem(last=False)


def _fresh(heard: Heard, version: int, messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with a seq not heard yet; the entry moves on to ``version``."""
    heard.version, heard.known = max(heard.version, version), True
    fresh = [m for m in messages if m.get("seq", 0) > heard.seq]
    if fresh:
        heard.seq = max(m["seq"] for m in fresh)
    return fresh


#: Reads one catch-up makes at most; relays that keep coming meanwhile are left to the
#: next relay or to the sweeper's recovery (it compares versions).
CATCH_UP_READS = 2


async def catch_up(ledger: Ledger, task_id: str, version: int, instance: uuid.UUID | None) -> list[dict[str, Any]]:
    """The task's events a connection missed (its ``ledger`` says which it heard), read
    from the database when the relay at ``version`` told it that one was lost; but
    ``instance``'s own updates. Call instead of forwarding that relay (when
    :meth:`Ledger.relay` returned ``None``). One catch-up at a time per task: relays
    that come meanwhile are read again after it (:data:`CATCH_UP_READS`); nothing if the
    task was forgotten meanwhile."""
    heard = ledger.get(task_id)
    heard.reading = True
    forward: list[dict[str, Any]] = []
    try:
        for _ in range(CATCH_UP_READS):
            missed = await db.run(queries.relayed_since, task_id, heard.seq, instance)
            if ledger.tasks.get(task_id) is not heard:
                return []  # its part is over, or it was forgotten for want of room
            forward += _fresh(heard, version, missed)
            if heard.pending <= heard.version:
                break
            version, heard.pending = heard.pending, 0
        if instance is not None and heard.remove_by is None and any(m["type"] == "end" for m in forward):
            # The relay that names who removes an autoremove task may not come now.
            heard.remove_by = (await db.run(queries.versions, [task_id])).get(task_id, (0, None))[1]
    finally:
        heard.reading = False
    log.info("a relay of %s was lost on the layer; %d event(s) read again", task_id, len(forward))
    return forward


class Connection(Protocol):
    """What :func:`recover` needs of a connection (``TaskHubConsumer``)."""

    instance_id: uuid.UUID | None
    ledger: Ledger

    async def dispatch(self, message: dict[str, Any]) -> None: ...


async def recover(process: str, connections: Iterable[Connection]) -> int:
    """Send the connections of this process (``process``: its name in
    ``Instance.process``) what the layer lost; call on every sweep.

    Returns:
        How many messages were sent again.
    """
    by_instance = {c.instance_id: c for c in connections if c.instance_id is not None}
    if not by_instance:
        return 0
    sent = 0
    for instance_id, offered, attempt in await db.run(queries.offered_to, process):
        connection = by_instance.get(instance_id)
        if connection is not None and connection.ledger.get(str(offered)).offered < attempt:
            offer = await db.run(queries.offer_of, offered, attempt, instance_id)
            if offer is not None:
                log.info("offer of %s to %s was lost on the layer; sending it again", offered, instance_id)
                await connection.dispatch({"type": OFFER, "message": offer})
                sent += 1
    followed = {task_id for c in by_instance.values() for task_id in c.ledger.tasks}
    versions = await db.run(queries.versions, list(followed))
    for connection in by_instance.values():
        for task_id, heard in list(connection.ledger.tasks.items()):
            version, remove_by = versions.get(task_id, (0, None))
            if version <= heard.version:
                continue
            missed = await db.run(queries.relayed_since, task_id, heard.seq, connection.instance_id)
            if not missed:  # it moved without news (a pickup, a touch)
                heard.version = max(heard.version, version)
                continue
            log.info("%d event(s) of %s were lost on the layer; sending them again", len(missed), task_id)
            relay = {"type": RELAY, "task": task_id, "version": version, "messages": missed, "remove_by": remove_by}
            await connection.dispatch(relay)
            sent += len(missed)
    return sent
