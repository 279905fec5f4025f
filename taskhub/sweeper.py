"""Each hub process's sweeper: renews leases, enforces deadlines, re-offers waiting tasks,
and deletes old history (retention).

It starts with the server (:mod:`taskhub.asgi`), and on the first connection of an event
loop otherwise (:func:`ensure_started`). Deadlines live in the database, so a task still
times out when the process that accepted it has died: any surviving process's sweeper
expires it.

Retention (``TASKHUB_KEEP_SUCCEEDED``, ``TASKHUB_KEEP_FAILED``) runs at the end of a pass,
at most every :data:`RETENTION_INTERVAL` seconds, in at most
:data:`~taskhub.services.retention.EXPIRE_BUDGET` batches; a pass that leaves a backlog
has the next pass go on with it. Every process does it: their batches never overlap
(:mod:`taskhub.services.retention`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from channels.layers import get_channel_layer
from django.utils import timezone

from . import db, notify, recovery, services
from .conf import conf
from .core.codes import ErrorCode
from .notify import send_notices
from .services.retention import EXPIRE_BUDGET, Expiry, Purged
from .services.routing import CLOSE, Notice

log = logging.getLogger(__name__)

#: Seconds between two runs of retention in a process once nothing was left to delete
#: (or ``TASKHUB_SWEEP_INTERVAL`` if longer). Ages are counted in hours or days, so a
#: minute late costs nothing, and when nothing is due a run is one indexed query per status.
RETENTION_INTERVAL = 60.0

#: This process's name in ``Instance.process``.
PROCESS = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"

_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
#: When each event loop's sweeper next runs retention; absent: in its next pass.
_retention_due: dict[asyncio.AbstractEventLoop, datetime] = {}


def ensure_started() -> None:
    """Start this event loop's sweeper unless it runs. Call from async code."""
    loop = asyncio.get_running_loop()
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(_run(), name="taskhub-sweeper")


async def stop() -> None:
    """Stop this event loop's sweeper (tests, shutdown). Started again, it runs retention
    in its first pass."""
    _retention_due.pop(asyncio.get_running_loop(), None)
    task = _tasks.pop(asyncio.get_running_loop(), None)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def sweep_once(now: datetime | None = None) -> None:
    """One pass: each step's batches on a database thread, one call each, their notices
    and closes sent on the layer as they come (:mod:`taskhub.services.sweeping`).

    ``now`` defaults to the clock; tests pass a later moment to fire deadlines (and
    retention). A long pass renews the leases again every sweep interval, so that a
    backlog never lets this process's own instances lapse. Retention runs last, when due;
    its errors are logged, not raised.
    """
    now = now or timezone.now()
    layer = get_channel_layer()
    loop = asyncio.get_running_loop()
    renewed = -math.inf

    async def renew_if_due() -> None:
        nonlocal renewed
        if loop.time() - renewed < conf.SWEEP_INTERVAL:
            return
        renewed = loop.time()
        to_close = await db.run(services.renew_leases, PROCESS, timezone.now(), notify.channels())
        close = {"type": CLOSE, "code": ErrorCode.CREDENTIAL_DISABLED.value}
        await send_notices(layer, [Notice("channel", name, close) for name in to_close])
        # Connections whose instance an operator disconnected, or another connection
        # resumed, and which the layer did not tell.
        connections = {
            c.instance_id: c.channel_name
            for c in notify.consumers()
            if getattr(c, "instance_id", None) is not None and not getattr(c, "closing", False)
        }
        gone, taken = await db.run(services.orphaned, connections)
        for names, code in ((gone, ErrorCode.DISCONNECTED), (taken, ErrorCode.SUPERSEDED)):
            await send_notices(layer, [Notice("channel", name, {"type": CLOSE, "code": code.value}) for name in names])

    await renew_if_due()
    after = None
    while True:
        notices, after = await db.run(services.release_lapsed, now, services.SWEEP_BATCH, after)
        await send_notices(layer, notices)
        await renew_if_due()
        if after is None:
            break
    # Several batches at once where the database has several threads (PostgreSQL).
    size, width = services.SWEEP_BATCH, db.thread_count()
    cursor = None
    while due := await db.run(services.overdue, now, size * width, cursor):
        ids = [task_id for _, task_id in due]
        batches = [ids[i : i + size] for i in range(0, len(ids), size)]
        for notices in await asyncio.gather(*(db.run(services.expire, batch, now) for batch in batches)):
            await send_notices(layer, notices)
        await renew_if_due()
        cursor = due[-1]
    more = True
    while more:
        notices, more = await db.run(services.offer_waiting, now)
        await send_notices(layer, notices)
        await renew_if_due()
    await recovery.recover(PROCESS, notify.consumers())
    await _retention_if_due(now, renew_if_due)


async def expire_history(
    now: datetime, budget: int = EXPIRE_BUDGET, between: Callable[[], Awaitable[None]] | None = None
) -> Purged:
    """Apply the retention settings at ``now``: delete the tasks that finished longer ago
    than ``TASKHUB_KEEP_SUCCEEDED`` or ``TASKHUB_KEEP_FAILED`` say, in at most ``budget``
    batches of ``TASKHUB_PURGE_BATCH``, and await ``between`` after each.

    Each batch is its own database call, in the lane of work that may wait
    (:func:`taskhub.db.run_deferred`): the connections' commands go first, and on SQLite
    none waits longer than one batch. With both settings ``None`` it makes no call.

    Returns:
        What it deleted; ``more`` if tasks may be left for the next run.

    Raises:
        DatabaseError: a batch failed (the batches before it are committed).
    """
    expiry = Expiry(now)
    purged = Purged()
    for _ in range(budget):
        if expiry.done:
            break
        purged += await db.run_deferred(expiry.step)
        if between is not None:
            await between()
    purged.more = not expiry.done
    if purged.total:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(purged.tasks.items()) if n)
        log.info(
            "retention: deleted %s tasks (%d events)%s",
            counts,
            sum(purged.events.values()),
            "; more in the next pass" if purged.more else "",
        )
    return purged


async def _retention_if_due(now: datetime, between: Callable[[], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    interval = timedelta(seconds=max(conf.SWEEP_INTERVAL, RETENTION_INTERVAL))
    due = _retention_due.get(loop)
    # Not yet due; a clock set back puts it off by one interval at most.
    if due is not None and now < due <= now + interval:
        return
    more = False
    try:
        more = (await expire_history(now, between=between)).more
    except asyncio.CancelledError:
        raise
    except Exception:
        # Retention can wait; deadlines and leases in the next passes cannot.
        log.exception("retention failed; trying again in %d s", interval.total_seconds())
    _retention_due[loop] = now if more else now + interval


async def _run() -> None:
    while True:
        try:
            await sweep_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sweeper pass failed; retrying")
        await asyncio.sleep(conf.SWEEP_INTERVAL)
