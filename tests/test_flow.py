"""The outbox each WebSocket connection's ``send`` goes through (taskhub/flow.py): it never
waits for the client, keeps the order, gives up on a client that does not read (close
4008, else the TCP connection dropped), and drops what goes to a closed connection.

The server here is a fake with the contract of uvicorn's: its ``send`` waits while the
socket's buffer is full, raises an ``OSError`` once the client is gone, and its
``transport`` can be aborted. ``tests/e2e/test_bounds.py`` runs the real servers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

from taskhub import flow
from taskhub.core.codes import CloseCode
from tests.conftest import TIMEOUT


class Transport:
    def __init__(self) -> None:
        self.aborted = asyncio.Event()

    def abort(self) -> None:
        self.aborted.set()


class Server:
    """A server's side of one connection: ``send`` waits while ``writable`` is clear."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.sent: list[dict[str, Any]] = []
        self.gone = False
        self.paced = False  # each message taken fills the buffer again
        self.transport = Transport()
        self.changed = asyncio.Condition()

    async def send(self, message: dict[str, Any]) -> None:
        if message.get("type") not in ("websocket.accept", "websocket.send", "websocket.close"):
            raise RuntimeError(f"unexpected ASGI message {message.get('type')!r}")
        await self.writable.wait()
        if self.gone:
            raise OSError("the client is gone")  # uvicorn's ClientDisconnected is an OSError
        self.sent.append(message)
        if self.paced:
            self.writable.clear()
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.sent) >= count), TIMEOUT)


def text(n: int, size: int = 10) -> dict[str, Any]:
    return {"type": "websocket.send", "text": str(n).rjust(size, "x")}


async def test_a_send_the_server_takes_at_once_is_done_when_it_returns():
    server = Server()
    outbox = flow.Outbox(server.send)
    await outbox.send(text(1))
    assert server.sent == [text(1)]  # no turn of the event loop in between


async def test_sends_never_wait_for_a_client_that_is_not_reading_and_keep_their_order():
    server = Server()
    outbox = flow.Outbox(server.send)
    server.writable.clear()  # the socket's buffer is full
    for n in range(5):
        await asyncio.wait_for(outbox.send(text(n)), TIMEOUT)  # never waits for the client
    assert server.sent == []
    server.writable.set()  # it reads again
    await server.wait_for(5)
    assert server.sent == [text(n) for n in range(5)]
    # Then straight through again.
    await outbox.send(text(5))
    assert server.sent[-1] == text(5)


async def test_a_client_over_the_limit_is_closed_with_4008_when_it_reads_again(settings, caplog):
    settings.TASKHUB_MAX_BUFFERED_BYTES = 1000
    server = Server()
    outbox = flow.Outbox(server.send, "10.0.0.7:5000")
    server.writable.clear()
    with caplog.at_level(logging.WARNING, logger="taskhub.flow"):
        for n in range(12):  # the first waits in the server; 11 × 100 bytes wait in the outbox
            await asyncio.wait_for(outbox.send(text(n, 100)), TIMEOUT)
    assert outbox.gave_up
    assert "closing the connection of 10.0.0.7:5000: it does not read (1100 bytes" in caplog.text
    await outbox.send(text(99))  # dropped: nothing more goes to it
    server.writable.set()  # it reads again within the close timeout
    await server.wait_for(1)
    assert server.sent == [
        {"type": "websocket.close", "code": int(CloseCode.NOT_READING), "reason": flow.NOT_READING_REASON}
    ]
    assert not server.transport.aborted.is_set()


async def test_a_client_that_never_reads_is_dropped_after_the_close_timeout(settings, monkeypatch):
    settings.TASKHUB_MAX_BUFFERED_BYTES = 1000
    monkeypatch.setattr(flow, "CLOSE_TIMEOUT", 0.05)
    server = Server()
    outbox = flow.Outbox(server.send)
    server.writable.clear()
    for n in range(12):
        await outbox.send(text(n, 100))
    await asyncio.wait_for(server.transport.aborted.wait(), TIMEOUT)
    assert server.sent == []


async def test_a_server_without_a_transport_to_drop_says_the_connection_stays(settings, monkeypatch, caplog):
    settings.TASKHUB_MAX_BUFFERED_BYTES = 1000
    monkeypatch.setattr(flow, "CLOSE_TIMEOUT", 0.05)
    server = Server()

    async def send(message: dict[str, Any]) -> None:  # a function: nothing to reach a transport by
        await server.send(message)

    outbox = flow.Outbox(send, "10.0.0.8:5000")
    server.writable.clear()
    with caplog.at_level(logging.WARNING, logger="taskhub.flow"):
        for n in range(12):
            await outbox.send(text(n, 100))

        async def said() -> None:
            while "stays open until it reads or goes" not in caplog.text:
                await asyncio.sleep(0.01)  # the log is the only signal

        await asyncio.wait_for(said(), TIMEOUT)
    assert "the connection of 10.0.0.8:5000 stays open" in caplog.text


