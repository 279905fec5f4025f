"""TaskHub's tables: credentials, tasks with their append-only event log, assignments,
and the live instances (connections) with their subscriptions.

The database is the truth: every transition of a task is written at the version it read
(``TaskRecord.version``), so it happens once whatever other hub processes do
(:mod:`taskhub.services.transitions`); the channel layer only carries notices after the
write.
"""

from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models

from .core.actions import validate_pattern
from .core.codes import EventKind, FailureReason
from .core.states import AssignmentState, TaskStatus


def validate_patterns(value: object) -> None:
    """Model validator: a list of valid permission patterns."""
    if not isinstance(value, list):
        raise ValidationError("Enter a list of permission patterns.")
    for pattern in value:
        try:
            validate_pattern(pattern)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


InstanceLink = models.ForeignKey["Instance | None", "Instance | None"]


def instance_link(column: str, related_name: str, help_text: str) -> InstanceLink:
    """A link to an :class:`Instance` that outlives it: no constraint, since instances come
    and go (a disconnect deletes the row) while tasks stay, and no index of its own. The
    ORM and the store join through it to find an instance's channel while it is there."""
    return models.ForeignKey(
        "Instance",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        db_column=column,
        related_name=related_name,
        help_text=help_text,
    )


class Credential(models.Model):
    """A service's name and key, with what it may subscribe to and publish."""

    name = models.CharField(
        max_length=100,
        unique=True,
        validators=[RegexValidator(r"^[A-Za-z0-9._-]+$", "Use letters, digits, '.', '_' and '-'.")],
        help_text="The service's name, sent with its key when it connects.",
    )
    key_hash = models.CharField(max_length=200, help_text="Salted SHA-256 of the key; the key itself is never stored.")
    sub_permissions = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_patterns],
        help_text="Patterns of actions this service may subscribe to: mail:send, mail (a namespace), mail:*, *.",
    )
    pub_permissions = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_patterns],
        help_text="Patterns of actions this service may publish tasks on.",
    )
    max_instances = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="How many connections of this service may be live at once, across all hub processes.",
    )
    is_active = models.BooleanField(default=True, help_text="Disabling a credential disconnects its instances.")
    description = models.TextField(blank=True, help_text="What this service is, for operators.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class TaskRecord(models.Model):
    """One task: what was asked, where it is in its lifecycle, and how it ended."""

    id = models.UUIDField(
        primary_key=True, default=uuid.uuid4, editable=False, help_text="The task id (caller-chosen or generated)."
    )
    action = models.CharField(max_length=200, help_text="The action the task was published on.")
    publisher = models.ForeignKey(
        Credential,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="published_tasks",
        help_text="The credential that published the task.",
    )
    publisher_name = models.CharField(
        max_length=100, help_text="The publisher's name (kept if the credential is deleted)."
    )
    publisher_instance = instance_link(
        "publisher_instance",
        "+",
        "The instance (connection) that published the task: its events go there while it is connected.",
    )
    payload = models.JSONField(null=True, blank=True, help_text="The task's input.")
    payload_size = models.PositiveIntegerField(default=0, help_text="Size of the JSON-encoded payload in bytes.")
    status = models.CharField(
        max_length=20,
        choices={s.value: s.name.title() for s in TaskStatus},
        default=TaskStatus.PENDING,
        help_text="Where the task is in its lifecycle.",
    )
    result = models.JSONField(null=True, blank=True, help_text="The result returned by the first service to return.")
    has_result = models.BooleanField(default=False, help_text="Whether a service returned a result (it may be null).")
    failure_reason = models.CharField(
        max_length=40,
        blank=True,
        choices={r.value: r.value for r in FailureReason},
        help_text="Why the task failed (empty unless it failed).",
    )
    failure_detail = models.TextField(blank=True, help_text="The failure's detail, e.g. the worker's error text.")
    attempt = models.PositiveIntegerField(default=1, help_text="The current attempt, counted from 1.")
    progress = models.FloatField(
        null=True, blank=True, help_text="The latest progress fraction (0 to 1) a service reported."
    )
    pickup_timeout = models.FloatField(
        null=True, blank=True, help_text="Seconds to wait for a subscriber and for a pickup; empty: forever."
    )
    complete_timeout = models.FloatField(
        null=True, blank=True, help_text="Seconds a picked-up task may run; empty: forever."
    )
    heartbeat_timeout = models.FloatField(
        null=True,
        blank=True,
        help_text="Seconds a picked-up task may go without an update or a touch; empty: no limit.",
    )
    retries = models.IntegerField(default=0, help_text="How many times a failed attempt is retried; -1: for ever.")
    retry_backoff = models.FloatField(
        default=1.0, help_text="Seconds before the first retry; each later one waits twice as long (capped)."
    )
    pickup_deadline = models.DateTimeField(null=True, blank=True, help_text="When the pickup timeout passes.")
    complete_deadline = models.DateTimeField(null=True, blank=True, help_text="When the complete timeout passes.")
    heartbeat_deadline = models.DateTimeField(
        null=True, blank=True, help_text="When the heartbeat timeout passes, unless a service updates or touches."
    )
    retry_at = models.DateTimeField(null=True, blank=True, help_text="When the next attempt may be offered.")
    autoremove = models.BooleanField(
        default=False,
        help_text="Whether the task is deleted, events and all, once it succeeded and its result "
        "reached the publisher (wsq's autoremove).",
    )
    deadline = models.DateTimeField(
        null=True, blank=True, help_text="The next moment a sweeper must look at this task."
    )
    version = models.PositiveIntegerField(default=0, help_text="Bumped by every transition; guards concurrent updates.")
    relayed_version = models.PositiveIntegerField(
        default=0,
        help_text="The version of the last transition that sent task events to listeners: each "
        "relay carries the one before it, so that a connection sees it missed one.",
    )
    created_at = models.DateTimeField(help_text="When the task was published.")
    started_at = models.DateTimeField(null=True, blank=True, help_text="When it was first offered to a service.")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When it succeeded, failed or ended.")
    watched = models.BooleanField(
        default=False,
        help_text="Whether a connection watched the task: its events then also go to the task's "
        "channel-layer group, which holds its watchers.",
    )

    class Meta:
        verbose_name = "task"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["action", "status", "created_at"], name="taskhub_task_action_status"),
            models.Index(fields=["deadline"], name="taskhub_task_deadline", condition=models.Q(deadline__isnull=False)),
            models.Index(fields=["status", "-created_at"], name="taskhub_task_status_created"),
            models.Index(fields=["publisher_name", "-created_at"], name="taskhub_task_publisher"),
            models.Index(fields=["-created_at"], name="taskhub_task_created"),
            # Retention: the oldest finished tasks of a status first.
            models.Index(
                fields=["status", "finished_at"],
                name="taskhub_task_finished",
                condition=models.Q(finished_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.id}"


class TaskEvent(models.Model):
    """One step in a task's life. Append-only: rows are written, never changed."""

    # No index of its own: taskhub_event_task (task, id) serves look-ups by task, and
    # every index is one more page written per event.
    task = models.ForeignKey(
        TaskRecord, on_delete=models.CASCADE, related_name="events", db_index=False, help_text="The task."
    )
    kind = models.CharField(
        max_length=20,
        choices={k.value: k.value for k in EventKind},
        help_text='What happened (docs/protocol.md, "Events").',
    )
    service = models.CharField(max_length=100, blank=True, help_text="The service the event concerns, if any.")
    instance = models.UUIDField(null=True, blank=True, help_text="The instance (connection) involved, if any.")
    attempt = models.PositiveIntegerField(default=1, help_text="The attempt the event belongs to.")
    data = models.JSONField(null=True, blank=True, help_text="The event's data: update data, result, failure reason.")
    ref = models.CharField(
        max_length=100,
        blank=True,
        default="",
        help_text="The ref of the client command that caused it: a command sent again after a reconnect "
        "is not applied twice.",
    )
    created_at = models.DateTimeField(help_text="When it happened.")

    class Meta:
        verbose_name = "task event"
        ordering = ["id"]
        indexes = [models.Index(fields=["task", "id"], name="taskhub_event_task")]

    def __str__(self) -> str:
        return f"{self.kind} {self.service}".strip()


class Assignment(models.Model):
    """One service's part in one attempt of a task, held by one of its instances."""

    # No index of its own: taskhub_assignment_unique (task, service, attempt) serves it.
    task = models.ForeignKey(
        TaskRecord, on_delete=models.CASCADE, related_name="assignments", db_index=False, help_text="The task."
    )
    service = models.CharField(max_length=100, help_text="The service's credential name.")
    # taskhub_assignment_instance (instance, state) serves look-ups by instance.
    instance = instance_link(
        "instance", "assignments", "The instance the task was offered to (gone once it disconnected)."
    )
    attempt = models.PositiveIntegerField(default=1, help_text="The attempt this assignment belongs to.")
    state = models.CharField(
        max_length=20,
        choices={s.value: s.name.replace("_", " ").title() for s in AssignmentState},
        default=AssignmentState.OFFERED,
        help_text="Where this service is with the task.",
    )
    detail = models.TextField(blank=True, help_text="The service's error text, or why the hub gave up on it.")
    created_at = models.DateTimeField(help_text="When the task was offered.")
    updated_at = models.DateTimeField(help_text="When the state last changed.")

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["task", "service", "attempt"], name="taskhub_assignment_unique")]
        indexes = [models.Index(fields=["instance", "state"], name="taskhub_assignment_instance")]

    def __str__(self) -> str:
        return f"{self.service} #{self.attempt}: {self.state}"


