"""Instances: credentials checked, connections registered, their slots and leases.

An instance is one live connection of a service. Its row holds a slot of the
credential's ``max_instances`` (counted across every hub process) for as long as its
lease lasts; its process renews the lease on every sweep (:func:`renew_leases`). When
the connection goes, :func:`disconnect` loses its tasks and frees the slot at once; when
its process dies, any other process reaps it once the lease ran out.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.db import transaction

from taskhub.auth import verify_key
from taskhub.conf import conf
from taskhub.core import machine
from taskhub.core.codes import ErrorCode
from taskhub.core.errors import AuthenticationFailed
from taskhub.core.states import ACTIVE_ASSIGNMENT_STATES
from taskhub.models import Assignment, Credential, Instance

from .routing import Notice
from .transitions import transition


def authenticate(name: str, key: str) -> Credential:
    """Return the active credential for ``name`` and ``key``.

    Raises:
        AuthenticationFailed: ``authentication_failed`` for an unknown name or a wrong key
            (the same answer for both), ``credential_disabled`` for a disabled one.
    """
    credential = Credential.objects.filter(name=name).first()
    if credential is None or not verify_key(key, credential.key_hash):
        raise AuthenticationFailed("invalid name or key")
    if not credential.is_active:
        raise AuthenticationFailed(f"credential {name!r} is disabled", ErrorCode.CREDENTIAL_DISABLED)
    return credential


def register_instance(
    credential: Credential, channel_name: str, process: str, remote_addr: str, now: datetime
) -> Instance:
    """Take one of the credential's instance slots, counted across all hub processes.

    Raises:
        AuthenticationFailed: ``too_many_instances`` when every slot has a live lease.
    """
    with transaction.atomic():
        # Locks the credential row (PostgreSQL) so racing connects count one at a time;
        # SQLite's IMMEDIATE transactions serialise them anyway.
        locked = Credential.objects.select_for_update().get(pk=credential.pk)
        live = Instance.objects.filter(credential=locked, lease_expires_at__gt=now).count()
        if live >= locked.max_instances:
            raise AuthenticationFailed(
                f"{credential.name} already has {live} live instance(s) of {locked.max_instances} allowed",
                ErrorCode.TOO_MANY_INSTANCES,
            )
        return Instance.objects.create(
            credential=locked,
            channel_name=channel_name,
            process=process,
            remote_addr=remote_addr[:100],
            connected_at=now,
            lease_expires_at=now + timedelta(seconds=conf.INSTANCE_LEASE),
        )


def disconnect(instance_id: uuid.UUID, now: datetime) -> list[Notice]:
    """The instance is gone: its active assignments are lost, its slot is freed.

    Returns:
        The notices of the tasks it held.
    """
    notices: list[Notice] = []
    task_ids = (
        Assignment.objects.filter(instance=instance_id, state__in=ACTIVE_ASSIGNMENT_STATES)
        .values_list("task_id", flat=True)
        .distinct()
    )
    for task_id in list(task_ids):
        notices += transition(task_id, lambda task: machine.lose_instance(task, str(instance_id), now), now)
    Instance.objects.filter(pk=instance_id).delete()
    return notices


def renew_leases(process: str, now: datetime) -> list[str]:
    """Renew the leases of ``process``'s instances.

    Returns:
        The channel names of those whose credential an operator disabled: the process
        closes them.
    """
    Instance.objects.filter(process=process).update(lease_expires_at=now + timedelta(seconds=conf.INSTANCE_LEASE))
    return list(
        Instance.objects.filter(process=process, credential__is_active=False).values_list("channel_name", flat=True)
    )


def lapsed(now: datetime, limit: int) -> list[uuid.UUID]:
    """Instances whose lease ran out (their process died), at most ``limit``."""
    return list(Instance.objects.filter(lease_expires_at__lte=now).values_list("id", flat=True)[:limit])