async def test_what_is_sent_after_a_close_is_dropped_as_daphne_does():
    server = Server()
    outbox = flow.Outbox(server.send)
    await outbox.send({"type": "websocket.close", "code": 4001})
    await outbox.send(text(1))  # a relay that came in after the refusal: no error
    await outbox.send({"type": "websocket.close", "code": 1000})
    assert server.sent == [{"type": "websocket.close", "code": 4001}]


async def test_a_close_waits_behind_what_waits_before_it():
    server = Server()
    outbox = flow.Outbox(server.send)
    server.writable.clear()
    await outbox.send(text(1))
    await outbox.send(text(2))
    await outbox.send({"type": "websocket.close", "code": 1000})
    await outbox.send(text(3))  # after the close: dropped
    server.writable.set()
    await server.wait_for(3)
    assert server.sent == [text(1), text(2), {"type": "websocket.close", "code": 1000}]


async def test_a_client_that_is_gone_drops_what_is_sent_without_an_error():
    server = Server()
    outbox = flow.Outbox(server.send)
    server.gone = True
    await outbox.send(text(1))  # at once
    assert outbox.closed
    server2 = Server()
    outbox2 = flow.Outbox(server2.send)
    server2.writable.clear()
    await outbox2.send(text(1))
    await outbox2.send(text(2))
    server2.gone = True
    server2.writable.set()  # the disconnect wakes the waiting send, which raises

    async def dropped() -> None:
        while not outbox2.closed:
            await asyncio.sleep(0.01)  # the writer task's end is not observable otherwise

    await asyncio.wait_for(dropped(), TIMEOUT)
    await outbox2.send(text(3))
    assert server2.sent == []


async def test_a_malformed_message_raises_as_the_server_does():
    server = Server()
    outbox = flow.Outbox(server.send)
    with pytest.raises(RuntimeError, match="unexpected ASGI message"):
        await outbox.send({"type": "websocket.nonsense"})
    await outbox.send(text(1))  # the connection goes on
    assert server.sent == [text(1)]


async def test_a_malformed_message_behind_others_is_logged_and_the_connection_given_up(caplog):
    server = Server()
    outbox = flow.Outbox(server.send, "10.0.0.9:5000")
    server.writable.clear()
    await outbox.send(text(1))
    await outbox.send({"type": "websocket.nonsense"})
    with caplog.at_level(logging.ERROR, logger="taskhub.flow"):
        server.writable.set()

        async def logged() -> None:
            while "could not send to 10.0.0.9:5000" not in caplog.text:
                await asyncio.sleep(0.01)  # the log is the only signal

        await asyncio.wait_for(logged(), TIMEOUT)
    assert server.sent == [text(1)]
    assert outbox.closed


def test_the_peer_is_named_by_the_scopes_client():
    assert flow.peer_of({"client": ["10.0.0.1", 4321]}) == "10.0.0.1:4321"
    assert flow.peer_of({"client": None}) == "?"


async def test_a_client_that_takes_nothing_for_the_stall_timeout_is_given_up_on(monkeypatch, caplog):
    """Under the byte limit, but its socket took nothing for that long: as daphne's
    keepalive would, the hub closes it (and drops it, since it does not read the close)."""
    monkeypatch.setattr(flow, "STALL_TIMEOUT", 0.1)
    monkeypatch.setattr(flow, "CLOSE_TIMEOUT", 0.05)
    server = Server()
    outbox = flow.Outbox(server.send, "10.0.0.10:5000")
    server.writable.clear()
    with caplog.at_level(logging.WARNING, logger="taskhub.flow"):
        await outbox.send(text(1, 100))
        await outbox.send(text(2, 100))
        await asyncio.wait_for(server.transport.aborted.wait(), TIMEOUT)
    assert outbox.gave_up
    assert "closing the connection of 10.0.0.10:5000: it does not read (it took nothing for" in caplog.text
    assert server.sent == []


async def test_a_client_that_reads_slowly_is_not_given_up_on(monkeypatch):
    monkeypatch.setattr(flow, "STALL_TIMEOUT", 0.2 * TIMEOUT)
    server = Server()
    server.paced = True
    outbox = flow.Outbox(server.send)
    server.writable.clear()
    for n in range(15):
        await outbox.send(text(n))
    # It takes one message every 0.02 × TIMEOUT s: longer than the stall timeout in all,
    # never that long without taking one.
    for n in range(15):
        await asyncio.sleep(0.02 * TIMEOUT)  # the client's pace
        server.writable.set()
        await server.wait_for(n + 1)
    assert server.sent == [text(n) for n in range(15)]
    assert not outbox.gave_up and not server.transport.aborted.is_set()


