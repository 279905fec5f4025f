"""The hub's operations on the database: the sans-I/O core applied to the ORM.

Every function here is synchronous. Call them from async code on the hub's database
threads (:func:`taskhub.db.run`), as the consumer and the sweeper do. Functions that
change tasks return :class:`~.routing.Notice` lists: what to send on the channel layer
*after* the write; a lost notice is recovered from the database.

============  ==========================================================
module        job
============  ==========================================================
routing       who hears what: notices, listeners, the watchers' groups
transitions   a task's transitions, each applied once (the only writer of tasks)
dispatch      which instance of each subscribed service gets a task
instances     credentials checked (and shared), connections registered, slots and leases
queries       the read side: visible tasks, snapshots, events
commands      each client command, checked and applied
sweeping      each process's periodic pass: leases, deadlines, waiting tasks
retention     old finished tasks deleted in batches, events and all
============  ==========================================================

Imports point up this table, never down: ``commands`` and ``sweeping`` use the modules
above them, ``transitions`` uses ``routing`` and the store, and ``routing`` uses the
core, the models and the store's row types only.
"""

from __future__ import annotations

from .commands import act, cancel, check_size, get_payload, publish, retry, subscribe, unsubscribe, watch
from .dispatch import dispatch_waiting
from .instances import Session, authenticate, connect, detach, disconnect, orphaned, release, renew_leases, shared
from .retention import Purged, expire_history, purge
from .routing import Notice, task_group
from .sweeping import SWEEP_BATCH, expire, offer_waiting, overdue, release_lapsed, sweep
from .transitions import OPTIMISTIC_ATTEMPTS, transition

__all__ = [
    "OPTIMISTIC_ATTEMPTS",
    "SWEEP_BATCH",
    "Notice",
    "Purged",
    "Session",
    "act",
    "authenticate",
    "cancel",
    "check_size",
    "connect",
    "detach",
    "disconnect",
    "dispatch_waiting",
    "expire",
    "expire_history",
    "get_payload",
    "offer_waiting",
    "orphaned",
    "overdue",
    "publish",
    "purge",
    "release",
    "release_lapsed",
    "renew_leases",
    "shared",
    "retry",
    "subscribe",
    "sweep",
    "task_group",
    "transition",
    "unsubscribe",
    "watch",
]
