"""What the client hands to user code: a worker's :class:`Task` and a caller's :class:`TaskHandle`."""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskhub.core.codes import ErrorCode
from taskhub.core.commands import COMMANDS, MISSING, GetPayload, Pickup
from taskhub.core.commands import Update as UpdateCommand
from taskhub.core.errors import InvalidMessage, NoResult, TaskFailed
from taskhub.core.frames import encoded_size
from taskhub.core.messages import (
    Message,
    Offer,
    Payload,
    TaskEnd,
    TaskEventMessage,
    TaskFailure,
    TaskSnapshot,
    TaskSuccess,
    TaskUpdate,
)
from taskhub.core.states import TERMINAL_TASK_STATUSES

TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL_TASK_STATUSES)

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("taskhub.client")

_RAISE: Any = object()
#: A task's pickup and updates that may await the hub's acknowledgement before the next
#: :meth:`Task.pickup` or :meth:`Task.update` waits for the oldest.
UPDATE_WINDOW = 16


@dataclass(frozen=True)
class Update:
    """A progress update: any JSON ``data``, an optional ``progress`` fraction, who sent
    it, and the task attempt it belongs to."""

    data: Any
    progress: float | None
    service: str
    attempt: int = 1

    @classmethod
    def of(cls, message: TaskUpdate) -> Update:
        return cls(message.data, message.progress, str(message.service), int(message.attempt))


def _call(callback: Callable[..., Any], *args: Any) -> None:
    """Run a user callback; a coroutine is scheduled, an exception logged."""
    try:
        outcome = callback(*args)
        if inspect.isawaitable(outcome):
            asyncio.ensure_future(outcome)
    except Exception:
        log.exception("task callback %r raised", callback)


class Task:
    """A task offered to this worker. Handlers receive one.

    Call :meth:`pickup` first for work that takes a while: it tells the hub to wait for
    this service (up to the task's complete timeout). Return a value from the handler to
    return the result, raise to fail the task, or call :meth:`drop` to finish without one.
    """

    def __init__(self, client: Client, offer: Offer) -> None:
        self._client = client
        self.id: str = offer.task
        self.action: str = offer.action
        self.attempt: int = offer.attempt
        self.publisher: str = str(offer.publisher)
        self.payload_size: int = int(offer.payload_size)
        self._payload: Any = _RAISE if offer.payload is MISSING else offer.payload
        self._callbacks: dict[str, list[Callable[..., Any]]] = {"update": [], "success": [], "fail": []}
        # "success" or "fail" with its argument, once it happened: like a settled promise,
        # a callback registered later is still called.
        self._outcome: tuple[str, Any] | None = None
        #: Set once this service returned, dropped or failed, or the task ended.
        self.done = False
        # Answers still to come to updates sent, oldest first.
        self._unacked: collections.deque[asyncio.Future[Message]] = collections.deque()

    async def _command(self, type_: str, **fields: Any) -> Message:
        command = COMMANDS[type_].build(task=self.id, attempt=self.attempt, **fields)
        return await self._client.request(command)

    async def pickup(self) -> None:
        """Tell the hub this service works on the task.

        Returns once the pickup is sent, as :meth:`update` does: the hub handles a
        connection's commands in order, so what the handler sends next lands after it.

        Raises:
            ProtocolError (a subclass by code): the hub refused an earlier command of this
                task, and its answer came since. A refused pickup (``InvalidTransition``: the
                task is no longer this service's to work on) is raised by the next
                :meth:`update` or :meth:`drop`, or logged when the handler returns.
        """
        await self._send_windowed(Pickup.build(task=self.id, attempt=self.attempt))

    async def get_payload(self) -> Any:
        """The task's payload (fetched from the hub when it was too large to come inline)."""
        if self._payload is _RAISE:
            answer = await self._client.request(GetPayload.build(task=self.id))
            assert isinstance(answer, Payload)
            self._payload = answer.payload
        return self._payload

    async def update(self, data: Any = None, progress: float | None = None) -> None:
        """Send progress to the caller and to the other services on the task.

        Returns once the update is sent, without waiting for the hub to acknowledge it:
        the hub persists a connection's commands in the order sent, so a later ``return``
        lands after it, and the caller hears the update before the result. With
        :data:`UPDATE_WINDOW` updates unacknowledged, waits for the oldest.

        Args:
            data: any JSON value.
            progress: a fraction from 0 to 1, for progress bars.

        Raises:
            InvalidMessage: ``invalid_field`` for a ``progress`` outside 0..1,
                ``payload_too_large`` for ``data`` over the hub's payload limit; checked
                before sending, so nothing is sent.
            ProtocolError (a subclass by code): the hub refused an earlier update of this
                task (say, ``stale_attempt`` after a timeout), and its answer came since.
        """
        # The hub's own checks, before anything is sent.
        command = UpdateCommand.build(
            task=self.id, attempt=self.attempt, data=data, progress=MISSING if progress is None else progress
        )
        limit = self._client.protocol.max_payload_size
        if limit is not None and (size := encoded_size(data)) > limit:
            raise InvalidMessage(
                f"update data of {size} bytes is over the hub's limit of {limit} bytes", ErrorCode.PAYLOAD_TOO_LARGE
            )
        await self._send_windowed(command)

    async def _send_windowed(self, command: Pickup | UpdateCommand) -> None:
        """Send a command without waiting for its answer, once fewer than
        :data:`UPDATE_WINDOW` of this task's answers are outstanding."""
        await self._settle_updates(keep=UPDATE_WINDOW - 1)
        self._unacked.append(await self._client.submit(command))

    async def _settle_updates(self, keep: int = 0) -> None:
        """Read the answers to this task's updates that came, and wait for the oldest
        until at most ``keep`` are left.

        Raises:
            ProtocolError (a subclass by code): the hub refused one of them.
            ConnectionLost: the connection closed before it answered.
        """
        while self._unacked and (len(self._unacked) > keep or self._unacked[0].done()):
            await self._unacked.popleft()

    def _forget_updates(self) -> None:
        """The handler is gone: answers that come are dropped (and not logged as unread)."""
        for future in self._unacked:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._unacked.clear()

    async def drop(self) -> None:
        """Finish without a result; the handler's return value is then ignored.

        Raises:
            ProtocolError (a subclass by code): the hub refused an update of this task
                that still awaited its answer, or the drop itself.
        """
        await self._settle_updates()
        self.done = True
        await self._command("drop")

    def on(self, event: str, callback: Callable[..., Any]) -> Task:
        """Call ``callback(task, update)`` on another service's ``"update"``,
        ``callback(task, result)`` on ``"success"`` (another service completed the task), or
        ``callback(task, reason)`` on ``"fail"``. Returns the task, for chaining.
        """
        if event not in self._callbacks:
            raise ValueError(f"unknown task event {event!r}: use 'update', 'success' or 'fail'")
        self._callbacks[event].append(callback)
        if self._outcome is not None and self._outcome[0] == event:
            _call(callback, self, self._outcome[1])
        return self

    def _notify(self, message: TaskEventMessage) -> None:
        arg: Any
        match message:
            case TaskUpdate():
                arg = Update.of(message)
            case TaskSuccess(result=result) | TaskFailure(reason=result):
                arg = result
                self.done = True
                self._outcome = (message.type, arg)
            case _:
                self.done = True
                return
        for callback in self._callbacks.get(message.type, ()):
            _call(callback, self, arg)

    def __repr__(self) -> str:
        return f"<Task {self.action} {self.id} attempt {self.attempt}>"


