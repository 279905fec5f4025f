"""Messages: what the hub sends a client.

The hub builds every message it sends with these classes and writes them with
:meth:`Message.to_dict`; the client reads every frame it receives with
:func:`parse_message`. Task events live (``update``, ``success``, ``fail``, ``end``) and
task events replayed by ``watch`` come from the same function, :func:`event_message`,
and carry the same ``seq``, so a client can tell one it heard from one it missed.

Optional fields a message does not carry are :data:`MISSING` (as opposed to ``None``, a
JSON ``null``), and are not sent.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, ClassVar

from .codes import ErrorCode, EventKind
from .commands import MISSING
from .errors import InvalidMessage
from .frames import PROTOCOL_VERSION

Ref = str | int | None

__all__ = [
    "MESSAGES",
    "MISSING",
    "Ack",
    "Error",
    "Message",
    "Offer",
    "Payload",
    "Pong",
    "State",
    "Stats",
    "TaskEnd",
    "TaskEventMessage",
    "TaskFailure",
    "TaskList",
    "TaskRetry",
    "TaskSuccess",
    "TaskUpdate",
    "TaskSnapshot",
    "LoggedEvent",
    "Transition",
    "Welcome",
    "event_message",
    "parse_message",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every message. ``ref`` echoes the ref of the command it answers."""

    type: ClassVar[str]
    #: Fields every message of the class carries; the others may be ``MISSING``.
    required: ClassVar[tuple[str, ...]] = ()
    #: The fields in the order they are written.
    order: ClassVar[tuple[str, ...]] = ()
    #: The JSON types of the fields a reader relies on (others are passed on as sent).
    types: ClassVar[dict[str, builtins.type]] = {}

    def to_dict(self) -> dict[str, Any]:
        """The message as a frame's object."""
        frame: dict[str, Any] = {"type": self.type}
        for name in self.order:
            value = getattr(self, name)
            if value is not MISSING and not (name == "ref" and value is None):
                frame[name] = value
        return frame

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Message:
        """Read a message of this class.

        Raises:
            InvalidMessage: ``invalid_field`` when a field it must carry is missing.
        """
        for name in cls.required_of(obj):
            if name not in obj:
                raise InvalidMessage(f"{cls.type} message without {name!r}", ErrorCode.INVALID_FIELD)
        for name, kind in cls.types.items():
            value = obj.get(name)
            if name in obj and (not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool)):
                raise InvalidMessage(f"{cls.type} message with a wrong {name!r}: {value!r}", ErrorCode.INVALID_FIELD)
        return cls(**{name: obj[name] for name in cls.order if name in obj})

    @classmethod
    def required_of(cls, obj: dict[str, Any]) -> tuple[str, ...]:
        """The fields ``obj`` must carry to be read as this class (:attr:`required`)."""
        return cls.required


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    """Authenticated: the instance's id and the hub's limits (bytes).

    A monitor's welcome (``monitor`` true) names the session's ``user`` instead of a
    service and an instance: a monitor has none.
    """

    type = "welcome"
    required = ("service", "instance")
    types = {
        "instance": str,
        "max_message_size": int,
        "max_payload_size": int,
        "resume": str,
        "resumed": bool,
        "monitor": bool,
    }
    order = (
        "v",
        "monitor",
        "user",
        "service",
        "instance",
        "resume",
        "resumed",
        "max_message_size",
        "max_payload_size",
        "ref",
    )
    service: Any = MISSING
    instance: Any = MISSING
    #: ``True`` for a monitor's session (read-only, no instance).
    monitor: Any = MISSING
    #: A monitor's Django user name.
    user: Any = MISSING
    #: The token that takes this instance back after a reconnect (``hello``'s ``resume``).
    resume: Any = MISSING
    #: Whether this connection took back the instance its ``resume`` named.
    resumed: Any = False
    max_message_size: Any = MISSING
    max_payload_size: Any = MISSING
    v: Any = PROTOCOL_VERSION
    ref: Ref = None

    @classmethod
    def required_of(cls, obj: dict[str, Any]) -> tuple[str, ...]:
        """A service's welcome names its service and instance; a monitor's need not."""
        return () if obj.get("monitor") is True else cls.required


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    """A command was applied (persisted, where it changes something).

    ``task`` answers task commands and ``pub`` (with ``created``); ``action`` answers
    ``sub`` (with ``waiting``, the waiting tasks offered because of it) and ``unsub``.
    """

    type = "ack"
    order = ("ref", "task", "created", "action", "waiting")
    ref: Ref = None
    task: Any = MISSING
    created: Any = MISSING
    action: Any = MISSING
    waiting: Any = MISSING


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Message):
    type = "pong"
    order = ("ref",)
    ref: Ref = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """A command (or the session) was refused; it changed nothing."""

    type = "error"
    required = ("code",)
    types = {"code": str}
    order = ("code", "detail", "ref")
    code: str
    detail: Any = ""
    ref: Ref = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer(Message):
    """A task offered to this instance. ``payload`` is there when it is small enough."""

    type = "task"
    required = ("task", "action", "attempt")
    types = {"task": str, "action": str, "attempt": int, "payload_size": int}
    order = ("task", "action", "attempt", "publisher", "payload_size", "payload")
    task: str
    action: str
    attempt: int
    publisher: Any = ""
    payload_size: Any = 0
    payload: Any = MISSING


