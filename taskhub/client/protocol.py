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
  commands, sent ``again``), and the tasks a caller follows, which it ``watch``\\ es
  again from the last ``seq`` it heard, so that no task event is lost or repeated. A
  ``cancel`` or ``retry`` whose answer was lost is not sent again (a second one would be
  refused although the first happened, or start another attempt): it fails with
  :class:`ConnectionLost`, and the caller reads the task to learn what happened;
- commands submitted while disconnected, sent once the session is open again;
- the worker's commands that asked for no answer (``"ack": false``): the hub answers
  them only to refuse them, and answers a connection's commands in order, so the answer
  to any later command acknowledges them all, and so does the next offer or task event,
  whose ``applied`` names the last of them. :meth:`~ClientProtocol.sync` (and every
  :data:`SYNC_EVERY` of them in a row) sends a ``ping`` whose answer does it when
  nothing else comes.

A task event that carries its task's ``end`` inside it (``inline_end``, which this client
asks for) is read as the two events it holds.

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

import dataclasses
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from taskhub.core.commands import Command, Ping, Sub, Watch
from taskhub.core.ends import unfold_end
from taskhub.core.errors import InvalidMessage, TaskHubError, error_for
from taskhub.core.frames import decode_frame, encode
from taskhub.core.messages import (
    MISSING,
    Ack,
    Error,
    LoggedEvent,
    Message,
    Offer,
    State,
    TaskEventMessage,
    Welcome,
    parse_message,
)

log = logging.getLogger("taskhub.client")

#: The largest frame the client reads before the hub said its limit (bytes).
MAX_FRAME = 64 * 2**20

#: Commands sent again after a reconnect when their answer was lost: reads and requests
#: that are safe to repeat (a ``pub`` carries its task id), and a worker's commands, which
#: go with ``again``: the hub applies each once (it finds the events it caused). Not
#: ``cancel`` and ``retry``: the hub cannot tell one sent again from a new one.
RESENT = frozenset(
    {
        "pub", "get_payload", "watch", "tasks", "ping", "unsub",
        "pickup", "update", "touch", "return", "drop", "fail",
    }
)  # fmt: skip
#: The worker's commands among them.
WORK = frozenset({"pickup", "update", "touch", "return", "drop", "fail"})
#: Commands sent in a row that asked for no answer, after which a ``ping`` goes, so that
#: the answer acknowledging them comes, and a reconnect sends no more than these again.
SYNC_EVERY = 64


class ConnectionLost(TaskHubError):
    """The connection closed before the hub answered a command (one not sent again)."""


class ConnectionState(Enum):
    CLOSED = "closed"  # no socket
    CONNECTING = "connecting"  # a socket, waiting for welcome
    OPEN = "open"  # authenticated: commands flow
    FINISHED = "finished"  # the client closed: nothing more is sent


@dataclass(frozen=True)
class Welcomed:
    welcome: Welcome
    #: The refs of the subscriptions sent again: the session is ready once they are answered.
    subscriptions: tuple[int, ...]
    #: A reconnect that did not get its instance back (the resume grace had passed): the
    #: tasks the old instance worked on are no longer this client's.
    instance_lost: bool = False


