"""Test settings: the project's, with the sweeper slowed so that tests drive it by hand."""

from __future__ import annotations

import os

from hubproject.settings import *  # noqa: F403

TASKHUB_SWEEP_INTERVAL = 3600.0
TASKHUB_INSTANCE_LEASE = 3 * 3600.0
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# A second suite run beside this one (tests/test_store.py) gets its own test database.
if os.environ.get("TASKHUB_TEST_DB_SUFFIX"):
    _suffix = os.environ["TASKHUB_TEST_DB_SUFFIX"]
    _test = DATABASES["default"].setdefault("TEST", {})  # noqa: F405
    assert isinstance(_test, dict)  # the project's settings type a database's entries as ``object``
    _name = _test.get("NAME") or f"test_{DATABASES['default']['NAME']}"  # noqa: F405
    _stem, _sqlite = str(_name).removesuffix(".sqlite3"), str(_name).endswith(".sqlite3")
    _test["NAME"] = f"{_stem}_{_suffix}" + (".sqlite3" if _sqlite else "")
