"""Instances: credentials checked, connections registered and resumed, slots and leases.

An instance is one connection of a service, and outlives it for a while: a connection
that goes without a ``bye`` *detaches* its instance, which keeps its tasks and its slot
for the resume grace (``TASKHUB_RESUME_GRACE``), so that the client can reconnect to any
hub process and *resume* it with the token its ``welcome`` carried. Once the grace has
passed, or the instance leaves with ``bye``, or its process stops renewing its lease
(``TASKHUB_INSTANCE_LEASE``: the process died), it is *released*: each task it held goes
to another live instance of its service, or waits for one (:func:`release`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
import weakref
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import NamedTuple

from django.db import transaction
from django.db.models import Q

from taskhub.auth import hash_key, verify_key
from taskhub.conf import conf
from taskhub.core.codes import ErrorCode
from taskhub.core.errors import AuthenticationFailed
from taskhub.core.states import HELD_ASSIGNMENT_STATES
from taskhub.models import Assignment, Credential, Instance

from .dispatch import release_task
from .routing import Notice

log = logging.getLogger("taskhub.services")

_STAND_IN_HASH = hash_key(secrets.token_urlsafe(32))
NAME_LENGTH = Credential._meta.get_field("name").max_length or 0


def authenticate(name: str, key: str) -> Credential:
    """Return the active credential for ``name`` and ``key``.

    Raises:
        AuthenticationFailed: ``authentication_failed`` for an unknown name or a wrong key
            (the same answer for both), ``credential_disabled`` for a disabled one.
    """
    # One path for an unknown name and a wrong key: the same query, and a key checked
    # against a stand-in hash when there is no credential. A name no database could
    # hold (U+0000, too long) is unknown without a query.
    row = None
    if len(name) <= NAME_LENGTH and "\x00" not in name:
        row = Credential.objects.filter(name=name).values_list("pk", "key_hash", "is_active").first()
    pk, key_hash, active = row if row is not None else (None, _STAND_IN_HASH, False)
    if not verify_key(key, key_hash) or pk is None:
        raise AuthenticationFailed("invalid name or key")
    if not active:
        raise AuthenticationFailed(f"credential {name!r} is disabled", ErrorCode.CREDENTIAL_DISABLED)
    return Credential.objects.get(pk=pk)


_shared: weakref.WeakValueDictionary[tuple[int, datetime], Credential] = weakref.WeakValueDictionary()


def shared(credential: Credential) -> Credential:
    """The one instance of this version of ``credential`` (its ``updated_at``) that this
    process's connections keep, from the first that authenticated with it.

    Call from the event loop's thread once a connection authenticated. The many instances
    of a service then hold one model instance for their lives, not one each (about 1 KiB
    each, more with a long description); one that authenticates after an operator changed
    the credential holds the new version. The hub never changes the instance it holds.
    """
    return _shared.setdefault((credential.pk, credential.updated_at), credential)


class Session(NamedTuple):
    """A registered or resumed instance: what ``welcome`` tells the client."""

    instance: Instance
    #: The token that resumes the instance (``hello``'s ``resume``).
    token: str
    resumed: bool
    #: The channel of the connection this one took the instance from, to be closed.
    superseded: str | None
    #: The notices of tasks a detached instance handed over to free its slot.
    notices: list[Notice]


def _new_token(instance_id: uuid.UUID) -> tuple[str, str]:
    """A resume token for the instance and the hash stored for it."""
    secret = secrets.token_urlsafe(24)
    return f"{instance_id.hex}.{secret}", hashlib.sha256(secret.encode()).hexdigest()


def connect(
    credential: Credential,
    channel_name: str,
    process: str,
    remote_addr: str,
    now: datetime,
    *,
    resume: str | None = None,
    concurrency: int | None = None,
) -> Session:
    """Take back the instance ``resume`` names, or register a new one.

    A new instance takes one of the credential's slots, counted across all hub
    processes; when every slot is held and some by detached instances (connections that
    went without a bye), the longest detached one is released to make room.

    Raises:
        AuthenticationFailed: ``too_many_instances`` when every slot is held by a
            connected instance.
    """
    if resume:
        session = _resume(credential, resume, channel_name, process, now, concurrency)
        if session is not None:
            return session
    notices: list[Notice] = []
    with transaction.atomic():
        # Locks the credential row (PostgreSQL) so racing connects count one at a time;
        # SQLite's IMMEDIATE transactions serialise them anyway.
        locked = Credential.objects.select_for_update().get(pk=credential.pk)
        live = Instance.objects.filter(credential=locked, lease_expires_at__gt=now)
        held = live.count()
        if held >= locked.max_instances:
            detached = live.filter(detached_at__isnull=False).order_by("detached_at").first()
            if detached is None:
                raise AuthenticationFailed(
                    f"{credential.name} already has {held} live instance(s) of {locked.max_instances} allowed",
                    ErrorCode.TOO_MANY_INSTANCES,
                )
            notices = release(detached.pk, now)
        instance_id = uuid.uuid4()
        token, resume_hash = _new_token(instance_id)
        instance = Instance.objects.create(
            id=instance_id,
            credential=locked,
            channel_name=channel_name,
            process=process,
            remote_addr=remote_addr[:100],
            connected_at=now,
            lease_expires_at=now + timedelta(seconds=conf.INSTANCE_LEASE),
            resume_hash=resume_hash,
            concurrency=concurrency,
        )
    return Session(instance, token, False, None, notices)


def _resume(
    credential: Credential, token: str, channel_name: str, process: str, now: datetime, concurrency: int | None
) -> Session | None:
    """The instance ``token`` names, taken over by this connection; ``None`` if there is no
    such instance of this credential any more (its grace passed) or the token is wrong."""
    instance_hex, _, secret = token.partition(".")
    try:
        instance_id = uuid.UUID(hex=instance_hex)
    except ValueError:
        return None
    digest = hashlib.sha256(secret.encode()).hexdigest()
    with transaction.atomic():
        instance = Instance.objects.select_for_update().filter(pk=instance_id, credential=credential).first()
        if instance is None or not hmac.compare_digest(instance.resume_hash, digest):
            return None
        superseded = instance.channel_name if instance.detached_at is None and instance.channel_name else None
        # The token stays the instance's for its life: had the hub sent a new one, a
        # connection lost before its welcome arrived would leave the client with a token
        # that no longer resumes anything.
        Instance.objects.filter(pk=instance_id).update(
            channel_name=channel_name,
            process=process,
            detached_at=None,
            lease_expires_at=now + timedelta(seconds=conf.INSTANCE_LEASE),
            concurrency=concurrency,
        )
        instance.refresh_from_db()
    return Session(instance, token, True, superseded if superseded != channel_name else None, [])


def detach(instance_id: uuid.UUID, channel_name: str, now: datetime) -> bool:
    """The instance's connection closed without a bye: it keeps its tasks and slot for the
    resume grace. Nothing happens if another connection has taken the instance since.

    Returns:
        Whether it was detached.
    """
    detached = Instance.objects.filter(pk=instance_id, channel_name=channel_name, detached_at__isnull=True).update(
        detached_at=now, channel_name=""
    )
    return bool(detached)


def release(
    instance_id: uuid.UUID, now: datetime, *, channel_name: str | None = None, only_if_gone: bool = False
) -> list[Notice]:
    """The instance is gone for good: each task it held goes to another live instance of
    its service, or waits for one until its pickup timeout; its slot is freed.

    The instance's row goes first, conditionally, in the same transaction as the
    hand-over: a connection resuming the instance meanwhile either took it before (then
    nothing is released) or finds it gone (then it gets a new instance). With
    ``channel_name`` (a ``bye``), nothing happens if another connection has taken the
    instance since; with ``only_if_gone`` (the sweeper), nothing happens unless it is
    still gone (:func:`lapsed`).

    Returns:
        The notices of the tasks it held (offers to their new instances among them).
    """
    instances = Instance.objects.filter(pk=instance_id)
    if channel_name is not None:
        instances = instances.filter(channel_name=channel_name)
    if only_if_gone:
        instances = instances.filter(_gone(now))
    notices: list[Notice] = []
    with transaction.atomic():
        # Locked, and on PostgreSQL the conditions read again under the lock: a resume
        # that committed first wins, one that comes after finds the instance gone.
        locked = instances.select_for_update(of=("self",)).values_list("credential__name", flat=True)
        service = locked.first()
        if service is None:
            return []
        Instance.objects.filter(pk=instance_id).delete()
        held = Assignment.objects.filter(instance=instance_id, state__in=HELD_ASSIGNMENT_STATES)
        for task_id, action in list(held.values_list("task_id", "task__action").distinct()):
            notices += release_task(task_id, action, service, instance_id, now)
    return notices


def disconnect(instance_id: uuid.UUID, now: datetime) -> list[Notice]:
    """An operator disconnects the instance: it is released at once (no resume grace: its
    tasks go to other instances of its service by the lost-instance rules), and its
    connection, if one is open on any process, is closed with ``disconnected`` (4005).
    The client reconnects as a new instance; disable the credential to keep it out.

    Returns:
        The notices to send: the tasks' hand-over and the close. Empty if the instance
        was gone already.
    """
    with transaction.atomic():
        # Read under the row's lock, in the release's transaction: a resume that commits
        # first moves the instance to its new connection, which is then the one closed.
        attached = Instance.objects.filter(pk=instance_id, detached_at__isnull=True).select_for_update(of=("self",))
        open_on = attached.values_list("channel_name", flat=True).first()
        notices = release(instance_id, now)
    if open_on:
        notices.append(Notice("channel", open_on, {"type": "taskhub.close", "code": ErrorCode.DISCONNECTED.value}))
    return notices


def orphaned(connections: dict[uuid.UUID, str]) -> tuple[list[str], list[str]]:
    """Of a process's open connections (instance id to channel name), those whose
    instance is gone (an operator disconnected it) and those whose instance another
    connection took (resumed it): each should have been told on the layer, which may have
    lost the message. Call from the sweeper; close the first with ``disconnected``, the
    second with ``superseded``.

    Returns:
        ``(channels of gone instances, channels of instances taken)``.
    """
    if not connections:
        return [], []
    now_on = dict(Instance.objects.filter(pk__in=list(connections)).values_list("pk", "channel_name"))
    gone = [channel for pk, channel in connections.items() if pk not in now_on]
    taken = [channel for pk, channel in connections.items() if pk in now_on and now_on[pk] != channel]
    return gone, taken


def renew_leases(process: str, now: datetime, channels: Collection[str] | None = None) -> list[str]:
    """Renew the leases of ``process``'s instances whose connection is open: those with
    one of ``channels``, the channels of the process's live consumers (all of them if
    ``None``). The others' consumer ended without detaching them (it crashed): they are
    detached now.

    Returns:
        The channel names of instances whose credential an operator disabled: the
        process closes them.
    """
    mine = Instance.objects.filter(process=process, detached_at__isnull=True)
    for instance_id, channel_name in mine.values_list("id", "channel_name") if channels is not None else ():
        if channels is not None and channel_name not in channels:
            log.warning("instance %s has no connection in this process any more: detaching it", instance_id)
            detach(instance_id, channel_name, now)
    mine.update(lease_expires_at=now + timedelta(seconds=conf.INSTANCE_LEASE))
    return list(mine.filter(credential__is_active=False).values_list("channel_name", flat=True))


def _gone(now: datetime) -> Q:
    """Instances gone for good: detached, or attached to a process that stopped renewing
    their lease (it died: its connections went without a detach), for longer than the
    resume grace, which their clients had to come back."""
    grace = now - timedelta(seconds=conf.RESUME_GRACE)
    return Q(detached_at__lte=grace) | Q(detached_at__isnull=True, lease_expires_at__lte=grace)


def lapsed(now: datetime, limit: int, after: uuid.UUID | None = None) -> list[uuid.UUID]:
    """Instances to release, at most ``limit``, in id order from just after ``after``
    (see :func:`_gone`)."""
    gone = Instance.objects.filter(_gone(now))
    if after is not None:
        gone = gone.filter(id__gt=after)
    return list(gone.order_by("id").values_list("id", flat=True)[:limit])
