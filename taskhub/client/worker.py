"""A worker's side of the client: handlers run on the tasks offered to this instance.

Each offer becomes a :class:`~taskhub.client.tasks.Task` and an asyncio task that runs
its action's handler; the handler's return value is the result, its exception the
failure (``fail`` with the error's text, cut to the hub's limit). When the hub ends the
handler's part (the task was cancelled, timed out, or another service's success ended
it; its attempt failed; it went to another instance), the handler is cancelled: it sees
:class:`asyncio.CancelledError`, and nothing more is sent for it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from taskhub.core.commands import MAX_ERROR_LENGTH
from taskhub.core.errors import TaskHubError
from taskhub.core.messages import Offer, TaskEventMessage

from .tasks import Task

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("taskhub.client")

Handler = Callable[[Task], Awaitable[Any] | Any]


class Worker:
    """The handlers of one client, and the tasks they run."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.handlers: dict[str, Handler] = {}
        #: The tasks whose handlers run, by id.
        self.tasks: dict[str, Task] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def offer(self, offer: Offer) -> bool:
        """Run the handler of the offer's action on it; whether it has one (an offer of a
        task this worker already runs, sent again after a reconnect, counts as had)."""
        running = self.tasks.get(offer.task)
        if running is not None and running.attempt == offer.attempt:
            return True
        handler = self.handlers.get(offer.action)
        if handler is None:
            log.warning("taskhub: offered %s, which has no handler", offer.action)
            return False
        task = Task(self.client, offer)
        self.tasks[task.id] = task
        self.client.protocol.follow(task.id, resume=True)
        job = self._running[task.id] = self.client.spawn(self._work(task, handler))
        task._on_over = functools.partial(job.cancel, "the hub ended this part of the task")
        return True

    def notify(self, message: TaskEventMessage) -> None:
        task = self.tasks.get(message.task)
        if task is not None:
            task._notify(message)

    def abandon(self) -> None:
        """This client's instance is gone (a reconnect did not get it back): its tasks went
        to other instances, so every handler is cancelled."""
        for task in list(self.tasks.values()):
            task._end()

    async def _work(self, task: Task, handler: Handler) -> None:
        try:
            outcome = handler(task)
            result = await outcome if inspect.isawaitable(outcome) else outcome
        except asyncio.CancelledError:
            if not task.over:
                raise  # the client is closing
            log.info("taskhub: the hub ended %s's part in task %s; its handler was cancelled", task.action, task.id)
            return
        except Exception as exc:
            log.exception("taskhub: handler for %s failed", task.action)
            await self._finish(task, "fail", error=_error_text(exc))
        else:
            await self._finish(task, "return", result=result)
        finally:
            self.tasks.pop(task.id, None)
            self._running.pop(task.id, None)
            self.client._unfollow(task.id)
            task._forget_updates()

    async def _finish(self, task: Task, type_: str, **fields: Any) -> None:
        try:
            await task._settle_updates()
        except TaskHubError as exc:
            log.warning("taskhub: an update of %s was not accepted: %s", task.id, exc)
        if task.done:
            return
        task.done = True
        try:
            await task._command(type_, **fields)
        except TaskHubError as exc:
            log.warning("taskhub: %s of %s not accepted: %s", type_, task.id, exc)


def _error_text(exc: BaseException) -> str:
    """The text a ``fail`` carries: the error's type and message, cut to the hub's limit."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text
