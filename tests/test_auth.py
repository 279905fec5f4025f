from __future__ import annotations

import pytest

from taskhub.auth import generate_key, hash_key, verify_key


def test_generated_keys_verify_and_differ():
    key = generate_key()
    assert len(key) >= 40 and key != generate_key()
    stored = hash_key(key)
    assert key not in stored and verify_key(key, stored)
    assert not verify_key(key + "x", stored)


def test_same_key_different_salt():
    key = generate_key()
    assert hash_key(key) != hash_key(key)


@pytest.mark.parametrize("stored", ["", "sha256$only", "md5$salt$abc", "plain"])
def test_malformed_hashes_never_verify(stored):
    assert not verify_key("k" * 20, stored)


def test_short_keys_are_refused():
    with pytest.raises(ValueError, match="at least 16"):
        hash_key("short")


def test_generated_keys_never_start_with_a_dash(monkeypatch):
    # "--key -abc..." would read as another option on a command line.
    drawn = iter(["-" + "a" * 42, "b" * 43])
    monkeypatch.setattr("taskhub.auth.secrets.token_urlsafe", lambda n: next(drawn))
    assert generate_key() == "b" * 43
