"""Django admin for operators: credentials, the task history, live instances.

The task and instance actions (retry, cancel, disconnect) go through the services layer,
as a client's commands do, and tell the connections concerned over the channel layer:
they work from any hub process, or from a separate admin-only process on the same
database and channel layer.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django import forms
from django.contrib import admin, messages
from django.db.models import Count, F, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template import engines
from django.template.backends.django import DjangoTemplates
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html

from . import services
from .auth import MIN_KEY_LENGTH, generate_key, hash_key
from .core.errors import ProtocolError
from .models import Assignment, Credential, Instance, TaskEvent, TaskRecord, validate_patterns
from .notify import send_notices

#: The request attribute that holds a key generated while saving, until the response shows it.
_GENERATED_KEY = "_taskhub_generated_key"


class PatternsField(forms.CharField):
    """A list of permission patterns, edited one per line."""

    widget = forms.Textarea(attrs={"rows": 3, "cols": 40})

    def prepare_value(self, value: Any) -> Any:
        return "\n".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]

    def validate(self, value: Any) -> None:
        validate_patterns(value)


#: The help text of the key field, on the add form and on the change form.
KEY_HELP_ADD = (
    "Leave empty to generate a key: it is shown once, after saving. Or type one of at least "
    f"{MIN_KEY_LENGTH} characters. Only a hash is stored."
)
KEY_HELP_CHANGE = (
    f"Leave empty to keep the current key, or type a new one of at least {MIN_KEY_LENGTH} characters. "
    "Only a hash is stored."
)


class CredentialForm(forms.ModelForm):  # type: ignore[type-arg]
    key = forms.CharField(required=False, min_length=MIN_KEY_LENGTH, widget=forms.PasswordInput(render_value=False))
    regenerate_key = forms.BooleanField(
        required=False, help_text="Replace the key with a new generated one, shown once after saving."
    )
    sub_permissions = PatternsField(required=False, help_text=Credential._meta.get_field("sub_permissions").help_text)
    pub_permissions = PatternsField(required=False, help_text=Credential._meta.get_field("pub_permissions").help_text)

    class Meta:
        model = Credential
        fields = [
            "name",
            "key",
            "regenerate_key",
            "sub_permissions",
            "pub_permissions",
            "max_instances",
            "is_active",
            "description",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An empty key generates one on add, and keeps the current one on change.
        adding = self.instance._state.adding
        self.fields["key"].help_text = KEY_HELP_ADD if adding else KEY_HELP_CHANGE
        if adding:
            self.fields.pop("regenerate_key", None)  # a new credential has no key to replace


#: The page that shows a generated key, as the answer to the save itself: a key in a
#: message would travel in the messages cookie (or the session) to the next page.
KEY_PAGE = """{% extends "admin/base_site.html" %}
{% block title %}{{ title }} | {{ site_title|default:"Django site admin" }}{% endblock %}
{% block breadcrumbs %}<div class="breadcrumbs"><a href="{% url 'admin:index' %}">Home</a>
&rsaquo; <a href="{{ changelist_url }}">Credentials</a> &rsaquo; {{ credential.name }}</div>{% endblock %}
{% block content %}<div id="content-main">
<p>The key of <strong>{{ credential.name }}</strong> is below. Copy it now: it is not shown again,
and only its hash is stored.</p>
<p><code id="credential-key" style="font-size:1.2em;user-select:all">{{ key }}</code></p>
<p><a class="button" href="{{ next_url }}">Continue</a></p>
</div>{% endblock %}
"""


def _key_page(request: HttpRequest, context: dict[str, Any]) -> HttpResponse:
    """The one-time page that shows ``context["key"]``, never cached."""
    engine = next(e for e in engines.all() if isinstance(e, DjangoTemplates))  # the admin needs one
    response = TemplateResponse(request, engine.from_string(KEY_PAGE), context)
    add_never_cache_headers(response)
    return response


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    form = CredentialForm
    list_display = ["name", "is_active", "max_instances", "subscribes", "publishes", "live_instances", "updated_at"]
    list_filter = ["is_active"]
    search_fields = ["name", "description"]
    actions = ["disable", "enable"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Credential]:
        live = Count("instances", filter=Q(instances__lease_expires_at__gt=timezone.now()))
        queryset: QuerySet[Credential] = super().get_queryset(request).annotate(live=live)
        return queryset

    @admin.display(description="sub")
    def subscribes(self, obj: Credential) -> str:
        return ", ".join(obj.sub_permissions) or "-"

    @admin.display(description="pub")
    def publishes(self, obj: Credential) -> str:
        return ", ".join(obj.pub_permissions) or "-"

    @admin.display(description="live instances", ordering="live")
    def live_instances(self, obj: Credential) -> int:
        return getattr(obj, "live", 0)

    def get_fields(self, request: HttpRequest, obj: Credential | None = None) -> Any:
        fields = super().get_fields(request, obj)
        return fields if obj is not None else [f for f in fields if f != "regenerate_key"]

    def save_model(self, request: HttpRequest, obj: Credential, form: Any, change: bool) -> None:
        key = form.cleaned_data.get("key")
        generated = not key and (not change or form.cleaned_data.get("regenerate_key"))
        if generated:
            key = generate_key()
        if key:
            obj.key_hash = hash_key(key)
        super().save_model(request, obj, form, change)
        if generated:
            # Shown by response_add/response_change, in the answer to this request only.
            setattr(request, _GENERATED_KEY, key)

    def response_add(self, request: HttpRequest, obj: Credential, post_url_continue: str | None = None) -> HttpResponse:
        return self._show_key(request, obj, super().response_add(request, obj, post_url_continue))

    def response_change(self, request: HttpRequest, obj: Credential) -> HttpResponse:
        return self._show_key(request, obj, super().response_change(request, obj))

    def _show_key(self, request: HttpRequest, obj: Credential, response: HttpResponse) -> HttpResponse:
        """The page that shows a key generated by this request, leading on to where the
        admin would have gone (``response``'s redirect); else ``response`` itself."""
        key = getattr(request, _GENERATED_KEY, None)
        if key is None:
            return response
        changelist = reverse("admin:taskhub_credential_changelist", current_app=self.admin_site.name)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"The key of {obj.name}",
            "credential": obj,
            "key": key,
            "next_url": response["Location"] if isinstance(response, HttpResponseRedirect) else changelist,
            "changelist_url": changelist,
        }
        return _key_page(request, context)

    @admin.action(description="Disable selected credentials (disconnects their instances)")
    def disable(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        count = queryset.update(is_active=False, updated_at=timezone.now())
        self.message_user(request, f"Disabled {count} credential(s); their instances are disconnected within seconds.")

    @admin.action(description="Enable selected credentials")
    def enable(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        count = queryset.update(is_active=True, updated_at=timezone.now())
        self.message_user(request, f"Enabled {count} credential(s).")


def pretty_json(value: Any) -> str:
    return format_html(
        "<pre style='margin:0;white-space:pre-wrap'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False)
    )


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _tell(notices: list[services.Notice]) -> None:
    """Send what an operator's action changed to the connections concerned (the channel
    layer; the database already has it, so a lost notice is recovered by the sweepers)."""
    if notices:
        async_to_sync(send_notices)(get_channel_layer(), notices)


def _operator(request: HttpRequest) -> str:
    return f"operator {request.user.get_username()}"


def millis(delta: Any) -> str:
    """A duration as milliseconds, to the microsecond: operators read 20 ms tasks."""
    return f"{delta.total_seconds() * 1000:,.3f} ms"


class TaskEventInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = TaskEvent
    fields = readonly_fields = ("at", "offset", "kind", "service", "attempt", "event_data", "instance")
    extra = 0
    can_delete = False
    verbose_name_plural = "timeline"

    @admin.display(description="time (UTC)")
    def at(self, obj: TaskEvent) -> str:
        return obj.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskEvent]:
        # The task's publication time for the offsets, without loading its payload per row.
        events: QuerySet[TaskEvent] = super().get_queryset(request).annotate(task_created_at=F("task__created_at"))
        return events

    @admin.display(description="since init")
    def offset(self, obj: TaskEvent) -> str:
        return "+" + millis(obj.created_at - obj.task_created_at)  # type: ignore[attr-defined]  # annotated

    @admin.display(description="data")
    def event_data(self, obj: TaskEvent) -> str:
        return pretty_json(obj.data) if obj.data is not None else "-"


class AssignmentInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = Assignment
    fields = readonly_fields = ("service", "attempt", "state", "detail", "instance_id", "created_at", "updated_at")
    extra = 0
    can_delete = False
    verbose_name_plural = "services on the task"


@admin.register(TaskRecord)
class TaskRecordAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "id",
        "action",
        "status",
        "services",
        "publisher_name",
        "progress_bar",
        "failure_reason",
        "run_time",
        "created_at",
    ]
    list_filter = ["status", "action", "publisher_name", "failure_reason", "assignments__service", "created_at"]
    search_fields = ["id", "action", "publisher_name", "assignments__service", "failure_detail"]
    search_help_text = "A task id, or text in the action, the publisher, a service or the failure detail."
    date_hierarchy = "created_at"
    # A count of the whole table on every page is a full scan on a big history.
    show_full_result_count = False
    inlines = [AssignmentInline, TaskEventInline]
    actions = ["retry_tasks", "cancel_tasks"]
    readonly_fields = [
        "id",
        "action",
        "status",
        "publisher_name",
        "attempt",
        "progress",
        "failure_reason",
        "failure_detail",
        "payload_pretty",
        "payload_size",
        "result_pretty",
        "has_result",
        "retries",
        "pickup_timeout",
        "complete_timeout",
        "heartbeat_timeout",
        "pickup_deadline",
        "complete_deadline",
        "created_at",
        "started_at",
        "finished_at",
        "run_time",
    ]
    fieldsets = [
        (None, {"fields": ["id", "action", "status", "publisher_name", "attempt", "retries", "progress"]}),
        ("Outcome", {"fields": ["result_pretty", "has_result", "failure_reason", "failure_detail"]}),
        ("Payload", {"fields": ["payload_pretty", "payload_size"]}),
        (
            "Timing",
            {
                "fields": [
                    "created_at",
                    "started_at",
                    "finished_at",
                    "run_time",
                    "pickup_timeout",
                    "complete_timeout",
                    "heartbeat_timeout",
                    "pickup_deadline",
                    "complete_deadline",
                ]
            },
        ),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskRecord]:
        return super().get_queryset(request).prefetch_related("assignments")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # For those with the delete permission, and then finished tasks only: a task
        # being worked on is cancelled, not deleted (retention, taskhub_purge, take the rest).
        return bool(super().has_delete_permission(request, obj)) and (obj is None or obj.finished_at is not None)

    @admin.display(description="services")
    def services(self, obj: TaskRecord) -> str:
        return ", ".join(sorted({a.service for a in obj.assignments.all()})) or "-"

    @admin.display(description="run time", ordering="finished_at")
    def run_time(self, obj: TaskRecord) -> str:
        """From the first offer (or publication) to the end, or until now if it runs."""
        start = obj.started_at or obj.created_at
        end = obj.finished_at or timezone.now()
        return millis(end - start) + ("" if obj.finished_at else " (running)")

    @admin.display(description="payload")
    def payload_pretty(self, obj: TaskRecord) -> str:
        return pretty_json(obj.payload)

    @admin.display(description="result")
    def result_pretty(self, obj: TaskRecord) -> str:
        return pretty_json(obj.result) if obj.has_result else "-"

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, obj: TaskRecord) -> str:
        if obj.progress is None:
            return "-"
        return format_html("<progress max='1' value='{}'></progress> {}%", obj.progress, round(obj.progress * 100))

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """Retry and cancel: for operators who may change tasks (the model's change permission)."""
        return request.user.has_perm("taskhub.change_taskrecord")

    @admin.action(description="Retry selected failed tasks", permissions=["operate"])
    def retry_tasks(self, request: HttpRequest, queryset: QuerySet[TaskRecord]) -> None:
        self._each(request, queryset, services.retry, "Retried")

    @admin.action(description="Cancel selected pending or running tasks", permissions=["operate"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet[TaskRecord]) -> None:
        self._each(request, queryset, services.cancel, "Cancelled")

    def _each(self, request: HttpRequest, queryset: QuerySet[TaskRecord], act: Any, done: str) -> None:
        """Apply ``act`` (an operator's command) to each task; say what was done and why
        the others were skipped (each task on its own: one that cannot does not stop the rest)."""
        notices: list[services.Notice] = []
        applied, skipped = 0, []
        for task_id, status in queryset.values_list("pk", "status"):
            try:
                notices += act(None, str(task_id), timezone.now(), _operator(request))
                applied += 1
            except ProtocolError as exc:
                skipped.append(f"{task_id} ({status}: {exc.detail})")
        _tell(notices)
        if applied:
            self.message_user(request, f"{done} {applied} task(s).", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"Skipped {len(skipped)}: " + "; ".join(skipped[:10]), messages.WARNING)


@admin.register(Instance)
class InstanceAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "id",
        "credential",
        "process",
        "remote_addr",
        "connected_at",
        "detached_at",
        "lease_expires_at",
        "subscribed_to",
    ]
    list_filter = ["credential"]
    actions = ["disconnect"]
    readonly_fields = [
        "id",
        "credential",
        "channel_name",
        "process",
        "remote_addr",
        "connected_at",
        "detached_at",
        "lease_expires_at",
        "last_assigned_at",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Instance]:
        return super().get_queryset(request).select_related("credential").prefetch_related("subscriptions")

    @admin.display(description="subscribed to")
    def subscribed_to(self, obj: Instance) -> str:
        return ", ".join(s.action for s in obj.subscriptions.all()) or "-"

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a deleted row would leave its connection a zombie: disconnect instead

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("taskhub.change_instance")

    @admin.action(
        description="Disconnect selected instances (their tasks go to other instances)", permissions=["operate"]
    )
    def disconnect(self, request: HttpRequest, queryset: QuerySet[Instance]) -> None:
        notices: list[services.Notice] = []
        count = 0
        for instance_id in queryset.values_list("pk", flat=True):
            notices += services.disconnect(instance_id, timezone.now())
            count += 1
        _tell(notices)
        self.message_user(
            request,
            f"Disconnected {count} instance(s): each connection is closed with code 4005 and its client "
            "reconnects as a new instance; disable the credential to keep it out.",
            messages.SUCCESS,
        )
