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


def test_update_changes_what_it_is_given_and_keeps_the_rest():
    key = run("create", "geo", "--sub", "geo", "--pub", "log", "--max-instances", "2", "--description", "geocoding")
    key = key.strip().splitlines()[-1]
    out = run("update", "geo", "--sub", "geo", "weather:forecast", "--sub", "maps:*", "--max-instances", "4")
    c = Credential.objects.get(name="geo")
    assert (c.sub_permissions, c.pub_permissions, c.max_instances, c.description) == (
        ["geo", "weather:forecast", "maps:*"],
        ["log"],
        4,
        "geocoding",
    )
    assert verify_key(key, c.key_hash)  # the key is not touched
    assert "max_instances=4" in out
    run("update", "geo", "--pub")  # alone: no pub permission left
    assert "geo\tactive\tmax_instances=4\tsub=geo,weather:forecast,maps:*\tpub=-" in run("list")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["update", "nobody", "--sub", "geo"], "no credential named 'nobody'"),
        (["update", "geo", "--sub", "geo", "Not Valid"], "invalid permission pattern 'Not Valid'"),
        (["update", "geo", "--pub", "mail:"], "invalid permission pattern 'mail:'"),
        (["update", "geo", "--max-instances", "0"], "greater than or equal to 1"),
        (["update", "geo"], "nothing to update"),
    ],
)
def test_update_errors_change_nothing(args, message):
    run("create", "geo", "--sub", "geo", "--max-instances", "2")
    with pytest.raises(CommandError, match=message):
        run(*args)
    c = Credential.objects.get(name="geo")
    assert (c.sub_permissions, c.pub_permissions, c.max_instances) == (["geo"], [], 2)