async def test_a_closed_connection_the_server_did_not_end_is_dropped_after_the_linger_timeout(monkeypatch):
    monkeypatch.setattr(flow, "LINGER_TIMEOUT", 0.05)
    server = Server()
    outbox = flow.Outbox(server.send)
    await outbox.send({"type": "websocket.close", "code": 1000})
    await asyncio.wait_for(server.transport.aborted.wait(), TIMEOUT)


# -- daphne: handshakes paced per turn of the event loop ---------------------------------------


class TCPTransport:
    """Twisted's side of one connection, as far as pacing uses it."""

    def __init__(self) -> None:
        self.reading, self.disconnected = True, False

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.reading = False

    def resumeProducing(self) -> None:  # noqa: N802
        self.reading = True


class HTTPConnection:
    """A new HTTP connection of daphne's: what it was handed, in order. Like Twisted's
    generic HTTP protocol, it keeps its transport out of sight (on the channel it wraps)."""

    def __init__(self) -> None:
        self.handled: list[bytes] = []

    def makeConnection(self, transport: TCPTransport) -> None:  # noqa: N802
        self.channel_transport = transport

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.handled.append(data)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.lost = True


def accepted() -> Any:
    """A new connection, paced, as Twisted's port hands it over."""
    connection = flow.paced(HTTPConnection())
    connection.makeConnection(TCPTransport())
    return connection


async def next_turn() -> None:
    """One turn of the event loop: the unit the handshake budget is counted in, so the
    sleep is the thing under test."""
    await asyncio.sleep(0)


async def test_a_burst_of_handshakes_is_spread_over_turns_in_order_none_dropped(monkeypatch):
    monkeypatch.setattr(flow, "HANDSHAKES_PER_TURN", 2)
    monkeypatch.setattr(flow, "_budget", flow._TurnBudget())
    connections = [accepted() for _ in range(5)]
    for n, connection in enumerate(connections):
        connection.dataReceived(b"GET /ws/taskhub/ %d" % n)
    # This turn starts two; the others wait, their sockets not read meanwhile.
    assert [len(c.handled) for c in connections] == [1, 1, 0, 0, 0]
    assert [c.channel_transport.reading for c in connections] == [True, True, False, False, False]
    await next_turn()
    assert [len(c.handled) for c in connections] == [1, 1, 1, 1, 0]
    await next_turn()
    assert all(c.handled == [b"GET /ws/taskhub/ %d" % n] for n, c in enumerate(connections))
    assert all(c.channel_transport.reading for c in connections)
    # Once started, a connection's data is never held back.
    connections[4].dataReceived(b"more")
    connections[4].dataReceived(b"and more")
    assert connections[4].handled[1:] == [b"more", b"and more"]


async def test_a_connection_gone_while_it_waited_for_its_turn_is_not_handled(monkeypatch):
    monkeypatch.setattr(flow, "HANDSHAKES_PER_TURN", 1)
    monkeypatch.setattr(flow, "_budget", flow._TurnBudget())
    first, second = accepted(), accepted()
    first.dataReceived(b"a")
    second.dataReceived(b"b")
    second.connectionLost(None)  # the client gave up
    assert second.lost  # Twisted's own handling still runs
    await next_turn()
    await next_turn()
    assert (first.handled, second.handled) == ([b"a"], [])


async def test_chunks_that_come_before_the_turn_wait_behind_the_first_in_order(monkeypatch):
    # Under TLS, the wrapper hands over what it decrypted without asking the transport.
    monkeypatch.setattr(flow, "HANDSHAKES_PER_TURN", 1)
    monkeypatch.setattr(flow, "_budget", flow._TurnBudget())
    first, second = accepted(), accepted()
    first.dataReceived(b"GET / HTTP/1.1")
    for chunk in (b"GET /ws/", b"taskhub/ HTTP/1.1\r\n", b"Host: hub\r\n\r\n"):
        second.dataReceived(chunk)
    assert second.handled == []
    await next_turn()
    assert second.handled == [b"GET /ws/taskhub/ HTTP/1.1\r\nHost: hub\r\n\r\n"]
    await next_turn()
    assert len(second.handled) == 1  # handled once, not once per chunk


def test_once_the_server_runs_what_was_loaded_is_out_of_the_collectors_sight(monkeypatch):
    from taskhub import asgi, sweeper

    started: list[bool] = []
    monkeypatch.setattr(sweeper, "ensure_started", lambda: started.append(True))
    gc.unfreeze()
    try:
        asgi.serving()
        assert started == [True]
        assert gc.get_freeze_count() > 10_000  # the modules, classes and functions loaded
    finally:
        gc.unfreeze()
