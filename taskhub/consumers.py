"""The WebSocket consumer: one connection of a service (an *instance*).

Thin by design: frames are decoded and validated by the core (:mod:`taskhub.core.frames`,
:mod:`taskhub.core.commands`), each command is one call into :mod:`taskhub.services` (on a
database thread) and is answered with a message the core builds
(:mod:`taskhub.core.messages`), and the notices it returns go out after the write
(:mod:`taskhub.notify`: directly to consumers of this process, on the channel layer to
the others). See docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils import timezone

from . import db, notify, services, sweeper
from .conf import conf
from .core.codes import CloseCode, ErrorCode
from .core.commands import (
    Bye,
    Command,
    Drop,
    Fail,
    GetPayload,
    Hello,
    Pickup,
    Ping,
    Pub,
    Return,
    Sub,
    Unsub,
    Update,
    Watch,
    parse_command,
    read_ref,
)
from .core.errors import AuthenticationFailed, InvalidMessage, ProtocolError
from .core.frames import decode_frame, encode
from .core.messages import Ack, Error, Message, Payload, Pong, State, Welcome
from .models import Credential
from .notify import send_notices

log = logging.getLogger(__name__)

# Tasks whose last version heard a connection remembers. A copy of a relay comes within
# moments of the first; the bound keeps a long-lived caller's memory flat.
HEARD_TASKS = 1000


def basic_credentials(scope: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(name, key)`` from an ``Authorization: Basic`` handshake header, if any."""
    for header, value in scope.get("headers", ()):
        if header == b"authorization" and value[:6].lower() == b"basic ":
            try:
                name, _, key = base64.b64decode(value[6:].strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return ("", "")
            return (name, key)
    return None


class TaskHubConsumer(AsyncWebsocketConsumer):
    """Serves ``/ws/taskhub/``."""

    credential: Credential | None = None
    instance_id: uuid.UUID | None = None

    async def connect(self) -> None:
        sweeper.ensure_started()
        # Task groups this connection joined to watch the tasks, and the last version of
        # the tasks it heard of lately: it may hear a transition both as the task's
        # publisher or worker and as a watcher.
        self.followed: set[str] = set()
        self.heard: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.auth_timer: asyncio.TimerHandle | None = None
        notify.register(self.channel_name, self.dispatch)
        await self.accept()
        credentials = basic_credentials(self.scope)
        if credentials is not None:
            await self.login(*credentials, ref=None)
        else:
            loop = asyncio.get_running_loop()
            self.auth_timer = loop.call_later(conf.AUTH_TIMEOUT, lambda: asyncio.ensure_future(self.auth_timed_out()))

    async def auth_timed_out(self) -> None:
        if self.credential is None:
            code = ErrorCode.AUTHENTICATION_TIMEOUT
            await self.reply(Error(code=code, detail="no hello within the authentication timeout"))
            await self.close(CloseCode.for_error(code))

    async def login(self, name: str, key: str, ref: str | int | None) -> None:
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        now = timezone.now()
        client = self.scope.get("client") or ("", 0)
        try:
            credential = await db.run(services.authenticate, name, key)
            instance = await db.run(
                services.register_instance, credential, self.channel_name, sweeper.PROCESS, str(client[0]), now
            )
        except AuthenticationFailed as exc:
            await self.reply(Error(code=exc.code, detail=exc.detail, ref=ref))
            await self.close(CloseCode.for_error(exc.code))
            return
        self.credential, self.instance_id = credential, instance.pk
        welcome = Welcome(
            service=credential.name,
            instance=str(instance.pk),
            max_message_size=conf.MAX_MESSAGE_SIZE,
            max_payload_size=conf.MAX_PAYLOAD_SIZE,
            ref=ref,
        )
        await self.reply(welcome)

    async def disconnect(self, code: int) -> None:
        notify.unregister(self.channel_name)
        if getattr(self, "auth_timer", None) is not None:
            self.auth_timer.cancel()  # type: ignore[union-attr]
        for group in getattr(self, "followed", set()):
            await notify.group_discard(self.channel_layer, group, self.channel_name)
        if self.instance_id is not None:
            notices = await db.run(services.disconnect, self.instance_id, timezone.now())
            await send_notices(self.channel_layer, notices)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' AsyncConsumer.dispatch first closes stale database connections, with a
        # hop to the ORM thread, before every frame and every layer message. Every
        # database call of this consumer goes through taskhub.db.run, whose threads do
        # that themselves; the extra hop only queued offers and relays behind database work.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def reply(self, message: Message | dict[str, Any]) -> None:
        """Send a message (or a message's dict, as relays carry them)."""
        await self.send(text_data=encode(message.to_dict() if isinstance(message, Message) else message))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        obj: Any = None
        try:
            if text_data is None:
                raise InvalidMessage("binary frames are not supported: send JSON text frames", ErrorCode.INVALID_FRAME)
            obj = decode_frame(text_data, conf.MAX_MESSAGE_SIZE)
            cmd = parse_command(obj)
        except InvalidMessage as exc:
            await self.reply(Error(code=exc.code, detail=exc.detail, ref=read_ref(obj)))
            return
        try:
            await self.dispatch_command(cmd)
        except ProtocolError as exc:
            await self.reply(Error(code=exc.code, detail=exc.detail, ref=cmd.ref))
        except Exception:
            log.exception("command %s failed", cmd.type)
            detail = "the hub could not process this command"
            await self.reply(Error(code=ErrorCode.INTERNAL_ERROR, detail=detail, ref=cmd.ref))

    async def dispatch_command(self, cmd: Command) -> None:
        if isinstance(cmd, Hello):
            if self.credential is not None:
                raise InvalidMessage("already authenticated", ErrorCode.ALREADY_AUTHENTICATED)
            await self.login(cmd.name, cmd.key, cmd.ref)
            return
        credential, instance_id = self.credential, self.instance_id
        if credential is None or instance_id is None:
            raise ProtocolError("send hello (or authenticate at the handshake) first", ErrorCode.NOT_AUTHENTICATED)
        now = timezone.now()
        notices: list[services.Notice] = []
        answer: Message
        match cmd:
            case Ping():
                answer = Pong(ref=cmd.ref)
            case Bye():
                self.instance_id = None
                notices = await db.run(services.disconnect, instance_id, now)
                await self.reply(Ack(ref=cmd.ref))
                await send_notices(self.channel_layer, notices)
                await self.close(1000)
                return
            case Sub(action=action):
                started, notices = await db.run(services.subscribe, instance_id, credential, action, now)
                answer = Ack(ref=cmd.ref, action=action, waiting=started)
            case Unsub(action=action):
                await db.run(services.unsubscribe, instance_id, action)
                answer = Ack(ref=cmd.ref, action=action)
            case Pub():
                task_id, created, notices = await db.run(services.publish, credential, cmd, now, instance_id)
                if not created:
                    # A re-sent pub, maybe from a new connection: follow the task as its
                    # watchers do, since its events go to the connection that published it.
                    await self.follow(task_id)
                answer = Ack(ref=cmd.ref, task=task_id, created=created)
            case Pickup() | Update() | Return() | Drop() | Fail():
                notices = await db.run(services.act, credential, cmd, now, self.channel_name)
                answer = Ack(ref=cmd.ref, task=cmd.task)
            case GetPayload(task=task_id):
                payload = await db.run(services.get_payload, credential, task_id)
                answer = Payload(ref=cmd.ref, task=task_id, payload=payload)
            case Watch(task=task_id, since=since):
                await self.follow(task_id)
                state = await db.run(services.watch, credential, task_id, since if isinstance(since, int) else 0)
                answer = State(ref=cmd.ref, **state)
        await self.reply(answer)
        await send_notices(self.channel_layer, notices)

    async def follow(self, task_id: str) -> None:
        """Watch the task: join its group."""
        group = services.task_group(task_id)
        if group not in self.followed:
            self.followed.add(group)
            await notify.group_add(self.channel_layer, group, self.channel_name)

    async def unfollow(self, group: str) -> None:
        if group in self.followed:
            self.followed.discard(group)
            await notify.group_discard(self.channel_layer, group, self.channel_name)

    # -- channel-layer messages ------------------------------------------------------------

    async def taskhub_offer(self, event: dict[str, Any]) -> None:
        """A task offered to this instance."""
        await self.reply(event["message"])

    async def taskhub_relay(self, event: dict[str, Any]) -> None:
        """A transition's task events, for the task's publisher, its services and its watchers."""
        if self.instance_id is not None and event.get("exclude") == str(self.instance_id):
            return
        task_id, version = event["task"], event["version"]
        if version <= self.heard.get(task_id, 0):
            return  # heard it already, as a publisher or worker and as a watcher
        self.heard[task_id] = version
        self.heard.move_to_end(task_id)
        if len(self.heard) > HEARD_TASKS:
            self.heard.popitem(last=False)
        for message in event["messages"]:
            await self.reply(message)
            if message["type"] == "end":
                await self.unfollow(services.task_group(task_id))

    async def taskhub_close(self, event: dict[str, Any]) -> None:
        """An operator disabled this instance's credential."""
        code = event.get("code", ErrorCode.CREDENTIAL_DISABLED)
        await self.reply(Error(code=code, detail="the credential was disabled"))
        await self.close(CloseCode.for_error(code))
