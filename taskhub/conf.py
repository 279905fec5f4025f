"""TaskHub's settings, read from Django settings on access.

Reading on access (not at import) keeps ``override_settings`` working in tests. A value
read is remembered until Django's ``setting_changed`` signal says a ``TASKHUB_`` setting
changed (``override_settings`` and pytest-django's ``settings`` send it; deleting a
setting with ``del settings.X`` sends nothing, so override it instead): the hot path
reads a few settings per message, and Django's look-up of a setting left at its default
raises and catches an ``AttributeError`` each time (~10 µs). Each property documents its
unit and default; :mod:`taskhub.checks` validates them.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # Seconds a task waits for a subscriber, and then for a service to pick it up; None: forever.
    "PICKUP_TIMEOUT": 30.0,
    # Seconds a picked-up task may run before it fails with complete_timeout; None: forever.
    "COMPLETE_TIMEOUT": 300.0,
    # Bytes: the largest text frame the hub answers; larger ones get a message_too_large
    # error. Keep it below daphne's --websocket_max_message_size (1 MiB by default), over
    # which daphne drops the connection without a close frame.
    "MAX_MESSAGE_SIZE": 768 * 1024,
    # Bytes: the largest JSON-encoded payload, result or update data.
    "MAX_PAYLOAD_SIZE": 512 * 1024,
    # Bytes: payloads up to this size travel inline in the offer; larger ones via get_payload.
    "INLINE_PAYLOAD_SIZE": 16 * 1024,
    # Seconds an instance's lease lasts; its process renews it on every sweep. A crashed
    # process's instances stop getting tasks, and hand theirs over, after this.
    "INSTANCE_LEASE": 10.0,
    # Seconds a connection that went without a bye may take its instance back (resume),
    # tasks included; after this its tasks go to another instance of the service.
    "RESUME_GRACE": 10.0,
    # Seconds: the longest wait before a retry (the backoff doubles up to it).
    "RETRY_BACKOFF_MAX": 60.0,
    # Seconds between two runs of each process's sweeper (deadlines, leases).
    "SWEEP_INTERVAL": 1.0,
    # Seconds a connection without handshake credentials has to send its hello.
    "AUTH_TIMEOUT": 10.0,
    # Failed authentications allowed per client address, and per credential name, within
    # AUTH_FAILURE_WINDOW seconds; beyond, hello is refused with too_many_attempts.
    "AUTH_FAILURES": 10,
    "AUTH_FAILURE_WINDOW": 60.0,
    # Bytes the hub queues for a client that does not read its socket (over what the
    # socket buffers hold) before it closes the connection with code 4008.
    "MAX_BUFFERED_BYTES": 8 * 1024 * 1024,
    # Frames read from a client and not yet handled; beyond, the hub stops reading that
    # client's socket until it catches up (TCP then slows the client down).
    "MAX_QUEUED_FRAMES": 16,
    # Threads per process that run database work; None: 1 on SQLite (one writer), else 8.
    "DB_THREADS": None,
    # On SQLite, run database work on the event loop's thread while the database thread
    # is idle (taskhub/db.py); False: always on the database thread.
    "SQLITE_INLINE": True,
    # On PostgreSQL, prepare the hot path's statements once per connection. False for a
    # pooler that cannot carry prepared statements (PgBouncer in transaction mode < 1.21).
    "PREPARED_STATEMENTS": True,
    # The hot path's database backend (taskhub/store): "auto" (SQLite's or PostgreSQL's
    # own, else the ORM's) or "orm" (the reference, on any database).
    "STORE": "auto",
    # Seconds a succeeded or ended (KEEP_SUCCEEDED) or failed (KEEP_FAILED) task is kept
    # after it ended, with its payload and events; the sweepers delete older ones. None: forever.
    "KEEP_SUCCEEDED": None,
    "KEEP_FAILED": None,
    # Tasks deleted per statement by retention and taskhub_purge (short transactions).
    "PURGE_BATCH": 100,
    # A bearer token that may read /taskhub/metrics besides staff sessions; None: staff only.
    "METRICS_TOKEN": None,
}


class Settings:
    """``conf.PICKUP_TIMEOUT`` reads ``settings.TASKHUB_PICKUP_TIMEOUT`` or its default."""

    def __getattr__(self, name: str) -> Any:
        # Called only for names not yet remembered in the instance's __dict__.
        if name not in DEFAULTS:
            raise AttributeError(f"unknown TaskHub setting {name!r}")
        value = self.__dict__[name] = getattr(settings, f"TASKHUB_{name}", DEFAULTS[name])
        return value

    def forget(self) -> None:
        """Read every setting afresh on its next access."""
        self.__dict__.clear()

    PICKUP_TIMEOUT: float | None
    COMPLETE_TIMEOUT: float | None
    MAX_MESSAGE_SIZE: int
    MAX_PAYLOAD_SIZE: int
    INLINE_PAYLOAD_SIZE: int
    INSTANCE_LEASE: float
    RESUME_GRACE: float
    RETRY_BACKOFF_MAX: float
    SWEEP_INTERVAL: float
    AUTH_TIMEOUT: float
    AUTH_FAILURES: int
    AUTH_FAILURE_WINDOW: float
    MAX_BUFFERED_BYTES: int
    MAX_QUEUED_FRAMES: int
    DB_THREADS: int | None
    PREPARED_STATEMENTS: bool
    SQLITE_INLINE: bool
    STORE: str
    KEEP_SUCCEEDED: float | None
    KEEP_FAILED: float | None
    PURGE_BATCH: int
    METRICS_TOKEN: str | None


conf = Settings()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting.startswith("TASKHUB_"):
        conf.forget()


setting_changed.connect(_setting_changed, dispatch_uid="taskhub.conf.setting_changed")
