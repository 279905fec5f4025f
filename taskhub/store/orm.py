"""The reference store: every query with the ORM.

It runs on any database Django supports, and it is what the faster backends are
compared with: the services and race tests run against each backend and this one. Its
transitions lock on read (``SELECT ... FOR UPDATE`` where the database has it), so the
caller runs each in ``transaction.atomic()``.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Count, F, OuterRef, Subquery
from django.db.models.functions import Coalesce

from taskhub.core.states import HELD_ASSIGNMENT_STATES
from taskhub.models import Assignment, Instance, Subscription, TaskEvent, TaskRecord

from .base import TERMINAL, AssignmentRow, Changes, LoadedTask, Store, Subscriber, Written

HELD = [state.value for state in HELD_ASSIGNMENT_STATES]


class OrmStore(Store):
    def __init__(self, conn: BaseDatabaseWrapper) -> None:
        self.alias = conn.alias

    def load_task(
        self, task_id: uuid.UUID | str, *, with_payload: bool = False, service: str | None = None, lock: bool = True
    ) -> LoadedTask | None:
        pk = self.parse_id(task_id)
        if pk is None:
            return None
        tasks = TaskRecord.objects.using(self.alias).filter(pk=pk)
        features = connections[self.alias].features
        if lock and features.has_select_for_update:
            # Only the task's row: the publisher's instance may be missing (outer join).
            tasks = tasks.select_for_update(of=("self",) if features.has_select_for_update_of else ())
        if not with_payload:
            tasks = tasks.defer("payload")
        record = tasks.annotate(publisher_channel=F("publisher_instance__channel_name")).first()
        if record is None:
            return None
        if not with_payload:
            record.payload = None
        rows = Assignment.objects.using(self.alias).filter(task_id=pk)
        if service is not None and record.status in TERMINAL:
            rows = rows.filter(service=service)
        assignments = [
            AssignmentRow(*row)
            for row in rows.order_by("id").values_list(
                "id", "service", "instance_id", "attempt", "state", "detail", "instance__channel_name"
            )
        ]
        return LoadedTask(record, assignments, record.publisher_channel)

    def write_transition(self, changes: Changes) -> Written | None:
        record, now = changes.record, changes.now
        if changes.fields is None:
            record.save(force_insert=True, using=self.alias)
        elif changes.fields:
            moved = (
                TaskRecord.objects.using(self.alias)
                .filter(pk=record.pk, version=record.version)
                .update(**changes.fields)
            )
            if not moved:
                return None
        for pk, state, detail, instance in changes.assignment_updates:
            Assignment.objects.using(self.alias).filter(pk=pk).update(
                state=state, detail=detail, instance_id=instance, updated_at=now
            )
        if changes.new_assignments:
            Assignment.objects.using(self.alias).bulk_create([Assignment(**row) for row in changes.new_assignments])
        events = TaskEvent.objects.using(self.alias).bulk_create([TaskEvent(**row) for row in changes.events])
        if changes.assigned:
            Instance.objects.using(self.alias).filter(pk__in=changes.assigned).update(last_assigned_at=now)
        ids = [e.pk for e in events]
        if None in ids:  # a database that returns no inserted ids (MySQL): ours are the task's last, under its lock
            latest = TaskEvent.objects.using(self.alias).filter(task_id=record.pk).order_by("-id")
            ids = list(latest.values_list("id", flat=True)[: len(events)])[::-1]
        return Written(event_ids=tuple(ids))

    def live_subscribers(self, action: str, now: datetime) -> list[Subscriber]:
        held = (
            Assignment.objects.using(self.alias)
            .filter(instance=OuterRef("instance_id"), state__in=HELD)
            .values("instance")
            .annotate(n=Count("id"))
            .values("n")
        )
        rows = (
            Subscription.objects.using(self.alias)
            .filter(
                action=action,
                instance__lease_expires_at__gt=now,
                instance__detached_at__isnull=True,
                instance__credential__is_active=True,
            )
            .annotate(held=Coalesce(Subquery(held), 0))
            .order_by(F("instance__last_assigned_at").asc(nulls_first=True), "instance__connected_at")
            .values_list(
                "instance_id",
                "instance__channel_name",
                "instance__credential_id",
                "instance__credential__name",
                "instance__credential__sub_permissions",
                "instance__concurrency",
                "held",
            )
        )
        return [
            Subscriber(
                instance,
                channel,
                credential,
                name,
                patterns,
                concurrency is not None and held >= concurrency,
                concurrency is not None,
            )
            for instance, channel, credential, name, patterns, concurrency, held in rows
        ]
