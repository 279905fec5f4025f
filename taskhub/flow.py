"""Flow control: each connection's memory bounded both ways, whatever the server.

A client that sends requests faster than the hub answers them, or one that does not read
what the hub sends it (a caller whose task streams updates while it sleeps), must not
grow the hub's memory without limit, nor hold up anyone else.

**Any server** (:class:`Outbox`, which :func:`taskhub.asgi.hub_application` puts around
each WebSocket connection's ``send``). The hub sends to a connection from other
connections' handlers and from the sweeper (:mod:`taskhub.notify`), so a ``send`` must
never wait for that client. daphne's never does; uvicorn's waits while the socket's
write buffer is over its high-water mark (the client is not keeping up). The outbox
hands each message to the server at once and returns; while the server's ``send`` waits,
the next messages queue in the outbox, in order. Once more than
``TASKHUB_MAX_BUFFERED_BYTES`` wait there, or the server has taken nothing for
:data:`STALL_TIMEOUT` seconds, the hub gives up on the client: it logs a warning, drops
what waits, closes the connection with code 4008 ("not reading") if the client reads it
within :data:`CLOSE_TIMEOUT`, and otherwise drops the TCP connection (the disconnect
then detaches the instance). uvicorn's own keepalive cannot end such a connection: it
closes the transport, which waits for a buffer the client never drains. For the same
reason, :data:`LINGER_TIMEOUT` after the hub closed a connection, its TCP connection is
dropped if the server has not ended it. The outbox also makes every server behave as
daphne does towards a connection that is gone or closing: what the hub sends to it is
dropped, never an error.

**Reading.** uvicorn's ``websockets-sansio`` protocol stops reading a client's socket
while one of its messages waits for the hub, so at most one read's frames wait.
daphne queues every frame it reads, unbounded: the daphne part below bounds it.

**daphne** (:func:`install`), both ways in its own protocol:

- **Reading.** Once ``TASKHUB_MAX_QUEUED_FRAMES`` frames wait for the application, the
  hub stops reading that client's socket until the queue is half as long: TCP then slows
  the client down, and nothing is refused.
- **Writing.** daphne writes everything the application sends into the socket's buffer,
  unbounded. The protocol registers with its transport as a streaming producer, so
  Twisted says when the socket's buffers are full (the client is not keeping up). From
  then on, once more than ``TASKHUB_MAX_BUFFERED_BYTES`` more have been queued for the
  client, the hub closes the connection with code 4008 ("not reading") and drops
  anything sent to it after that; a second later (autobahn's close handshake timeout)
  the socket is gone, and what was queued for it with it. A client that reads again
  before the limit loses nothing.

- **Handshakes.** A turn of the event loop handles every socket that became readable,
  and a burst of connects makes hundreds of new connections readable at once, each with
  its opening handshake (HTTP, autobahn, the ASGI application's start): every
  established connection's traffic then waited behind all of them (a burst of 2,000
  connects held a ping for 1.1–1.9 s). The hub starts at most
  :data:`HANDSHAKES_PER_TURN` handshakes per turn: a connection beyond it stops being
  read, and its request is handled in a later turn, established connections served in
  between.

:func:`taskhub.asgi.hub_application` installs it when daphne is loaded. It changes one
class attribute of daphne (its factory's ``protocol``) to a subclass, wraps its HTTP
factory's ``buildProtocol``, and uses only autobahn's and Twisted's public producer and
transport API.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

from .conf import conf
from .core.codes import CloseCode

log = logging.getLogger(__name__)

#: Seconds between two looks at the queue of a connection whose reading is paused.
RESUME_POLL = 0.01
#: Seconds a client given up on has to read the close frame before its TCP connection is
#: dropped (autobahn's close handshake timeout under daphne).
CLOSE_TIMEOUT = 1.0
#: Seconds the server may take nothing of what the hub sends a client (its socket's
#: buffers stay full) before the hub gives up on the client as on one over
#: ``TASKHUB_MAX_BUFFERED_BYTES``: about when daphne's keepalive (a ping after 20 s, 30 s
#: for the pong, queued behind what the client has not read) drops it.
STALL_TIMEOUT = 60.0
#: Seconds after the hub closed a connection before its TCP connection is dropped, should
#: the server not have ended it (uvicorn waits 10 s for the client's close frame).
LINGER_TIMEOUT = 15.0
#: The reason of the 4008 close.
NOT_READING_REASON = "the client does not read its messages"

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


Step = Generator[Any, None, Any]  # a coroutine being run, as ``__await__`` gives it
#: What :meth:`Outbox._finish` is given for a send that has not started yet.
_NOT_STARTED = object()


class _Suspended:
    """Awaiting it waits for what a suspended coroutine yielded (its future), as the task
    that runs it would have."""

    def __init__(self, yielded: Any) -> None:
        self.yielded = yielded

    def __await__(self) -> Generator[Any, None, None]:
        yield self.yielded


def _size(message: Message) -> int:
    text = message.get("text")
    if text is not None:
        return len(text.encode())
    return len(message.get("bytes") or b"")


class Outbox:
    """A WebSocket connection's ``send`` that never waits for the client (module docs).

    Use :meth:`send` as the application's ``send``; ``peer`` names the client in the log.
    """

    # One per connection, most of them idle: slots, and no queue until one is needed.
    __slots__ = ("_send", "peer", "_waiting", "waiting_bytes", "_writer", "_stall", "_moved", "closed", "gave_up")

    def __init__(self, send: Send, peer: str = "?") -> None:
        self._send = send
        self.peer = peer
        self._waiting: collections.deque[Message] | None = None
        #: Bytes waiting in the outbox (what the server has not taken yet).
        self.waiting_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._moved = 0.0  # when the server last took a message (loop time)
        self.closed = False  # a close went (or waits) to the server: later messages are dropped
        self.gave_up = False

    async def send(self, message: Message) -> None:
        """Hand ``message`` to the server, or queue it behind the messages that wait; never
        waits for the client.

        Raises:
            Exception: what the server's ``send`` raises at once for a malformed message
                (not for a connection that is gone: that message is dropped).
        """
        if self.closed:
            return  # daphne drops what is sent after a close; uvicorn would raise
        if message["type"] == "websocket.close":
            self.closed = True
        if self._writer is not None:
            if self._waiting is None:
                self._waiting = collections.deque()
            self._waiting.append(message)
            self.waiting_bytes += _size(message)
            if self.waiting_bytes > conf.MAX_BUFFERED_BYTES:
                self._give_up(f"{self.waiting_bytes} bytes queued for it beyond its socket's buffers")
            return
        # Step the server's send right here, as awaiting it would: it nearly always
        # completes at once. Only if it suspends (the socket's buffer is full) does a
        # task finish it, and the messages after it wait for that task.
        step: Step = self._send(message).__await__()
        try:
            yielded = step.send(None)
        except StopIteration:
            self._sent(message)
            return
        except OSError:
            return self._gone()
        loop = asyncio.get_running_loop()
        self._moved = loop.time()
        self._writer = loop.create_task(self._write(message, step, yielded))
        self._stall = loop.call_later(STALL_TIMEOUT, self._check_stall)

    async def _write(self, message: Message, step: Step, yielded: Any) -> None:
        """Finish the suspended send of ``message``, then send what waits, in order."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._finish(step, yielded)
                self._moved = loop.time()
                self._sent(message)
                if not self._waiting:
                    self._waiting = None
                    return
                message = self._waiting.popleft()
                self.waiting_bytes -= _size(message)
                step, yielded = self._send(message).__await__(), _NOT_STARTED
        except OSError:
            self._gone()
        except asyncio.CancelledError:
            raise
        except Exception:  # a malformed message: what the server's send raised at once
            log.exception("could not send to %s", self.peer)
            self._gone()
        finally:
            self._writer = None
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

    @staticmethod
    async def _finish(step: Step, yielded: Any) -> None:
        """Run ``step`` to its end; ``yielded`` is what it yielded last, or
        :data:`_NOT_STARTED`."""
        if yielded is _NOT_STARTED:
            try:
                yielded = step.send(None)
            except StopIteration:
                return
        while True:
            try:
                await _Suspended(yielded)
            except BaseException as exc:  # cancelled: the server's send is cancelled too
                try:
                    yielded = step.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                yielded = step.send(None)
            except StopIteration:
                return

    def _sent(self, message: Message) -> None:
        """The server took ``message``. After a close, the server may not manage to end
        a connection whose client does not read (uvicorn closes, which waits for its
        buffer to drain): the TCP connection is dropped :data:`LINGER_TIMEOUT` later, a
        no-op for one that ended."""
        if message["type"] == "websocket.close":
            for transport in _transports(self._send):
                asyncio.get_running_loop().call_later(LINGER_TIMEOUT, transport.abort)

    def _check_stall(self) -> None:
        self._stall = None
        if self._writer is None or self.gave_up:
            return
        loop = asyncio.get_running_loop()
        still = loop.time() - self._moved
        if still >= STALL_TIMEOUT:
            self._give_up(f"it took nothing for {still:.0f} s; {self.waiting_bytes} bytes wait for it")
        else:
            self._stall = loop.call_later(STALL_TIMEOUT - still, self._check_stall)

    def _gone(self) -> None:
        """The connection is gone: drop what waits (the disconnect is on its way)."""
        self.closed = True
        self._waiting = None
        self.waiting_bytes = 0

    def _give_up(self, why: str) -> None:
        log.warning("closing the connection of %s: it does not read (%s)", self.peer, why)
        self.gave_up = True
        self._gone()
        writer = self._writer
        assert writer is not None  # messages wait only behind a running writer
        writer.cancel()
        closing = asyncio.get_running_loop().create_task(self._close_or_drop(writer))
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)

    async def _close_or_drop(self, writer: asyncio.Task[None]) -> None:
        """Send the 4008 close behind what the client has not read; drop the connection if
        the client does not read it within :data:`CLOSE_TIMEOUT`."""
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        close = {"type": "websocket.close", "code": int(CloseCode.NOT_READING), "reason": NOT_READING_REASON}
        try:
            await asyncio.wait_for(self._send(close), CLOSE_TIMEOUT)
            self._sent(close)
            return
        except Exception:  # it did not read in time, is gone, or the server closed it already
            log.debug("no close frame for %s", self.peer, exc_info=True)
        for transport in _transports(self._send):
            transport.abort()  # the kernel's buffers, and the server's, are freed now
            return
        log.warning(
            "the connection of %s stays open until it reads or goes: this server gives the hub no way to drop it",
            self.peer,
        )


