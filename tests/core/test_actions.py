from __future__ import annotations

import pytest

from taskhub.core.actions import pattern_grants, permits, validate_action, validate_pattern
from taskhub.core.errors import InvalidMessage


@pytest.mark.parametrize(
    "action",
    ["mail:send", "mail:send-bulk", "geo:geocode", "weather/metno:forecast", "a.b_c-d/e1:v2", "x:y"],
)
def test_valid_actions(action):
    assert validate_action(action) == action


@pytest.mark.parametrize(
    "action",
    [
        "",
        "mail",
        "Mail:send",
        "mail:",
        ":send",
        "mail:send:now",
        "mail/:send",
        "/mail:send",
        "mail send:x",
        "mail:sénd",
        "mail:*",
        "a" * 199 + ":b",
        42,
        None,
        ["mail:send"],
    ],
)
def test_invalid_actions_are_rejected_with_a_code(action):
    with pytest.raises(InvalidMessage) as info:
        validate_action(action)
    assert info.value.code == "invalid_action"


@pytest.mark.parametrize(
    ("pattern", "action", "granted"),
    [
        ("mail:send", "mail:send", True),
        ("mail:send", "mail:send-bulk", False),
        ("log", "log:error", True),
        ("log", "logs:error", False),
        ("log", "log/app:error", True),
        ("weather", "weather:forecast", True),
        ("weather", "weather/metno:forecast", True),
        ("weather", "weatherly:get", False),
        ("weather/metno", "weather/metno:forecast", True),
        ("weather/metno", "weather:forecast", False),
        ("weather/metno", "weather/metnox:forecast", False),
        ("*", "anything/at:all", True),
        ("mail:*", "mail:send", True),
        ("mail:*", "mail:send-bulk", True),
        ("mail:*", "mailer:send", False),
        ("mail:*", "mail/x:send", False),
        ("weather/*", "weather/metno:forecast", True),
        ("weather/*", "weather:forecast", False),
        ("*:send", "mail:send", True),
        ("*:send", "mail:receive", False),
    ],
)
def test_pattern_grants(pattern, action, granted):
    assert validate_pattern(pattern) == pattern
    assert pattern_grants(pattern, action) is granted


def test_permits_any_of_the_patterns():
    assert permits(["log", "mail:send"], "mail:send")
    assert not permits(["log", "mail:send"], "geo:geocode")
    assert not permits([], "mail:send")


@pytest.mark.parametrize("pattern", ["", "Mail", "mail:", "mail::x", "mail send", "a:b:c", None, 3, "x" * 201])
def test_invalid_patterns(pattern):
    with pytest.raises(ValueError, match="invalid permission pattern"):
        validate_pattern(pattern)
