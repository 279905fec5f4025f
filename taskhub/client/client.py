"""The TaskHub client: workers and callers on one connection to the hub.

Use it as ``async with Client(...) as client:`` (returns once authenticated and every
registered subscription is acknowledged) or ``await client.run_forever()`` in a worker.

Reconnects: after a lost connection the client waits :func:`backoff` (``min((10n)² ms,
60 s)`` for the n-th try, as wsq does), reconnects, re-subscribes, re-sends the commands
that were not answered and are safe to send again (a ``pub`` with its task id, so the hub
never creates a task twice) and watches the tasks it waits for from the last event it
heard. A ``cancel`` or ``retry`` whose answer was lost fails with
:class:`~taskhub.client.ConnectionLost` instead: sent again, it could be refused although
it happened, or start another attempt. Authentication errors are final: they are raised,
not retried.

The layers below: :mod:`.connection` (the socket and the reconnect loop),
:mod:`.protocol` (what frames mean, sans I/O), :mod:`.worker` (handlers), :mod:`.tasks`
(what user code holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

from websockets.exceptions import ConnectionClosed

from taskhub.core.actions import validate_action
from taskhub.core.commands import Bye, Command, Ping, Pub, Retry, Tasks, Watch
from taskhub.core.errors import InvalidMessage, TaskHubError, UnknownTask
from taskhub.core.messages import Ack, Message, Offer, State, TaskEventMessage, TaskList, TaskSnapshot

from .connection import Connection, backoff
from .handle import TaskHandle
from .protocol import ConnectionLost
from .tasks import Task
from .worker import Handler, Worker

__all__ = ["Client", "Handler", "backoff"]

log = logging.getLogger("taskhub.client")


class Client(Connection):
    """A service's connection to the hub: it subscribes handlers and publishes tasks.

    Args:
        url: the hub's WebSocket endpoint, e.g. ``ws://localhost:8000/ws/taskhub/``.
        name, key: the service's credential.
        backoff: seconds to wait before reconnect number n.
        resync_interval: seconds a waiting ``get_result`` stays quiet before it re-reads
            the task's events from the hub.
        max_size: the largest frame to accept from the hub, in bytes.
        connect_timeout: seconds ``async with`` and :meth:`connect` try to reach the hub
            before they raise :class:`ConnectionFailed` (``None``: for ever).
        concurrency: most unfinished tasks the hub offers this worker at once (``None``,
            the default: no limit); a task beyond it goes to another instance of the
            service, or waits for a free one.

    Raises:
        ValueError: ``url`` is not a WebSocket URL (``ws://`` or ``wss://``).
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
        connect_timeout: float | None = 30.0,
        concurrency: int | None = None,
    ) -> None:
        super().__init__(
            url,
            name=name,
            key=key,
            backoff=backoff,
            max_size=max_size,
            connect_timeout=connect_timeout,
            concurrency=concurrency,
        )
        self.resync_interval = resync_interval
        self._worker = Worker(self)
        self._handles: dict[str, TaskHandle] = {}

    @property
    def running(self) -> list[Task]:
        """The tasks whose handlers run now (their return or failure not yet sent)."""
        return list(self._worker.tasks.values())

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Leave (the instance's slot is free once this returns), close the connection and
        stop reconnecting. Running handlers are cancelled."""
        if self._ws is not None and self.connected:
            with contextlib.suppress(TaskHubError, ConnectionClosed, TimeoutError):
                await asyncio.wait_for(self.request(Bye.build()), 5)
        await self.disconnect()
        for handle in list(self._handles.values()):
            handle._abandon(ConnectionLost("the client was closed before the task ended"))
            self._forget(handle)

    async def run_forever(self) -> None:
        """Connect and serve subscriptions until cancelled or :meth:`close` is called.

        It keeps trying to reach the hub however long that takes, and says at WARNING
        (at most every 30 s) that it fails.

        Raises:
            AuthenticationFailed, PermissionDenied: as :meth:`connect`.
        """
        await self.connect(timeout=None)
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
            self._worker.handlers[action] = fn
            self.subscribe(action)
            return fn

        return register if handler is None else register(handler)

    def pub(
        self,
        action: str,
        payload: Any = None,
        timeout: float | None = None,
        *,
        pickup_timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        retries: int = 0,
        retry_backoff: float | None = None,
        task_id: str | None = None,
        autoremove: bool = False,
    ) -> TaskHandle:
        """Publish a task and return its handle at once.

        Args:
            timeout: seconds an attempt may run once picked up (``math.inf``: no limit;
                ``None``: the hub's default).
            pickup_timeout: seconds to wait for a subscriber and a pickup (as above).
            heartbeat_timeout: seconds a picked-up attempt may go without an update or a
                ``touch()`` before it fails with ``heartbeat_timeout`` (``None``: no limit).
            retries: how many times a failed attempt (``error``, ``worker_lost``,
                ``complete_timeout``, ``heartbeat_timeout``) is retried; ``-1``: for ever.
            retry_backoff: seconds before the first retry (1 by default), doubled for each
                one after, up to the hub's ``TASKHUB_RETRY_BACKOFF_MAX``, jittered.
            task_id: choose the task's id (a UUID; ``handle.task_id`` spells it as the
                hub does, lowercase and hyphenated); by default one is generated. The
                client re-sends the ``pub`` with this id after a reconnect, so the hub
                creates the task once.
            autoremove: the hub deletes the task, its payload and its events, once it
                succeeded and its result reached this client (wsq's ``autoremove``).
                A failed task is kept. ``get_task``, ``watch`` and ``retry`` of it then
                raise ``UnknownTask``.

        Raises:
            InvalidMessage: ``action`` is not a valid action name, or an option is out of
                its range; nothing is sent.
        """
        validate_action(action)
        fields: dict[str, Any] = {"task_id": _canonical(task_id) if task_id else str(uuid.uuid4())}
        for name, value in (
            ("timeout", timeout),
            ("pickup_timeout", pickup_timeout),
            ("heartbeat_timeout", heartbeat_timeout),
        ):
            if value is not None:
                fields[name] = None if math.isinf(value) else value
        if retries:
            fields["retries"] = retries
        if retry_backoff is not None:
            fields["retry_backoff"] = retry_backoff
        if autoremove:
            fields["autoremove"] = True
        command = Pub.build(action=action, payload=payload, **fields)
        return self._follow(command.task_id, command)

    def watch(self, task_id: str) -> TaskHandle:
        """Follow a task by id, as :meth:`pub`'s handle does: the events it had (for
        ``on("update")`` callbacks registered at once), then the live ones, and its
        result. For the task's publisher and the services it was offered to.

        ``get_result()`` raises :class:`UnknownTask` for a task that is not this
        credential's (or no task), and :class:`InvalidMessage` for an id that is not a
        UUID.
        """
        task_id = _canonical(task_id)
        return self._follow(task_id, Watch.build(task=task_id, since=0))

    async def retry(self, task_id: str) -> TaskHandle:
        """Retry a failed task this credential published: its next attempt is offered at
        once. Returns, once the hub accepted the retry, the handle that follows the task
        from the retry on.

        Raises:
            InvalidTransition: the task did not fail.
            UnknownTask: it is not a task this credential published.
            InvalidMessage: ``task_id`` is not a UUID.
            ConnectionLost: the connection closed before the hub answered. The retry is
                not sent again (a second one could start another attempt): read the
                task (:meth:`get_task`) to learn whether it happened.
        """
        task_id = _canonical(task_id)
        state = await self.get_task(task_id)
        since = max((event.get("seq", 0) for event in state.events), default=0)
        handle = self._follow(task_id, Retry.build(task=task_id), since=since)
        await asyncio.shield(handle.published)
        return handle

    async def tasks(
        self, *, status: str | None = None, action: str | None = None, limit: int = 100
    ) -> list[TaskSnapshot]:
        """The tasks this credential published or was offered, newest first, at most
        ``limit`` (up to 1,000): all of them, or those with ``status`` (``pending``,
        ``started``, ``success``, ``failed``, ``ended``) and ``action``.

        Raises:
            InvalidMessage: a status, action or limit out of its range.
        """
        fields: dict[str, Any] = {"limit": limit}
        if status is not None:
            fields["status"] = status
        if action is not None:
            fields["action"] = action
        answer = await self.request(Tasks.build(**fields))
        assert isinstance(answer, TaskList)
        return [TaskSnapshot.from_dict(task) for task in answer.tasks]

    def _follow(self, task_id: str, command: Command, *, since: int = 0) -> TaskHandle:
        """A handle on the task, made by ``command`` (sent in the background)."""
        handle = TaskHandle(self, task_id)
        self._handles[task_id] = handle
        self.protocol.follow(task_id, resume=True, since=since)
        # Queued now, so that it goes out before whatever the caller sends next (a
        # get_task of this id, say); the background task only flushes and waits.
        answer: asyncio.Future[Message] | BaseException
        try:
            answer = self._expect(self.protocol.send(command))
        except InvalidMessage as exc:  # too large: nothing was sent
            answer = exc
        self.spawn(self._publish(handle, answer))
        return handle

    async def get_task(self, task_id: str, since: int = 0) -> State:
        """The task's current state and its events with a ``seq`` above ``since``, from the
        hub's database: ``.task`` (a dict, see docs/protocol.md, ``watch``) and ``.events``.

        For the task's publisher and the services it was offered to.

        Raises:
            UnknownTask: no such task, or not one of this credential's.
            InvalidMessage: ``task_id`` is not a UUID.
        """
        task_id = _canonical(task_id)
        answer = await self.request(Watch.build(task=task_id, since=since, follow=False))
        assert isinstance(answer, State)
        events = list(answer.events)
        while answer.more is True and answer.events:  # a long history comes in pages
            answer = await self._next_page(task_id, answer)
            events += answer.events
        return State(ref=answer.ref, task=answer.task, events=events)

    async def _next_page(self, task_id: str, page: State) -> State:
        """The ``state`` page after ``page`` (which said ``more``)."""
        since = max(event.get("seq", 0) for event in page.events)
        answer = await self.request(Watch.build(task=task_id, since=since, follow=False))
        assert isinstance(answer, State)
        return answer

    async def ping(self) -> float:
        """Seconds a ``ping`` takes to the hub and back (once the session is open)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self.request(Ping.build())
        return loop.time() - start

    # -- what the connection hands over ---------------------------------------------------

    def on_offer(self, offer: Offer) -> None:
        if not self._worker.offer(offer):
            self._unfollow(offer.task)

    def on_task_event(self, message: TaskEventMessage) -> None:
        handle = self._handles.get(message.task)
        if handle is not None:
            handle._notify(message)
        self._worker.notify(message)

    def on_instance_lost(self) -> None:
        self._worker.abandon()

    # -- a caller's handles ---------------------------------------------------------------

    async def _publish(self, handle: TaskHandle, sent: asyncio.Future[Message] | BaseException) -> None:
        """Send what the command that made the handle queued, and take its answer; a
        watch's answer is its state too."""
        try:
            if isinstance(sent, BaseException):
                raise sent
            await self._flush()
            answer = await sent
        except Exception as exc:
            self._forget(handle)
            if not handle.published.done():
                handle.published.set_exception(exc)
                handle.published.exception()  # retrieved: the handle's result raises it too
            return
        if not handle.published.done():
            handle.published.set_result(answer)
        if isinstance(answer, State):
            await self._apply_state(handle, answer)
        elif isinstance(answer, Ack) and answer.created is False:
            # The task existed (a caller restarted with its id, say): it may be over
            # already, and its events went to whoever published it. Read it now rather
            # than after the resync interval.
            await self._resync(handle)

    async def _resync(self, handle: TaskHandle) -> None:
        """Re-read a task's events and state from the hub (after a quiet spell, or an
        ``end`` whose outcome was lost); the missed events reach the handle first."""
        task_id = handle.task_id
        try:
            state = await self.request(Watch.build(task=task_id, since=self.protocol.last_seq(task_id)))
        except UnknownTask as exc:
            # Gone (removed with autoremove, or purged) before its outcome reached us:
            # nothing will end it, so the wait ends here.
            handle._abandon(exc)
            self._forget(handle)
            return
        except TaskHubError as exc:
            log.debug("resync of %s failed: %s", task_id, exc)
            return
        assert isinstance(state, State)
        await self._apply_state(handle, state)

    async def _apply_state(self, handle: TaskHandle, state: State) -> None:
        """Apply a ``state`` answer to its handle, reading the pages after it first (their
        events reach the handle as replayed ones; the last page's task is complete)."""
        try:
            while state.more is True and state.events:
                state = await self._next_page(handle.task_id, state)
        except TaskHubError as exc:
            log.debug("reading the rest of %s failed: %s", handle.task_id, exc)
            return
        handle._apply_snapshot(state.task)

    def _forget(self, handle: TaskHandle) -> None:
        self._handles.pop(handle.task_id, None)
        self._unfollow(handle.task_id)

    def _unfollow(self, task_id: str) -> None:
        """Stop following a task once neither a handle nor a handler needs its events."""
        if task_id not in self._handles and task_id not in self._worker.tasks:
            self.protocol.forget(task_id)


def _canonical(task_id: str) -> str:
    """A task id in the spelling the hub uses (lowercase, hyphenated), or the id as given
    if it is no UUID (the hub's refusal then says so)."""
    try:
        return str(uuid.UUID(task_id))
    except (ValueError, TypeError, AttributeError):
        return task_id
