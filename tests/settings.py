"""Test settings: the project's, with the sweeper slowed so that tests drive it by hand."""

from __future__ import annotations

from hubproject.settings import *  # noqa: F403

TASKHUB_SWEEP_INTERVAL = 3600.0
TASKHUB_INSTANCE_LEASE = 3 * 3600.0
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
