"""The dashboard page over HTTP: staff users get it, everyone else is sent to the admin's
login, and what the page needs (its config, its static files) is there."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.urls import include, path

from taskhub.views import PLACEHOLDER, WS_PATH, admin_links

pytestmark = pytest.mark.django_db

LOGIN = "/admin/login/?next=/taskhub/"

# A project that mounts the dashboard without the admin.
urlpatterns = [path("taskhub/", include("taskhub.urls"))]


def browser(*, staff: bool | None, active: bool = True) -> Client:
    """A browser with a logged-in session (``staff=None``: none)."""
    client = Client()
    if staff is not None:
        user = get_user_model().objects.create_user("someone", password="pw", is_staff=staff, is_active=active)
        client.force_login(user)
    return client


def config_of(html: str) -> dict[str, Any]:
    start = html.index('<script id="taskhub-config" type="application/json">') + len(
        '<script id="taskhub-config" type="application/json">'
    )
    loaded: dict[str, Any] = json.loads(html[start : html.index("</script>", start)])
    return loaded


def test_a_staff_user_gets_the_dashboard():
    response = browser(staff=True).get("/taskhub/")
    assert response.status_code == 200
    html = response.content.decode()
    assert '<script type="module" src="/static/taskhub/dashboard.js"></script>' in html
    assert '<link rel="stylesheet" href="/static/taskhub/dashboard.css">' in html
    assert 'id="tasks"' in html and 'id="timeline"' in html
    config = config_of(html)
    assert config["wsPath"] == WS_PATH == "/ws/taskhub/"
    assert config["user"] == "someone"
    assert config["admin"]["task"] == f"/admin/taskhub/taskrecord/{PLACEHOLDER}/change/"
    assert config["admin"]["credential"] == f"/admin/taskhub/credential/{PLACEHOLDER}/change/"
    assert config["admin"]["tasks"] == "/admin/taskhub/taskrecord/"
    assert "no-cache" in response["Cache-Control"]  # a page of live data is never cached


@pytest.mark.parametrize(
    ("staff", "active"),
    [(None, True), (False, True), (True, False)],
    ids=["anonymous", "not staff", "inactive staff"],
)
def test_anyone_else_is_sent_to_the_admin_login(staff, active):
    response = browser(staff=staff, active=active).get("/taskhub/")
    assert (response.status_code, response["Location"]) == (302, LOGIN)


def test_the_login_tells_a_user_who_is_not_staff_why():
    response = browser(staff=False).get("/taskhub/", follow=True)
    assert response.redirect_chain == [(LOGIN, 302)]
    assert b"not authorized to access this page" in response.content
    assert b"taskhub-config" not in response.content


def test_a_user_name_cannot_inject_markup_into_the_page():
    user = get_user_model().objects.create_user("</script><b>x", password="pw", is_staff=True)
    client = Client()
    client.force_login(user)
    html = client.get("/taskhub/").content.decode()
    assert "</script><b>x" not in html
    assert config_of(html)["user"] == "</script><b>x"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("dashboard.js", "javascript"), ("dashboard.css", "text/css"), ("taskhub.js", "javascript")],
)
def test_the_page_s_static_files_are_served(name, kind):
    response = Client().get(f"/static/taskhub/{name}")
    assert response.status_code == 200 and kind in response["Content-Type"]


def test_the_dashboard_imports_the_client_module_next_to_it():
    body = b"".join(Client().get("/static/taskhub/dashboard.js").streaming_content)  # type: ignore[attr-defined]
    assert b"import {Client} from './taskhub.js';" in body
    assert b"monitor: true" in body


@override_settings(ROOT_URLCONF=__name__)
def test_links_to_an_admin_the_project_does_not_mount_are_left_out():
    assert admin_links() == {}
