"""The project's settings, with a channel layer that loses messages (tests/e2e/lossy.py)."""

from __future__ import annotations

from hubproject.settings import *  # noqa: F403

CHANNEL_LAYERS["default"]["BACKEND"] = "tests.e2e.lossy.LossyRedisLayer"  # noqa: F405
