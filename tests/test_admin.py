from __future__ import annotations

import re
import uuid

import pytest
from django.contrib.messages.storage.cookie import CookieStorage
from django.test import RequestFactory
from django.utils import timezone

from taskhub.auth import verify_key
from taskhub.models import Credential, Instance, Subscription, TaskEvent, TaskRecord

from .conftest import make_credential

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client, django_user_model):
    user = django_user_model.objects.create_superuser("op", "op@example.org", "pw")
    client.force_login(user)
    return client


def test_admin_requires_staff_login(client):
    response = client.get("/admin/taskhub/taskrecord/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


CREDENTIAL = {
    "name": "mailer",
    "key": "",
    "sub_permissions": "mail:send-bulk\nlog",
    "pub_permissions": "log:*",
    "max_instances": 2,
    "is_active": "on",
    "description": "",
}


def shown_key(response):
    """The key on the page that answers a save that generated one."""
    found = re.search(r'<code id="credential-key"[^>]*>([^<]+)</code>', response.content.decode())
    assert found is not None, response.content.decode()
    return found.group(1)


def assert_key_kept_out_of_cookies_and_session(client, response, key):
    """No cookie the response sets, nor the session, holds the key (the messages cookie is
    signed and maybe compressed: decode it)."""
    for name, morsel in response.cookies.items():
        assert key not in morsel.value, name
        if name == "messages":
            request = RequestFactory().get("/")
            request.COOKIES[name] = morsel.value
            assert all(key not in str(message) for message in CookieStorage(request))
    assert all(key not in str(value) for value in client.session.values())


def test_create_credential_shows_a_generated_key_once(staff):
    response = staff.post("/admin/taskhub/credential/add/", {**CREDENTIAL, "_continue": "Save"})
    assert response.status_code == 200  # the key is on the answer to the save itself...
    assert "no-store" in response["Cache-Control"]
    key = shown_key(response)
    assert_key_kept_out_of_cookies_and_session(staff, response, key)
    credential = Credential.objects.get(name="mailer")
    assert key not in credential.key_hash and verify_key(key, credential.key_hash)
    assert credential.sub_permissions == ["mail:send-bulk", "log"] and credential.max_instances == 2
    # ...which leads on to where the admin goes after a save ("Save and continue editing").
    change_url = f"/admin/taskhub/credential/{credential.pk}/change/"
    assert f'href="{change_url}"' in response.content.decode()
    after = staff.get(change_url)
    assert after.status_code == 200 and key not in after.content.decode()  # ...and never again


def test_regenerated_key_is_shown_once_without_a_cookie(staff):
    credential, old_key = make_credential("svc")
    response = staff.post(
        f"/admin/taskhub/credential/{credential.pk}/change/",
        {**CREDENTIAL, "name": "svc", "regenerate_key": "on"},
    )
    assert response.status_code == 200
    key = shown_key(response)
    assert_key_kept_out_of_cookies_and_session(staff, response, key)
    credential.refresh_from_db()
    assert verify_key(key, credential.key_hash) and not verify_key(old_key, credential.key_hash)
    assert 'href="/admin/taskhub/credential/"' in response.content.decode()  # "Save": back to the list
    assert key not in staff.get("/admin/taskhub/credential/").content.decode()


def test_key_help_says_what_an_empty_key_does(staff):
    add = staff.get("/admin/taskhub/credential/add/").content.decode()
    assert "Leave empty to generate a key" in add and 'name="regenerate_key"' not in add
    credential, old_key = make_credential("svc")
    change = staff.get(f"/admin/taskhub/credential/{credential.pk}/change/").content.decode()
    assert "generate a key" not in change and "Leave empty to keep the current key" in change
    assert 'name="regenerate_key"' in change
    # And it does what it says: saved with the key empty, the key stays.
    response = staff.post(f"/admin/taskhub/credential/{credential.pk}/change/", {**CREDENTIAL, "name": "svc"})
    assert response.status_code == 302
    credential.refresh_from_db()
    assert verify_key(old_key, credential.key_hash) and credential.max_instances == 2


def test_operator_set_key_and_invalid_patterns(staff):
    data = {
        "name": "geo",
        "key": "operator-chosen-key-123",
        "sub_permissions": "Geo Code",
        "pub_permissions": "",
        "max_instances": 1,
        "is_active": "on",
        "description": "",
    }
    response = staff.post("/admin/taskhub/credential/add/", data)
    assert response.status_code == 200 and "invalid permission pattern" in response.content.decode()
    assert not Credential.objects.exists()
    response = staff.post("/admin/taskhub/credential/add/", {**data, "sub_permissions": "geo"})
    assert response.status_code == 302
    assert verify_key("operator-chosen-key-123", Credential.objects.get(name="geo").key_hash)
    response = staff.post("/admin/taskhub/credential/add/", {**data, "name": "short", "key": "short"})
    assert response.status_code == 200 and not Credential.objects.filter(name="short").exists()


def test_disable_action(staff):
    credential, _ = make_credential("svc")
    staff.post("/admin/taskhub/credential/", {"action": "disable", "_selected_action": [credential.pk]})
    credential.refresh_from_db()
    assert credential.is_active is False


def make_task(**fields):
    now = timezone.now()
    task = TaskRecord.objects.create(
        id=uuid.uuid4(), action="mail:send", publisher_name="app", created_at=now, **fields
    )
    TaskEvent.objects.create(task=task, kind="init", service="app", created_at=now)
    TaskEvent.objects.create(task=task, kind="update", service="mailer", data={"data": {"sent": 3}}, created_at=now)
    return task


def test_task_list_filters_search_and_read_only_detail(staff):
    ok = make_task(status="success", result={"ok": "yes"}, has_result=True, progress=1.0)
    failed = make_task(status="failed", failure_reason="pickup_timeout")
    listing = staff.get("/admin/taskhub/taskrecord/?status__exact=failed").content.decode()
    assert str(failed.id) in listing and str(ok.id) not in listing
    found = staff.get(f"/admin/taskhub/taskrecord/?q={str(ok.id)[:8]}").content.decode()
    assert str(ok.id) in found and str(failed.id) not in found
    detail = staff.get(f"/admin/taskhub/taskrecord/{ok.id}/change/").content.decode()
    assert "&quot;ok&quot;: &quot;yes&quot;" in detail and "timeline" in detail.lower() and "sent" in detail
    assert 'name="_save"' not in detail
    assert staff.get("/admin/taskhub/taskrecord/add/").status_code == 403


def test_instances_page_lists_live_connections(staff):
    credential, _ = make_credential("svc")
    now = timezone.now()
    instance = Instance.objects.create(
        credential=credential, channel_name="c", process="p", connected_at=now, lease_expires_at=now
    )
    Subscription.objects.create(instance=instance, action="mail:send")
    page = staff.get("/admin/taskhub/instance/").content.decode()
    assert str(instance.id) in page and "mail:send" in page
