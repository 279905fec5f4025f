"""Commands: what a client sends the hub.

The hub calls :func:`read_ref` and then :func:`parse_command` on every decoded frame
(:func:`taskhub.core.frames.decode_frame`); both raise
:class:`~taskhub.core.errors.InvalidMessage` with a stable code (``invalid_frame``,
``missing_type``, ``unknown_type``, ``invalid_field``, ``invalid_action``) and change
nothing. The client builds the same classes with :meth:`Command.build`, which runs the
hub's own checks before anything is sent, and writes them with :meth:`Command.to_dict`.

Unknown fields are ignored, so that newer clients can talk to older hubs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from .actions import validate_action
from .codes import ErrorCode
from .errors import InvalidMessage
from .frames import MAX_INTEGER, storable

MAX_REF_LENGTH = 100
MAX_ERROR_LENGTH = 10_000
#: Most retries a task may ask for (besides -1, for ever).
MAX_RETRIES = 1_000_000
#: The longest duration a command may name: about 30 years, in seconds.
MAX_SECONDS = 10**9
#: The largest concurrency an instance may announce.
MAX_CONCURRENCY = 100_000
#: Most tasks one ``tasks`` command lists.
MAX_LIST = 1000
#: The values of ``tasks``'s ``status``.
TASK_STATUSES = frozenset({"pending", "started", "success", "failed", "ended"})
#: Longest service (credential) name, as ``Credential.name`` stores it.
MAX_SERVICE_LENGTH = 100


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Marks an optional field the client did not send (as opposed to an explicit null).
MISSING: Any = _Missing()


def _field(obj: dict[str, Any], name: str, kind: str, *, required: bool = True) -> Any:
    """Read and check one field. ``kind`` is one of the checkers below."""
    if name not in obj:
        if required:
            raise InvalidMessage(f"field {name!r} is required", ErrorCode.INVALID_FIELD)
        return MISSING
    return _CHECKERS[kind](name, obj[name])


def _bad(name: str, expected: str) -> InvalidMessage:
    return InvalidMessage(f"field {name!r} must be {expected}", ErrorCode.INVALID_FIELD)


def _task_id(name: str, value: Any) -> str:
    # Only the canonical spelling: a client matching events by the id it sent must
    # recognise the id the hub sends back.
    try:
        if isinstance(value, str) and str(uuid.UUID(value)) == value:
            return value
    except ValueError:
        pass
    raise _bad(name, "a task id: a UUID in canonical form (lowercase, hyphenated: 8d7f6a0e-3b7c-4f4e-…)")


def _attempt(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(name, "a positive integer")
    return int(value)


def _timeout(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_SECONDS:
        raise _bad(name, f"a positive number of seconds up to {MAX_SECONDS:g}, or null")
    return float(value)


def _progress(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _bad(name, "a number from 0 to 1 or null")
    return float(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_ERROR_LENGTH:
        raise _bad(name, f"a string of at most {MAX_ERROR_LENGTH} characters")
    return value


def _since(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(name, "a non-negative integer")
    return int(value)


def _retries(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_RETRIES:
        raise _bad(name, f"an integer from -1 (for ever) to {MAX_RETRIES}")
    return int(value)


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_SECONDS:
        raise _bad(name, f"a positive number of seconds up to {MAX_SECONDS:g}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "true or false")
    return value


def _concurrency(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise _bad(name, f"an integer from 1 to {MAX_CONCURRENCY}, or null for no limit")
    return int(value)


def _status(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in TASK_STATUSES:
        raise _bad(name, "one of " + ", ".join(sorted(TASK_STATUSES)))
    return str(value)


def _limit(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIST:
        raise _bad(name, f"an integer from 1 to {MAX_LIST}")
    return int(value)


def _service(name: str, value: Any) -> str:
    # A credential's name: letters, digits, ".", "_" and "-" (``Credential.name``).
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_SERVICE_LENGTH
        or not value.isascii()
        or not all(c.isalnum() or c in "._-" for c in value)
    ):
        raise _bad(name, f"a service name: at most {MAX_SERVICE_LENGTH} letters, digits, '.', '_' or '-'")
    return value


def _action(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(name, "an action name (a string)")
    return validate_action(value)


_CHECKERS: dict[str, Callable[[str, Any], Any]] = {
    "task": _task_id,
    "attempt": _attempt,
    "timeout": _timeout,
    "progress": _progress,
    "text": _text,
    "since": _since,
    "action": _action,
    "retries": _retries,
    "seconds": _seconds,
    "flag": _flag,
    "concurrency": _concurrency,
    "status": _status,
    "limit": _limit,
    "service": _service,
    "json": lambda name, value: value,
}


@dataclass(frozen=True, slots=True)
class Command:
    """Base of every command. ``ref`` is the client's tag, echoed in the answer."""

    type: ClassVar[str]
    fields: ClassVar[tuple[tuple[str, str, bool], ...]] = ()
    ref: str | int | None

    @classmethod
    def from_dict(cls, obj: dict[str, Any], ref: str | int | None) -> Command:
        values = {name: _field(obj, name, kind, required=required) for name, kind, required in cls.fields}
        return cls(ref, **values)

    @classmethod
    def build(cls, ref: str | int | None = None, **values: Any) -> Self:
        """The command with ``values``, checked as the hub checks them (a client calls
        this before sending, so that a bad field is refused before it leaves).

        Raises:
            InvalidMessage: as :func:`parse_command`.
        """
        known = {name: value for name, value in values.items() if value is not MISSING}
        command = cls.from_dict(known, ref)
        assert isinstance(command, cls)
        return command

    def to_dict(self) -> dict[str, Any]:
        """The command as a frame's object; fields left ``MISSING`` are not sent."""
        frame: dict[str, Any] = {"type": self.type}
        for name, _, _ in self.fields:
            value = getattr(self, name)
            if value is not MISSING:
                frame[name] = value
        if self.ref is not None:
            frame["ref"] = self.ref
        return frame


