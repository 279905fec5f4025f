"""System checks for TaskHub's settings, one id per rule.

=============  ===========================================================
id             rule
=============  ===========================================================
taskhub.E001   PICKUP_TIMEOUT is a positive number of seconds or None
taskhub.E002   COMPLETE_TIMEOUT is a positive number of seconds or None
taskhub.E003   MAX_MESSAGE_SIZE, MAX_PAYLOAD_SIZE, INLINE_PAYLOAD_SIZE are positive integers
taskhub.E004   INLINE_PAYLOAD_SIZE <= MAX_PAYLOAD_SIZE < MAX_MESSAGE_SIZE
taskhub.E005   INSTANCE_LEASE, SWEEP_INTERVAL, AUTH_TIMEOUT, RESUME_GRACE, RETRY_BACKOFF_MAX,
               AUTH_FAILURE_WINDOW are positive numbers
taskhub.E006   INSTANCE_LEASE is at least three SWEEP_INTERVALs (leases are renewed by the sweeper)
taskhub.E007   a channel layer is configured
taskhub.E008   DB_THREADS is a positive integer or None
taskhub.E009   PREPARED_STATEMENTS and SQLITE_INLINE are True or False
taskhub.E010   STORE is "auto" or the name of a backend that fits the database
taskhub.E011   AUTH_FAILURES and MAX_QUEUED_FRAMES are positive integers
taskhub.E012   MAX_BUFFERED_BYTES is an integer number of bytes, at least twice MAX_MESSAGE_SIZE
taskhub.E013   KEEP_SUCCEEDED and KEEP_FAILED are positive numbers of seconds or None
taskhub.E014   PURGE_BATCH is a positive integer
taskhub.E015   METRICS_TOKEN is None or a string of at least 16 characters
taskhub.W001   MAX_MESSAGE_SIZE is below daphne's default frame limit (1 MiB)
=============  ===========================================================
"""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from .conf import conf

DAPHNE_MAX_MESSAGE_SIZE = 1024 * 1024


