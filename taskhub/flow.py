"""Flow control under daphne: each connection's memory bounded both ways.

daphne puts every frame it reads into the application's queue, unbounded, and writes
everything the application sends into the socket's buffer, unbounded. So a client that
sends requests faster than the hub answers them, or one that does not read what the hub
sends it (a caller whose task streams updates while it sleeps), grows the hub's memory
without limit, and Python keeps most of it after the client has gone.

:func:`install` makes daphne's WebSocket protocol bound both:

- **Reading.** Once ``TASKHUB_MAX_QUEUED_FRAMES`` frames wait for the application, the
  hub stops reading that client's socket until the queue is half as long: TCP then slows
  the client down, and nothing is refused.
- **Writing.** The protocol registers with its transport as a streaming producer, so
  Twisted says when the socket's buffers are full (the client is not keeping up). From
  then on, once more than ``TASKHUB_MAX_BUFFERED_BYTES`` more have been queued for the
  client, the hub closes the connection with code 4008 ("not reading") and drops
  anything sent to it after that; a second later (autobahn's close handshake timeout)
  the socket is gone, and what was queued for it with it. A client that reads again
  before the limit loses nothing.

:func:`taskhub.asgi.hub_application` installs it when daphne serves the hub. It changes
one class attribute of daphne (its factory's ``protocol``) to a subclass, and uses only
autobahn's and Twisted's public producer and transport API.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from .conf import conf
from .core.codes import CloseCode

log = logging.getLogger(__name__)

#: Seconds between two looks at the queue of a connection whose reading is paused.
RESUME_POLL = 0.01


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


def install() -> bool:
    """Bound every connection daphne serves from now on; call before daphne's server
    runs (importing the ASGI application is early enough). Idempotent.

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
    return True
