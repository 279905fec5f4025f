"""Each hub process's sweeper: renews leases, enforces deadlines, re-offers waiting tasks.

It starts with the server (:mod:`taskhub.asgi`), and on the first connection of an event
loop otherwise (:func:`ensure_started`). Deadlines live in the database, so a task still
times out when the process that accepted it has died: any surviving process's sweeper
expires it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
from datetime import datetime

from channels.layers import get_channel_layer
from django.utils import timezone

from . import db, notify, recovery, services
from .conf import conf
from .core.codes import ErrorCode
from .notify import send_notices
from .services.routing import CLOSE, Notice

log = logging.getLogger(__name__)

#: This process's name in ``Instance.process``.
PROCESS = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"

_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}


def ensure_started() -> None:
    """Start this event loop's sweeper unless it runs. Call from async code."""
    loop = asyncio.get_running_loop()
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(_run(), name="taskhub-sweeper")


async def stop() -> None:
    """Stop this event loop's sweeper (tests, shutdown)."""
    task = _tasks.pop(asyncio.get_running_loop(), None)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def sweep_once(now: datetime | None = None) -> None:
    """One pass: each step's batches on a database thread, one call each, their notices
    and closes sent on the layer as they come (:mod:`taskhub.services.sweeping`).

    ``now`` defaults to the clock; tests pass a later moment to fire deadlines. A long
    pass renews the leases again every sweep interval, so that a backlog never lets this
    process's own instances lapse.
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


async def _run() -> None:
    while True:
        try:
            await sweep_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sweeper pass failed; retrying")
        await asyncio.sleep(conf.SWEEP_INTERVAL)