class TaskHandle:
    """A published task, as its caller sees it. Returned by :meth:`Client.pub` at once."""

    def __init__(self, client: Client, task_id: str) -> None:
        self._client = client
        self.task_id = task_id
        #: Done once the hub acknowledged the ``pub`` (its answer), or raises its refusal.
        self.published: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._callbacks: list[Callable[[Update], Any]] = []
        self.status: str = "pending"

    def on(self, event: str, callback: Callable[[Update], Any]) -> TaskHandle:
        """Call ``callback(update)`` for each ``"update"``. Returns the handle, for chaining."""
        if event != "update":
            raise ValueError(f"unknown event {event!r}: a caller can follow 'update'")
        self._callbacks.append(callback)
        return self

    async def get_result(self, default: Any = _RAISE) -> Any:
        """Wait for the task to finish and return its result.

        Args:
            default: returned instead of raising :class:`TaskFailed` or :class:`NoResult`.

        Raises:
            TaskFailed: the task failed (``.reason``: ``error``, ``pickup_timeout``, ...).
            NoResult: every service saw or dropped the task without a result.
            PermissionDenied, InvalidMessage: the hub refused the ``pub``.
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

    def _notify(self, message: TaskEventMessage) -> None:
        match message:
            case TaskUpdate():
                update = Update.of(message)
                for callback in self._callbacks:
                    _call(callback, update)
            case TaskSuccess(result=result):
                self._finish("success", result=result)
            case TaskFailure(reason=reason, detail=detail):
                self._finish("failed", reason=str(reason), detail=str(detail))
            case TaskEnd(status="ended"):
                self._finish("ended")
            case TaskEnd():
                # The result or the failure reason travels in "success"/"fail", which the
                # layer may have lost: read them back.
                asyncio.ensure_future(self._client._resync(self))

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
        self._client._forget(self)

    def _abandon(self, error: Exception) -> None:
        """The client closed: whoever waits for the task is told ``error``."""
        if not self.published.done():
            self.published.set_exception(error)
            self.published.exception()  # nobody may await it: it must not be logged as lost
        if not self._outcome.done():
            self._outcome.set_exception(error)

    def _apply_snapshot(self, task: dict[str, Any]) -> None:
        snapshot = TaskSnapshot.from_dict(task)
        if snapshot.status in TERMINAL_STATUSES:
            self._finish(
                snapshot.status,
                result=snapshot.result,
                reason=snapshot.failure_reason,
                detail=snapshot.failure_detail,
            )

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {self.status}>"