def _positive(value: Any, *, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    # Durations where None means "no limit" (timeouts) or "forever" (retention).
    waits = "For example 30.0; None waits forever."
    keeps = "For example 7 * 24 * 3600 keeps a week; None keeps every task."
    for name, check_id, hint in (
        ("PICKUP_TIMEOUT", "taskhub.E001", waits),
        ("COMPLETE_TIMEOUT", "taskhub.E002", waits),
        ("KEEP_SUCCEEDED", "taskhub.E013", keeps),
        ("KEEP_FAILED", "taskhub.E013", keeps),
    ):
        value = getattr(conf, name)
        if value is not None and not _positive(value):
            errors.append(
                Error(
                    f"TASKHUB_{name} must be a positive number of seconds or None, not {value!r}.",
                    hint=hint,
                    id=check_id,
                )
            )
    sizes_ok = True
    for name in ("MAX_MESSAGE_SIZE", "MAX_PAYLOAD_SIZE", "INLINE_PAYLOAD_SIZE"):
        value = getattr(conf, name)
        if not _positive(value, integer=True):
            sizes_ok = False
            errors.append(
                Error(f"TASKHUB_{name} must be a positive integer number of bytes, not {value!r}.", id="taskhub.E003")
            )
    if sizes_ok and not conf.INLINE_PAYLOAD_SIZE <= conf.MAX_PAYLOAD_SIZE < conf.MAX_MESSAGE_SIZE:
        errors.append(
            Error(
                "TASKHUB_INLINE_PAYLOAD_SIZE <= TASKHUB_MAX_PAYLOAD_SIZE < TASKHUB_MAX_MESSAGE_SIZE must hold.",
                hint="A payload travels inside a message, with room for the envelope.",
                id="taskhub.E004",
            )
        )
    if sizes_ok and conf.MAX_MESSAGE_SIZE >= DAPHNE_MAX_MESSAGE_SIZE:
        errors.append(
            Warning(
                "TASKHUB_MAX_MESSAGE_SIZE is not below daphne's default --websocket_max_message_size (1 MiB).",
                hint="Start daphne with a larger --websocket_max_message_size, or oversized frames drop the "
                "connection instead of getting a message_too_large error.",
                id="taskhub.W001",
            )
        )
    times_ok = True
    for name in (
        "INSTANCE_LEASE",
        "SWEEP_INTERVAL",
        "AUTH_TIMEOUT",
        "RESUME_GRACE",
        "RETRY_BACKOFF_MAX",
        "AUTH_FAILURE_WINDOW",
    ):
        value = getattr(conf, name)
        if not _positive(value):
            times_ok = False
            errors.append(
                Error(f"TASKHUB_{name} must be a positive number of seconds, not {value!r}.", id="taskhub.E005")
            )
    if times_ok and conf.INSTANCE_LEASE < 3 * conf.SWEEP_INTERVAL:
        errors.append(
            Error(
                "TASKHUB_INSTANCE_LEASE must be at least three TASKHUB_SWEEP_INTERVALs.",
                hint="Each process renews its instances' leases from its sweeper.",
                id="taskhub.E006",
            )
        )
    if conf.DB_THREADS is not None and not _positive(conf.DB_THREADS, integer=True):
        errors.append(
            Error(
                f"TASKHUB_DB_THREADS must be a positive integer or None, not {conf.DB_THREADS!r}.",
                hint="None runs one thread on SQLite and 8 on other databases.",
                id="taskhub.E008",
            )
        )
    for name in ("PREPARED_STATEMENTS", "SQLITE_INLINE"):
        value = getattr(conf, name)
        if not isinstance(value, bool):
            errors.append(Error(f"TASKHUB_{name} must be True or False, not {value!r}.", id="taskhub.E009"))
    for name in ("AUTH_FAILURES", "MAX_QUEUED_FRAMES"):
        value = getattr(conf, name)
        if not _positive(value, integer=True):
            errors.append(Error(f"TASKHUB_{name} must be a positive integer, not {value!r}.", id="taskhub.E011"))
    buffered = conf.MAX_BUFFERED_BYTES
    if not _positive(buffered, integer=True) or (sizes_ok and buffered < 2 * conf.MAX_MESSAGE_SIZE):
        errors.append(
            Error(
                f"TASKHUB_MAX_BUFFERED_BYTES must be an integer number of bytes, at least twice "
                f"TASKHUB_MAX_MESSAGE_SIZE, not {buffered!r}.",
                hint="A client that reads, slowly, must be able to have a large answer or two pending.",
                id="taskhub.E012",
            )
        )
    if not _positive(conf.PURGE_BATCH, integer=True):
        errors.append(
            Error(f"TASKHUB_PURGE_BATCH must be a positive integer, not {conf.PURGE_BATCH!r}.", id="taskhub.E014")
        )
    token = conf.METRICS_TOKEN
    if token is not None and not (isinstance(token, str) and len(token) >= 16):
        errors.append(
            Error(
                "TASKHUB_METRICS_TOKEN must be None or a string of at least 16 characters.",
                hint="A scraper sends it as 'Authorization: Bearer <token>'; make it long and random.",
                id="taskhub.E015",
            )
        )
    errors += _check_store()
    if not getattr(settings, "CHANNEL_LAYERS", None):
        errors.append(
            Error(
                "TaskHub needs a channel layer: CHANNEL_LAYERS is not set.",
                hint="Use channels.layers.InMemoryChannelLayer for one process, channels_redis for several.",
                id="taskhub.E007",
            )
        )
    return errors


def _check_store() -> list[CheckMessage]:
    from django.db import DEFAULT_DB_ALIAS, connections

    from .store import BACKENDS

    vendor = connections[DEFAULT_DB_ALIAS].vendor
    value = conf.STORE
    if value == "auto" or value == "orm" or (value in BACKENDS and value == vendor):
        return []
    return [
        Error(
            f"TASKHUB_STORE must be 'auto', 'orm' or this database's own backend, not {value!r}.",
            hint=f"The database is {vendor}; 'auto' picks its fast backend when TaskHub has one.",
            id="taskhub.E010",
        )
    ]
