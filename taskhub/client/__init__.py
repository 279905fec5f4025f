"""The Python client for TaskHub: workers and callers.

Imports only ``websockets`` and :mod:`taskhub.core`, never Django::

    from taskhub.client import Client

    client = Client("ws://localhost:8000/ws/taskhub/", name="mailer", key="...")

    @client.sub("mail:send-bulk")
    async def send_bulk(task):
        await task.pickup()
        return await task.get_payload()

    async with client:
        result = await client.pub("mail:send-bulk", emails).get_result()
"""

from __future__ import annotations

from taskhub.core.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    InvalidMessage,
    InvalidTransition,
    NoResult,
    PermissionDenied,
    ProtocolError,
    TaskFailed,
    TaskHubError,
    UnknownTask,
)
from taskhub.core.messages import TaskSnapshot

from .client import Client
from .connection import backoff
from .handle import Retrying, TaskHandle
from .protocol import ClientProtocol, ConnectionLost
from .tasks import Task, Update

__all__ = [
    "AuthenticationFailed",
    "Client",
    "ClientProtocol",
    "ConnectionFailed",
    "ConnectionLost",
    "InvalidMessage",
    "InvalidTransition",
    "NoResult",
    "PermissionDenied",
    "ProtocolError",
    "Retrying",
    "Task",
    "TaskFailed",
    "TaskHandle",
    "TaskHubError",
    "TaskSnapshot",
    "UnknownTask",
    "Update",
    "backoff",
]
