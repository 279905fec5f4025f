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

Calls wait in two lanes: :func:`run_deferred`'s (authentication and registration of
new connections, and the detach of closed ones) run on a database thread, never inline, and only when no call of
:func:`run` waits (but for one in every :data:`DEFERRED_EVERY`, so that they cannot
starve), and a group holds at most :data:`MAX_DEFERRED_GROUP` of them: a burst of
connects delays established connections' commands by about one call, not by the whole
burst.

Like Channels, each thread closes connections that errored or outlived ``CONN_MAX_AGE``
before and after its work.

On SQLite, while the database thread has nothing to do, a call runs *inline* instead, on
the event loop's thread (``TASKHUB_SQLITE_INLINE``, on by default). A transition costs
SQLite well under a millisecond, less than handing it to a thread and back, and the two
threads shared one GIL: inline, a sequential round trip cost the hub 5.2 → 4.0 ms of CPU,
and 50 tasks in flight ran ~185 → 250–300/s (bench/README.md). The call is synchronous from
start to end, so no other coroutine touches the connection meanwhile; that is why Django's
guard against ORM calls in async code is lifted for it. The loop's connection never
waits for a lock (``busy_timeout`` 0): if another connection holds SQLite's write lock
(the admin, a ``manage.py`` command), the call fails at once with "database is locked"
and is handed to the database thread, which waits. So a call must be safe to run again
after that error; the services layer's are (each write either takes the lock first or
is idempotent), and a call that carries on past one item's error must not carry on past
that one (:func:`is_locked`).

On SQLite in WAL mode, the hub's threads do not checkpoint the WAL themselves: a
checkpoint writes pages back to the database file and syncs it, which stalled the one
transition that crossed SQLite's threshold for ~20 ms (p99 of a round trip went from 5 to
24 ms). A checkpointer thread does it instead, every :data:`CHECKPOINT_INTERVAL` seconds,
without waiting for readers or writers (``PRAGMA wal_checkpoint(PASSIVE)``). Under a
steady load that alone let the WAL grow without end (220 MB in 10 s of progress round
trips): SQLite starts the WAL over only for a writer that begins once every frame is
written back, and the writes made during a second's checkpoint never were. So a
checkpoint that finds :data:`RESTART_FRAMES` or more follows with a ``RESTART`` that
takes the writer's lock for the few frames written meanwhile, if no one holds it (else
it is tried again, :data:`RESTART_RETRIES` times :data:`RESTART_RETRY` seconds apart), and
the hub's connections cut the WAL back to :data:`WAL_SIZE_LIMIT` bytes when they start it
over.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import DEFAULT_DB_ALIAS, OperationalError, close_old_connections, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from .conf import conf

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: Seconds between two WAL checkpoints on SQLite.
CHECKPOINT_INTERVAL = 1.0
#: Frames in the WAL (4 KiB pages; SQLite's own threshold) from which a checkpoint
#: makes sure the next writer starts the WAL over.
RESTART_FRAMES = 1000
#: Seconds before a restart that found someone in the way is tried again, and how many
#: times it is, per checkpoint.
RESTART_RETRY, RESTART_RETRIES = 0.05, 5
#: Bytes the WAL file is cut back to when it starts over (``journal_size_limit``).
WAL_SIZE_LIMIT = 16 * 1024 * 1024
#: Default number of database threads on databases other than SQLite.
DEFAULT_THREADS = 8

