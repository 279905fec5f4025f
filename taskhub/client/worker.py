"""A worker's side of the client: handlers run on the tasks offered to this instance.

Each offer becomes a :class:`~taskhub.client.tasks.Task` and an asyncio task that runs
its action's handler; the handler's return value is the result, its exception the
failure (``fail`` with the error's text, cut to the hub's limit). A result the hub could
not take (not JSON, ``NaN``, over its payload limit) fails the task too, with a reason
that says so: the task always ends. When the hub ends the handler's part (the task was
cancelled, timed out, or another service's success ended it; its attempt failed; it went
to another instance), the handler is cancelled: it sees :class:`asyncio.CancelledError`,
and nothing more is sent for it.

An offer may come twice (sent again after a reconnect, or by the hub's recovery): each
attempt of a task runs its handler once. The worker logs each task at INFO on the
``taskhub.client`` logger: received, and how it finished and how long it took.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from taskhub.core.commands import MAX_ERROR_LENGTH
from taskhub.core.errors import InvalidMessage, TaskHubError
from taskhub.core.messages import Message, Offer, TaskEventMessage

from .protocol import ConnectionLost
from .tasks import Task, sendable

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("taskhub.client")

Handler = Callable[[Task], Awaitable[Any] | Any]

#: Attempts whose handler finished that a worker remembers, so that their offer sent
#: again is not run twice.
REMEMBERED = 1000


class Worker:
    """The handlers of one client, and the tasks they run."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.handlers: dict[str, Handler] = {}
        #: The tasks whose handlers run, by id: the latest attempt of each.
        self.tasks: dict[str, Task] = {}
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        #: ``(task, attempt)`` of the handlers that finished, oldest first.
        self._finished: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()

    def offer(self, offer: Offer) -> bool:
        """Run the handler of the offer's action on it, unless this attempt of the task
        runs or ran here already (its offer sent again). An offer of a newer attempt ends
        the older one's part.

        Returns:
            Whether a handler works on the task now (its events are then wanted).
        """
        key = (offer.task, offer.attempt)
        if key in self._running:
            return True
        current = self.tasks.get(offer.task)
        if key in self._finished or (current is not None and current.attempt > offer.attempt):
            return current is not None  # an offer sent again, or an old attempt's come late
        handler = self.handlers.get(offer.action)
        if handler is None:
            log.warning("taskhub: offered %s, which has no handler", offer.action)
            return False
        if current is not None:
            current._end()  # the hub moved on to the next attempt: the old one is over
        task = Task(self.client, offer)
        self.tasks[task.id] = task
        self.client.protocol.follow(task.id, resume=True)
        job = self._running[key] = self.client.spawn(self._work(task, handler))
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
        loop = asyncio.get_running_loop()
        started = loop.time()
        name = f"{task.action}[{task.id}]"
        log.info("Task %s received (attempt %d)", name, task.attempt)
        try:
            outcome = handler(task)
            result = await outcome if inspect.isawaitable(outcome) else outcome
        except asyncio.CancelledError:
            if not task.over:
                raise  # the client is closing
            log.info("Task %s ended by the hub after %.3fs: its handler was cancelled", name, loop.time() - started)
            return
        except Exception as exc:
            sent = await self._finish(task, "fail", error=_error_text(exc))
            took = loop.time() - started
            log.error("Task %s failed in %.3fs%s", name, took, "" if sent else " (the task had ended)", exc_info=exc)
        else:
            try:
                sendable(result, "result", self.client.protocol.max_payload_size)
            except InvalidMessage as exc:
                sent = await self._finish(task, "fail", error=_cut(exc.detail))
                log.error("Task %s failed in %.3fs: %s", name, loop.time() - started, exc.detail)
            else:
                sent = await self._finish(task, "return", result=result)
                took = loop.time() - started
                outcome = "succeeded" if sent else "finished, its result not accepted or no longer wanted"
                log.info("Task %s %s in %.3fs", name, outcome, took)
        finally:
            self._running.pop((task.id, task.attempt), None)
            self._finished[(task.id, task.attempt)] = None
            if len(self._finished) > REMEMBERED:
                self._finished.popitem(last=False)
            if self.tasks.get(task.id) is task:  # not a newer attempt's
                del self.tasks[task.id]
                self.client._unfollow(task.id)
            task._forget_updates()

    async def _finish(self, task: Task, type_: str, **fields: Any) -> bool:
        """Send the handler's ``return`` or ``fail``, after what it sent before (the hub
        applies a connection's commands in order), asking for no answer: a refusal comes
        later and is logged, and a result the hub refuses fails the task instead, so that
        it ends.

        Returns:
            Whether it was sent: not if the part was over (dropped, the task ended, or the
            hub refused an earlier command of the part).
        """
        try:
            await task._settle_updates(keep=len(task._unacked))  # the answers that came
        except TaskHubError as exc:
            log.warning("taskhub: an update of %s was not accepted: %s", task.id, exc)
        if task.done:
            return False
        task.done = True
        try:
            answer = await self.client.submit(task._build(type_, ack=False, **fields))
        except InvalidMessage as exc:  # a result the client could not check: over the frame limit, say
            log.warning("taskhub: %s of %s not accepted: %s", type_, task.id, exc)
            if type_ == "return":
                await self._send_fail(task, f"result could not be sent: {exc.detail}")
            return False
        answer.add_done_callback(functools.partial(self._answered, task, type_))
        return True

    def _answered(self, task: Task, type_: str, answer: asyncio.Future[Message]) -> None:
        """The hub applied a ``return`` or ``fail``, or refused it: a result it could not
        take fails the task instead."""
        error = None if answer.cancelled() else answer.exception()
        if error is None or isinstance(error, ConnectionLost):  # lost: the client closed
            return
        log.warning("taskhub: %s of %s not accepted: %s", type_, task.id, error)
        if type_ == "return" and isinstance(error, InvalidMessage):
            self.client.spawn(self._send_fail(task, f"result could not be sent: {error.detail}"))

    async def _send_fail(self, task: Task, error: str) -> None:
        try:
            await task._command("fail", error=_cut(error))
        except TaskHubError as exc:
            log.warning("taskhub: fail of %s not accepted: %s", task.id, exc)


def _error_text(exc: BaseException) -> str:
    """The text a ``fail`` carries: the error's type and message, as the hub can store it
    and cut to its limit."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not keep the task from ending
        message = "<the error's message could not be read>"
    return _cut(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _cut(text: str) -> str:
    """``text`` as a ``fail`` may carry it: without U+0000 or lone surrogates (the hub
    refuses both), at most :data:`MAX_ERROR_LENGTH` characters."""
    text = text.replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"
