"""Django admin for operators: credentials, the task history, live instances."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template import engines
from django.template.backends.django import DjangoTemplates
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html

from .auth import MIN_KEY_LENGTH, generate_key, hash_key
from .models import Assignment, Credential, Instance, TaskEvent, TaskRecord, validate_patterns

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


class TaskEventInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = TaskEvent
    fields = readonly_fields = ("created_at", "kind", "service", "attempt", "event_data", "instance")
    extra = 0
    can_delete = False
    verbose_name_plural = "timeline"

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
    list_display = ["id", "action", "status", "publisher_name", "progress_bar", "created_at", "finished_at"]
    list_filter = ["status", "action", "publisher_name", "failure_reason", "created_at"]
    search_fields = ["id", "action"]
    date_hierarchy = "created_at"
    inlines = [AssignmentInline, TaskEventInline]
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
        "pickup_timeout",
        "complete_timeout",
        "pickup_deadline",
        "complete_deadline",
        "created_at",
        "started_at",
        "finished_at",
    ]
    fieldsets = [
        (None, {"fields": ["id", "action", "status", "publisher_name", "attempt", "progress"]}),
        ("Outcome", {"fields": ["result_pretty", "has_result", "failure_reason", "failure_detail"]}),
        ("Payload", {"fields": ["payload_pretty", "payload_size"]}),
        (
            "Timing",
            {
                "fields": [
                    "created_at",
                    "started_at",
                    "finished_at",
                    "pickup_timeout",
                    "complete_timeout",
                    "pickup_deadline",
                    "complete_deadline",
                ]
            },
        ),
    ]

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


@admin.register(Instance)
class InstanceAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["id", "credential", "process", "remote_addr", "connected_at", "lease_expires_at", "subscribed_to"]
    list_filter = ["credential"]
    readonly_fields = [
        "id",
        "credential",
        "channel_name",
        "process",
        "remote_addr",
        "connected_at",
        "lease_expires_at",
        "last_assigned_at",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Instance]:
        return super().get_queryset(request).select_related("credential").prefetch_related("subscriptions")

    @admin.display(description="subscribed to")
    def subscribed_to(self, obj: Instance) -> str:
        return ", ".join(s.action for s in obj.subscriptions.all()) or "-"
