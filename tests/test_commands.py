from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from taskhub.auth import verify_key
from taskhub.models import Credential

pytestmark = pytest.mark.django_db


def run(*args):
    out = io.StringIO()
    call_command("taskhub_credential", *args, stdout=out)
    return out.getvalue()


def test_create_prints_the_key_alone_on_the_last_line():
    key = run("create", "mailer", "--sub", "mail:send-bulk", "--pub", "log", "--pub", "geo:*", "--max-instances", "3")
    key = key.strip().splitlines()[-1]
    c = Credential.objects.get(name="mailer")
    assert verify_key(key, c.key_hash)
    assert (c.sub_permissions, c.pub_permissions, c.max_instances) == (["mail:send-bulk"], ["log", "geo:*"], 3)


def test_create_with_an_operator_key():
    assert run("create", "svc", "--key", "x" * 20).strip().splitlines()[-1] == "x" * 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "bad", "--sub", "Not Valid"], "invalid permission pattern"),
        (["create", "svc", "--key", "short"], "at least 16"),
        (["create", "bad name"], "letters, digits"),
        (["create", "svc", "--max-instances", "0"], "greater than or equal to 1"),
        (["disable", "nobody"], "no credential named"),
    ],
)
def test_errors_change_nothing(args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert not Credential.objects.exclude(name="svc").exists()


def test_duplicate_name():
    run("create", "svc")
    with pytest.raises(CommandError, match="already exists"):
        run("create", "svc")


def test_list_disable_enable_and_rotate():
    old = run("create", "svc").strip().splitlines()[-1]
    assert "svc\tactive" in run("list")
    run("disable", "svc")
    assert "svc\tdisabled" in run("list")
    run("enable", "svc")
    new = run("rotate-key", "svc").strip().splitlines()[-1]
    c = Credential.objects.get(name="svc")
    assert c.is_active and verify_key(new, c.key_hash) and not verify_key(old, c.key_hash)
