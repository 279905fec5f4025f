r"""What a worker's handler gets: the :class:`Task` it works on, and the :class:`Update`\ s
it hears of."""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskhub.core.codes import ErrorCode
from taskhub.core.commands import COMMANDS, MISSING, Command, GetPayload, Pickup, Touch
from taskhub.core.commands import Update as UpdateCommand
from taskhub.core.errors import InvalidMessage, InvalidTransition, UnknownTask
from taskhub.core.frames import decode_frame, encode
from taskhub.core.messages import (
    Message,
    Offer,
    Payload,
    TaskEventMessage,
    TaskFailure,
    TaskSuccess,
    TaskUpdate,
)

from .protocol import ConnectionLost

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


def sendable(value: Any, what: str, limit: int | None) -> int:
    """Check that the hub can take ``value`` as ``what`` (a task's ``"update data"`` or
    ``"result"``) before it is sent, and return its size in bytes. Call where the one who
    made the value can still hear why it cannot go.

    Raises:
        InvalidMessage: ``invalid_value`` for a value that is not JSON (``NaN`` and
            ``Infinity`` included) or that the hub would refuse (see
            :func:`~taskhub.core.frames.decode_frame`); ``payload_too_large`` over
            ``limit`` bytes (the hub's ``max_payload_size``).
    """
    try:
        text = encode(value)
        size = len(text.encode())
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError among them
        raise InvalidMessage(
            f"{what} could not be sent: not JSON ({_cut(str(exc), 200)}): {_preview(value)}", ErrorCode.INVALID_VALUE
        ) from None
    if limit is not None and size > limit:
        raise InvalidMessage(
            f"{what} of {size} bytes is over the hub's limit of {limit} bytes", ErrorCode.PAYLOAD_TOO_LARGE
        )
    try:
        # The hub's own checks (depth, numbers, strings), on the value as a command's
        # field holds it: one level below the frame.
        decode_frame(f"[{text}]", 4 * len(text) + 3)
    except InvalidMessage as exc:
        raise InvalidMessage(f"{what} could not be sent: {exc.detail}", ErrorCode.INVALID_VALUE) from None
    return size


def _preview(value: Any) -> str:
    """A short ``repr`` of ``value`` for an error text; never raises."""
    try:
        return _cut(reprlib.repr(value), 200)
    except Exception:  # a broken __repr__
        return f"<{type(value).__name__} object>"


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def call(callback: Callable[..., Any], *args: Any) -> None:
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
        #: Set once the hub gave up on this service's part (the task ended, was cancelled,
        #: timed out, or went on to another attempt or instance): the handler is cancelled.
        self.over = False
        #: Called once when the part is over (the worker cancels the handler).
        self._on_over: Callable[[], object] = lambda: None
        # Answers still to come to updates sent, oldest first.
        self._unacked: collections.deque[asyncio.Future[Message]] = collections.deque()

    async def _command(self, type_: str, **fields: Any) -> Message:
        return await self._client.request(self._build(type_, **fields))

    def _build(self, type_: str, **fields: Any) -> Command:
        return COMMANDS[type_].build(task=self.id, attempt=self.attempt, **fields)

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
        await self._send_windowed(Pickup.build(task=self.id, attempt=self.attempt, ack=False))

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
                ``payload_too_large`` for ``data`` over the hub's payload limit,
                ``invalid_value`` for ``data`` that is not JSON (a set, ``NaN``) or that
                the hub would refuse (nested too deep, say); checked before sending, so
                nothing is sent.
            ProtocolError (a subclass by code): the hub refused an earlier update of this
                task (say, ``stale_attempt`` after a timeout), and its answer came since.
        """
        # The hub's own checks, before anything is sent.
        command = UpdateCommand.build(
            task=self.id, attempt=self.attempt, data=data, progress=MISSING if progress is None else progress, ack=False
        )
        sendable(data, "update data", self._client.protocol.max_payload_size)
        await self._send_windowed(command)

    async def touch(self) -> None:
        """Tell the hub this service is alive and still on the task: the task's heartbeat
        timeout starts again (as every :meth:`update` does). A touch on a task not picked
        up picks it up. Returns once sent, as :meth:`update` does.

        Raises:
            ProtocolError (a subclass by code): as :meth:`update`.
        """
        await self._send_windowed(Touch.build(task=self.id, attempt=self.attempt, ack=False))

    async def _send_windowed(self, command: Pickup | UpdateCommand | Touch) -> None:
        """Send a command that asks for no answer (the hub answers only a refusal, and the
        answer to a later command acknowledges it), once fewer than :data:`UPDATE_WINDOW`
        of this task's commands are not known to be applied."""
        await self._settle_updates(keep=UPDATE_WINDOW - 1)
        answer = await self._client.submit(command)
        answer.add_done_callback(self._refused)
        self._unacked.append(answer)
        if not len(self._unacked) % (UPDATE_WINDOW // 2):
            # Ask for the answer that acknowledges them: halfway, and once the window is
            # full, so that the next waits at most for the answer to a ping sent already.
            await self._client.sync()

    def _refused(self, answer: asyncio.Future[Message]) -> None:
        """A refusal that means this part is over (``stale_attempt``, say) ends it."""
        error = None if answer.cancelled() else answer.exception()
        if isinstance(error, InvalidTransition | UnknownTask):
            self._end()

    def _end(self) -> None:
        if not self.over:
            self.over = self.done = True
            self._on_over()

    async def _settle_updates(self, keep: int = 0) -> None:
        """Read the answers to this task's updates that came, and wait for the oldest
        until at most ``keep`` are left (none waited for with ``keep`` at their number).

        Raises:
            ProtocolError (a subclass by code): the hub refused one of them.
            ConnectionLost: the connection closed before it answered.
        """
        while self._unacked and (len(self._unacked) > keep or self._unacked[0].done()):
            await self._unacked.popleft()

    def _forget_updates(self) -> None:
        """The handler is gone: a refusal that comes is logged."""
        for future in self._unacked:
            future.add_done_callback(self._log_refusal)
        self._unacked.clear()

    def _log_refusal(self, answer: asyncio.Future[Message]) -> None:
        error = None if answer.cancelled() else answer.exception()
        if error is not None and not isinstance(error, ConnectionLost):
            log.warning("taskhub: an update of %s was not accepted: %s", self.id, error)

    async def drop(self) -> None:
        """Finish without a result; the handler's return value is then ignored.

        Raises:
            ProtocolError (a subclass by code): the hub refused an update of this task
                that still awaited its answer, or the drop itself.
        """
        if self._unacked:
            await self._client.sync()  # the answer that says whether the hub applied them
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
            call(callback, self, self._outcome[1])
        return self

    def _notify(self, message: TaskEventMessage) -> None:
        if message.attempt != self.attempt and not isinstance(message, TaskUpdate):
            return  # another attempt's news
        arg: Any
        match message:
            case TaskUpdate():
                arg = Update.of(message)
            case TaskSuccess(result=result) | TaskFailure(reason=result):
                arg = result
                self.done = True
                self._outcome = (message.type, arg)
            case _:  # end, or retry: the hub gave up on this attempt
                self._end()
                return
        for callback in self._callbacks.get(message.type, ()):
            call(callback, self, arg)
        if isinstance(message, TaskFailure):
            self._end()  # the task failed: nobody waits for this part any more

    def __repr__(self) -> str:
        return f"<Task {self.action} {self.id} attempt {self.attempt}>"
