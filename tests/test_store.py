"""The hot path's own value preparation gives the driver what Django's fields give it."""

from __future__ import annotations

import uuid
import warnings
import zoneinfo
from datetime import timedelta
from datetime import timezone as dt_timezone

import pytest
from django.db import connection
from django.utils import timezone

from taskhub import store
from taskhub.models import Assignment, Instance, TaskEvent, TaskRecord

pytestmark = pytest.mark.django_db

NOW = timezone.now()
VALUES = {
    "DateTimeField": [
        NOW,
        NOW + timedelta(seconds=30),
        NOW.replace(microsecond=0),  # str() drops the microseconds: the field does too
        NOW.astimezone(zoneinfo.ZoneInfo("Europe/Paris")),  # aware, not UTC
        NOW.astimezone(dt_timezone(timedelta(hours=-5))),
        NOW.replace(tzinfo=None),  # naive: the field warns
        "2026-11-23T10:00:00+00:00",
        None,
    ],
    "UUIDField": [uuid.uuid4(), str(uuid.uuid4()), uuid.uuid4().hex, None],
    "CharField": ["mail:send", "", None, 5],
    "PositiveIntegerField": [0, 7, True, "3", None],
    "FloatField": [0.5, 1, "0.25", None],
    "BooleanField": [True, False, 1, None],
}
FIELDS = [
    (TaskRecord, "created_at"),
    (TaskRecord, "deadline"),
    (TaskRecord, "id"),
    (TaskRecord, "action"),
    (TaskRecord, "attempt"),
    (TaskRecord, "progress"),
    (TaskRecord, "watched"),
    (Assignment, "updated_at"),
    (Assignment, "instance"),
    (TaskEvent, "instance"),
    (Instance, "lease_expires_at"),
]


@pytest.mark.parametrize(("model", "name"), FIELDS, ids=[f"{m.__name__}.{n}" for m, n in FIELDS])
def test_the_hot_path_prepares_values_as_the_field_does(model, name):
    field = model._meta.get_field(name)
    prep = store.statements().prep(model, name)
    for value in VALUES[field.get_internal_type()]:
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = field.get_db_prep_save(value, connection=connection)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            got = prep(value)
        assert (type(got), got) == (type(expected), expected), value
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs], value


def test_the_shortcuts_are_taken_for_the_hot_paths_own_values():
    """Guards the point of the shortcuts: the field's machinery is not called for them."""
    st = store.statements()
    fields = {(m, n): m._meta.get_field(n) for m, n in FIELDS}
    calls = []
    for field in fields.values():
        field.get_db_prep_save = lambda value, connection, calls=calls: calls.append(value)  # type: ignore[method-assign]
    try:
        fresh = store.Statements(connection)
        for value in (NOW, NOW + timedelta(seconds=1)):
            fresh.prep(TaskRecord, "created_at")(value)
        fresh.prep(TaskRecord, "id")(uuid.uuid4())
        fresh.prep(TaskRecord, "action")("mail:send")
    finally:
        for field in fields.values():
            del field.get_db_prep_save
    assert calls == []
    assert st is store.statements()  # the connection's own statements are untouched