class Instance(models.Model):
    """A live connection of a service. Its lease is renewed by its hub process."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    credential = models.ForeignKey(
        Credential, on_delete=models.CASCADE, related_name="instances", help_text="The service."
    )
    channel_name = models.CharField(max_length=200, help_text="The connection's channel-layer channel.")
    process = models.CharField(max_length=100, help_text="The hub process serving the connection (host:pid:nonce).")
    remote_addr = models.CharField(max_length=100, blank=True, help_text="The client's address.")
    connected_at = models.DateTimeField(help_text="When the instance authenticated.")
    lease_expires_at = models.DateTimeField(help_text="The instance counts as live until then.")
    last_assigned_at = models.DateTimeField(
        null=True, blank=True, help_text="When it was last given a task (least recently assigned goes next)."
    )
    resume_hash = models.CharField(
        max_length=100, blank=True, help_text="SHA-256 of the secret of its resume token (the token is never stored)."
    )
    detached_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When its connection went without a bye: it may resume until the resume grace has passed.",
    )
    concurrency = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most unfinished tasks offered to it at once; empty: no limit."
    )

    class Meta:
        ordering = ["connected_at"]
        indexes = [
            models.Index(fields=["lease_expires_at"], name="taskhub_instance_lease"),
            models.Index(
                fields=["detached_at"], name="taskhub_instance_detached", condition=models.Q(detached_at__isnull=False)
            ),
            models.Index(fields=["process"], name="taskhub_instance_process"),
            models.Index(fields=["credential", "lease_expires_at"], name="taskhub_instance_credential"),
        ]

    def __str__(self) -> str:
        return f"{self.credential} {self.id}"


class Subscription(models.Model):
    """An instance's subscription to an action."""

    instance = models.ForeignKey(
        Instance, on_delete=models.CASCADE, related_name="subscriptions", help_text="The instance."
    )
    action = models.CharField(max_length=200, help_text="The action subscribed to.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["instance", "action"], name="taskhub_subscription_unique")]
        indexes = [models.Index(fields=["action"], name="taskhub_subscription_action")]

    def __str__(self) -> str:
        return self.action


class Monitor(models.Model):
    """A live monitor: a staff user's read-only connection (the dashboard).

    While one is live anywhere, every hub process sends every task transition to the
    monitors' channel-layer group; each process reads this table at most once a second
    to know (:func:`taskhub.services.routing.monitored`). Its connection renews its lease;
    a process that dies leaves rows that lapse on their own.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.CharField(max_length=150, help_text="The staff user's name.")
    channel_name = models.CharField(max_length=200, help_text="The connection's channel-layer channel.")
    process = models.CharField(max_length=100, help_text="The hub process serving the connection (host:pid:nonce).")
    remote_addr = models.CharField(max_length=100, blank=True, help_text="The client's address.")
    connected_at = models.DateTimeField(help_text="When the monitor was welcomed.")
    lease_expires_at = models.DateTimeField(help_text="The monitor counts as live until then.")

    class Meta:
        ordering = ["connected_at"]
        indexes = [models.Index(fields=["lease_expires_at"], name="taskhub_monitor_lease")]

    def __str__(self) -> str:
        return f"{self.user} {self.id}"
