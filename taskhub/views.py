"""The live dashboard at ``/taskhub/`` (the app's URLconf), for staff users.

The page is static: a template and two static files (``taskhub/dashboard.js``, which
speaks the WebSocket protocol through ``taskhub/taskhub.js``, and ``dashboard.css``); no
build step and nothing fetched from outside the hub. It connects to the hub as a
*monitor* (``hello`` with ``monitor: true``), with the rights of the same Django session
that loaded the page (docs/dashboard.md).
"""

from __future__ import annotations

from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache

#: Where the hub's WebSocket routes serve it (``taskhub.routing.websocket_urlpatterns``).
WS_PATH = "/ws/taskhub/"
#: Stands for an object's id in the admin URLs the page fills in.
PLACEHOLDER = "00000000-0000-0000-0000-000000000000"


def admin_links() -> dict[str, str]:
    """The admin pages the dashboard links to, by name; an object's id in a ``*_change``
    URL is :data:`PLACEHOLDER`. A page the project's admin does not serve is left out."""
    names = {
        "index": ("admin:index", None),
        "tasks": ("admin:taskhub_taskrecord_changelist", None),
        "task": ("admin:taskhub_taskrecord_change", PLACEHOLDER),
        "credentials": ("admin:taskhub_credential_changelist", None),
        "credential": ("admin:taskhub_credential_change", PLACEHOLDER),
        "instances": ("admin:taskhub_instance_changelist", None),
        "instance": ("admin:taskhub_instance_change", PLACEHOLDER),
    }
    links = {}
    for key, (name, arg) in names.items():
        try:
            links[key] = reverse(name, args=[arg] if arg else [])
        except NoReverseMatch:
            continue
    return links


@never_cache
@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """The dashboard page. Anyone but an active staff user is sent to the admin's login
    (which says so to a user who is logged in but not staff)."""
    config: dict[str, Any] = {
        "wsPath": WS_PATH,
        "admin": admin_links(),
        "placeholder": PLACEHOLDER,
        "user": request.user.get_username(),
    }
    return render(request, "taskhub/dashboard.html", {"config": config})