@dataclass(frozen=True, slots=True)
class Hello(Command):
    """Authenticate (when the handshake carried no credentials): ``name``, ``key``.

    ``resume``: the token of an instance this client had (from its ``welcome``), to take
    it back with its tasks. ``concurrency``: most unfinished tasks to be offered at once.

    ``monitor`` (true) asks for read-only monitor rights instead (the dashboard): the hub
    takes them from the connection's Django session, which must be a staff user's, and
    reads neither ``name`` nor ``key`` (they may be left out).

    ``inline_end`` (true) says the client reads an ``end`` carried inside the task event
    before it (``"end": {...}``), so that the hub sends the two in one frame.
    """

    type = "hello"
    fields = (
        ("name", "text", True),
        ("key", "text", True),
        ("resume", "text", False),
        ("concurrency", "concurrency", False),
        ("monitor", "flag", False),
        ("inline_end", "flag", False),
    )
    name: str
    key: str
    resume: str
    concurrency: int | None
    monitor: bool = MISSING
    inline_end: bool = MISSING

    @classmethod
    def from_dict(cls, obj: dict[str, Any], ref: str | int | None) -> Command:
        if _field(obj, "monitor", "flag", required=False) is not True:
            return super(Hello, cls).from_dict(obj, ref)
        # A monitor authenticates with its session: a name and a key, if sent, are not read.
        return cls(ref, MISSING, MISSING, MISSING, MISSING, True)


@dataclass(frozen=True, slots=True)
class Sub(Command):
    """Subscribe this instance to ``action``; waiting tasks are then offered to it."""

    type = "sub"
    fields = (("action", "action", True),)
    action: str


@dataclass(frozen=True, slots=True)
class Unsub(Command):
    """Stop receiving new tasks of ``action``."""

    type = "unsub"
    fields = (("action", "action", True),)
    action: str


@dataclass(frozen=True, slots=True)
class Pub(Command):
    """Publish a task. ``task_id`` (optional, caller-chosen) makes re-sending safe.

    ``timeout`` / ``pickup_timeout`` / ``heartbeat_timeout``: seconds, ``null`` for none,
    absent for the hub's default. ``retries``: how many times a failed attempt is retried
    (-1: for ever), each after ``retry_backoff`` seconds doubled per attempt.
    ``autoremove``: delete the task once it succeeded and its result reached the publisher.
    """

    type = "pub"
    fields = (
        ("action", "action", True),
        ("payload", "json", False),
        ("task_id", "task", False),
        ("timeout", "timeout", False),
        ("pickup_timeout", "timeout", False),
        ("heartbeat_timeout", "timeout", False),
        ("retries", "retries", False),
        ("retry_backoff", "seconds", False),
        ("autoremove", "flag", False),
    )
    action: str
    payload: Any
    task_id: str
    timeout: float | None
    pickup_timeout: float | None
    heartbeat_timeout: float | None
    retries: int
    retry_backoff: float
    autoremove: bool


# A worker's commands name the task and the attempt they concern; ``again`` says the
# command is sent again after a reconnect: the hub applies it unless it already did.
# ``ack`` false asks for no answer unless the command is refused: the hub answers a
# connection's commands in order, so the answer to any later command says it was applied.
_WORK = (("task", "task", True), ("attempt", "attempt", True))
_AGAIN = ("again", "flag", False)
_ACK = ("ack", "flag", False)


@dataclass(frozen=True, slots=True)
class Pickup(Command):
    """The service works on the task: the hub waits for it (the complete timeout starts)."""

    type = "pickup"
    fields = (*_WORK, _AGAIN, _ACK)
    task: str
    attempt: int
    again: bool
    ack: bool


@dataclass(frozen=True, slots=True)
class Update(Command):
    """Progress: any JSON ``data`` and an optional ``progress`` fraction."""

    type = "update"
    fields = (*_WORK, ("data", "json", False), ("progress", "progress", False), _AGAIN, _ACK)
    task: str
    attempt: int
    data: Any
    progress: float | None
    again: bool
    ack: bool


