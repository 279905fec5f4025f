"""The client's I/O: the protocol on a ``websockets`` connection, reconnected with backoff.

:class:`Connection` owns the socket, the reconnect loop and the futures of the commands
in flight; everything a frame means is :class:`~taskhub.client.protocol.ClientProtocol`'s.
:class:`~taskhub.client.Client` builds the API on it and receives what the hub offers
and relays through :meth:`Connection.on_offer` and :meth:`Connection.on_task_event`.

Reconnects wait :func:`backoff` before each try. The first :meth:`Connection.connect`
raises what cannot mend itself, and nothing reconnects: an authentication error, a
subscription refused, a URL whose path serves no hub (:class:`ConnectionFailed` at once),
or an error this module did not expect. Later, the same is logged and retried (say,
every instance slot of the credential is taken for a while).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from taskhub.core.codes import CloseCode, ErrorCode
from taskhub.core.commands import Command
from taskhub.core.errors import AuthenticationFailed, ConnectionFailed, PermissionDenied, ProtocolError, TaskHubError
from taskhub.core.messages import Message, Offer, TaskEventMessage

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

log = logging.getLogger("taskhub.client")


#: Seconds between two warnings that connecting to the hub fails.
WARN_EVERY = 30.0
#: Seconds after a command that asked for no answer before a ``ping`` asks for the answer
#: that acknowledges it, unless another command's answer did meanwhile.
SYNC_AFTER = 1.0


class _Default:
    """The default of an argument whose ``None`` means something."""


DEFAULT = _Default()


def backoff(tries: int) -> float:
    """Seconds to wait before reconnect number ``tries`` (1, 2, ...): ``min((10n)² ms, 60 s)``."""
    return min((10 * tries) ** 2 / 1000, 60.0)


class Connection:
    """One client's connection to the hub, across reconnects.

    Args:
        url: the hub's WebSocket endpoint, e.g. ``ws://localhost:8000/ws/taskhub/``.
        name, key: the service's credential, sent at the handshake (HTTP Basic).
        backoff: seconds to wait before reconnect number n.
        max_size: the largest frame to accept from the hub, in bytes.
        connect_timeout: seconds :meth:`connect` tries before it raises
            :class:`ConnectionFailed` (``None``: for ever).
        concurrency: most unfinished tasks the hub offers this client at once (``None``:
            no limit); sent at every (re)connect.

    Raises:
        ValueError: ``url`` is not a WebSocket URL (``ws://HOST[:PORT]/PATH`` or
            ``wss://...``): nothing could ever connect to it.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        key: str,
        backoff: Callable[[int], float] = backoff,
        max_size: int | None = 2**20,
        connect_timeout: float | None = 30.0,
        concurrency: int | None = None,
    ) -> None:
        _check_url(url)
        self.url, self.name = url, name
        self._auth = "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()
        self.backoff = backoff
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.concurrency = concurrency
        self._last_error = "no answer yet"
        self._warned_at = -math.inf
        self._failures = 0
        self.protocol = ClientProtocol()
        self._futures: dict[int, asyncio.Future[Message]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._ws: Any = None
        self._ready = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._started_at = 0.0
        self._closing = False
        self._sync_timer: asyncio.TimerHandle | None = None
        # One flush at a time: a send that waits for the socket's buffer must not let a
        # later flush's frames pass its own (an answer acknowledges what was sent before).
        self._sending = asyncio.Lock()

    @property
    def instance(self) -> str | None:
        """This connection's instance id, once connected."""
        return self.protocol.instance

    @property
    def connected(self) -> bool:
        """Whether the session is open and its subscriptions acknowledged."""
        return self._ready.is_set()

    # -- what the client builds on ---------------------------------------------------------

    def on_offer(self, offer: Offer) -> None:
        """Called with each task offered to this instance."""

    def on_task_event(self, message: TaskEventMessage) -> None:
        """Called with each task event of a followed task, each ``seq`` once."""

    def on_instance_lost(self) -> None:
        """Called when a reconnect did not get the client's instance back: the tasks it
        worked on went to other instances."""

    # -- connecting --------------------------------------------------------------------------

    async def connect(self, *, timeout: float | None | _Default = DEFAULT) -> None:
        """Connect, authenticate and subscribe, retrying with backoff until the hub answers
        or ``timeout`` seconds (the client's ``connect_timeout`` unless given; ``None``:
        for ever) have passed.

        Raises:
            ConnectionFailed: the hub could not be reached in time (it names the URL and
                the last error), or at once when the URL's path serves no hub (the hub
                answers ``not_found``); the client stops trying.
            AuthenticationFailed: wrong name or key, a disabled credential, no free slot.
            PermissionDenied: a registered subscription is not allowed.
            Exception: whatever unexpected error ended the first try (logged too).
        """
        seconds = self.connect_timeout if isinstance(timeout, _Default) else timeout
        if self._runner is None:
            self._closing = False
            self._started_at = asyncio.get_running_loop().time()
            self._first = asyncio.get_running_loop().create_future()
            self._runner = asyncio.create_task(self._run(), name=f"taskhub-client-{self.name}")
        assert self._first is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._first), seconds)
        except TimeoutError:
            error = ConnectionFailed(self.url, self._last_error, seconds or 0)
            await self.disconnect()
            raise error from None

    async def disconnect(self) -> None:
        """Close the socket and stop reconnecting; cancel the background tasks. Commands
        still waiting for an answer fail with :class:`ConnectionLost`."""
        self._closing = True
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self._handle(self.protocol.close())
        if self._ws is not None:
            await self._ws.close()
        runner = [self._runner] if self._runner else []
        for task in [*self._background, *runner]:
            task.cancel()
        await asyncio.gather(*self._background, *runner, return_exceptions=True)
        self._runner = None

    async def _run(self) -> None:
        tries = 0
        while not self._closing:
            try:
                await self._session()
                tries = 0
            except (AuthenticationFailed, PermissionDenied) as exc:
                if self._refused(exc):
                    return
                log.error("taskhub: %s; reconnecting", exc)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, TaskHubError) as exc:
                status = exc.response.status_code if isinstance(exc, InvalidStatus) else None
                if status in (401, 403) and self._refused(AuthenticationFailed(f"handshake refused: {exc}")):
                    return
                # A path that serves no hub will not serve one on the next try either.
                if _not_found(exc, status) and self._refused(self._unreachable(exc)):
                    return
                self._failed(exc)
            except Exception as exc:  # a bug, here or below: said, and raised by a first connect
                log.exception("taskhub: the connection to %s failed unexpectedly", self.url)
                if self._refused(exc):
                    return
                self._last_error = f"{type(exc).__name__}: {exc}"
            if self._closing:
                return
            tries += 1
            await asyncio.sleep(self.backoff(tries))

    def _unreachable(self, exc: BaseException) -> ConnectionFailed:
        """The :class:`ConnectionFailed` of a first connect that cannot succeed."""
        elapsed = asyncio.get_running_loop().time() - self._started_at
        what = exc.code if isinstance(exc, ProtocolError) else type(exc).__name__
        return ConnectionFailed(self.url, f"{what}: {exc}", round(elapsed, 3))

    def _failed(self, exc: BaseException) -> None:
        """A connection failed or closed: say so at WARNING, at most every
        :data:`WARN_EVERY` seconds (with how many failed since)."""
        self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._failures += 1
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= WARN_EVERY:
            more = f" ({self._failures} failures since the last warning)" if self._failures > 1 else ""
            log.warning("taskhub: connection to %s failed or closed: %s; retrying%s", self.url, self._last_error, more)
            self._warned_at, self._failures = now, 0

    def _refused(self, error: Exception) -> bool:
        """Raise ``error`` from the first :meth:`connect`; whether it was the first."""
        if self._first is None or self._first.done():
            return False
        self._first.set_exception(error)
        return True

    async def _session(self) -> None:
        """One connection: read frames and act on the protocol's events until it closes."""
        # The client reads an end inside the event before it (taskhub.core.ends).
        headers = {"Authorization": self._auth, "TaskHub-Inline-End": "true"}
        if self.protocol.resume_token:
            headers["TaskHub-Resume"] = self.protocol.resume_token
        if self.concurrency is not None:
            headers["TaskHub-Concurrency"] = str(self.concurrency)
        async with websockets.connect(
            self.url,
            additional_headers=headers,
            max_size=self.max_size,
            open_timeout=10,
            compression=None,
        ) as ws:
            self.protocol.connection_made()
            self._ws = ws
            try:
                async for raw in ws:
                    try:
                        self._handle(self.protocol.receive(raw))
                    except TaskHubError:
                        raise  # the hub refused the session
                    except Exception:  # one frame's trouble must not end the client
                        log.exception("taskhub: could not handle a frame from the hub")
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
                case Welcomed(subscriptions=refs, instance_lost=instance_lost):
                    self._warned_at = -math.inf
                    if instance_lost:
                        self.on_instance_lost()
                    self.spawn(self._opened([self._expect(ref) for ref in refs]))
                case SessionRefused(error=error):
                    raise error  # ends the session: final if it refuses the credential
                case Offered(offer=offer):
                    self.on_offer(offer)
                case TaskEventIn(message=message):
                    self.on_task_event(message)
                case HubError(error=error):
                    log.error("taskhub: %s", error)

    async def _opened(self, subscriptions: list[asyncio.Future[Message]]) -> None:
        """The session is open: once its subscriptions are acknowledged, it is ready."""
        try:
            for future in subscriptions:
                await future
        except ConnectionLost:
            return  # the next session subscribes again
        except TaskHubError as exc:  # a subscription refused
            if not self._refused(exc):
                log.error("taskhub: %s", exc)  # revoked since, say: serve the other actions
            else:  # the first connect: the caller learns why, and nothing reconnects
                self._closing = True
                if self._ws is not None:
                    await self._ws.close()
                return
        self._ready.set()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    # -- commands ------------------------------------------------------------------------

    async def submit(self, command: Command) -> asyncio.Future[Message]:
        """Send ``command`` (or hold it until the session is open) and return the future
        of its answer, without waiting for it. The future raises the hub's refusal (the
        exception of its code) or :class:`ConnectionLost`.

        Raises:
            InvalidMessage: ``message_too_large``; nothing was sent.
        """
        future = self._expect(self.protocol.send(command))
        await self._flush()
        return future

    async def request(self, command: Command) -> Message:
        """Send ``command`` and return the hub's answer (see :meth:`submit`)."""
        return await (await self.submit(command))

    def subscribe(self, action: str) -> None:
        """Subscribe to ``action`` now if connected, and after every reconnect."""
        ref = self.protocol.subscribe(action)
        if ref is not None:
            self._expect(ref).add_done_callback(_log_refusal)
            self.spawn(self._flush())

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until it ends or the client closes."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _expect(self, ref: int) -> asyncio.Future[Message]:
        """The future of the answer to the command ``ref``; register it before the answer
        can be read (synchronously after ``protocol.send``)."""
        future = self._futures.get(ref)
        if future is None:
            future = self._futures[ref] = asyncio.get_running_loop().create_future()
        return future

    def _settle(self, ref: int, message: Message | None, error: BaseException | None) -> None:
        future = self._futures.pop(ref, None)
        if future is None or future.done():
            return
        if error is None:
            assert message is not None
            future.set_result(message)
        else:
            future.set_exception(error)

    async def _flush(self) -> None:
        """Send what the protocol queued. A frame lost to a closing connection is the
        protocol's to send again or to fail (:meth:`ClientProtocol.connection_lost`)."""
        async with self._sending:
            ws = self._ws
            frames = self.protocol.data_to_send()
            if self.protocol.unacknowledged and self._sync_timer is None:
                self._sync_timer = asyncio.get_running_loop().call_later(SYNC_AFTER, self._sync)
            if ws is None:
                return
            try:
                for frame in frames:
                    await ws.send(frame)
            except ConnectionClosed:
                pass

    async def sync(self) -> None:
        """Ask now for the answer that acknowledges the commands sent without one (a
        ``ping``), if no command sent since asks for an answer."""
        if self.protocol.sync():
            await self._flush()

    def _sync(self) -> None:
        """Ask for the answer that acknowledges the commands sent without one (a ``ping``),
        if nothing else did since."""
        self._sync_timer = None
        if self.protocol.sync():
            self.spawn(self._flush())
        elif self.protocol.unacknowledged:  # the ping or a command's answer is on its way
            self._sync_timer = asyncio.get_running_loop().call_later(SYNC_AFTER, self._sync)


def _not_found(exc: BaseException, status: int | None) -> bool:
    """Whether ``exc`` says the URL's path serves no hub: the hub's ``not_found`` (an
    error, then close code 4404), or an HTTP 404 from whatever answered the handshake."""
    if isinstance(exc, ProtocolError):
        return exc.code == ErrorCode.NOT_FOUND
    if isinstance(exc, ConnectionClosed):
        return exc.rcvd is not None and exc.rcvd.code == CloseCode.NOT_FOUND
    return status == 404


def _check_url(url: str) -> None:
    """Raise ``ValueError`` if ``url`` is not a WebSocket URL."""
    try:
        parse_uri(url)
    except (InvalidURI, ValueError) as exc:
        raise ValueError(f"{url!r} is not a WebSocket URL (ws://HOST[:PORT]/PATH or wss://...): {exc}") from None


def _log_refusal(future: asyncio.Future[Message]) -> None:
    error = None if future.cancelled() else future.exception()
    if error is not None and not isinstance(error, ConnectionLost):  # lost: sent again on reconnect
        log.error("taskhub: %s", error)
