"""The TaskHub client: one WebSocket connection, reconnected with backoff.

Use it as ``async with Client(...) as client:`` (returns once authenticated and every
registered subscription is acknowledged) or ``await client.run_forever()`` in a worker.

Reconnects: after a lost connection the client waits :func:`backoff` (``min((10n)² ms,
60 s)`` for the n-th try, as wsq does), reconnects, re-subscribes, re-sends ``pub``
commands that were not acknowledged (with their task id, so the hub never creates a
task twice) and re-reads the state of the tasks it waits for from the hub's database.
Authentication errors are final: they are raised, not retried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from taskhub.core.actions import validate_action
from taskhub.core.errors import AuthenticationFailed, InvalidMessage, PermissionDenied, TaskHubError
from taskhub.core.messages import encode

from .answers import ConnectionLost, checked, error_from
from .tasks import Task, TaskHandle

log = logging.getLogger("taskhub.client")

Handler = Callable[[Task], Awaitable[Any] | Any]


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
        self.instance: str | None = None
        self._max_message_size: int | None = None
        self._max_payload_size: int | None = None
        self._handlers: dict[str, Handler] = {}
        self._refs = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._handles: dict[str, TaskHandle] = {}
        self._tasks: dict[str, Task] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._closing = False

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
        if ws is not None:
            # Leave gracefully, so that the instance's slot is free once close() returns.
            with contextlib.suppress(TaskHubError, ConnectionClosed, TimeoutError):
                await asyncio.wait_for(self._send_request(ws, {"type": "bye"}), 5)
            await ws.close()
        for task in [*self._background, *([self._runner] if self._runner else [])]:
            task.cancel()
        await asyncio.gather(*self._background, *([self._runner] if self._runner else []), return_exceptions=True)
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
            if self._connected.is_set():
                self._spawn(self._request({"type": "sub", "action": action}))
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
            InvalidMessage: ``action`` is not a valid action name.
        """
        validate_action(action)
        task_id = str(uuid.UUID(task_id)) if task_id else str(uuid.uuid4())
        message: dict[str, Any] = {"type": "pub", "action": action, "payload": payload, "task_id": task_id}
        for field, value in (("timeout", timeout), ("pickup_timeout", pickup_timeout)):
            if value is not None:
                message[field] = None if math.isinf(value) else value
        handle = TaskHandle(self, task_id, message)
        self._handles[task_id] = handle
        self._spawn(self._publish(handle))
        return handle

    # -- internals ------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _publish(self, handle: TaskHandle) -> None:
        try:
            answer = await self._request(handle._message)
        except Exception as exc:
            self._handles.pop(handle.task_id, None)
            if not handle.published.done():
                handle.published.set_exception(exc)
            return
        if not handle.published.done():
            handle.published.set_result(answer)

    async def _request(self, message: dict[str, Any], *, retry: bool = True) -> dict[str, Any]:
        """Send a command and return its answer; re-sent after a reconnect when ``retry``.

        Raises:
            ProtocolError (a subclass by code): the hub answered with an error.
        """
        while True:
            await self._connected.wait()
            try:
                return await self._send_request(self._ws, message)
            except ConnectionLost:
                if not retry:
                    raise

    async def _submit(self, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send a command (waiting for a connection) and return the future of its answer,
        without waiting for it; read the answer with :func:`checked`."""
        while True:
            await self._connected.wait()
            with contextlib.suppress(ConnectionLost):
                return await self._send(self._ws, message)

    async def _send(self, ws: Any, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send one command on ``ws``; return the future of the hub's answer to it.

        Raises:
            InvalidMessage: ``message_too_large``, before anything is sent.
            ConnectionLost: the connection closed before the frame was sent.
        """
        ref = next(self._refs)
        frame = encode({**message, "ref": ref})
        size = len(frame.encode())
        if self._max_message_size and size > self._max_message_size:
            # The hub would refuse it (or its server drop the connection): refuse it here.
            raise InvalidMessage(
                f"message of {size} bytes is over the hub's limit of {self._max_message_size} bytes",
                "message_too_large",
            )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        future.add_done_callback(lambda _: self._pending.pop(ref, None))
        try:
            await ws.send(frame)
        except ConnectionClosed:
            future.cancel()
            raise ConnectionLost("connection closed") from None
        return future

    async def _send_request(self, ws: Any, message: dict[str, Any]) -> dict[str, Any]:
        return checked(await (await self._send(ws, message)))

    async def _resync(self, handle: TaskHandle) -> None:
        """Re-read a task's state from the hub (after a reconnect or a quiet spell)."""
        try:
            state = await self._request({"type": "watch", "task": handle.task_id}, retry=False)
        except (ConnectionLost, TaskHubError) as exc:
            log.debug("resync of %s failed: %s", handle.task_id, exc)
            return
        handle._apply_snapshot(state["task"])

    def _forget(self, handle: TaskHandle) -> None:
        self._handles.pop(handle.task_id, None)

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
            except (OSError, InvalidHandshake, ConnectionClosed, ConnectionLost, TimeoutError) as exc:
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
        """One connection: authenticate, subscribe, recover, then read until it closes."""
        async with websockets.connect(
            self.url,
            additional_headers={"Authorization": self._auth},
            max_size=self.max_size,
            open_timeout=10,
            compression=None,
        ) as ws:
            welcome = json.loads(await ws.recv())
            if welcome.get("type") == "error":
                raise error_from(welcome)
            self.instance = welcome.get("instance")
            self._max_message_size = welcome.get("max_message_size")
            self._max_payload_size = welcome.get("max_payload_size")
            self._ws = ws
            reader = asyncio.create_task(self._read(ws))
            try:
                for action in list(self._handlers):
                    await self._send_request(ws, {"type": "sub", "action": action})
                self._connected.set()
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                for handle in list(self._handles.values()):
                    if handle.published.done():
                        self._spawn(self._resync(handle))
                await reader
            finally:
                self._connected.clear()
                self._ws = None
                reader.cancel()
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(ConnectionLost("connection closed"))

    async def _read(self, ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    self._dispatch(json.loads(raw))
                except Exception:
                    log.exception("taskhub: could not handle %r", raw[:200])

    def _dispatch(self, message: dict[str, Any]) -> None:
        ref = message.get("ref")
        if isinstance(ref, int) and ref in self._pending:
            future = self._pending.pop(ref)
            if not future.done():
                future.set_result(message)
            return
        kind = message.get("type")
        if kind == "task":
            self._offer(message)
        elif kind in ("update", "success", "fail", "end"):
            task_id = message.get("task", "")
            if task_id in self._handles:
                self._handles[task_id]._notify(message)
            if task_id in self._tasks:
                self._tasks[task_id]._notify(message)
        elif kind == "error":
            log.error("taskhub: %s: %s", message.get("code"), message.get("detail"))

    def _offer(self, offer: dict[str, Any]) -> None:
        handler = self._handlers.get(offer["action"])
        if handler is None:
            log.warning("taskhub: offered %s, which has no handler", offer["action"])
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