# Closes under way, kept until they finish.
_closing: set[asyncio.Task[None]] = set()


def _transports(send: Send) -> Iterator[Any]:
    """The transport under a server's ``send``: uvicorn's protocols (``send`` is a method
    of the connection's ``asyncio.Protocol``) keep it as ``transport``."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and callable(getattr(transport, "abort", None)):
        yield transport


def peer_of(scope: dict[str, Any]) -> str:
    """``host:port`` of the scope's client, for the log."""
    client = scope.get("client")
    return ":".join(map(str, client)) if client else "?"


class _WriteWatch:
    """A streaming producer for Twisted's transport: it is paused when the socket's
    buffers are full, resumed when they have drained."""

    def __init__(self) -> None:
        self.paused = False
        #: Bytes queued for the client since its buffers were full.
        self.unread = 0

    def pauseProducing(self) -> None:  # noqa: N802  (Twisted's IPushProducer)
        if not self.paused:
            self.paused, self.unread = True, 0

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused, self.unread = False, 0

    def stopProducing(self) -> None:  # noqa: N802
        self.paused = False


def bounded_protocol(base: type[Any]) -> type[Any]:
    """daphne's ``WebSocketProtocol`` (``base``) with both bounds."""

    class BoundedWebSocketProtocol(base):  # type: ignore[misc]
        _watch: _WriteWatch | None = None
        _reading_paused = False
        _gave_up = False

        def onOpen(self) -> None:  # noqa: N802  (autobahn's names)
            super().onOpen()
            self._watch = _WriteWatch()
            try:
                self.registerProducer(self._watch, True)
            except RuntimeError:
                # The HTTP channel this connection was upgraded from is still registered
                # as the socket's producer; it has nothing left to produce.
                self.unregisterProducer()
                self.registerProducer(self._watch, True)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            super().onMessage(payload, isBinary)
            queue = getattr(self, "application_queue", None)
            if queue is not None and not self._reading_paused and queue.qsize() >= conf.MAX_QUEUED_FRAMES:
                self._reading_paused = True
                self.transport.pauseProducing()
                self._resume_when_drained()

        def _resume_when_drained(self) -> None:
            if self.state == self.STATE_CLOSED:
                return
            if self.application_queue.qsize() <= conf.MAX_QUEUED_FRAMES // 2:
                self._reading_paused = False
                self.transport.resumeProducing()
                return
            from twisted.internet import reactor

            reactor.callLater(RESUME_POLL, self._resume_when_drained)  # type: ignore[attr-defined,arg-type,unused-ignore]

        def serverSend(self, content: str | bytes, binary: bool = False) -> None:  # noqa: N802
            if self._gave_up:
                return  # closed for not reading: what the application still sends is dropped
            super().serverSend(content, binary)
            watch = self._watch
            if watch is None or not watch.paused:
                return
            watch.unread += len(content) if isinstance(content, bytes) else len(content.encode())
            if watch.unread > conf.MAX_BUFFERED_BYTES:
                self._give_up(watch.unread)

        def serverClose(self, code: int | None = None) -> None:  # noqa: N802
            if not self._gave_up:
                super().serverClose(code)

        def _give_up(self, unread: int) -> None:
            self._gave_up = True
            peer = ":".join(map(str, self.client_addr)) if self.client_addr else "?"
            log.warning(
                "closing the connection of %s: it does not read (%d bytes queued for it beyond its socket's buffers)",
                peer,
                unread,
            )
            reason = "the client does not read its messages"
            # The close frame waits behind what the client has not read: a client that
            # reads again gets it; for one that does not, autobahn drops the connection,
            # and what was queued, after its close handshake timeout (1 s).
            self.sendClose(code=int(CloseCode.NOT_READING), reason=reason)

    BoundedWebSocketProtocol.__qualname__ = BoundedWebSocketProtocol.__name__
    return BoundedWebSocketProtocol


