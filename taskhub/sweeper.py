"""Each hub process's sweeper: renews leases, enforces deadlines, re-offers waiting tasks.

It starts with the server (:mod:`taskhub.asgi`), and on the first connection of an event
loop otherwise (:func:`ensure_started`). Deadlines live in the database, so a task still
times out when the process that accepted it has died: any surviving process's sweeper
expires it.
"""

from __future__ import annotations

import asyncio
import logging
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
    """One pass: database work on a database thread, then notices and closes on the layer.

    ``now`` defaults to the clock; tests pass a later moment to fire deadlines.
    """
    notices, to_close = await db.run(services.sweep, PROCESS, now or timezone.now())
    layer = get_channel_layer()
    await send_notices(layer, notices)
    close = {"type": CLOSE, "code": ErrorCode.CREDENTIAL_DISABLED.value}
    await send_notices(layer, [Notice("channel", name, close) for name in to_close])
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
