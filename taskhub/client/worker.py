"""A worker's side of the client: handlers run on the tasks offered to this instance.

Each offer becomes a :class:`~taskhub.client.tasks.Task` and an asyncio task that runs
its action's handler; the handler's return value is the result, its exception the
failure (``fail`` with the error's text).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

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

    def offer(self, offer: Offer) -> bool:
        """Run the handler of the offer's action on it; whether there is one."""
        handler = self.handlers.get(offer.action)
        if handler is None:
            log.warning("taskhub: offered %s, which has no handler", offer.action)
            return False
        task = Task(self.client, offer)
        self.tasks[task.id] = task
        self.client.spawn(self._work(task, handler))
        return True

    def notify(self, message: TaskEventMessage) -> None:
        task = self.tasks.get(message.task)
        if task is not None:
            task._notify(message)

    async def _work(self, task: Task, handler: Handler) -> None:
        try:
            outcome = handler(task)
            result = await outcome if inspect.isawaitable(outcome) else outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("taskhub: handler for %s failed", task.action)
            await self._finish(task, "fail", error=f"{type(exc).__name__}: {exc}")
        else:
            await self._finish(task, "return", result=result)
        finally:
            self.tasks.pop(task.id, None)
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
