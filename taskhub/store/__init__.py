"""The hot path's database access: one interface, several backends.

In the manner of ``django.contrib.sessions.backends``: :class:`~.base.Store` says what a
task transition needs from the database, :class:`~.orm.OrmStore` does it with the ORM
(the reference, and the backend for databases without a faster one), and
:class:`~.sqlite.SqliteStore` and :class:`~.postgresql.PostgresStore` do the same with
fewer statements. ``TASKHUB_STORE`` chooses: ``"auto"`` (the fast backend of the
database, else the ORM's) or ``"orm"``.

============  ==========================================================
module        job
============  ==========================================================
base          the interface and the rows it exchanges
schema        tables, columns and joins, derived from the models' ``_meta``
values        values converted as the model fields convert them
orm           the reference backend
sql           the statements the fast backends share
sqlite        SQLite: the statements in order, under the write lock
postgresql    PostgreSQL: lock-free reads and one fenced statement per write
============  ==========================================================
"""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, connections

from taskhub.conf import conf

from .base import AssignmentRow, Changes, LoadedTask, Store, Subscriber, Written

__all__ = ["AssignmentRow", "Changes", "LoadedTask", "Store", "Subscriber", "Written", "get_store"]

#: The backends ``TASKHUB_STORE`` may name besides ``"auto"``.
BACKENDS = ("orm", "sqlite", "postgresql")


def get_store() -> Store:
    """The store of this thread's default connection, built on first use.

    It is kept on the connection wrapper: its statements and converters belong to that
    connection, and go with it.
    """
    conn = connections[DEFAULT_DB_ALIAS]
    name = conf.STORE
    if name == "auto":
        name = conn.vendor if conn.vendor in ("sqlite", "postgresql") else "orm"
    stores: dict[str, Store] = conn.__dict__.setdefault("_taskhub_stores", {})
    found = stores.get(name)
    if found is None:
        found = stores[name] = _build(name, conn)
    return found


def _build(name: str, conn: object) -> Store:
    from django.db.backends.base.base import BaseDatabaseWrapper

    assert isinstance(conn, BaseDatabaseWrapper)
    if name == "orm":
        from .orm import OrmStore

        return OrmStore(conn)
    if name != conn.vendor:
        raise ValueError(f"TASKHUB_STORE={name!r} does not fit this {conn.vendor} database")
    if name == "sqlite":
        from .sqlite import SqliteStore

        return SqliteStore(conn)
    from .postgresql import PostgresStore

    return PostgresStore(conn)