#: Most calls committed together on SQLite.
MAX_GROUP = 64
#: Most deferred calls (:func:`run_deferred`) in such a group.
MAX_DEFERRED_GROUP = 8
#: A deferred call runs after at most this many urgent ones taken while it waited.
DEFERRED_EVERY = 16

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
    __slots__ = ("func", "loop", "future", "later")

    def __init__(self, func: Callable[[], Any], loop: asyncio.AbstractEventLoop, *, later: bool = False) -> None:
        self.func, self.loop, self.later = func, loop, later
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
    """Database threads sharing two queues of calls, the established connections' first;
    ``group`` commits queued calls together."""

    def __init__(self, threads: int, *, group: bool) -> None:
        # One token per call put (None: stop a thread); the calls wait in the deques, so
        # a thread that wakes takes the most urgent call, not the oldest.
        self.tokens: queue.SimpleQueue[bool | None] = queue.SimpleQueue()
        self.urgent: collections.deque[_Call] = collections.deque()
        self.later: collections.deque[_Call] = collections.deque()
        self.lock = threading.Lock()
        #: Urgent calls taken since a deferred one last ran, while deferred ones waited.
        self.urgent_run = 0
        self.group = group
        #: Calls put and not yet answered; counted on the event loop's thread.
        self.pending = 0
        self.threads = [
            threading.Thread(target=self._serve, name=f"taskhub-db-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def put(self, call: _Call) -> None:
        (self.later if call.later else self.urgent).append(call)
        self.tokens.put(True)

    def stop(self) -> None:
        for _ in self.threads:
            self.tokens.put(None)
        for thread in self.threads:
            thread.join()

    def _take(self, *, later_ok: bool = True) -> _Call | None:
        """The next call for a token taken: an urgent one if any waits, but a deferred one
        after every :data:`DEFERRED_EVERY` urgent ones taken while it waited."""
        with self.lock:
            if later_ok and self.later and self.urgent_run >= DEFERRED_EVERY:
                self.urgent_run = 0
                return self.later.popleft()
            if self.urgent:
                self.urgent_run += 1 if self.later else 0
                return self.urgent.popleft()
            if not later_ok:
                return None
            self.urgent_run = 0
            return self.later.popleft()

    def _serve(self) -> None:
        _local.hub_thread = True
        try:
            while self.tokens.get() is not None:
                first = self._take()
                assert first is not None  # a token always has its call
                calls = [first]
                deferred = int(first.later)
                while self.group and len(calls) < MAX_GROUP:
                    try:
                        token = self.tokens.get_nowait()
                    except queue.Empty:
                        break
                    if token is None:
                        self.tokens.put(None)  # stop after this group
                        break
                    # Few deferred calls per group: an urgent call that queues meanwhile
                    # waits for the whole group.
                    call = self._take(later_ok=deferred < MAX_DEFERRED_GROUP)
                    if call is None:
                        self.tokens.put(True)  # its call stays queued for the next group
                        break
                    calls.append(call)
                    deferred += call.later
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
    """Run the synchronous ``func`` on a database thread, or inline on SQLite; return its
    result or raise its error.

    Call from async code, for anything that touches the ORM. The result comes once the
    work is committed (with its group, on SQLite). On SQLite ``func`` may run twice: inline
    first, then, if that failed with "database is locked", on the database thread (see
    the module's docstring).
    """
    return await _run(functools.partial(func, *args, **kwargs), later=False)


async def run_deferred(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """:func:`run`, behind every call of :func:`run` that waits for a thread.

    For work that may wait without holding anyone up: authentication, registration and
    what a closed connection leaves behind, so that a burst of connects or closes does
    not stall the traffic of established connections.
    """
    return await _run(functools.partial(func, *args, **kwargs), later=True)


async def _run(partial: functools.partial[R], *, later: bool) -> R:
    pool = _get_pool()
    # A pool that groups calls is SQLite's. Deferred calls never run inline: a burst of
    # them would run back to back on the event loop's thread, everyone else waiting.
    if not later and pool.group and pool.pending == 0 and conf.SQLITE_INLINE and not getattr(_local, "inline", False):
        try:
            return _run_inline(partial)
        except OperationalError as exc:
            if not is_locked(exc):
                raise
            log.debug("SQLite is locked by another connection: %r goes to the database thread", partial.func)
    call = _Call(partial, asyncio.get_running_loop(), later=later)
    pool.pending += 1
    pool.put(call)
    try:
        result: R = await call.future
    finally:
        pool.pending -= 1
    return result


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked": another connection holds the
    write lock."""
    return isinstance(exc, OperationalError) and "locked" in str(exc)


def refused_inline(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's lock met by a call running inline, which then runs
    again on the database thread (which waits for the lock).

    Call it in work that catches an item's error to go on with the next item (the
    sweeper's batches): such an error must propagate instead, or every later item would
    fail too. On the database thread the lock outlasted its wait: an item's failure.
    """
    return getattr(_local, "inline", False) and is_locked(exc)


def _run_inline(func: Callable[[], R]) -> R:
    """``func`` on this (the event loop's) thread, with Django's async guard lifted."""
    loop = asyncio.events._get_running_loop()
    _local.inline = _local.hub_thread = True
    # Django refuses ORM calls while this thread has a running loop; hide it for the call.
    asyncio.events._set_running_loop(None)
    try:
        conn = connections[DEFAULT_DB_ALIAS]
        conn.ensure_connection()
        if conn.__dict__.get("_taskhub_inline") is not conn.connection:
            with conn.cursor() as cursor:  # never wait for a lock on the loop's thread
                cursor.execute("PRAGMA busy_timeout = 0")
                cursor.execute("PRAGMA wal_autocheckpoint = 0")
            conn.__dict__["_taskhub_inline"] = conn.connection
        try:
            return func()
        finally:
            close_old_connections()
    finally:
        asyncio.events._set_running_loop(loop)
        _local.inline = False


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
            cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")


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
                    busy = checkpoint()[0]
                    # The pages are written back: only the restart is tried again, a few
                    # times, while the writers pause between transactions.
                    for _ in range(RESTART_RETRIES):
                        if not busy or self._stopping.wait(RESTART_RETRY):
                            break
                        busy = restart()
                except Exception:
                    log.exception("WAL checkpoint failed; retrying")
        finally:
            connections.close_all()

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def checkpoint() -> tuple[int, int, int]:
    """Checkpoint the SQLite WAL without waiting for anyone, and once it holds
    :data:`RESTART_FRAMES`, make the next writer start it over (:func:`restart`).

    Returns SQLite's ``(busy, frames in the WAL, frames checkpointed)``: the frames
    of the first step, and whether the restart, if due, found a writer, or a reader of
    an older snapshot, in the way.
    """
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        busy, log_frames, done = cursor.fetchone()
    if log_frames >= RESTART_FRAMES:
        busy = restart()
    return busy, log_frames, done


def restart() -> int:
    """Write back what the WAL holds beyond the last checkpoint and make the next writer
    start it over, unless a writer, or a reader of an older snapshot, is in the way:
    then nothing waits, and it returns 1 (0 once done)."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        (timeout,) = cursor.fetchone()
        cursor.execute("PRAGMA busy_timeout=0")  # never wait: the hub's writers would
        try:
            cursor.execute("PRAGMA wal_checkpoint(RESTART)")
            busy: int = cursor.fetchone()[0]
        finally:
            cursor.execute(f"PRAGMA busy_timeout={int(timeout)}")
    return busy
