"""The WebSocket consumer: one connection of a service (an *instance*).

Thin by design: frames are decoded and validated by the core (:mod:`taskhub.core.frames`,
:mod:`taskhub.core.commands`), each command is one call into :mod:`taskhub.services` (on a
database thread) and is answered with a message the core builds
(:mod:`taskhub.core.messages`), and the notices it returns go out after the write
(:mod:`taskhub.notify`: directly to consumers of this process, on the channel layer to
the others). See docs/protocol.md.

A connection that closes without ``bye`` only *detaches* its instance: the client may
take it back, with its tasks, from any hub process within the resume grace
(:mod:`taskhub.services.instances`).

A *monitor* (the dashboard) authenticates with its Django session instead, and reads
every task without changing any (:mod:`taskhub.monitoring`, a mixin of the consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.utils import timezone

from . import db, layers, notify, services, sweeper, throttle
from .conf import conf
from .core.codes import CloseCode, ErrorCode
from .core.commands import (
    Bye,
    Cancel,
    Command,
    Drop,
    Fail,
    GetPayload,
    Hello,
    Pickup,
    Ping,
    Pub,
    Retry,
    Return,
    Stats,
    Sub,
    Tasks,
    Touch,
    Unsub,
    Update,
    Watch,
    parse_command,
    read_ref,
)
from .core.ends import fold_ends
from .core.errors import AuthenticationFailed, InvalidMessage, PermissionDenied, ProtocolError
from .core.frames import decode_frame, encode
from .core.messages import MISSING, Ack, Error, Message, Payload, Pong, State, TaskList, Welcome
from .handshake import SessionOptions, basic_credentials, session_options
from .models import Credential
from .monitoring import MonitorSession
from .notify import send_notices
from .recovery import Ledger, catch_up
from .services import queries, retention
from .services.routing import MONITOR_GROUP, RELAY

log = logging.getLogger(__name__)

# Cleanups of consumers that ended without a disconnect, kept until they finish.
_cleanups: set[asyncio.Future[None]] = set()

_CLOSE_DETAIL = {
    ErrorCode.CREDENTIAL_DISABLED: "the credential was disabled",
    ErrorCode.SUPERSEDED: "the instance was resumed on another connection",
    ErrorCode.DISCONNECTED: "an operator disconnected this instance; its tasks go to other instances",
}


class TaskHubConsumer(MonitorSession, layers.ResilientReceive, AsyncWebsocketConsumer):  # type: ignore[misc]  # channel_receive
    """Serves ``/ws/taskhub/``."""

    credential: Credential | None = None
    instance_id: uuid.UUID | None = None
    concurrency: int | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Channels lets a handler's exception end the consumer without websocket.disconnect:
        # the instance would stay registered, its lease renewed, its slot taken. Whatever
        # ends the consumer, the connection's instance is detached.
        try:
            if notify.in_process(get_channel_layer(self.channel_layer_alias)):
                await self._serve_in_process(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
        finally:
            if not self._cleaned_up:
                # A task of its own: a cancelled consumer could not await the database.
                cleanup = asyncio.ensure_future(self._cleanup())
                _cleanups.add(cleanup)
                cleanup.add_done_callback(_cleanups.discard)

    async def _serve_in_process(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' ``AsyncConsumer.__call__`` (as of Channels 4.3) without the layer's
        receive.

        With the in-memory layer every notice reaches this consumer's ``dispatch``
        directly (:mod:`taskhub.notify`), so nothing ever arrives on its channel. Channels
        would still wait on it beside the client's frames: a queue, a task and an
        ``asyncio.wait`` per connection, and a new task per frame. An idle connection
        held 37.6 KiB of memory with them, 31.7 without.
        """
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        assert self.channel_layer is not None  # in_process said it is the in-memory layer
        self.channel_name = await self.channel_layer.new_channel()
        self.base_send = send
        with contextlib.suppress(StopConsumer):
            while True:
                await self.dispatch(await receive())

    _cleaned_up = False
    closing = False
    #: The client reads an ``end`` inside the event before it (one frame for the two).
    inline_end = False
    #: A task (autoremove) whose result the answer being sent gives its publisher.
    _remove_after_reply: str | None = None
    #: The last command applied that asked for no answer, until a frame says so.
    _applied: str | int | None = None

    async def connect(self) -> None:
        sweeper.ensure_started()
        # Task groups this connection joined to watch the tasks, and what it forwarded of
        # each task it follows: it may hear a transition both as the task's publisher or
        # worker and as a watcher, and the sweeper sends it what the layer lost.
        self.followed: set[str] = set()
        self.ledger = Ledger()
        self.subscriptions: set[str] = set()
        self.auth_timer: asyncio.TimerHandle | None = None
        notify.register(self.channel_name, self)
        await self.accept()
        credentials = basic_credentials(self.scope)
        if credentials is not None:
            try:
                options = session_options(self.scope)
            except InvalidMessage as exc:
                await self.refuse(exc.code, exc.detail, None)
                return
            await self.login(*credentials, ref=None, options=options)
        else:
            loop = asyncio.get_running_loop()
            self.auth_timer = loop.call_later(conf.AUTH_TIMEOUT, lambda: asyncio.ensure_future(self.auth_timed_out()))

    async def auth_timed_out(self) -> None:
        if self.credential is None:
            await self.refuse(ErrorCode.AUTHENTICATION_TIMEOUT, "no hello within the authentication timeout", None)

    async def refuse(self, code: str, detail: str, ref: str | int | None) -> None:
        """Refuse the session: an error, then the close code that goes with it."""
        self.closing = True
        await self.reply(Error(code=code, detail=detail, ref=ref))
        await self.close(int(CloseCode.for_error(code)))  # autobahn refuses an IntEnum

    async def login(self, name: str, key: str, ref: str | int | None, *, options: SessionOptions) -> None:
        """Authenticate and register the instance, or refuse the session and close.

        The authentication timer runs until this succeeds: a ``hello`` that fails in any
        way leaves the connection closing, never open and unauthenticated.
        """
        now = timezone.now()
        address = str((self.scope.get("client") or ("", 0))[0])
        try:
            await throttle.admit(address, name)
            try:
                credential = await db.run_deferred(services.authenticate, name, key)
            except AuthenticationFailed as exc:
                throttle.settle(address, name, time.monotonic(), failed=exc.code == ErrorCode.AUTHENTICATION_FAILED)
                raise
            except BaseException:
                throttle.settle(address, name, time.monotonic(), failed=False)
                raise
            throttle.settle(address, name, time.monotonic(), failed=False)
            session = await db.run_deferred(
                services.connect,
                credential,
                self.channel_name,
                sweeper.PROCESS,
                address,
                now,
                resume=options.resume,
                concurrency=options.concurrency,
            )
        except AuthenticationFailed as exc:
            await self.refuse(exc.code, exc.detail, ref)
            return
        except Exception:
            log.exception("could not open a session for %r", name)
            await self.refuse(ErrorCode.INTERNAL_ERROR, "the hub could not open the session: try again later", ref)
            return
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        self.credential, self.instance_id = services.shared(credential), session.instance.pk
        self.concurrency = options.concurrency
        self.inline_end = options.inline_end
        await self.reply(
            Welcome(
                service=credential.name,
                instance=str(session.instance.pk),
                resume=session.token,
                resumed=session.resumed,
                max_message_size=conf.MAX_MESSAGE_SIZE,
                max_payload_size=conf.MAX_PAYLOAD_SIZE,
                ref=ref,
            )
        )
        notices = list(session.notices)
        if session.superseded:
            close = {"type": "taskhub.close", "code": ErrorCode.SUPERSEDED.value}
            notices.append(services.Notice("channel", session.superseded, close))
        await send_notices(self.channel_layer, notices)

    async def disconnect(self, code: int) -> None:
        await self._cleanup()

    async def _cleanup(self) -> None:
        """Forget the connection: its groups, its timer, and its instance (detached)."""
        if self._cleaned_up:
            return
        self._cleaned_up = True
        notify.unregister(getattr(self, "channel_name", ""))
        if getattr(self, "auth_timer", None) is not None:
            self.auth_timer.cancel()  # type: ignore[union-attr]
        for group in getattr(self, "followed", set()):
            try:
                await notify.group_discard(self.channel_layer, group, self.channel_name)
            except Exception:  # the layer is down: the group expires on its own
                log.warning("could not leave group %s", group, exc_info=True)
        if self.monitor_id is not None:
            await self._leave_monitoring()
        if self.instance_id is not None:
            # Without a bye: the client may come back for its instance. Should this fail,
            # the sweeper stops renewing the lease (the channel is gone) and the instance
            # lapses. Deferred, as connects are: a wave of closes (a load balancer
            # dropping its connections) would otherwise run back to back on the event
            # loop's thread on SQLite, the established connections waiting.
            await db.run_deferred(services.detach, self.instance_id, self.channel_name, timezone.now())

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' AsyncConsumer.dispatch first closes stale database connections, with a
        # hop to the ORM thread, before every frame and every layer message. Every
        # database call of this consumer goes through taskhub.db.run, whose threads do
        # that themselves; the extra hop only queued offers and relays behind database work.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            log.error("no handler for message type %r", message.get("type"))
            return
        try:
            await handler(message)
        except (StopConsumer, asyncio.CancelledError):
            raise
        except Exception:
            # A bug or a broken database. The connection closes (and its instance is
            # detached when the disconnect comes), or, if this was the disconnect, the
            # consumer ends; the sweeper detaches an instance whose consumer is gone.
            log.exception("the connection failed on %r", message.get("type"))
            if message.get("type") == "websocket.disconnect":
                raise StopConsumer() from None
            if not self.closing:
                self.closing = True
                with contextlib.suppress(Exception):
                    await self.close(int(CloseCode.INTERNAL_ERROR))

    async def reply(self, message: Message | dict[str, Any]) -> None:
        """Send a message (or a message's dict, as relays carry them).

        The first frame without a ``ref`` of its own (an offer, a task event) after
        commands that asked for no answer says, in ``applied``, the last of them: the
        client needs no ``ping`` to learn they were applied.
        """
        obj = message.to_dict() if isinstance(message, Message) else message
        if self._applied is not None:
            if obj.get("ref") is None:
                obj = {**obj, "applied": self._applied}  # relays' dicts are shared: a copy
            self._applied = None  # an answer with a ref acknowledges them as well
        await self.send(text_data=encode(obj))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing:  # refused: what the client sent after that is not heard
            return
        obj: Any = None
        try:
            if text_data is None:
                raise InvalidMessage("binary frames are not supported: send JSON text frames", ErrorCode.INVALID_FRAME)
            obj = decode_frame(text_data, conf.MAX_MESSAGE_SIZE)
            cmd = parse_command(obj)
        except InvalidMessage as exc:
            # A frame whose JSON parsed but holds a value the hub refuses keeps its ref.
            await self.reply(Error(code=exc.code, detail=exc.detail, ref=read_ref(getattr(exc, "frame", obj))))
            return
        except Exception:  # a bug in validation: the frame is refused, the connection goes on
            log.exception("could not read a frame")
            detail = "the hub could not read this frame"
            await self.reply(Error(code=ErrorCode.INTERNAL_ERROR, detail=detail, ref=read_ref(obj)))
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
            if self.credential is not None or self.monitor_user is not None:
                raise InvalidMessage("already authenticated", ErrorCode.ALREADY_AUTHENTICATED)
            if cmd.monitor is True:
                await self.login_monitor(cmd.ref)
                return
            options = SessionOptions(
                resume=None if cmd.resume is MISSING else cmd.resume,
                concurrency=None if cmd.concurrency is MISSING else cmd.concurrency,
                inline_end=cmd.inline_end is True,
            )
            await self.login(cmd.name, cmd.key, cmd.ref, options=options)
            return
        if self.monitor_user is not None:
            await self.dispatch_monitor(cmd)
            return
        credential, instance_id = self.credential, self.instance_id
        if credential is None or instance_id is None:
            raise ProtocolError("send hello (or authenticate at the handshake) first", ErrorCode.NOT_AUTHENTICATED)
        now = timezone.now()
        notices: list[services.Notice] = []
        answer: Message | None
        match cmd:
            case Ping():
                answer = Pong(ref=cmd.ref)
            case Bye():
                self.instance_id = None
                notices = await db.run(services.release, instance_id, now, channel_name=self.channel_name)
                await self.reply(Ack(ref=cmd.ref))
                await send_notices(self.channel_layer, notices)
                await self.close(1000)
                return
            case Sub(action=action):
                started, notices = await db.run(services.subscribe, instance_id, credential, action, now)
                self.subscriptions.add(action)
                answer = Ack(ref=cmd.ref, action=action, waiting=started)
            case Unsub(action=action):
                await db.run(services.unsubscribe, instance_id, action)
                self.subscriptions.discard(action)
                answer = Ack(ref=cmd.ref, action=action)
            case Pub():
                task_id, created, notices = await db.run(services.publish, credential, cmd, now, instance_id)
                if created:
                    self.ledger.start(task_id, 0)  # no relay came before its first
                else:
                    # A re-sent pub, maybe from a new connection: follow the task as its
                    # watchers do, since its events go to the connection that published it.
                    await self.follow(task_id)
                answer = Ack(ref=cmd.ref, task=task_id, created=created)
            case Pickup() | Update() | Touch() | Return() | Drop() | Fail():
                notices = await db.run(services.act, credential, cmd, now, self.channel_name, instance_id)
                # Asked for no answer: the next frame will say it was applied (see reply).
                answer = None if cmd.ack is False else Ack(ref=cmd.ref, task=cmd.task)
                if answer is None and cmd.ref is not None:  # no ref: nothing to name
                    self._applied = cmd.ref
                await self._heard_own(cmd, notices)
                if self.concurrency is not None and isinstance(cmd, Return | Drop | Fail) and self.subscriptions:
                    # Room for another task: offer what waits for one.
                    notices += (await db.run(services.dispatch_waiting, now, self.subscriptions))[1]
            case Cancel(task=task_id) | Retry(task=task_id):
                # Followed first, so that no event of the outcome falls before the join:
                # whoever cancels or retries a task hears how it ends.
                change = services.cancel if isinstance(cmd, Cancel) else services.retry
                new = await self.follow(task_id)
                try:
                    notices = await db.run(change, credential, task_id, now, credential.name)
                except ProtocolError:
                    if new:  # refused: nothing of the task may reach this connection
                        await self.unfollow(task_id)
                    raise
                answer = Ack(ref=cmd.ref, task=task_id)
            case Tasks():
                answer = await self.list_tasks(cmd, credential)
            case GetPayload(task=task_id):
                payload = await db.run(services.get_payload, credential, task_id)
                answer = Payload(ref=cmd.ref, task=task_id, payload=payload)
            case Watch(task=task_id):
                answer = await self.watch(cmd)
            case Stats():
                raise PermissionDenied("stats is for monitors (a staff user's session, hello with monitor true)")
        if answer is not None:
            await self.reply(answer)
        await send_notices(self.channel_layer, notices)
        if self._remove_after_reply is not None:
            task_id, self._remove_after_reply = self._remove_after_reply, None
            await self.remove_delivered(task_id)

    async def list_tasks(self, cmd: Tasks, credential: Credential | None) -> TaskList:
        """``tasks``: the credential's tasks, or every task for a monitor (``None``), whose
        larger reads wait behind the services' commands (:func:`taskhub.db.run_deferred`)."""
        run = db.run if credential is not None else db.run_deferred
        listed, more = await run(
            queries.listed,
            credential,
            status=None if cmd.status is MISSING else cmd.status,
            action=None if cmd.action is MISSING else cmd.action,
            limit=100 if cmd.limit is MISSING else cmd.limit,
            service=None if cmd.service is MISSING else cmd.service,
        )
        return TaskList(ref=cmd.ref, tasks=listed, more=more or MISSING)

    async def _heard_own(
        self, cmd: Pickup | Update | Touch | Return | Drop | Fail, notices: list[services.Notice]
    ) -> None:
        """What this connection's own command did to the task counts as heard, so that the
        sweeper's recovery does not look for it, unless it shows that a relay before it
        was lost (then what that said is sent now); a part that is over is forgotten (no
        more of the task comes here, unless it is watched or was published here)."""
        if isinstance(cmd, Return | Drop | Fail) and services.task_group(cmd.task) not in self.followed:
            self.ledger.forget(cmd.task)
            return
        for _, _, message in notices:
            if message.get("type") == RELAY and message["task"] == cmd.task and message.get("exclude"):
                await self.taskhub_relay(message)

    async def watch(self, cmd: Watch) -> State:
        """``watch``: join the task's group first (so that no event falls between the
        read and the join), then read; leave the group again if the task is not this
        credential's, is over, or only its state was asked for."""
        assert self.credential is not None
        since = 0 if cmd.since is MISSING else cmd.since
        follow = cmd.follow is not False
        new = follow and await self.follow(cmd.task)
        try:
            state = await db.run(services.watch, self.credential, cmd.task, since, follow=follow)
        except ProtocolError:
            # Not this credential's task (or none): nothing of it may reach this connection.
            if new:
                await self.unfollow(cmd.task)
            raise
        relayed = state.pop("relayed")
        if follow and state["task"]["status"] in ("success", "failed", "ended"):
            await self.unfollow(cmd.task)
        elif follow:  # what it read need not come again
            self.ledger.start(cmd.task, relayed, state["events"][-1]["seq"] if state["events"] else since)
        if state.pop("remove", False):  # the answer carries the result to its publisher
            self._remove_after_reply = cmd.task  # removed once the answer is sent
        return State(ref=cmd.ref, task=state["task"], events=state["events"], more=state["more"] or MISSING)

    async def follow(self, task_id: str) -> bool:
        """Watch the task: join its group. Returns whether the connection followed it
        neither as a watcher nor as its publisher or worker before."""
        group = services.task_group(task_id)
        new = task_id not in self.ledger.tasks and group not in self.followed
        self.ledger.get(task_id)
        if group not in self.followed:
            self.followed.add(group)
            await notify.group_add(self.channel_layer, group, self.channel_name)
        return new

    async def unfollow(self, task_id: str) -> None:
        """Stop watching the task: leave its group and forget what was heard of it (the
        sweeper's recovery sends only tasks this connection remembers)."""
        self.ledger.forget(task_id)
        group = services.task_group(task_id)
        if group in self.followed:
            self.followed.discard(group)
            await notify.group_discard(self.channel_layer, group, self.channel_name)

    async def rejoin(self) -> None:
        """The layer came back (a Redis restart): join this connection's groups again, the
        monitors' feed included."""
        for group in list(self.followed):
            await notify.group_add(self.channel_layer, group, self.channel_name)
        if self.monitor_id is not None:
            await notify.group_add(self.channel_layer, MONITOR_GROUP, self.channel_name)

    # -- channel-layer messages ------------------------------------------------------------

    async def taskhub_offer(self, event: dict[str, Any]) -> None:
        """A task offered to this instance."""
        offer = event["message"]
        if self.ledger.offer(offer["task"], offer["attempt"]):
            # Where the instance starts hearing of a task new to it (an offer the sweeper
            # sent again carries no prev); one it followed already may have a gap to see.
            if "prev" in event and not self.ledger.get(offer["task"]).known:
                self.ledger.start(offer["task"], event["prev"], event["since"])
            await self.reply(offer)

    async def taskhub_relay(self, event: dict[str, Any]) -> None:
        """A transition's task events, for the task's publisher, its services and its watchers."""
        task_id, version = event["task"], event["version"]
        mine = None if self.instance_id is None else str(self.instance_id)
        gone = self.ledger.gone.get(task_id)
        if mine is not None and gone is not None and gone.succeeded and event.get("remove_by") == mine:
            # Its end was forwarded, read from the database after a lost relay, before
            # this relay (the one that says to remove it) came.
            gone.succeeded = False
            await self.remove_delivered(task_id)
            return
        own = mine is not None and event.get("exclude") == mine
        messages = () if own else event["messages"]
        forward = self.ledger.relay(task_id, version, event.get("prev", 0), messages, event.get("remove_by"))
        if forward is None:
            forward = await catch_up(self.ledger, task_id, version, self.instance_id)
        frames = fold_ends(forward) if self.inline_end else [(m, [m]) for m in forward]
        for frame, carried in frames:
            await self.reply(frame)
            for message in carried:
                heard = self.ledger.tasks.get(task_id)
                if message["type"] == "success" and heard is not None:
                    heard.succeeded = True
                if message["type"] == "end":
                    # Removed (autoremove) only once this connection forwarded the result
                    # itself (live, read again after a lost relay, or sent by the sweeper).
                    removable = mine is not None and heard is not None and heard.succeeded and heard.remove_by == mine
                    await self.unfollow(task_id)
                    if removable:
                        self.ledger.gone[task_id].succeeded = False  # removed once
                        await self.remove_delivered(task_id)

    async def remove_delivered(self, task_id: str) -> None:
        """The publisher has the result of a task published with ``autoremove``: delete
        it. A failure is logged; the task then stays until retention takes it."""
        try:
            await db.run_deferred(retention.remove_delivered, task_id)
        except Exception:
            log.exception("could not remove task %s (autoremove)", task_id)

    async def taskhub_close(self, event: dict[str, Any]) -> None:
        """An operator disabled this instance's credential or disconnected the instance, or
        another connection resumed its instance."""
        if self.closing:
            return  # told twice (the layer, then the sweeper): closing already
        code = event.get("code", ErrorCode.CREDENTIAL_DISABLED)
        if code in (ErrorCode.SUPERSEDED, ErrorCode.DISCONNECTED):
            self.instance_id = None  # the other connection's now, or released already
        await self.refuse(code, _CLOSE_DETAIL.get(code, "the connection was closed"), None)
