"""Values between Python and the driver, converted exactly as the model fields do.

The SQL backends send values through :meth:`Values.prep` (the field's
``get_db_prep_save``) and read them back through :class:`Reader` (the converters the
ORM's compiler applies), so that rows they read equal rows the ORM reads
(``tests/test_store.py`` compares them).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

Prep = Callable[[Any], Any]

# Field types whose values of this exact Python type reach the driver unchanged.
_NATIVE: dict[str, type] = {"CharField": str, "TextField": str, "FloatField": float, "BooleanField": bool}
# Integer field types: an int goes through the backend's integer adapter only.
_INTEGERS = {
    "IntegerField": "IntegerField",
    "PositiveIntegerField": "PositiveIntegerField",
    "BigIntegerField": "BigIntegerField",
    "SmallIntegerField": "SmallIntegerField",
    # An auto field's values are its integer type's.
    "AutoField": "IntegerField",
    "BigAutoField": "BigIntegerField",
    "SmallAutoField": "SmallIntegerField",
}


class Reader:
    """Turns a row of ``fields``' columns into Python values, with the compiler's converters."""

    def __init__(self, conn: BaseDatabaseWrapper, fields: Sequence[Field[Any, Any]]) -> None:
        self.conn = conn
        self.columns = []
        for field in fields:
            col = field.get_col(field.model._meta.db_table)
            converters = conn.ops.get_db_converters(col) + col.get_db_converters(conn)
            self.columns.append((col, converters))

    def __call__(self, row: Sequence[Any]) -> list[Any]:
        """The row's values, converted, in column order."""
        values = []
        conn = self.conn
        for value, (col, converters) in zip(row, self.columns, strict=True):
            for convert in converters:
                value = convert(value, col, conn)
            values.append(value)
        return values


class Values:
    """Value preparation for one database connection, cached per field."""

    def __init__(self, conn: BaseDatabaseWrapper) -> None:
        self.conn = conn
        # By the field's id: a Field's own hash is computed in Python on every look-up,
        # and a transition looks up some thirty. Fields live as long as their models.
        self._prep: dict[int, Prep] = {}
        self._named: dict[tuple[type[Model], str], Prep] = {}

    def named(self, model: type[Model], attname: str) -> Prep:
        """:meth:`prep` of the field whose attribute is ``attname``; the hot path's way."""
        key = (model, attname)
        found = self._named.get(key)
        if found is None:
            field = next(f for f in model._meta.concrete_fields if f.attname == attname)
            found = self._named[key] = self.prep(field)
        return found

    def prep(self, field: Field[Any, Any]) -> Prep:
        """The field's ``get_db_prep_save`` bound to this connection, with a shortcut for
        the values the hot path passes (see :meth:`_shortcut`)."""
        found = self._prep.get(id(field))
        if found is None:
            slow = functools.partial(field.get_db_prep_save, connection=self.conn)
            # A foreign key's value is prepared as its target's.
            kind = (field.target_field if field.is_relation else field).get_internal_type()  # type: ignore[attr-defined]
            found = self._prep[id(field)] = self._shortcut(kind, slow) or slow
        return found

    def _shortcut(self, kind: str, slow: Prep) -> Prep | None:
        """What the field would give for its common value, without its machinery.

        A transition prepares some twenty datetimes and UUIDs, and Django's path for
        each (``get_prep_value``, the backend's adapter, ``make_naive``, settings look-ups)
        was a tenth of the services layer's CPU. Each shortcut gives exactly what the
        field gives (a test compares them) and hands anything else to the field.
        """
        native = _NATIVE.get(kind)
        if native is not None:
            # A value of the field's own Python type reaches the driver unchanged.
            return lambda value: value if type(value) is native else slow(value)
        if kind in _INTEGERS:
            # What the backend makes of an int: itself, or psycopg's Int4 and Int8 on
            # PostgreSQL, which keep a prepared statement's parameter types stable.
            wrap = type(self.conn.ops.adapt_integerfield_value(1, _INTEGERS[kind]))
            if wrap is int:
                return lambda value: value if type(value) is int else slow(value)
            return lambda value: wrap(value) if type(value) is int else slow(value)
        if kind == "UUIDField":
            if self.conn.features.has_native_uuid_field:
                return lambda value: value if type(value) is uuid.UUID else slow(value)
            return lambda value: value.hex if type(value) is uuid.UUID else slow(value)
        tz = self.conn.timezone  # None without USE_TZ: naive datetimes, no shortcut
        if kind == "DateTimeField" and tz is not None:
            if self.conn.vendor == "postgresql":  # psycopg adapts aware datetimes itself
                return lambda value: value if type(value) is datetime and value.tzinfo is not None else slow(value)
            if self.conn.vendor == "sqlite":  # naive text in the connection's time zone
                return lambda value: (
                    str(value.replace(tzinfo=None)) if type(value) is datetime and value.tzinfo is tz else slow(value)
                )
        return None
