"""The TaskHub client: the sans-I/O protocol on a ``websockets`` connection, reconnected
with backoff.

Use it as ``async with Client(...) as client:`` (returns once authenticated and every
registered subscription is acknowledged) or ``await client.run_forever()`` in a worker.

This module owns the socket, the clock and the asyncio tasks; what a frame means, what to
send and what a reconnect recovers is :class:`~taskhub.client.protocol.ClientProtocol`'s.

Reconnects: after a lost connection the client waits :func:`backoff` (``min((10n)² ms,
60 s)`` for the n-th try, as wsq does), reconnects, re-subscribes, re-sends the commands
that were not answered and are safe to send again (a ``pub`` with its task id, so the hub
never creates a task twice) and watches the tasks it waits for from the last event it
heard. Authentication errors are final: they are raised, not retried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from taskhub.core.actions import validate_action
from taskhub.core.commands import Bye, Command, Ping, Pub, Watch
from taskhub.core.errors import AuthenticationFailed, PermissionDenied, TaskHubError
from taskhub.core.messages import Message, State

from .protocol import (
    Answered,
    ClientProtocol,
    ConnectionLost,
    Event,
    Failed,
    HubError,
    Offered,
    Refused,
    SessionRefused,
    TaskEventIn,
    Welcomed,
)
from .tasks import Task, TaskHandle

log = logging.getLogger("taskhub.client")

Handler = Callable[[Task], Awaitable[Any] | Any]


def _log_refusal(future: asyncio.Future[Message]) -> None:
    error = None if future.cancelled() else future.exception()
    if error is not None and not isinstance(error, ConnectionLost):  # lost: sent again on reconnect
        log.error("taskhub: %s", error)


def backoff(tries: int) -> float:
    """Seconds to wait before reconnect number ``tries`` (1, 2, ...): ``min((10n)² ms, 60 s)``."""
    return min((10 * tries) ** 2 / 1000, 60.0)


class Client:
    """A service's connection to the hub.

    Args:
        url: the hub's WebSocket endpoint, e.g. ``ws://localhost:8000/ws/taskhub/``.
        name, key: the service's credential.
        backoff: seconds to wait before reconnect number n.
        resync_interval: seconds a waiting ``get_result`` stays quiet before it re-reads
            the task's state from the hub.
        max_size: the largest frame to accept from the hub, in bytes.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        key: str,
        backoff: Callable[[int], float] = backoff,
        resync_interval: float = 30.0,
        max_size: int | None = 2**20,
    ) -> None:
        self.url, self.name = url, name
        self._auth = "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()
        self.backoff = backoff
        self.resync_interval = resync_interval
        self.max_size = max_size
        self.protocol = ClientProtocol()
        self._futures: dict[int, asyncio.Future[Message]] = {}
        self._handlers: dict[str, Handler] = {}
        self._handles: dict[str, TaskHandle] = {}
        self._tasks: dict[str, Task] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._ws: Any = None
        self._ready = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def instance(self) -> str | None:
        """This connection's instance id, once connected."""
        return self.protocol.instance

    @property
    def connected(self) -> bool:
        """Whether the session is open and its subscriptions acknowledged."""
        return self._ready.is_set()

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, authenticate and subscribe; retries until the hub answers.

        Raises:
            AuthenticationFailed: wrong name or key, a disabled credential, no free slot.
            PermissionDenied: a registered subscription is not allowed.
        """
        if self._runner is None:
            self._closing = False
            self._first = asyncio.get_running_loop().create_future()
            self._runner = asyncio.create_task(self._run(), name=f"taskhub-client-{self.name}")
        assert self._first is not None
        await asyncio.shield(self._first)

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Running handlers are cancelled."""
        self._closing = True
        ws = self._ws  # the session forgets it as soon as the hub closes, maybe during bye
        if ws is not None and self.connected:
            # Leave gracefully, so that the instance's slot is free once close() returns.
            with contextlib.suppress(TaskHubError, ConnectionClosed, TimeoutError):
                await asyncio.wait_for(self._request(Bye.build()), 5)
        if ws is not None:
            await ws.close()
        runner = [self._runner] if self._runner else []
        for task in [*self._background, *runner]:
            task.cancel()
        await asyncio.gather(*self._background, *runner, return_exceptions=True)
        self._runner = None

    async def run_forever(self) -> None:
        """Connect and serve subscriptions until cancelled or :meth:`close` is called."""
        await self.connect()
        assert self._runner is not None
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner

    # -- the API --------------------------------------------------------------------------

    def sub(self, action: str, handler: Handler | None = None) -> Any:
        """Subscribe ``handler`` to ``action``; use as ``@client.sub("mail:send")``.

        Subscriptions made before :meth:`connect` are sent when it connects; later ones at
        once. The handler gets a :class:`Task`; its return value is the result.

        Raises:
            InvalidMessage: ``action`` is not a valid action name.
        """
        validate_action(action)

        def register(fn: Handler) -> Handler:
            self._handlers[action] = fn
            ref = self.protocol.subscribe(action)
            if ref is not None:
                answer = self._expect(ref)
                answer.add_done_callback(_log_refusal)
                self._spawn(self._flush())
            return fn

        return register if handler is None else register(handler)

    def pub(
        self,
        action: str,
        payload: Any = None,
        timeout: float | None = None,
        *,
        pickup_timeout: float | None = None,
        task_id: str | None = None,
    ) -> TaskHandle:
        """Publish a task and return its handle at once.

        Args:
            timeout: seconds the task may run once picked up (``math.inf``: no limit;
                ``None``: the hub's default).
            pickup_timeout: seconds to wait for a subscriber and a pickup (as above).
            task_id: choose the task's id (a UUID); by default one is generated. The
                client re-sends the ``pub`` with this id after a reconnect, so the hub
                creates the task once.

        Raises:
            InvalidMessage: ``action`` is not a valid action name, or a timeout is not a
                positive number.
        """
        validate_action(action)
        fields: dict[str, Any] = {"task_id": task_id or str(uuid.uuid4())}
        for name, value in (("timeout", timeout), ("pickup_timeout", pickup_timeout)):
            if value is not None:
                fields[name] = None if math.isinf(value) else value
        command = Pub.build(action=action, payload=payload, **fields)
        handle = TaskHandle(self, command.task_id)
        self._handles[handle.task_id] = handle
        self.protocol.follow(handle.task_id, resume=True)
        self._spawn(self._publish(handle, command))
        return handle

    async def get_task(self, task_id: str, since: int = 0) -> State:
        """The task's current state and its events with a ``seq`` above ``since``, from the
        hub's database: ``.task`` (a dict, see docs/protocol.md, ``watch``) and ``.events``.

        For the task's publisher and the services it was offered to.

        Raises:
            UnknownTask: no such task, or not one of this credential's.
            InvalidMessage: ``task_id`` is not a UUID.
        """
        answer = await self._request(Watch.build(task=task_id, since=since))
        assert isinstance(answer, State)
        return answer

    async def ping(self) -> float:
        """Seconds a ``ping`` takes to the hub and back (once the session is open)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._request(Ping.build())
        return loop.time() - start

    # -- commands -------------------------------------------------------------------------

    async def _submit(self, command: Command) -> asyncio.Future[Message]:
        """Send ``command`` (or hold it until the session is open) and return the future
        of its answer, without waiting for it. The future raises the hub's refusal (the
        exception of its code) or :class:`ConnectionLost`.

        Raises:
            InvalidMessage: ``message_too_large``; nothing was sent.
        """
        future = self._expect(self.protocol.send(command))
        await self._flush()
        return future

    async def _request(self, command: Command) -> Message:
        """Send ``command`` and return the hub's answer (see :meth:`_submit`)."""
        return await (await self._submit(command))

    def _expect(self, ref: int) -> asyncio.Future[Message]:
        """The future of the answer to the command ``ref``; register it before the answer
        can be read (synchronously after ``protocol.send``)."""
        future = self._futures.get(ref)
        if future is None:
            future = self._futures[ref] = asyncio.get_running_loop().create_future()
        return future

    async def _flush(self) -> None:
        """Send what the protocol queued. A frame lost to a closing connection is the
        protocol's to send again or to fail (:meth:`ClientProtocol.connection_lost`)."""
        ws = self._ws
        frames = self.protocol.data_to_send()
        if ws is None:
            return
        try:
            for frame in frames:
                await ws.send(frame)
        except ConnectionClosed:
            pass

    async def _publish(self, handle: TaskHandle, command: Pub) -> None:
        try:
            answer = await self._request(command)
        except Exception as exc:
            self._forget(handle)
            if not handle.published.done():
                handle.published.set_exception(exc)
            return
        if not handle.published.done():
            handle.published.set_result(answer)

    async def _resync(self, handle: TaskHandle) -> None:
        """Re-read a task's events and state from the hub (after a quiet spell, or an
        ``end`` whose outcome was lost); the missed events reach the handle first."""
        task_id = handle.task_id
        try:
            state = await self._request(Watch.build(task=task_id, since=self.protocol.last_seq(task_id)))
        except TaskHubError as exc:
            log.debug("resync of %s failed: %s", task_id, exc)
            return
        assert isinstance(state, State)
        handle._apply_snapshot(state.task)

    def _forget(self, handle: TaskHandle) -> None:
        self._handles.pop(handle.task_id, None)
        if handle.task_id not in self._tasks:
            self.protocol.forget(handle.task_id)

    # -- the connection -------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _run(self) -> None:
        tries = 0
        while not self._closing:
            try:
                await self._session()
                tries = 0
            except (AuthenticationFailed, PermissionDenied) as exc:
                if self._first is not None and not self._first.done():
                    self._first.set_exception(exc)
                    return
                log.error("taskhub: %s; reconnecting", exc)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                log.info("taskhub: connection to %s lost or refused: %s", self.url, exc)
                refused = isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403)
                if refused and self._first is not None and not self._first.done():
                    self._first.set_exception(AuthenticationFailed(f"handshake refused: {exc}"))
                    return
            if self._closing:
                return
            tries += 1
            await asyncio.sleep(self.backoff(tries))

    async def _session(self) -> None:
        """One connection: read frames and act on the protocol's events until it closes."""
        async with websockets.connect(
            self.url,
            additional_headers={"Authorization": self._auth},
            max_size=self.max_size,
            open_timeout=10,
            compression=None,
        ) as ws:
            self.protocol.connection_made()
            self._ws = ws
            try:
                async for raw in ws:
                    self._handle(self.protocol.receive(raw))
                    await self._flush()
            finally:
                self._ws = None
                self._ready.clear()
                self._handle(self.protocol.connection_lost())

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case Answered(ref=ref, message=message):
                    self._settle(ref, message, None)
                case Refused(ref=ref, error=error) | Failed(ref=ref, error=error):
                    self._settle(ref, None, error)
                case Welcomed(subscriptions=refs):
                    self._spawn(self._opened([self._expect(ref) for ref in refs]))
                case SessionRefused(error=error):
                    raise error
                case Offered(offer=offer):
                    self._offer(offer)
                case TaskEventIn(message=message):
                    if message.task in self._handles:
                        self._handles[message.task]._notify(message)
                    if message.task in self._tasks:
                        self._tasks[message.task]._notify(message)
                case HubError(error=error):
                    log.error("taskhub: %s", error)

    def _settle(self, ref: int, message: Message | None, error: BaseException | None) -> None:
        future = self._futures.pop(ref, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(message)  # type: ignore[arg-type]
        else:
            future.set_exception(error)

    async def _opened(self, subscriptions: list[asyncio.Future[Message]]) -> None:
        """The session is open: once its subscriptions are acknowledged, it is ready."""
        try:
            for future in subscriptions:
                await future
        except PermissionDenied as exc:
            if self._first is None or self._first.done():
                log.error("taskhub: %s", exc)  # revoked since: serve the other actions
            else:  # the first connect: the caller learns why, and nothing reconnects
                self._first.set_exception(exc)
                self._closing = True
                if self._ws is not None:
                    await self._ws.close()
                return
        except ConnectionLost:
            return  # the next session subscribes again
        self._ready.set()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    # -- a worker's tasks -----------------------------------------------------------------

    def _offer(self, offer: Any) -> None:
        handler = self._handlers.get(offer.action)
        if handler is None:
            log.warning("taskhub: offered %s, which has no handler", offer.action)
            return
        task = Task(self, offer)
        self._tasks[task.id] = task
        self._spawn(self._work(task, handler))

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
            self._tasks.pop(task.id, None)
            if task.id not in self._handles:
                self.protocol.forget(task.id)
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