#: Most opening handshakes daphne starts per turn of the event loop.
HANDSHAKES_PER_TURN = 16


class _TurnBudget:
    """How many handshakes this turn of the event loop may still start."""

    def __init__(self) -> None:
        self.left = HANDSHAKES_PER_TURN
        self.renewing = False

    def take(self) -> bool:
        if not self.renewing:
            # Callbacks queued in this turn run in the next, before its I/O callbacks.
            asyncio.get_running_loop().call_soon(self._renew)
            self.renewing = True
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def _renew(self) -> None:
        self.left, self.renewing = HANDSHAKES_PER_TURN, False


_budget = _TurnBudget()


def paced(protocol: Any) -> Any:
    """Hold ``protocol`` (a new HTTP connection of daphne's) to the turn's handshake
    budget: its first bytes are handled in a turn with room for one more handshake, and
    what comes before that (TLS may hand over several chunks unasked) waits with them, in
    order; meanwhile its transport is not read. Returns the protocol."""
    handle, connect, lose = protocol.dataReceived, protocol.makeConnection, protocol.connectionLost
    state: dict[str, Any] = {"started": False, "transport": None, "waiting": [], "lost": False}

    def make_connection(transport: Any) -> None:
        # Twisted's generic HTTP protocol keeps its transport on the channel it wraps.
        state["transport"] = transport
        connect(transport)

    def connection_lost(reason: Any) -> None:
        state["lost"] = True
        lose(reason)

    def data_received(data: bytes) -> None:
        if state["started"]:
            handle(data)
        elif state["waiting"]:
            state["waiting"].append(data)  # behind what waits for a turn already
        elif _budget.take():
            state["started"] = True
            handle(data)
        else:
            state["waiting"].append(data)
            with contextlib.suppress(AttributeError):  # a transport that cannot pause just waits
                state["transport"].pauseProducing()
            asyncio.get_running_loop().call_soon(later)

    def later() -> None:
        if state["lost"]:
            state["waiting"].clear()  # the client gave up while it waited
            return
        if not _budget.take():
            asyncio.get_running_loop().call_soon(later)
            return
        data, state["waiting"], state["started"] = b"".join(state["waiting"]), [], True
        with contextlib.suppress(AttributeError):
            state["transport"].resumeProducing()
        handle(data)

    protocol.makeConnection, protocol.dataReceived, protocol.connectionLost = (
        make_connection,
        data_received,
        connection_lost,
    )
    return protocol


def install() -> bool:
    """Bound every connection daphne serves from now on, and how many it accepts per
    turn; call before daphne's server runs (importing the ASGI application is early
    enough). Idempotent.

    Returns:
        Whether daphne is loaded (and now bounded).
    """
    ws_protocol = sys.modules.get("daphne.ws_protocol")
    if ws_protocol is None:
        return False
    factory = ws_protocol.WebSocketFactory
    if not getattr(factory.protocol, "taskhub_bounded", False):
        factory.protocol = bounded_protocol(factory.protocol)
        factory.protocol.taskhub_bounded = True
    http_factory = sys.modules["daphne.http_protocol"].HTTPFactory
    if not getattr(http_factory.buildProtocol, "taskhub_paced", False):
        build = http_factory.buildProtocol

        def build_paced(factory: Any, addr: Any) -> Any:
            protocol = build(factory, addr)
            return protocol if protocol is None else paced(protocol)

        build_paced.taskhub_paced = True  # type: ignore[attr-defined]
        http_factory.buildProtocol = build_paced
    return True
