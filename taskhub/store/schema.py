"""TaskHub's tables as the store sees them, derived from the models' ``_meta``.

Nothing here names a column: every field list is the model's concrete fields, in the
model's order, and every join follows a relation the model declares. A column added to a
model (with its migration) is read, inserted and converted by every backend without a
change here (``tests/test_store.py`` adds one in the middle of ``TaskRecord``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from django.db.models import Field, ForeignKey, Model
from django.utils import timezone

from taskhub.models import Assignment, Instance, Subscription, TaskRecord


@dataclass(frozen=True)
class Table:
    """One model's table: its concrete fields in the model's order."""

    model: type[Model]
    name: str
    fields: tuple[Field[Any, Any], ...]
    #: The fields' attribute names (``publisher_id`` for the ``publisher`` relation).
    attnames: tuple[str, ...]
    #: The fields an insert writes: all but an auto-incremented primary key, generated
    #: columns and those with a database default (the database fills them).
    inserted: tuple[Field[Any, Any], ...]
    #: Fields whose ``pre_save`` gives the value to insert (``auto_now`` and the like).
    pre_saved: frozenset[str]

    def field(self, attname: str) -> Field[Any, Any]:
        """The field whose attribute is ``attname``."""
        return _by_attname(self.model)[attname]

    def value(self, row: dict[str, Any], field: Field[Any, Any]) -> Any:
        """The value to insert for ``field`` from ``row`` (by attribute name): the row's,
        else the field's default; ``auto_now`` fields get the field's own."""
        if field.attname in self.pre_saved and (getattr(field, "auto_now", False) or row.get(field.attname) is None):
            return timezone.now()  # what the field's pre_save gives
        return row[field.attname] if field.attname in row else field.get_default()


@functools.cache
def _by_attname(model: type[Model]) -> dict[str, Field[Any, Any]]:
    return {f.attname: f for f in model._meta.concrete_fields}


@functools.cache
def table(model: type[Model]) -> Table:
    """The table of ``model``, built on first use."""
    fields = tuple(model._meta.concrete_fields)
    pk = model._meta.pk
    auto = pk is not None and pk.get_internal_type() in ("AutoField", "BigAutoField", "SmallAutoField")
    return Table(
        model=model,
        name=model._meta.db_table,
        fields=fields,
        attnames=tuple(f.attname for f in fields),
        inserted=tuple(f for f in fields if not (auto and f is pk) and not _filled_by_database(f)),
        pre_saved=frozenset(
            f.attname for f in fields if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
        ),
    )


def _filled_by_database(field: Field[Any, Any]) -> bool:
    """A generated column, or one with a database default."""
    return bool(getattr(field, "generated", False)) or field.has_db_default()


@dataclass(frozen=True)
class Join:
    """A relation as a join: ``local`` column of the model to ``remote`` column of ``target``."""

    target: Table
    local: str
    remote: str


def join(model: type[Model], relation: str) -> Join:
    """The join that follows the foreign key ``relation`` of ``model``."""
    field = model._meta.get_field(relation)
    assert isinstance(field, ForeignKey), f"{model.__name__}.{relation} is not a relation"
    target = field.target_field
    return Join(table(field.related_model), str(field.column), str(target.column))


# The tables the hot path reads and writes.
def tasks() -> Table:
    return table(TaskRecord)


def assignments() -> Table:
    return table(Assignment)


def instances() -> Table:
    return table(Instance)


def subscriptions() -> Table:
    return table(Subscription)
