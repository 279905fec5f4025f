"""The hub's answers to commands: an ``error`` becomes the exception of its code."""

from __future__ import annotations

from typing import Any

from taskhub.core.errors import (
    AuthenticationFailed,
    InvalidMessage,
    InvalidTransition,
    PermissionDenied,
    ProtocolError,
    TaskHubError,
    UnknownTask,
)

_AUTH_CODES = {"authentication_failed", "credential_disabled", "too_many_instances", "authentication_timeout"}
_ERRORS: dict[str, type[ProtocolError]] = {
    "permission_denied": PermissionDenied,
    "unknown_task": UnknownTask,
    "invalid_transition": InvalidTransition,
    "stale_attempt": InvalidTransition,
}


def error_from(message: dict[str, Any]) -> TaskHubError:
    """The exception matching an ``error`` message's code."""
    code, detail = message.get("code", "error"), message.get("detail", "")
    if code in _AUTH_CODES:
        return AuthenticationFailed(detail, code)
    if code in _ERRORS:
        return _ERRORS[code](detail, code)
    if code.startswith("invalid_") or code in (
        "message_too_large",
        "payload_too_large",
        "missing_type",
        "unknown_type",
        "task_exists",
    ):
        return InvalidMessage(detail, code)
    return _ERRORS.get(code, ProtocolError)(detail, code)


def checked(answer: dict[str, Any]) -> dict[str, Any]:
    """The hub's answer to a command, or its error raised (:func:`error_from`)."""
    if answer.get("type") == "error":
        raise error_from(answer)
    return answer


class ConnectionLost(TaskHubError):
    """The connection closed while a command waited for its answer (it is re-sent)."""
