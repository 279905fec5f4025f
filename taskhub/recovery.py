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


class Ledger:
    """What one connection forwarded, task by task (least recently heard first)."""

    def __init__(self) -> None:
        self.tasks: collections.OrderedDict[str, Heard] = collections.OrderedDict()

    def get(self, task_id: str) -> Heard:
        """The task's entry, created if new, moved to the most recent end."""
        heard = self.tasks.get(task_id)
        if heard is None:
            heard = self.tasks[task_id] = Heard()
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
        self, task_id: str, version: int, prev: int, messages: Iterable[dict[str, Any]] | None
    ) -> list[dict[str, Any]] | None:
        """The messages of a relay to forward: none if this version was heard already (as
        publisher or worker and as watcher), else those with a seq not heard yet.

        Returns ``None`` when a relay before this one was lost (``prev``, the version of
        the task's relay before it, is above the last one heard), or when the relay's
        ``messages`` are not at hand (``None``): then :func:`catch_up`.
        """
        heard = self.get(task_id)
        if version <= heard.version:
            return []
        if messages is None or (heard.known and prev > heard.version):
            return None
        return self.caught_up(task_id, version, messages)

    def caught_up(self, task_id: str, version: int, messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages read from the database after a lost relay to forward, and the
        entry moved on to ``version``, the relay's that told of the loss."""
        heard = self.get(task_id)
        heard.version, heard.known = max(heard.version, version), True
        fresh = [m for m in messages if m.get("seq", 0) > heard.seq]
        if fresh:
            heard.seq = max(m["seq"] for m in fresh)
        return fresh

    def offer(self, task_id: str, attempt: int) -> bool:
        """Record an offer forwarded; ``False`` if this one was forwarded already."""
        heard = self.get(task_id)
        if heard.offered >= attempt:
            return False
        heard.offered = attempt
        return True

    def forget(self, task_id: str) -> None:
        self.tasks.pop(task_id, None)


async def catch_up(ledger: Ledger, task_id: str, version: int, instance: uuid.UUID | None) -> list[dict[str, Any]]:
    """The task's events a connection missed (its ``ledger`` says which it heard), read
    from the database when the relay at ``version`` told it that one was lost; but
    ``instance``'s own updates. Call instead of forwarding that relay."""
    since = ledger.get(task_id).seq
    missed = await db.run(queries.relayed_since, task_id, since, instance)
    log.info("a relay of %s was lost on the layer; %d event(s) read again", task_id, len(missed))
    return ledger.caught_up(task_id, version, missed)


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
