"""Handlers for worker processes the end-to-end tests start (``python -m taskhub.client
worker tests.e2e.jobs:NAME``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from taskhub.client import Task


async def hold(task: Task) -> Any:
    """Pick the task up, say which process has it, then work until cancelled."""
    await task.pickup()
    await task.update({"pid": os.getpid()})
    await asyncio.Event().wait()


async def echo(task: Task) -> Any:
    """Return the payload and which process ran it."""
    return {"payload": await task.get_payload(), "pid": os.getpid()}
