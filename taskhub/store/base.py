"""The store's interface: the few queries a task transition needs, and its write.

A backend reads a task with its assignments (:meth:`Store.load_task`), writes what a
transition changed (:meth:`Store.write_transition`) and finds the live subscribers of an
action (:meth:`Store.live_subscribers`). :class:`~taskhub.store.orm.OrmStore` does it with
the ORM and is the reference; the SQLite and PostgreSQL backends do the same in fewer
statements, and the services and race tests run against each of them and the ORM's.

How a transition stays safe against others on the same task is the backend's
:attr:`Store.optimistic`:

- not optimistic: the caller reads and writes in one transaction that holds the task's
  lock from the read on (``SELECT ... FOR UPDATE``, or SQLite's one writer);
- optimistic (PostgreSQL): the read takes no lock and the write is *fenced*, applied only
  if the task's version is still the one read; the caller runs no transaction.

Either way the task's row is written at the version read (``UPDATE ... WHERE version =
<read>``); a write that finds another version changes nothing and returns ``None``, and
the caller decides again on the fresh row.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from taskhub.core.states import TERMINAL_TASK_STATUSES
from taskhub.models import TaskRecord

#: The statuses of a finished task, as stored.
TERMINAL = tuple(sorted(status.value for status in TERMINAL_TASK_STATUSES))


class AssignmentRow(NamedTuple):
    """An assignment as a transition reads it: the columns the core needs, no model.

    A task offered to 20 services is loaded by each of their 20 returns; building 20
    model instances each time was the costliest step of those transitions.
    """

    pk: int
    service: str
    instance: uuid.UUID | None
    attempt: int
    state: str
    detail: str
    #: The channel of the instance that holds it, while that instance is connected.
    channel: str | None


class LoadedTask(NamedTuple):
    """A task as a transition reads it."""

    record: TaskRecord
    assignments: list[AssignmentRow]
    #: The channel of the instance that published the task, while it is connected.
    publisher_channel: str | None


class Subscriber(NamedTuple):
    """A live instance subscribed to an action, and its service. ``busy``: it has as many
    unfinished tasks as its concurrency allows; ``limited``: it announced a concurrency."""

    instance: uuid.UUID
    channel_name: str
    credential_id: int
    name: str
    sub_permissions: Sequence[str]
    busy: bool
    limited: bool


@dataclass
class Changes:
    """What one transition writes.

    ``fields`` are the task's changed columns by attribute name, written at
    ``record.version``; empty, the task's row is left alone; ``None``, ``record`` is
    inserted instead (payload included). ``assignment_updates`` are ``(pk, state,
    detail, instance)``. ``new_assignments`` and ``events`` are rows by attribute name; a column a
    row does not name gets the field's default. ``assigned`` instances were just given
    the task: their ``last_assigned_at`` becomes ``now``.
    """

    record: TaskRecord
    fields: dict[str, Any] | None
    now: datetime
    assignment_updates: list[tuple[int, str, str, uuid.UUID | None]] = field(default_factory=list)
    new_assignments: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    assigned: list[uuid.UUID] = field(default_factory=list)


class Written(NamedTuple):
    """A transition's write that held.

    ``event_ids`` are the ids of the events written, in order: their ``seq``. A fenced
    write (:attr:`Store.optimistic`) read back the task's ``watched`` flag and its
    publisher's channel as they were when it wrote (``fresh``); otherwise the values
    loaded under the lock still hold.
    """

    event_ids: tuple[int, ...] = ()
    fresh: bool = False
    watched: bool = False
    publisher_channel: str | None = None


class Store(ABC):
    """The hot path's queries on one database connection. Get one with
    :func:`taskhub.store.get_store`."""

    #: Whether transitions read without a lock and fence their writes (see the module).
    optimistic = False

    @abstractmethod
    def load_task(
        self, task_id: uuid.UUID | str, *, with_payload: bool = False, service: str | None = None, lock: bool = True
    ) -> LoadedTask | None:
        """The task and its assignments, or ``None`` (also for an id that is not a UUID).

        ``lock`` locks the task's row until the caller's transaction ends (a no-op where
        the transaction itself holds the only write lock). The payload, which can be
        large, is loaded only ``with_payload``; otherwise ``record.payload`` is ``None``.
        With ``service``, a finished task comes with that service's assignments only:
        what a service does to a finished task (a late return) concerns its own.
        """

    @abstractmethod
    def write_transition(self, changes: Changes) -> Written | None:
        """Write one transition; ``None`` when the task's version moved on (nothing was
        written, and the caller's transaction, if any, must roll back).

        Call inside ``transaction.atomic()`` unless :attr:`optimistic`.

        Raises:
            IntegrityError: an inserted task's id is taken.
        """

    @abstractmethod
    def live_subscribers(self, action: str, now: datetime) -> list[Subscriber]:
        """Connected live instances subscribed to ``action`` with an active credential,
        least recently assigned first (busy ones among them)."""

    @staticmethod
    def parse_id(task_id: uuid.UUID | str) -> uuid.UUID | None:
        """``task_id`` as a UUID, or ``None`` if it is not one."""
        if isinstance(task_id, uuid.UUID):
            return task_id
        try:
            return uuid.UUID(str(task_id))
        except ValueError:
            return None
