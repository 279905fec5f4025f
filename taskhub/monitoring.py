"""A monitor's session on the hub's consumer: the dashboard's read-only rights.

A *monitor* authenticates with its Django session instead of a key (``hello`` with
``monitor: true``; the project's ASGI application wraps the routes in Channels'
``AuthMiddlewareStack``): an active staff user reads every task and changes nothing. It
holds no instance; it joins the monitors' group, which hears every transition of every
hub process while a monitor is live (:func:`taskhub.services.routing.monitored`), and its
lease is renewed while its session still names an active staff user.

:class:`MonitorSession` is a mixin of :class:`taskhub.consumers.TaskHubConsumer`; it
holds what differs for monitors, so that the consumer keeps the services' sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from importlib import import_module
from typing import TYPE_CHECKING, Any

from channels.auth import get_user
from django.conf import settings
from django.utils import timezone

from . import db, notify, services, sweeper, throttle
from .conf import conf
from .core.codes import RELAYED_KINDS, ErrorCode
from .core.commands import Bye, Command, GetPayload, Ping, Stats, Tasks, Watch
from .core.errors import AuthenticationFailed, PermissionDenied, ProtocolError
from .core.messages import MISSING, Ack, Message, Payload, Pong, State, TaskList, Welcome, event_message
from .core.messages import Stats as StatsMessage
from .recovery import Ledger, catch_up
from .services import queries, routing
from .services.routing import MONITOR_GROUP

if TYPE_CHECKING:
    from .models import Credential

log = logging.getLogger(__name__)


def monitor_refusal(user: Any) -> str | None:
    """Why the session's ``user`` (``scope["user"]``) may not monitor, or ``None`` for an
    active staff user."""
    if user is None:
        return (
            "monitor rights come from a Django session: wrap the hub's WebSocket routes in "
            "channels.auth.AuthMiddlewareStack"
        )
    if not getattr(user, "is_authenticated", False):
        return "monitor rights need a staff user's session: log in to the admin first"
    if not getattr(user, "is_active", False):
        return f"user {user.get_username()!r} is inactive"
    if not getattr(user, "is_staff", False):
        return f"user {user.get_username()!r} is not staff: only staff users may monitor"
    return None


class MonitorSession:
    """The monitor's part of the consumer (see the module's docstring)."""

    #: A monitor's row (:class:`~taskhub.models.Monitor`) and its user's name.
    monitor_id: uuid.UUID | None = None
    monitor_user: str | None = None
    monitor_keeper: asyncio.Future[None]

    @functools.cached_property
    def monitor_follows(self) -> Ledger:
        """The tasks a monitor's ``watch`` follows, and what was forwarded of each; made
        on first use, since most connections are services'."""
        return Ledger()

    if TYPE_CHECKING:  # the consumer's, which this mixin uses
        scope: Any
        channel_layer: Any
        channel_name: str
        auth_timer: asyncio.TimerHandle | None

        async def refuse(self, code: str, detail: str, ref: str | int | None) -> None: ...
        async def reply(self, message: Message | dict[str, Any]) -> None: ...
        async def close(self, code: int | None = None, reason: str | None = None) -> None: ...
        async def list_tasks(self, cmd: Tasks, credential: Credential | None) -> TaskList: ...

    async def login_monitor(self, ref: str | int | None) -> None:
        """Open a monitor's session for the connection's Django user (an active staff
        user), or refuse it and close (``authentication_failed``, 4001).

        Failures count against the address as a wrong key does (``throttle``), under the
        name ``session:<user name>``, which no credential can have.
        """
        user: Any = self.scope.get("user")
        name = user.get_username() if getattr(user, "is_authenticated", False) else ""
        address = str((self.scope.get("client") or ("", 0))[0])
        throttled = f"session:{name}"
        try:
            await throttle.admit(address, throttled)
        except AuthenticationFailed as exc:
            await self.refuse(exc.code, exc.detail, ref)
            return
        refusal = monitor_refusal(user)
        if refusal is not None:
            throttle.settle(address, throttled, time.monotonic(), failed=True)
            await self.refuse(ErrorCode.AUTHENTICATION_FAILED, refusal, ref)
            return
        throttle.settle(address, throttled, time.monotonic(), failed=False)
        try:
            # The group first: a transition written once the monitor is known is heard.
            await notify.group_add(self.channel_layer, MONITOR_GROUP, self.channel_name)
            monitor_id = await db.run_deferred(
                routing.add_monitor, name, self.channel_name, sweeper.PROCESS, address, timezone.now()
            )
        except Exception:
            log.exception("could not open a monitor's session for %r", name)
            with contextlib.suppress(Exception):
                await notify.group_discard(self.channel_layer, MONITOR_GROUP, self.channel_name)
            await self.refuse(ErrorCode.INTERNAL_ERROR, "the hub could not open the session: try again later", ref)
            return
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        self.monitor_id, self.monitor_user = monitor_id, name
        self.monitor_keeper = asyncio.ensure_future(self._keep_monitor())
        await self.reply(
            Welcome(
                monitor=True,
                user=name,
                resumed=MISSING,
                max_message_size=conf.MAX_MESSAGE_SIZE,
                max_payload_size=conf.MAX_PAYLOAD_SIZE,
                ref=ref,
            )
        )

    async def _keep_monitor(self) -> None:
        """Renew the monitor's lease while its user stays an active staff user with a live
        session; otherwise close the connection (``authentication_failed``, 4001)."""
        while self.monitor_id is not None:
            await asyncio.sleep(conf.INSTANCE_LEASE / 3)
            try:
                if not await self._still_staff():
                    # Rights go first, and the connection: the clean-up may fail.
                    self.monitor_user = None
                    try:
                        await self.refuse(
                            ErrorCode.AUTHENTICATION_FAILED,
                            "the session ended, or its user may no longer monitor",
                            None,
                        )
                    finally:
                        await self._leave_monitoring()
                    return
                # channels-redis forgets a group's members after a day: join it again.
                await notify.group_add(self.channel_layer, MONITOR_GROUP, self.channel_name)
                monitor_id = self.monitor_id
                if monitor_id is not None and not await db.run(routing.renew_monitor, monitor_id, timezone.now()):
                    # It lapsed (this loop was late) and another process removed it.
                    address = str((self.scope.get("client") or ("", 0))[0])
                    self.monitor_id = await db.run(
                        routing.add_monitor,
                        self.monitor_user or "",
                        self.channel_name,
                        sweeper.PROCESS,
                        address,
                        timezone.now(),
                    )
            except asyncio.CancelledError:
                raise
            except Exception:  # the database is down: try again at the next renewal
                log.warning("could not renew monitor %s", self.monitor_id, exc_info=True)

    async def _still_staff(self) -> bool:
        """Whether the session, read again from its store, still names the same active
        staff user (a logout, a password change or a demotion ends a monitor)."""
        session = self.scope.get("session")
        user = self.scope.get("user")
        if session is None or user is None:
            return False
        store = import_module(settings.SESSION_ENGINE).SessionStore
        scope: Any = {"session": store(session.session_key)}
        fresh = await get_user(scope)
        return monitor_refusal(fresh) is None and fresh.pk == user.pk

    async def _leave_monitoring(self) -> None:
        """Forget the monitor: its renewals, its group, its row (should that fail, it lapses)."""
        monitor_id, self.monitor_id = self.monitor_id, None
        keeper = getattr(self, "monitor_keeper", None)
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
        try:
            await notify.group_discard(self.channel_layer, MONITOR_GROUP, self.channel_name)
        except Exception:  # the layer is down: the group expires on its own
            log.warning("could not leave group %s", MONITOR_GROUP, exc_info=True)
        if monitor_id is not None:
            await db.run(routing.remove_monitor, monitor_id)

    async def dispatch_monitor(self, cmd: Command) -> None:
        """A monitor's command: the read commands, for every task; any other is refused
        with ``permission_denied`` and changes nothing.

        Raises:
            PermissionDenied: a command that would change something.
            UnknownTask: ``watch`` or ``get_payload`` of a task that does not exist.
        """
        answer: Message
        match cmd:
            case Ping():
                answer = Pong(ref=cmd.ref)
            case Bye():
                await self._leave_monitoring()
                await self.reply(Ack(ref=cmd.ref))
                await self.close(1000)
                return
            case Tasks():
                answer = await self.list_tasks(cmd, None)
            case GetPayload(task=task_id):
                payload = await db.run(services.get_payload, None, task_id)
                answer = Payload(ref=cmd.ref, task=task_id, payload=payload)
            case Watch(task=task_id):
                answer = await self.monitor_watch(cmd)
            case Stats():
                found = await db.run_deferred(queries.stats, timezone.now())
                answer = StatsMessage(
                    ref=cmd.ref,
                    at=found["at"],
                    services=found["services"],
                    actions=found["actions"],
                    waiting=found["waiting"],
                    monitors=found["monitors"],
                    more=found["more"] or MISSING,
                )
            case _:
                raise PermissionDenied(f"a monitor may only read: {cmd.type} is refused")
        await self.reply(answer)

    async def monitor_watch(self, cmd: Watch) -> State:
        """A monitor's ``watch``: a read that marks nothing, since the monitors' group
        already brings every event of every task. To follow the task, its events are
        forwarded from that feed as a watcher hears them, from before the read on (so that
        none falls between the read and the answer; the client drops a ``seq`` twice)."""
        since = 0 if cmd.since is MISSING else cmd.since
        follow = cmd.follow is not False
        follows = self.monitor_follows
        if follow:  # the feed may bring the task's events while the read runs
            heard = follows.get(cmd.task)
            heard.seq = max(heard.seq, since)
        try:
            state = await db.run(services.watch, None, cmd.task, since, follow=False)
        except ProtocolError:
            follows.forget(cmd.task)
            raise
        if follow and state["task"]["status"] in ("success", "failed", "ended"):
            follows.forget(cmd.task)
        elif follow:
            last = state["events"][-1]["seq"] if state["events"] else 0
            follows.start(cmd.task, state["relayed"], last)
        return State(ref=cmd.ref, task=state["task"], events=state["events"], more=state["more"] or MISSING)

    async def taskhub_monitor(self, event: dict[str, Any]) -> None:
        """A transition of any task, for monitors: forwarded as it is, and, for a task the
        monitor watches, as the task events a watcher hears (read from the database when
        the feed lost one, or left a value out)."""
        if self.monitor_id is None:
            return  # it left (bye), or never was a monitor
        message = event["message"]
        await self.reply(message)
        task_id = message["task"]["id"]
        follows = self.monitor_follows
        events = [e for e in message["events"] if e["kind"] in RELAYED_KINDS]
        if task_id not in follows.tasks or not events:
            return
        built: list[dict[str, Any]] | None = None
        if not any("omitted" in e for e in events):  # a value too large for the feed
            messages = (
                event_message(task_id, e["seq"], e["kind"], e["service"], e["attempt"], e["data"]) for e in events
            )
            built = [m.to_dict() for m in messages if m is not None]
        version = event.get("version", 0)
        relayed = follows.relay(task_id, version, event.get("prev", 0), built)
        if relayed is None:
            relayed = await catch_up(follows, task_id, version, None)
        for relay in relayed:
            await self.reply(relay)
            if relay["type"] == "end":
                follows.forget(task_id)