@dataclass(frozen=True)
class SessionRefused:
    """The hub refused the session: :class:`AuthenticationFailed` for the credential, or
    another error (a wrong path: ``not_found``)."""

    error: TaskHubError


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
    watched again after a reconnect (a caller's handle).

    While a ``watch`` of the task is unanswered, its live events wait in ``early``: the
    hub joins the task's group before it reads the events it replays, so a live event
    can arrive before the replay of older ones, and delivering it first would make the
    older ones look heard. They wait too while a long replay is read page by page
    (``paging``: the last answer said ``more``).
    """

    seq: int = 0
    resume: bool = False
    watches: int = 0
    paging: bool = False
    early: list[TaskEventMessage] = dataclasses.field(default_factory=list)


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
        #: Refs of worker commands sent again after a reconnect (they go with ``again``).
        self._again: set[int] = set()
        #: The token that resumes this client's instance (from the last ``welcome``).
        self.resume_token: str | None = None
        #: Refs of the watches this protocol sends itself after a reconnect: it reads the
        #: next pages of their answers itself too.
        self._own_watches: set[int] = set()
        #: Refs in ``_unanswered`` that asked for no answer (``"ack": false``).
        self._silent: set[int] = set()
        #: Commands that asked for no answer sent since the last one that did.
        self._silent_run = 0

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
                if command.type in WORK:
                    self._again.add(ref)
            else:  # subscriptions among them: each session sends them all again
                failed.append(Failed(ref, command, ConnectionLost("the connection closed before the hub answered")))
        self._unanswered.clear()
        self._silent.clear()
        self._silent_run = 0
        for followed in self._followed.values():
            followed.paging = False  # a page not asked again releases with the next watch
        # Sent before them, so sent again before them.
        self._held = {**again, **self._held}
        return failed

    def close(self) -> list[Event]:
        """Call when the client closes for good: every command held or unanswered fails
        with :class:`ConnectionLost`, and :meth:`send` refuses new ones.

        Returns:
            Their :class:`Failed` events.
        """
        self.state = ConnectionState.FINISHED
        self._outbox.clear()
        pending = {**self._unanswered, **self._held}
        self._unanswered.clear()
        self._held.clear()
        self._silent.clear()
        return [Failed(ref, command, ConnectionLost("the client was closed")) for ref, command in pending.items()]

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
            ConnectionLost: the client was closed (:meth:`close`).
        """
        if self.state is ConnectionState.FINISHED:
            raise ConnectionLost("the client was closed")
        ref = next(self._refs)
        frame = self._frame(command, ref)
        if isinstance(command, Watch):
            self._followed.get(command.task, _Followed()).watches += 1
        if self.state is ConnectionState.OPEN:
            self._put(ref, command, frame)
        else:
            self._held[ref] = command
        return ref

    @property
    def unacknowledged(self) -> int:
        """Commands sent that asked for no answer and are not known to be applied yet."""
        return len(self._silent)

    def sync(self) -> bool:
        """Send a ``ping`` if commands that asked for no answer were sent since the last
        command that asks for one: its answer acknowledges them. Call when nothing was
        sent for a while (the client does, a second after such a command).

        Returns:
            Whether a ``ping`` was queued.
        """
        if not self._silent_run or self.state is not ConnectionState.OPEN:
            return False
        self.send(Ping.build())
        return True

    def _put(self, ref: int, command: Command, frame: str) -> None:
        """Send ``command`` on the open connection: it awaits its answer."""
        self._unanswered[ref] = command
        self._outbox.append(frame)
        if getattr(command, "ack", None) is False:
            self._silent.add(ref)
            self._silent_run += 1
            if self._silent_run >= SYNC_EVERY:
                self.sync()
        else:
            self._silent_run = 0

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

    def follow(self, task_id: str, *, resume: bool = False, since: int = 0) -> None:
        """Deliver the task's events after ``since``; with ``resume``, watch it again
        after a reconnect.

        Call before sending a ``watch`` of the task, so that its answer's replay and the
        live events that race it are delivered in order.
        """
        followed = self._followed.setdefault(task_id, _Followed(seq=since))
        followed.resume = followed.resume or resume
        followed.seq = max(followed.seq, since)

    def forget(self, task_id: str) -> None:
        """Stop delivering the task's events (its handle or its handler is done)."""
        self._followed.pop(task_id, None)

    def last_seq(self, task_id: str) -> int:
        """The seq of the task's last event delivered; 0 for none."""
        followed = self._followed.get(task_id)
        return followed.seq if followed else 0

    def _frame(self, command: Command, ref: int) -> str:
        obj = {**command.to_dict(), "ref": ref}
        if ref in self._again:
            obj["again"] = True
        frame = encode(obj)
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
            objects = unfold_end(decode_frame(text, MAX_FRAME, strict=False))
        except InvalidMessage as exc:
            log.warning("taskhub: skipped a message from the hub: %s", exc.detail)
            return []
        events: list[Event] = []
        for obj in objects:
            applied = obj.get("applied") if isinstance(obj, dict) else None
            if isinstance(applied, int) and applied in self._silent:
                events += self._applied_before(applied, inclusive=True)
            try:
                message = parse_message(obj)
            except InvalidMessage as exc:
                log.warning("taskhub: skipped a message from the hub: %s", exc.detail)
                continue
            events += self._read(message)
        return events

    def _read(self, message: Message) -> list[Event]:
        if self.state is ConnectionState.CONNECTING:
            return self._opening(message)
        ref = getattr(message, "ref", None)
        if isinstance(ref, int) and ref in self._unanswered:
            events = self._applied_before(ref)
            self._again.discard(ref)
            self._silent.discard(ref)
            return events + self._answer(ref, self._unanswered.pop(ref), message)
        if isinstance(message, Offer):
            self.follow(message.task)
            return [Offered(message)]
        if isinstance(message, TaskEventMessage):
            return self._task_events([message], live=True)
        if isinstance(message, Error):
            return [HubError(error_for(message.code, str(message.detail)))]
        log.debug("taskhub: a %s message answers no command of ours", message.type)
        return []

    def _applied_before(self, ref: int, *, inclusive: bool = False) -> list[Event]:
        """The commands that asked for no answer and were sent before ``ref``, whose
        answer came (or up to ``ref`` itself, ``inclusive``, which a frame's ``applied``
        named): the hub applied them (it answers a connection's commands in order, and
        would have refused them by now)."""
        events: list[Event] = []
        if not self._silent:
            return events
        for earlier in list(self._unanswered):
            if earlier == ref and not inclusive:
                break
            if earlier in self._silent:
                command = self._unanswered.pop(earlier)
                self._silent.discard(earlier)
                self._again.discard(earlier)
                events.append(Answered(earlier, command, Ack(ref=earlier, task=getattr(command, "task", MISSING))))
            if earlier == ref:
                break
        # Those still unknown were sent after: no more of them in a row than are left.
        self._silent_run = min(self._silent_run, len(self._silent))
        return events

    def _opening(self, message: Message) -> list[Event]:
        if isinstance(message, Error):
            return [SessionRefused(error_for(message.code, str(message.detail)))]
        if not isinstance(message, Welcome):
            log.warning("taskhub: the hub's first message was %s, not welcome", message.type)
            return []
        instance_lost = self.welcome is not None and message.resumed is not True
        self.welcome, self.state = message, ConnectionState.OPEN
        self.resume_token = message.resume if isinstance(message.resume, str) else None
        subscriptions = tuple(self.send(Sub.build(action=action)) for action in self._subscriptions)
        # What a reconnect recovers: the events missed by the tasks this client follows
        # (unless a watch of the task waits to be sent again anyway)...
        watched = {command.task for command in self._held.values() if isinstance(command, Watch)}
        for task_id, followed in list(self._followed.items()):
            if followed.resume and task_id not in watched:
                self._own_watches.add(self.send(Watch.build(task=task_id, since=followed.seq)))
        # ...and what waited for the session, in the order it was submitted.
        events: list[Event] = [Welcomed(message, subscriptions, instance_lost)]
        held, self._held = self._held, {}
        for ref, command in held.items():
            try:
                frame = self._frame(command, ref)  # the limits are known only now
            except InvalidMessage as exc:
                events.append(Refused(ref, command, exc))
                continue
            self._put(ref, command, frame)
        return events

    def _answer(self, ref: int, command: Command, message: Message) -> list[Event]:
        events: list[Event] = []
        if isinstance(command, Watch):
            # A watch's answer replays the events after its ``since``: deliver the ones
            # this client has not heard, with the live ones that came meanwhile, in
            # order, before the answer itself.
            replayed: list[TaskEventMessage] = []
            more = False
            if isinstance(message, State):
                logged = (LoggedEvent.from_dict(obj) for obj in message.events)
                replayed = [m for e in logged if e is not None and (m := e.message(command.task)) is not None]
                more = message.more is True and bool(message.events)
            events += self._watch_answered(command.task, replayed, more=more)
            if ref in self._own_watches:
                self._own_watches.discard(ref)
                if more and isinstance(message, State) and command.task in self._followed:
                    # Read the rest of the replay: live events wait for its last page.
                    since = max(int(obj.get("seq", 0)) for obj in message.events)
                    self._own_watches.add(self.send(Watch.build(task=command.task, since=since)))
        if isinstance(message, Error):
            events.append(Refused(ref, command, error_for(message.code, str(message.detail))))
        else:
            events.append(Answered(ref, command, message))
        return events

    def _watch_answered(self, task_id: str, replayed: list[TaskEventMessage], *, more: bool) -> list[Event]:
        """A watch's replay, and the live events held for it once no watch or page of it
        is outstanding (``more``: the client asks for the next page)."""
        followed = self._followed.get(task_id)
        if followed is None:
            return []
        followed.watches = max(0, followed.watches - 1)
        followed.paging = more
        release = not followed.watches and not more
        waiting = replayed + (followed.early if release else [])
        if release:
            followed.early = []
        return self._task_events(sorted(waiting, key=lambda m: m.seq))

    def _task_events(self, messages: Iterable[TaskEventMessage], *, live: bool = False) -> list[Event]:
        events: list[Event] = []
        for message in messages:
            followed = self._followed.get(message.task)
            if followed is None or message.seq <= followed.seq:
                continue  # not ours, or heard already (live and replayed, say)
            if live and (followed.watches or followed.paging):
                followed.early.append(message)  # after the replay it may precede
                continue
            followed.seq = message.seq
            events.append(TaskEventIn(message))
        return events
