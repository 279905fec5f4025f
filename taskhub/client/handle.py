"""A caller's :class:`TaskHandle`: a published (or watched, or retried) task, followed to
its end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskhub.core.commands import Cancel
from taskhub.core.errors import NoResult, TaskFailed
from taskhub.core.messages import (
    Message,
    TaskEnd,
    TaskEventMessage,
    TaskFailure,
    TaskRetry,
    TaskSnapshot,
    TaskSuccess,
    TaskUpdate,
)
from taskhub.core.states import TERMINAL_TASK_STATUSES

from .tasks import Update, call

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("taskhub.client")

_RAISE: Any = object()
TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL_TASK_STATUSES)


@dataclass(frozen=True)
class Retrying:
    """An attempt of the task failed and the next will be offered: the attempt that
    failed, why, and the next attempt's number."""

    attempt: int
    reason: str
    detail: str
    next_attempt: int | None


class TaskHandle:
    """A task as its caller sees it: returned at once by :meth:`Client.pub`,
    :meth:`Client.watch` and :meth:`Client.retry`."""

    def __init__(self, client: Client, task_id: str) -> None:
        self._client = client
        self.task_id = task_id
        #: Done once the hub answered the command that made the handle (the ``pub``'s
        #: acknowledgement, say), or raises its refusal.
        self.published: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._callbacks: dict[str, list[Callable[[Any], Any]]] = {"update": [], "retry": []}
        self.status: str = "pending"
        #: The attempt the task is at, as far as this handle heard.
        self.attempt = 1

    def on(self, event: str, callback: Callable[[Any], Any]) -> TaskHandle:
        """Call ``callback(update)`` for each ``"update"`` (an :class:`Update`, with the
        attempt it belongs to), or ``callback(retrying)`` each time a failed attempt is
        retried (``"retry"``, a :class:`Retrying`). Returns the handle, for chaining.
        """
        if event not in self._callbacks:
            raise ValueError(f"unknown event {event!r}: a caller can follow 'update' and 'retry'")
        self._callbacks[event].append(callback)
        return self

    async def get_result(self, default: Any = _RAISE) -> Any:
        """Wait for the task to finish and return its result. It survives reconnects and
        hub restarts: the client watches the task again from the last event it heard.

        Args:
            default: returned instead of raising :class:`TaskFailed` or :class:`NoResult`.

        Raises:
            TaskFailed: the task failed (``.reason``: ``error``, ``pickup_timeout``, ...);
                with retries, only once its last attempt failed.
            NoResult: every service saw or dropped the task without a result.
            PermissionDenied, InvalidMessage, UnknownTask: the hub refused the command
                that made the handle; ``UnknownTask`` also when the task was deleted
                (``autoremove``, retention) before its outcome reached this client.
            ConnectionLost: the client was closed first.
        """
        await asyncio.shield(self.published)
        while not self._outcome.done():
            # The layer may drop a notice: after a quiet spell, ask the database.
            done, _ = await asyncio.wait([self._outcome], timeout=self._client.resync_interval)
            if not done:
                await self._client._resync(self)
        try:
            return self._outcome.result()
        except (TaskFailed, NoResult):
            if default is _RAISE:
                raise
            return default

    async def cancel(self) -> None:
        """Cancel the task: it fails with reason ``cancelled`` (:meth:`get_result` raises
        :class:`TaskFailed`), and the handlers working on it are cancelled.

        It is not sent again after a reconnect: a cancel whose answer the connection lost
        may or may not have happened, and a second one would be refused if it had.

        Raises:
            InvalidTransition: the task is already finished.
            UnknownTask: it is not a task this credential published.
            ConnectionLost: the connection closed before the hub answered; whether the
                task was cancelled, :meth:`get_result` (or ``client.get_task``) tells.
        """
        await asyncio.shield(self.published)
        await self._client.request(Cancel.build(task=self.task_id))

    def _notify(self, message: TaskEventMessage) -> None:
        match message:
            case TaskUpdate():
                for callback in self._callbacks["update"]:
                    call(callback, Update.of(message))
            case TaskRetry(next_attempt=next_attempt):
                if isinstance(next_attempt, int):
                    self.attempt = next_attempt
                retrying = Retrying(int(message.attempt), str(message.reason), str(message.detail), next_attempt)
                for callback in self._callbacks["retry"]:
                    call(callback, retrying)
            case TaskSuccess(result=result):
                self._finish("success", result=result)
            case TaskFailure(reason=reason, detail=detail):
                self._finish("failed", reason=str(reason), detail=str(detail))
            case TaskEnd(status="ended"):
                self._finish("ended")
            case TaskEnd():
                # The result or the failure reason travels in "success"/"fail", which the
                # layer may have lost: read them back.
                self._client.spawn(self._client._resync(self))

    def _finish(self, status: str, *, result: Any = None, reason: str = "", detail: str = "") -> None:
        if self._outcome.done():
            return
        self.status = status
        if status == "success":
            self._outcome.set_result(result)
        elif status == "failed":
            self._outcome.set_exception(TaskFailed(self.task_id, reason, detail))
        elif status == "ended":
            self._outcome.set_exception(NoResult(self.task_id))
        else:
            return
        if status != "success":
            # Nobody may await it (a handle published and forgotten, or cancelled): an
            # outcome not awaited is no error to log.
            self._outcome.exception()
        self._client._forget(self)

    def _abandon(self, error: Exception) -> None:
        """The client closed: whoever waits for the task is told ``error``."""
        if not self.published.done():
            self.published.set_exception(error)
            self.published.exception()  # nobody may await it: it must not be logged as lost
        if not self._outcome.done():
            self._outcome.set_exception(error)
            self._outcome.exception()  # as for published

    def _apply_snapshot(self, task: dict[str, Any]) -> None:
        snapshot = TaskSnapshot.from_dict(task)
        self.attempt = max(self.attempt, snapshot.attempt)
        if snapshot.status in TERMINAL_STATUSES:
            self._finish(
                snapshot.status,
                result=snapshot.result,
                reason=snapshot.failure_reason,
                detail=snapshot.failure_detail,
            )

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {self.status}>"
