"""Errors shared by the hub and the client.

The hierarchy::

    TaskHubError
    ├── ProtocolError                 an error with a stable wire ``code``
    │   ├── InvalidMessage            a frame or command that does not parse
    │   ├── InvalidTransition         a command the task's state does not allow
    │   ├── PermissionDenied          the credential may not do this
    │   └── UnknownTask               no such task, or not one of yours
    ├── AuthenticationFailed          wrong name or key, disabled, no free slot
    ├── ConnectionFailed              the hub could not be reached in time
    ├── TaskFailed                    the task failed; ``.reason`` says why
    └── NoResult                      the task ended without a result

Every :class:`ProtocolError` maps to an ``error`` message on the wire with its
``code`` (:class:`~taskhub.core.codes.ErrorCode`); :func:`error_for` turns an ``error``
back into the matching class, for the client.
"""

from __future__ import annotations

from .codes import AUTHENTICATION_CODES, ErrorCode


class TaskHubError(Exception):
    """Base class of every error TaskHub raises."""


class ProtocolError(TaskHubError):
    """An error reported to the peer as ``{"type": "error", "code": ..., "detail": ...}``.

    ``code`` is stable and machine-readable; ``detail`` is a human sentence.
    """

    default_code: str = "protocol_error"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code


class InvalidMessage(ProtocolError):
    """A frame that is not valid JSON, not an object, or a command with bad fields."""

    default_code = ErrorCode.INVALID_FIELD


class InvalidTransition(ProtocolError):
    """A command that the task (or this service's part in it) cannot take now."""

    default_code = ErrorCode.INVALID_TRANSITION


class PermissionDenied(ProtocolError):
    """The credential's permissions do not allow this action."""

    default_code = ErrorCode.PERMISSION_DENIED


class UnknownTask(ProtocolError):
    """No such task, or a task this connection neither published nor works on."""

    default_code = ErrorCode.UNKNOWN_TASK


class AuthenticationFailed(TaskHubError):
    """Wrong name or key, a disabled credential, or no free instance slot."""

    def __init__(self, detail: str, code: str = ErrorCode.AUTHENTICATION_FAILED) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


class ConnectionFailed(TaskHubError):
    """The hub could not be reached (or refused the WebSocket handshake) within the
    client's connect timeout. ``url`` is where it was sought, ``error`` the last failure."""

    def __init__(self, url: str, error: str, seconds: float) -> None:
        super().__init__(f"could not connect to {url} within {seconds:g} s: {error}")
        self.url = url
        self.error = error


class TaskFailed(TaskHubError):
    """The task failed. ``reason`` is a :class:`~taskhub.core.codes.FailureReason`."""

    def __init__(self, task_id: str, reason: str, detail: str = "") -> None:
        super().__init__(f"task {task_id} failed ({reason}){': ' + detail if detail else ''}")
        self.task_id = task_id
        self.reason = reason
        self.detail = detail


class NoResult(TaskHubError):
    """The task ended without a result: every service saw or dropped it."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} ended without a result")
        self.task_id = task_id


_CLASS_OF_CODE: dict[str, type[ProtocolError]] = {
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.UNKNOWN_TASK: UnknownTask,
    ErrorCode.INVALID_TRANSITION: InvalidTransition,
    ErrorCode.STALE_ATTEMPT: InvalidTransition,
    **dict.fromkeys(
        (
            ErrorCode.INVALID_JSON,
            ErrorCode.INVALID_VALUE,
            ErrorCode.INVALID_FRAME,
            ErrorCode.MESSAGE_TOO_LARGE,
            ErrorCode.MISSING_TYPE,
            ErrorCode.UNKNOWN_TYPE,
            ErrorCode.INVALID_FIELD,
            ErrorCode.INVALID_ACTION,
            ErrorCode.PAYLOAD_TOO_LARGE,
            ErrorCode.TASK_EXISTS,
        ),
        InvalidMessage,
    ),
}


def error_for(code: str, detail: str) -> TaskHubError:
    """The exception an ``error`` message with ``code`` stands for.

    Authentication codes give :class:`AuthenticationFailed`; codes this version does not
    know (a newer hub's) give a plain :class:`ProtocolError` that keeps the code.
    """
    if code in AUTHENTICATION_CODES:
        return AuthenticationFailed(detail, code)
    return _CLASS_OF_CODE.get(code, ProtocolError)(detail, code)
