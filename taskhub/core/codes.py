"""The protocol's vocabulary: event kinds, failure reasons, error codes and close codes.

The hub writes these values into the database and onto the wire, and the client reads
them back; both import them from here, so the two cannot drift. Each enum is a
:class:`~enum.StrEnum` (or :class:`~enum.IntEnum`), so a member compares equal to the
plain value that travels in JSON and sits in a database column.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class EventKind(StrEnum):
    """A step in a task's life: ``TaskEvent.kind`` and the ``kind`` of ``watch`` events."""

    INIT = "init"  # published (data: action, payload_size)
    START = "start"  # offered to one instance of a service
    PICKUP = "pickup"  # a service picked it up
    UPDATE = "update"  # progress (data: data, progress)
    DROP = "drop"  # a service finished without a result
    SUCCESS = "success"  # the first return (data: result)
    LATE_RETURN = "late_return"  # a return after another service completed the task
    ERROR = "error"  # a service reported a failure (data: detail)
    LOST = "lost"  # the instance holding it disconnected
    SEEN = "seen"  # offered, but not picked up within the pickup timeout
    # An attempt failed (or a failed task was retried on request) and the next will be
    # offered (data: reason, detail, next_attempt, and delay or by).
    RETRY = "retry"
    FAIL = "fail"  # the task failed (data: reason, detail)
    END = "end"  # the task is over (data: status)


#: The kinds that are also sent live, as messages of the same ``type``, to everyone
#: following the task (the publisher, the services on it and its watchers).
RELAYED_KINDS = frozenset({EventKind.UPDATE, EventKind.SUCCESS, EventKind.RETRY, EventKind.FAIL, EventKind.END})


class FailureReason(StrEnum):
    """Why a task failed: ``TaskRecord.failure_reason`` and ``TaskFailed.reason``."""

    ERROR = "error"  # a service reported a failure (its handler raised)
    WORKER_LOST = "worker_lost"  # the instance holding it disconnected
    PICKUP_TIMEOUT = "pickup_timeout"  # no service subscribed, or picked it up, in time
    COMPLETE_TIMEOUT = "complete_timeout"  # picked up, but not finished in time
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"  # no update or touch within the heartbeat timeout
    CANCELLED = "cancelled"  # the caller or an operator cancelled it


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message: stable and machine-readable."""

    # A frame that does not parse, or a command with bad fields.
    INVALID_JSON = "invalid_json"
    INVALID_VALUE = "invalid_value"  # JSON the hub cannot carry (too deep, out of range, U+0000)
    INVALID_FRAME = "invalid_frame"
    MESSAGE_TOO_LARGE = "message_too_large"
    MISSING_TYPE = "missing_type"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    INVALID_ACTION = "invalid_action"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TASK_EXISTS = "task_exists"
    # The session.
    NOT_AUTHENTICATED = "not_authenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    AUTHENTICATION_FAILED = "authentication_failed"
    AUTHENTICATION_TIMEOUT = "authentication_timeout"
    TOO_MANY_ATTEMPTS = "too_many_attempts"  # too many failed authentications: wait
    CREDENTIAL_DISABLED = "credential_disabled"
    TOO_MANY_INSTANCES = "too_many_instances"
    SUPERSEDED = "superseded"  # the instance was resumed on another connection
    DISCONNECTED = "disconnected"  # an operator disconnected the instance
    NOT_FOUND = "not_found"  # no TaskHub endpoint at the handshake's path
    # What the command asks for.
    PERMISSION_DENIED = "permission_denied"
    UNKNOWN_TASK = "unknown_task"
    INVALID_TRANSITION = "invalid_transition"
    STALE_ATTEMPT = "stale_attempt"
    # A bug in the hub: the command was not applied.
    INTERNAL_ERROR = "internal_error"


#: Codes that refuse the session itself: the hub closes the connection after them.
AUTHENTICATION_CODES = frozenset(
    {
        ErrorCode.AUTHENTICATION_FAILED,
        ErrorCode.AUTHENTICATION_TIMEOUT,
        ErrorCode.TOO_MANY_ATTEMPTS,
        ErrorCode.CREDENTIAL_DISABLED,
        ErrorCode.TOO_MANY_INSTANCES,
        ErrorCode.SUPERSEDED,
        ErrorCode.DISCONNECTED,
    }
)


class CloseCode(IntEnum):
    """WebSocket close codes the hub uses besides 1000 (a ``bye``)."""

    AUTHENTICATION_TIMEOUT = 4000
    AUTHENTICATION_FAILED = 4001
    CREDENTIAL_DISABLED = 4002
    TOO_MANY_INSTANCES = 4003
    SUPERSEDED = 4004
    DISCONNECTED = 4005  # an operator disconnected the instance (admin)
    NOT_READING = 4008  # the client let more than TASKHUB_MAX_BUFFERED_BYTES pile up unread
    TOO_MANY_ATTEMPTS = 4029
    NOT_FOUND = 4404
    INTERNAL_ERROR = 1011  # the hub could not open the session (its database failed)

    @classmethod
    def for_error(cls, code: str) -> CloseCode:
        """The close code that follows an authentication error ``code``."""
        return _CLOSE_FOR.get(code, cls.AUTHENTICATION_FAILED)


_CLOSE_FOR: dict[str, CloseCode] = {
    ErrorCode.AUTHENTICATION_TIMEOUT: CloseCode.AUTHENTICATION_TIMEOUT,
    ErrorCode.AUTHENTICATION_FAILED: CloseCode.AUTHENTICATION_FAILED,
    ErrorCode.CREDENTIAL_DISABLED: CloseCode.CREDENTIAL_DISABLED,
    ErrorCode.TOO_MANY_INSTANCES: CloseCode.TOO_MANY_INSTANCES,
    ErrorCode.SUPERSEDED: CloseCode.SUPERSEDED,
    ErrorCode.DISCONNECTED: CloseCode.DISCONNECTED,
    ErrorCode.NOT_FOUND: CloseCode.NOT_FOUND,
    ErrorCode.TOO_MANY_ATTEMPTS: CloseCode.TOO_MANY_ATTEMPTS,
    ErrorCode.INTERNAL_ERROR: CloseCode.INTERNAL_ERROR,
}