@dataclass(frozen=True, slots=True, kw_only=True)
class Payload(Message):
    """The answer to ``get_payload``."""

    type = "payload"
    required = ("task",)
    order = ("ref", "task", "payload")
    task: str
    payload: Any = None
    ref: Ref = None


@dataclass(frozen=True, slots=True, kw_only=True)
class State(Message):
    r"""The answer to ``watch``: the task's state (a :class:`TaskSnapshot`'s dict) and the
    events after ``since`` (:class:`LoggedEvent`\ s' dicts).

    ``more`` (``True``) says the events were cut to keep the answer within the hub's
    message size: ``watch`` again from the last event's ``seq``. Such a page may leave the
    task's ``result`` out (``None``, with ``has_result`` true); the last page has it.
    """

    type = "state"
    required = ("task", "events")
    types = {"task": dict, "events": list, "more": bool}
    order = ("ref", "task", "events", "more")
    task: dict[str, Any]
    events: list[dict[str, Any]]
    more: Any = MISSING
    ref: Ref = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskList(Message):
    """The answer to ``tasks``: the dicts of :class:`TaskSnapshot` objects, newest first.

    ``more`` (``True``) says the list was cut to keep the answer within the hub's message
    size: ask again with a narrower ``status``, ``action`` or ``limit``.
    """

    type = "tasks"
    required = ("tasks",)
    types = {"tasks": list, "more": bool}
    order = ("ref", "tasks", "more")
    tasks: list[dict[str, Any]]
    more: Any = MISSING
    ref: Ref = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEventMessage(Message):
    """A task event, live: ``seq`` is the event's number in the task's log (what
    ``watch`` replays by)."""

    required = ("task", "seq")
    types = {"task": str, "seq": int, "attempt": int}
    task: str
    seq: int
    attempt: Any = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskUpdate(TaskEventMessage):
    type = "update"
    order = ("task", "seq", "attempt", "service", "data", "progress")
    service: Any = ""
    data: Any = None
    progress: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSuccess(TaskEventMessage):
    type = "success"
    order = ("task", "seq", "attempt", "service", "result")
    service: Any = ""
    result: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRetry(TaskEventMessage):
    """Attempt ``attempt`` failed (``reason``, ``detail``); attempt ``next_attempt`` will be
    offered after ``delay`` seconds, or at once when someone (``by``) asked for it."""

    type = "retry"
    order = ("task", "seq", "attempt", "reason", "detail", "next_attempt", "delay", "by")
    reason: Any = ""
    detail: Any = ""
    next_attempt: Any = None
    delay: Any = MISSING
    by: Any = MISSING


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailure(TaskEventMessage):
    type = "fail"
    order = ("task", "seq", "attempt", "reason", "detail")
    reason: Any = ""
    detail: Any = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEnd(TaskEventMessage):
    """The last message about a task: ``status`` is ``success``, ``failed`` or ``ended``."""

    type = "end"
    order = ("task", "seq", "attempt", "status")
    status: Any = "ended"


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition(Message):
    r"""For monitors: one transition of a task, as it was written.

    ``task`` is the task after it (a :class:`TaskSnapshot`'s fields without ``result``,
    plus ``version``, ``started_at`` and ``has_result``); ``events`` the events it wrote
    (:class:`LoggedEvent`\ s' dicts, oldest first). A value of an event's data that was
    too large to send live is ``null``, its key listed in the event's ``omitted``: ``watch``
    the task for it.
    """

    type = "transition"
    required = ("task", "events")
    types = {"task": dict, "events": list}
    order = ("task", "events")
    task: dict[str, Any]
    events: list[dict[str, Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats(Message):
    """The answer to ``stats`` (monitors): ``services`` with their live instances,
    ``actions`` with their counts, ``waiting`` tasks and the ``monitors`` connected, as
    the database has them ``at`` that moment (docs/dashboard.md describes the fields)."""

    type = "stats"
    required = ("services", "actions", "waiting")
    types = {"services": list, "actions": list, "waiting": dict, "monitors": int}
    order = ("ref", "at", "services", "actions", "waiting", "monitors", "more")
    services: list[dict[str, Any]]
    actions: list[dict[str, Any]]
    waiting: dict[str, Any]
    monitors: Any = 0
    at: Any = ""
    more: Any = MISSING
    ref: Ref = None


MESSAGES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (
        Welcome,
        Ack,
        Pong,
        Error,
        Offer,
        Payload,
        State,
        TaskList,
        TaskUpdate,
        TaskSuccess,
        TaskRetry,
        TaskFailure,
        TaskEnd,
        Transition,
        Stats,
    )  # fmt: skip
}


def event_message(task: str, seq: int, kind: str, service: str, attempt: int, data: Any) -> TaskEventMessage | None:
    """The live message of a persisted task event, or ``None`` for a kind that is not
    relayed (see :data:`~taskhub.core.codes.RELAYED_KINDS`).

    The hub calls it on the events a transition wrote; the client on the events a
    ``watch`` replays, so that both read the same.
    """
    data = data if isinstance(data, dict) else {}
    if kind == EventKind.UPDATE:
        return TaskUpdate(
            task=task,
            seq=seq,
            attempt=attempt,
            service=service,
            data=data.get("data"),
            progress=data.get("progress"),
        )
    if kind == EventKind.SUCCESS:
        return TaskSuccess(task=task, seq=seq, attempt=attempt, service=service, result=data.get("result"))
    if kind == EventKind.RETRY:
        return TaskRetry(
            task=task,
            seq=seq,
            attempt=attempt,
            reason=data.get("reason", ""),
            detail=data.get("detail", ""),
            next_attempt=data.get("next_attempt"),
            delay=data.get("delay", MISSING),
            by=data.get("by", MISSING),
        )
    if kind == EventKind.FAIL:
        return TaskFailure(
            task=task, seq=seq, attempt=attempt, reason=data.get("reason", ""), detail=data.get("detail", "")
        )
    if kind == EventKind.END:
        return TaskEnd(task=task, seq=seq, attempt=attempt, status=data.get("status", "ended"))
    return None


def parse_message(obj: Any) -> Message:
    """Read a decoded frame from the hub.

    Raises:
        InvalidMessage: ``invalid_frame`` for a frame that is not an object,
            ``unknown_type`` for a type this version does not know (a newer hub's: skip
            it), ``invalid_field`` for a message without a field it must carry.
    """
    if not isinstance(obj, dict):
        raise InvalidMessage("a message must be a JSON object", ErrorCode.INVALID_FRAME)
    kind = obj.get("type")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidMessage(f"unknown message type {obj.get('type')!r}", ErrorCode.UNKNOWN_TYPE)
    return cls.from_dict(obj)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSnapshot:
    """A task as ``watch`` shows it (the ``task`` of a ``state`` message).

    ``status`` is a :class:`~taskhub.core.states.TaskStatus` value; times are ISO 8601.
    """

    id: str
    action: str
    status: str
    attempt: int = 1
    publisher: str = ""
    progress: float | None = None
    has_result: bool = False
    result: Any = None
    failure_reason: str = ""
    failure_detail: str = ""
    retries: int = 0
    retry_at: str | None = None
    created_at: str = ""
    finished_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> TaskSnapshot:
        """Read a snapshot; fields it lacks take their defaults.

        Raises:
            InvalidMessage: ``invalid_field`` without an ``id``, ``action`` or ``status``.
        """
        for name in ("id", "action", "status"):
            if not isinstance(obj.get(name), str):
                raise InvalidMessage(f"task snapshot without {name!r}", ErrorCode.INVALID_FIELD)
        return cls(**{name: obj[name] for name in cls.__dataclass_fields__ if name in obj})


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggedEvent:
    """One event of a task's log as ``watch`` replays it: ``seq``, its
    :class:`~taskhub.core.codes.EventKind`, the service and attempt it concerns, its
    data, and when it happened (ISO 8601)."""

    seq: int
    kind: str
    service: str = ""
    attempt: int = 1
    data: Any = None
    at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, obj: Any) -> LoggedEvent | None:
        """Read a logged event; ``None`` for one without an integer ``seq`` or a ``kind``."""
        if not isinstance(obj, dict) or not isinstance(obj.get("seq"), int) or not isinstance(obj.get("kind"), str):
            return None
        return cls(**{name: obj[name] for name in cls.__dataclass_fields__ if name in obj})

    def message(self, task: str) -> TaskEventMessage | None:
        """The live message this event was (see :func:`event_message`)."""
        return event_message(task, self.seq, self.kind, self.service, self.attempt, self.data)
