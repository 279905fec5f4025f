"""The hub's database threads: every ORM call of the consumer and the sweeper runs here.

Call :func:`run` from async code instead of Channels' ``database_sync_to_async``. That one
is thread-sensitive: all ORM work of a process shares one thread, and asgiref's machinery
around each call cost about as much CPU as the transition it ran (bench/README.md).
Here plain threads take calls from a queue:

- on SQLite, one thread, since SQLite has one writer at a time anyway. Calls that queued
  up while it was busy run together in one transaction, each in its own savepoint, and
  are answered after the one commit (a *group commit*): a commit writes its pages to the
  WAL, the costliest step of a transition, so tasks in flight share it. A call that
  raises rolls back its savepoint only; a failed commit fails every call of the group.
- on other databases, ``TASKHUB_DB_THREADS`` threads (8 unless set), one call at a time
  each. Transitions lock their task row, and the commands of one connection still run one
  at a time and in order, because the consumer awaits each before it reads the next frame.

Like Channels, each thread closes connections that errored or outlived ``CONN_MAX_AGE``
before and after its work.

On SQLite in WAL mode, the hub's threads do not checkpoint the WAL themselves: a
checkpoint writes pages back to the database file and syncs it, which stalled the one
transition that crossed SQLite's threshold for ~20 ms (p99 of a round trip went from 5 to
24 ms). A checkpointer thread does it instead, every :data:`CHECKPOINT_INTERVAL` seconds,
without waiting for readers or writers (``PRAGMA wal_checkpoint(PASSIVE)``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from .conf import conf

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: Seconds between two WAL checkpoints on SQLite.
CHECKPOINT_INTERVAL = 1.0
#: Default number of database threads on databases other than SQLite.
DEFAULT_THREADS = 8

#: Most calls committed together on SQLite.
MAX_GROUP = 64

_lock = threading.Lock()
_pool: _Pool | None = None
_checkpointer: _Checkpointer | None = None
_local = threading.local()


def thread_count() -> int:
    """How many database threads this process runs (``TASKHUB_DB_THREADS``)."""
    if conf.DB_THREADS is not None:
        return int(conf.DB_THREADS)
    return 1 if connections[DEFAULT_DB_ALIAS].vendor == "sqlite" else DEFAULT_THREADS


class _Call:
    __slots__ = ("func", "loop", "future")

    def __init__(self, func: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.func, self.loop = func, loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def answer(self, ok: bool, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, ok, value)
        except RuntimeError:  # the caller's event loop is closed: nobody waits any more
            log.debug("dropped the answer of %r: its event loop is closed", self.func)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():  # the caller went away; the work is done all the same
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class _Pool:
    """Database threads sharing one queue of calls; ``group`` commits queued calls together."""

    def __init__(self, threads: int, *, group: bool) -> None:
        self.calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self.group = group
        self.threads = [
            threading.Thread(target=self._serve, name=f"taskhub-db-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        for _ in self.threads:
            self.calls.put(None)
        for thread in self.threads:
            thread.join()

    def _serve(self) -> None:
        _local.hub_thread = True
        try:
            while (call := self.calls.get()) is not None:
                calls = [call]
                while self.group and len(calls) < MAX_GROUP:
                    try:
                        more = self.calls.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self.calls.put(None)  # stop after this group
                        break
                    calls.append(more)
                close_old_connections()
                try:
                    outcomes = _run_one(calls[0]) if len(calls) == 1 else _run_group(calls)
                finally:
                    close_old_connections()
                for c, (ok, value) in zip(calls, outcomes, strict=True):
                    c.answer(ok, value)
        finally:
            connections.close_all()


def _run_one(call: _Call) -> list[tuple[bool, Any]]:
    try:
        return [(True, call.func())]
    except BaseException as exc:
        return [(False, exc)]


def _run_group(calls: list[_Call]) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    try:
        with transaction.atomic():
            for call in calls:
                try:
                    with transaction.atomic():  # a savepoint: a failing call undoes only itself
                        outcomes.append((True, call.func()))
                except BaseException as exc:
                    outcomes.append((False, exc))
    except Exception as exc:  # the commit failed: none of the group happened
        return [(False, exc)] * len(calls)
    return outcomes


def _get_pool() -> _Pool:
    global _pool, _checkpointer
    if _pool is None:
        with _lock:
            if _pool is None:
                sqlite = connections[DEFAULT_DB_ALIAS].vendor == "sqlite"
                if sqlite:
                    _checkpointer = _Checkpointer()
                    _checkpointer.start()
                threads = thread_count()
                _pool = _Pool(threads, group=sqlite and threads == 1)
    return _pool


async def run(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the synchronous ``func`` on a database thread; return its result or raise its error.

    Call from async code, for anything that touches the ORM. The result comes once the
    work is committed (with its group, on SQLite).
    """
    call = _Call(functools.partial(func, *args, **kwargs), asyncio.get_running_loop())
    _get_pool().calls.put(call)
    result: R = await call.future
    return result


def shutdown() -> None:
    """Let the database threads finish their calls, close their connections and stop.

    Call from synchronous code at shutdown, or between tests; the next :func:`run` starts
    new threads.
    """
    global _pool, _checkpointer
    with _lock:
        pool, checkpointer, _pool, _checkpointer = _pool, _checkpointer, None, None
    if checkpointer is not None:
        checkpointer.stop()
    if pool is not None:
        pool.stop()


def _no_autocheckpoint(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    if connection.vendor == "sqlite" and getattr(_local, "hub_thread", False):
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_autocheckpoint=0")


connection_created.connect(_no_autocheckpoint, dispatch_uid="taskhub.db.no_autocheckpoint")


class _Checkpointer(threading.Thread):
    """Checkpoints the SQLite WAL on its own connection, off the hot path."""

    def __init__(self) -> None:
        super().__init__(name="taskhub-checkpoint", daemon=True)
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.wait(CHECKPOINT_INTERVAL):
                try:
                    checkpoint()
                except Exception:
                    log.exception("WAL checkpoint failed; retrying")
        finally:
            connections.close_all()

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def checkpoint() -> tuple[int, int, int]:
    """Checkpoint the SQLite WAL without blocking anyone.

    Returns SQLite's ``(busy, frames in the WAL, frames checkpointed)``.
    """
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        busy, log_frames, done = cursor.fetchone()
    return busy, log_frames, done
