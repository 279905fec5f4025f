"""The client's side of the protocol, without I/O.

:class:`ClientProtocol` is what python-websockets' ``ClientProtocol`` is to its asyncio
connection: it takes the frames the hub sent and returns what happened
(:meth:`~ClientProtocol.receive`), queues the frames to send
(:meth:`~ClientProtocol.data_to_send`), and keeps the state a connection and its
reconnects need. It owns no socket, no clock and no task; :class:`taskhub.client.Client`
does, and is a thin wrapper around it.

What it keeps:

- the connection's state, the instance and the hub's limits from ``welcome``;
- refs: each command gets one, and the hub's answer comes back as an :class:`Answered`
  or :class:`Refused` event for that ref;
- what survives a reconnect: the subscriptions (sent again first), commands not yet
  answered that are safe to send again (``pub`` with its task id, reads, a worker's
  final ``return``, ``drop`` or ``fail``), and the tasks a caller follows, which it
  ``watch``\\ es again from the last ``seq`` it heard, so that no task event is lost or
  repeated;
- commands submitted while disconnected, sent once the session is open again.

Events, in the order :meth:`~ClientProtocol.receive` returns them:

    Welcomed        the session is open (after a connect or a reconnect)
    SessionRefused  the hub refused the credential; it closes the connection
    Answered        a command's answer (ack, pong, payload, state)
    Refused         a command's error, as the exception of its code
    Failed          a command sent on a connection that was lost, and not sent again
    Offered         a task offered to this instance
    TaskEventIn     a task event (live, or replayed by watch), each seq once
    HubError        an error that answers no command of ours
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from taskhub.core.commands import Command, Sub, Watch
from taskhub.core.errors import AuthenticationFailed, InvalidMessage, TaskHubError, error_for
from taskhub.core.frames import decode_frame, encode
from taskhub.core.messages import Error, Message, Offer, State, TaskEventMessage, Welcome, event_message, parse_message

log = logging.getLogger("taskhub.client")

#: The largest frame the client reads before the hub said its limit (bytes).
MAX_FRAME = 64 * 2**20

#: Commands sent again after a reconnect when their answer was lost: reads, a ``pub``
#: (its task id makes it idempotent), and a worker's last word on a task.
RESENT = frozenset({"pub", "get_payload", "watch", "ping", "unsub", "return", "drop", "fail"})


class ConnectionLost(TaskHubError):
    """The connection closed before the hub answered a command (one not sent again)."""


class ConnectionState(Enum):
    CLOSED = "closed"  # no socket
    CONNECTING = "connecting"  # a socket, waiting for welcome
    OPEN = "open"  # authenticated: commands flow


@dataclass(frozen=True)
class Welcomed:
    welcome: Welcome
    #: The refs of the subscriptions sent again: the session is ready once they are answered.
    subscriptions: tuple[int, ...]


@dataclass(frozen=True)
class SessionRefused:
    error: AuthenticationFailed


@dataclass(frozen=True)
class Answered:
    ref: int
    command: Command
    message: Message


@dataclass(frozen=True)
class Refused:
    ref: int
    command: Command
    error: TaskHubError


@dataclass(frozen=True)
class Failed:
    ref: int
    command: Command
    error: ConnectionLost


@dataclass(frozen=True)
class Offered:
    offer: Offer


@dataclass(frozen=True)
class TaskEventIn:
    message: TaskEventMessage


@dataclass(frozen=True)
class HubError:
    error: TaskHubError


Event = Welcomed | SessionRefused | Answered | Refused | Failed | Offered | TaskEventIn | HubError


@dataclass
class _Followed:
    """A task whose events this client wants: the last seq heard, and whether it is
    watched again after a reconnect (a caller's handle)."""

    seq: int = 0
    resume: bool = False


class ClientProtocol:
    """The state of one client across its connections. See the module's docstring."""

    def __init__(self) -> None:
        self.state = ConnectionState.CLOSED
        self.welcome: Welcome | None = None
        self._refs = itertools.count(1)
        #: Sent on this connection and not answered yet, in the order sent.
        self._unanswered: dict[int, Command] = {}
        #: Waiting for the session to open, in the order submitted.
        self._held: dict[int, Command] = {}
        self._outbox: list[str] = []
        self._subscriptions: list[str] = []
        self._followed: dict[str, _Followed] = {}

    # -- the hub's limits ----------------------------------------------------------------

    @property
    def instance(self) -> str | None:
        """This connection's instance id (from ``welcome``)."""
        return self.welcome.instance if self.welcome else None

    @property
    def max_message_size(self) -> int | None:
        size = self.welcome.max_message_size if self.welcome else None
        return size if isinstance(size, int) else None

    @property
    def max_payload_size(self) -> int | None:
        size = self.welcome.max_payload_size if self.welcome else None
        return size if isinstance(size, int) else None

    # -- the connection ------------------------------------------------------------------

    def connection_made(self) -> None:
        """Call when a socket to the hub is open (authenticated at the handshake): the
        hub's first frame is ``welcome`` or an ``error``."""
        self.state = ConnectionState.CONNECTING
        self._outbox.clear()

    def connection_lost(self) -> list[Event]:
        """Call when the socket closed. Commands sent on it and not answered are held to
        be sent again (:data:`RESENT`) or fail with :class:`ConnectionLost`.

        Returns:
            The :class:`Failed` events of the commands that are not sent again.
        """
        self.state = ConnectionState.CLOSED
        self._outbox.clear()
        failed: list[Event] = []
        again: dict[int, Command] = {}
        for ref, command in self._unanswered.items():
            if command.type in RESENT:
                again[ref] = command
            else:  # subscriptions among them: each session sends them all again
                failed.append(Failed(ref, command, ConnectionLost("the connection closed before the hub answered")))
        self._unanswered.clear()
        # Sent before them, so sent again before them.
        self._held = {**again, **self._held}
        return failed

    def data_to_send(self) -> list[str]:
        """The frames to send now, in order; call after every other method."""
        frames, self._outbox = self._outbox, []
        return frames

    # -- commands ------------------------------------------------------------------------

    def send(self, command: Command) -> int:
        """Queue ``command`` and return its ref; its answer comes as an event for that ref.

        While the session is not open, the command waits and goes once it is.

        Raises:
            InvalidMessage: ``message_too_large`` when the frame is over the hub's limit;
                nothing is queued.
        """
        ref = next(self._refs)
        frame = self._frame(command, ref)
        if self.state is ConnectionState.OPEN:
            self._unanswered[ref] = command
            self._outbox.append(frame)
        else:
            self._held[ref] = command
        return ref

    def subscribe(self, action: str) -> int | None:
        """Subscribe to ``action``, now and after every reconnect.

        Returns:
            The ref of the ``sub`` sent now, or ``None`` when the session is not open (it
            is sent with the others once it is, see :class:`Welcomed`).
        """
        if action not in self._subscriptions:
            self._subscriptions.append(action)
        if self.state is not ConnectionState.OPEN:
            return None
        return self.send(Sub.build(action=action))

    def follow(self, task_id: str, *, resume: bool = False) -> None:
        """Deliver the task's events; with ``resume``, watch it again after a reconnect."""
        followed = self._followed.setdefault(task_id, _Followed())
        followed.resume = followed.resume or resume

    def forget(self, task_id: str) -> None:
        """Stop delivering the task's events (its handle or its handler is done)."""
        self._followed.pop(task_id, None)

    def last_seq(self, task_id: str) -> int:
        """The seq of the task's last event delivered; 0 for none."""
        followed = self._followed.get(task_id)
        return followed.seq if followed else 0

    def _frame(self, command: Command, ref: int) -> str:
        frame = encode({**command.to_dict(), "ref": ref})
        limit = self.max_message_size
        if limit is not None and len(frame) * 4 > limit and (size := len(frame.encode())) > limit:
            # The hub would refuse it (or its server drop the connection): refuse it here.
            raise InvalidMessage(
                f"message of {size} bytes is over the hub's limit of {limit} bytes", "message_too_large"
            )
        return frame

    # -- frames from the hub -------------------------------------------------------------

    def receive(self, text: str | bytes) -> list[Event]:
        """Read one frame from the hub and return what it means.

        A frame this client cannot read (a newer hub's message) is logged and skipped.
        """
        try:
            message = parse_message(decode_frame(text, MAX_FRAME))
        except InvalidMessage as exc:
            log.warning("taskhub: skipped a message from the hub: %s", exc.detail)
            return []
        if self.state is ConnectionState.CONNECTING:
            return self._opening(message)
        ref = getattr(message, "ref", None)
        if isinstance(ref, int) and ref in self._unanswered:
            return self._answer(ref, self._unanswered.pop(ref), message)
        if isinstance(message, Offer):
            self.follow(message.task)
            return [Offered(message)]
        if isinstance(message, TaskEventMessage):
            return self._task_events([message])
        if isinstance(message, Error):
            return [HubError(error_for(message.code, str(message.detail)))]
        log.debug("taskhub: a %s message answers no command of ours", message.type)
        return []

    def _opening(self, message: Message) -> list[Event]:
        if isinstance(message, Error):
            error = error_for(message.code, str(message.detail))
            if not isinstance(error, AuthenticationFailed):
                error = AuthenticationFailed(str(message.detail), message.code)
            return [SessionRefused(error)]
        if not isinstance(message, Welcome):
            log.warning("taskhub: the hub's first message was %s, not welcome", message.type)
            return []
        self.welcome, self.state = message, ConnectionState.OPEN
        subscriptions = tuple(self.send(Sub.build(action=action)) for action in self._subscriptions)
        # What a reconnect recovers: the events missed by the tasks this client follows...
        for task_id, followed in self._followed.items():
            if followed.resume:
                self.send(Watch.build(task=task_id, since=followed.seq))
        # ...and what waited for the session, in the order it was submitted.
        held, self._held = self._held, {}
        for ref, command in held.items():
            self._unanswered[ref] = command
            self._outbox.append(self._frame(command, ref))
        return [Welcomed(message, subscriptions)]

    def _answer(self, ref: int, command: Command, message: Message) -> list[Event]:
        if isinstance(message, Error):
            return [Refused(ref, command, error_for(message.code, str(message.detail)))]
        events: list[Event] = []
        if isinstance(message, State):
            # A watch's answer replays the events after its ``since``: deliver the ones
            # this client has not heard, before the answer itself.
            task_id = str(message.task.get("id", ""))
            replayed = [
                event_message(task_id, e["seq"], e["kind"], e.get("service", ""), e.get("attempt", 1), e.get("data"))
                for e in message.events
                if isinstance(e, dict) and isinstance(e.get("seq"), int)
            ]
            events += self._task_events(m for m in replayed if m is not None)
        events.append(Answered(ref, command, message))
        return events

    def _task_events(self, messages: Iterable[TaskEventMessage]) -> list[Event]:
        events: list[Event] = []
        for message in messages:
            followed = self._followed.get(message.task)
            if followed is None or message.seq <= followed.seq:
                continue  # not ours, or heard already (live and replayed, say)
            followed.seq = message.seq
            events.append(TaskEventIn(message))
        return events
