"""The hub's database threads: every ORM call of the consumer and the sweeper runs here.

Call :func:`run` from async code instead of Channels' ``database_sync_to_async``. That one
is thread-sensitive: all ORM work of a process shares one thread, and asgiref's machinery
around each call cost about as much CPU as the transition it ran (bench/README.md).
Here a plain thread pool runs the calls:

- on SQLite, one thread, since SQLite has one writer at a time anyway;
- on other databases, ``TASKHUB_DB_THREADS`` threads (8 unless set). Transitions lock
  their task row, and the commands of one connection still run one at a time and in
  order, because the consumer awaits each before it reads the next frame.

Like Channels, each call first and last closes connections that errored or outlived
``CONN_MAX_AGE``.

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
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections
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

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_checkpointer: _Checkpointer | None = None
_local = threading.local()


def thread_count() -> int:
    """How many database threads this process runs (``TASKHUB_DB_THREADS``)."""
    if conf.DB_THREADS is not None:
        return int(conf.DB_THREADS)
    return 1 if connections[DEFAULT_DB_ALIAS].vendor == "sqlite" else DEFAULT_THREADS


def _mark_hub_thread() -> None:
    _local.hub_thread = True


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_threads, _checkpointer
    if _pool is None:
        with _lock:
            if _pool is None:
                if connections[DEFAULT_DB_ALIAS].vendor == "sqlite":
                    _checkpointer = _Checkpointer()
                    _checkpointer.start()
                _pool_threads = thread_count()
                _pool = ThreadPoolExecutor(_pool_threads, "taskhub-db", initializer=_mark_hub_thread)
    return _pool


def _call(func: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    close_old_connections()
    try:
        return func(*args, **kwargs)
    finally:
        close_old_connections()


async def run(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the synchronous ``func`` on a database thread; return its result or raise its error.

    Call from async code, for anything that touches the ORM.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(_call, func, *args, **kwargs))


def shutdown() -> None:
    """Close every database thread's connections and stop the threads.

    Call from synchronous code at shutdown, or between tests; the next :func:`run` starts
    new threads.
    """
    global _pool, _checkpointer
    with _lock:
        pool, workers, checkpointer, _pool, _checkpointer = _pool, _pool_threads, _checkpointer, None, None
    if checkpointer is not None:
        checkpointer.stop()
    if pool is not None:
        # One job per thread: the barrier keeps each thread from taking a second one.
        barrier = threading.Barrier(workers)

        def close_and_wait() -> None:
            connections.close_all()
            barrier.wait()

        for future in [pool.submit(close_and_wait) for _ in range(workers)]:
            future.result()
        pool.shutdown(wait=True)


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
