"""The hub's database threads (taskhub.db)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from django.db import connection
from django.test import override_settings

from taskhub import db
from taskhub.models import Credential

from .conftest import make_credential

pytestmark = pytest.mark.django_db(transaction=True)


async def test_calls_run_on_a_database_thread_and_return_or_raise():
    assert (await db.run(threading.current_thread)).name.startswith("taskhub-db")
    assert await db.run(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        await db.run(lambda: 1 / 0)


async def test_work_done_on_a_database_thread_is_committed():
    await db.run(make_credential, "svc")
    assert await db.run(lambda: Credential.objects.filter(name="svc").exists())


def test_one_thread_on_sqlite_eight_elsewhere_unless_set():
    assert db.thread_count() == (1 if connection.vendor == "sqlite" else db.DEFAULT_THREADS)
    with override_settings(TASKHUB_DB_THREADS=3):
        assert db.thread_count() == 3


@override_settings(TASKHUB_DB_THREADS=3)
async def test_several_threads_when_configured():
    barrier = threading.Barrier(3, timeout=5)

    def meet() -> str:
        barrier.wait()  # only passes if three calls run at once
        return threading.current_thread().name

    names = await asyncio.gather(*(db.run(meet) for _ in range(3)))
    assert len(set(names)) == 3


async def test_shutdown_closes_connections_and_later_calls_start_new_threads():
    def connected() -> bool:
        Credential.objects.exists()
        return connection.connection is not None

    assert await db.run(connected)
    first = await db.run(threading.current_thread)
    db.shutdown()
    assert not first.is_alive()
    assert await db.run(connected)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="WAL checkpoints are SQLite's")
async def test_sqlite_hub_threads_leave_checkpoints_to_the_checkpointer():
    def autocheckpoint() -> int:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_autocheckpoint")
            return int(cursor.fetchone()[0])

    assert await db.run(autocheckpoint) == 0
    assert await asyncio.to_thread(autocheckpoint) > 0  # other connections (manage.py, admin) keep SQLite's default
    await db.run(make_credential, "svc")
    busy, frames, done = await db.run(db.checkpoint)
    assert (busy, done) == (0, frames)