@dataclass(frozen=True, slots=True)
class Touch(Command):
    """The service is alive and still on the task: its heartbeat timeout starts again."""

    type = "touch"
    fields = (*_WORK, _AGAIN, _ACK)
    task: str
    attempt: int
    again: bool
    ack: bool


@dataclass(frozen=True, slots=True)
class Return(Command):
    type = "return"
    fields = (*_WORK, ("result", "json", False), _AGAIN, _ACK)
    task: str
    attempt: int
    result: Any
    again: bool
    ack: bool


@dataclass(frozen=True, slots=True)
class Drop(Command):
    type = "drop"
    fields = (*_WORK, _AGAIN, _ACK)
    task: str
    attempt: int
    again: bool
    ack: bool


@dataclass(frozen=True, slots=True)
class Fail(Command):
    type = "fail"
    fields = (*_WORK, ("error", "text", True), _AGAIN, _ACK)
    task: str
    attempt: int
    error: str
    again: bool
    ack: bool


#: The commands a worker sends about its part in a task.
WorkCommand = Pickup | Update | Touch | Return | Drop | Fail


@dataclass(frozen=True, slots=True)
class Cancel(Command):
    """The publisher cancels its task: it fails with reason ``cancelled``."""

    type = "cancel"
    fields = (("task", "task", True),)
    task: str


@dataclass(frozen=True, slots=True)
class Retry(Command):
    """The publisher retries its failed task: the next attempt is offered at once."""

    type = "retry"
    fields = (("task", "task", True),)
    task: str


@dataclass(frozen=True, slots=True)
class Tasks(Command):
    """List the tasks this credential published or was offered (a monitor: every task),
    newest first; ``service`` keeps those offered to that service."""

    type = "tasks"
    fields = (
        ("status", "status", False),
        ("action", "action", False),
        ("limit", "limit", False),
        ("service", "service", False),
    )
    status: str
    action: str
    limit: int
    service: str = MISSING


@dataclass(frozen=True, slots=True)
class GetPayload(Command):
    type = "get_payload"
    fields = (("task", "task", True),)
    task: str


@dataclass(frozen=True, slots=True)
class Watch(Command):
    """Follow a task: the answer holds its state and its events after ``since``. With
    ``follow`` false, only read them (the connection is not sent the task's events)."""

    type = "watch"
    fields = (("task", "task", True), ("since", "since", False), ("follow", "flag", False))
    task: str
    since: int
    follow: bool


@dataclass(frozen=True, slots=True)
class Ping(Command):
    type = "ping"


@dataclass(frozen=True, slots=True)
class Stats(Command):
    """For monitors: services and their live instances, per-action counts and rates, and
    the tasks waiting for a subscriber, read from the database."""

    type = "stats"


@dataclass(frozen=True, slots=True)
class Bye(Command):
    """Leave: the hub releases the instance (its slot and its tasks), answers, and closes."""

    type = "bye"


COMMANDS: dict[str, type[Command]] = {
    cls.type: cls
    for cls in (
        Hello, Sub, Unsub, Pub, Pickup, Update, Touch, Return, Drop, Fail, Cancel, Retry, Tasks, GetPayload, Watch,
        Stats, Ping, Bye,
    )
}  # fmt: skip


def read_ref(obj: Any) -> str | int | None:
    """The ``ref`` of a frame, or ``None`` when it has none or an unusable one.

    Call before :func:`parse_command` so that even an invalid command's error carries
    its ref.
    """
    if not isinstance(obj, dict):
        return None
    ref = obj.get("ref")
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        return None
    if isinstance(ref, str) and (len(ref) > MAX_REF_LENGTH or "\x00" in ref or not storable(ref)):
        return None
    if isinstance(ref, int) and abs(ref) > MAX_INTEGER:
        return None
    return ref


def parse_command(obj: Any) -> Command:
    """Validate a decoded frame and return its command.

    Raises:
        InvalidMessage: ``invalid_frame``, ``missing_type``, ``unknown_type``,
            ``invalid_field`` or ``invalid_action``.
    """
    if not isinstance(obj, dict):
        raise InvalidMessage("a command must be a JSON object", ErrorCode.INVALID_FRAME)
    if "type" not in obj:
        raise InvalidMessage("command has no 'type'", ErrorCode.MISSING_TYPE)
    cls = COMMANDS.get(obj["type"]) if isinstance(obj["type"], str) else None
    if cls is None:
        raise InvalidMessage(f"unknown command type {obj['type']!r}", ErrorCode.UNKNOWN_TYPE)
    if "ref" in obj and obj["ref"] is not None and read_ref(obj) is None:
        raise InvalidMessage(
            f"field 'ref' must be a string of at most {MAX_REF_LENGTH} characters or an integer",
            ErrorCode.INVALID_FIELD,
        )
    return cls.from_dict(obj, read_ref(obj))
