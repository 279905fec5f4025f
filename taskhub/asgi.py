"""The hub's ASGI application: wrap your project's router so that every hub process
sweeps from its start.

Each process's sweeper enforces deadlines, releases instances that are gone and sends
what the channel layer lost (:mod:`taskhub.sweeper`). It must run in every process, also
one that never gets a connection (another process's tasks still time out there).
:func:`hub_application` starts it when the server starts:

- on ASGI lifespan startup (uvicorn, hypercorn), and stops it on shutdown;
- under daphne, which runs no lifespan, as soon as daphne's event loop runs.

The first WebSocket connection of an event loop starts it too, whatever the server.

It also bounds each connection's memory, and keeps a client that does not read from
holding up the others, under any server (:mod:`taskhub.flow`): each WebSocket
connection's ``send`` goes through a :class:`~taskhub.flow.Outbox`, and daphne's own
protocol is bounded when daphne is loaded.

When the server starts, what the process loaded (Django, the server, the app: ~140,000
objects) is moved out of the garbage collector's sight (:func:`gc.freeze`): CPython's
full collections walk every tracked object and stop the event loop meanwhile, and with
thousands of connections open they took 250–350 ms each, of which that part is a third.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

from . import flow, sweeper

log = logging.getLogger(__name__)

Scope = dict[str, Any]


class HubApplication:
    """An ASGI application that starts the sweeper with the server, around ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        # daphne is imported wherever it is an installed app, also under another server:
        # the hooks below then do nothing.
        if flow.install():
            log.debug("daphne's WebSocket protocol is bounded (taskhub.flow)")
        self._on_daphne_loop()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self.app(scope, receive, flow.Outbox(send, flow.peer_of(scope)).send)
            return
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                serving()
                log.debug("the sweeper started with the server (ASGI lifespan)")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await sweeper.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _on_daphne_loop(self) -> None:
        """Under daphne (no lifespan), start the sweeper once its event loop runs."""
        server = sys.modules.get("daphne.server")
        loop = getattr(server, "twisted_loop", None)
        if loop is not None:
            loop.call_soon(serving)
            log.debug("the sweeper starts with daphne's event loop, if daphne runs it")


def serving() -> None:
    """The server runs: start the sweeper, and freeze what was loaded (see above)."""
    sweeper.ensure_started()
    gc.freeze()


def hub_application(app: Any) -> HubApplication:
    """``app`` (your ``ProtocolTypeRouter``) with the sweeper started by the server."""
    return HubApplication(app)
