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
    """What a connection forwarded of one task: its version and the last event's seq."""

    version: int = 0
    seq: int = 0
    offered: int = 0  # the attempt it last forwarded an offer of
    succeeded: bool = False  # it forwarded the task's success (its result)


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

    def relay(self, task_id: str, version: int, messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages of a relay to forward: none if this version was heard already (as
        publisher or worker and as watcher), else those with a seq not heard yet."""
        heard = self.get(task_id)
        if version <= heard.version:
            return []
        heard.version = version
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
            version = versions.get(task_id)
            if version is None or version <= heard.version:
                continue
            missed = await db.run(queries.relayed_since, task_id, heard.seq, connection.instance_id)
            if not missed:  # it moved without news (a pickup, a touch)
                heard.version = max(heard.version, version)
                continue
            log.info("%d event(s) of %s were lost on the layer; sending them again", len(missed), task_id)
            await connection.dispatch({"type": RELAY, "task": task_id, "version": version, "messages": missed})
            sent += len(missed)
    return sent
