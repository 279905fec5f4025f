from __future__ import annotations

import pytest

from taskhub.core.commands import MISSING, Fail, Pub, Return, Touch, Update, parse_command, read_ref
from taskhub.core.errors import InvalidMessage
from taskhub.core.frames import decode_frame, encode
from taskhub.core.messages import Error

TASK = "8d7f6a0e-3b7c-4f4e-9a51-2d6f0f1f6b2a"


def code_of(fn, *args):
    with pytest.raises(InvalidMessage) as info:
        fn(*args)
    return info.value.code


def test_decode_frame_accepts_json():
    assert decode_frame('{"type":"ping"}', 100) == {"type": "ping"}
    assert decode_frame(b'{"a":1}', 100) == {"a": 1}


@pytest.mark.parametrize("text", ["{", "nope", '{"a": NaN}', "[Infinity]", ""])
def test_decode_frame_rejects_bad_json(text):
    assert code_of(decode_frame, text, 100) == "invalid_json"


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "ping", "ref": "\\ud800"}',  # a lone surrogate, anywhere
        '{"type": "pub", "action": "a:b", "payload": {"k\\udfff": 1}}',
        '{"type": "pub", "action": "a:b", "payload": "a\\u0000b"}',  # U+0000: no database stores it
        '{"type": "pub", "action": "a:b", "payload": 1e400}',
        '{"type": "pub", "action": "a:b", "payload": -1e999}',
        '{"type": "pub", "action": "a:b", "timeout": ' + "9" * 400 + "}",
        '{"type": "pub", "action": "a:b", "payload": 9007199254740993}',
        '{"type": "pub", "action": "a:b", "payload": ' + "[" * 33 + "]" * 33 + "}",
        '{"type": "pub", "action": "a:b", "payload": ' + "[" * 1000 + "]" * 1000 + "}",
        '{"a": ' * 40 + "1" + "}" * 40,
        '{"n": ' + "9" * 5000 + "}",  # beyond what Python reads
        "-99999999999999999999",  # a bare value, too
    ],
)
def test_values_the_hub_cannot_carry_are_refused(text):
    assert code_of(decode_frame, text, 100_000) == "invalid_value"


def test_values_within_the_limits_pass():
    assert decode_frame('{"a": "\\u00e9\\ud83d\\ude00", "n": 9007199254740992, "f": 1e308}', 1000) == {
        "a": "é😀",
        "n": 2**53,
        "f": 1e308,
    }
    assert decode_frame("[" * 31 + "]" * 31, 1000) is not None
    # Digits in strings are text, however many: "0" * 1000 is no number.
    # And an escaped backslash before "u0000" is a backslash, not U+0000.
    assert decode_frame('{"s": "' + "0" * 1000 + '", "t": "\\\\u0000"}', 10_000) == {"s": "0" * 1000, "t": "\\u0000"}


def test_hub_messages_are_read_without_the_value_checks():
    # The hub wraps values deeper than the commands that carried them.
    deep = "[" * 40 + "]" * 40
    assert code_of(decode_frame, deep, 1000) == "invalid_value"
    assert decode_frame(deep, 1000, strict=False) is not None


def test_decode_frame_counts_bytes_not_characters():
    assert code_of(decode_frame, '"' + "é" * 30 + '"', 60) == "message_too_large"
    assert decode_frame('"' + "e" * 30 + '"', 60) == "e" * 30


@pytest.mark.parametrize("obj", [[], "x", 3, None, True])
def test_non_object_frames(obj):
    assert code_of(parse_command, obj) == "invalid_frame"


def test_missing_and_unknown_type():
    assert code_of(parse_command, {"action": "a:b"}) == "missing_type"
    assert code_of(parse_command, {"type": "publish"}) == "unknown_type"
    assert code_of(parse_command, {"type": 3}) == "unknown_type"


def test_pub_with_defaults_and_with_every_field():
    cmd = parse_command({"type": "pub", "action": "mail:send", "ref": "r1"})
    assert cmd == Pub("r1", "mail:send", MISSING, MISSING, MISSING, MISSING, MISSING, MISSING, MISSING, MISSING)
    cmd = parse_command(
        {
            "type": "pub",
            "action": "mail:send",
            "payload": [1],
            "task_id": TASK,
            "timeout": 30,
            "pickup_timeout": None,
            "heartbeat_timeout": 5,
            "retries": -1,
            "retry_backoff": 0.5,
            "autoremove": True,
        }
    )
    assert cmd == Pub(None, "mail:send", [1], TASK, 30.0, None, 5.0, -1, 0.5, True)


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"type": "pub"}, "invalid_field"),
        ({"type": "pub", "action": "Mail"}, "invalid_action"),
        ({"type": "pub", "action": 5}, "invalid_field"),  # a wrong type, as for any field
        ({"type": "sub", "action": ["a:b"]}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "task_id": "nope"}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "task_id": 12}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "task_id": TASK.upper()}, "invalid_field"),  # not canonical
        ({"type": "pub", "action": "a:b", "task_id": TASK.replace("-", "")}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "task_id": "{" + TASK + "}"}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "timeout": 1e12}, "invalid_field"),  # over 10**9 s
        ({"type": "pub", "action": "a:b", "pickup_timeout": 3e11}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "timeout": 0}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "timeout": -1}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "timeout": "5"}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "timeout": True}, "invalid_field"),
        ({"type": "update", "task": TASK, "attempt": 1, "progress": 1.5}, "invalid_field"),
        ({"type": "update", "task": TASK, "attempt": 0}, "invalid_field"),
        ({"type": "update", "task": TASK, "attempt": "1"}, "invalid_field"),
        ({"type": "update", "task": TASK}, "invalid_field"),
        ({"type": "fail", "task": TASK, "attempt": 1}, "invalid_field"),
        ({"type": "fail", "task": TASK, "attempt": 1, "error": 3}, "invalid_field"),
        ({"type": "watch", "task": TASK, "since": -1}, "invalid_field"),
        ({"type": "hello", "name": "a"}, "invalid_field"),
        ({"type": "ping", "ref": {"a": 1}}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "retries": -2}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "retries": 1.5}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "retries": True}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "retry_backoff": 0}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "retry_backoff": None}, "invalid_field"),
        ({"type": "pub", "action": "a:b", "heartbeat_timeout": -1}, "invalid_field"),
        ({"type": "touch", "task": TASK}, "invalid_field"),
        ({"type": "touch", "task": TASK, "attempt": 1, "again": "yes"}, "invalid_field"),
        ({"type": "cancel"}, "invalid_field"),
        ({"type": "cancel", "task": "nope"}, "invalid_field"),
        ({"type": "retry", "task": 7}, "invalid_field"),
        ({"type": "tasks", "status": "done"}, "invalid_field"),
        ({"type": "tasks", "status": []}, "invalid_field"),
        ({"type": "tasks", "status": {"a": 1}}, "invalid_field"),
        ({"type": "tasks", "limit": 0}, "invalid_field"),
        ({"type": "tasks", "limit": 1001}, "invalid_field"),
        ({"type": "tasks", "action": "Bad"}, "invalid_action"),
        ({"type": "hello", "name": "a", "key": "k", "concurrency": 0}, "invalid_field"),
        ({"type": "hello", "name": "a", "key": "k", "resume": 5}, "invalid_field"),
        ({"type": "watch", "task": TASK, "follow": 1}, "invalid_field"),
        ({"type": "ping", "ref": "x" * 101}, "invalid_field"),
    ],
)
def test_field_errors(obj, code):
    assert code_of(parse_command, obj) == code


def test_update_and_fail_parse():
    assert parse_command({"type": "update", "task": TASK, "attempt": 2, "data": {"n": 1}, "progress": 1}) == Update(
        None, TASK, 2, {"n": 1}, 1.0, MISSING, MISSING
    )
    assert parse_command({"type": "fail", "task": TASK, "attempt": 1, "error": "boom", "ref": 9}) == Fail(
        9, TASK, 1, "boom", MISSING, MISSING
    )
    again = parse_command({"type": "touch", "task": TASK, "attempt": 1, "again": True, "ref": 3})
    assert again == Touch(3, TASK, 1, True, MISSING)
    silent = parse_command({"type": "return", "task": TASK, "attempt": 1, "result": 1, "ack": False, "ref": 4})
    assert silent == Return(4, TASK, 1, 1, MISSING, False)
    with pytest.raises(InvalidMessage, match="'ack' must be true or false") as refused:
        parse_command({"type": "pickup", "task": TASK, "attempt": 1, "ack": 0})
    assert refused.value.code == "invalid_field"


def test_unknown_fields_are_ignored():
    assert parse_command({"type": "ping", "future": 1}).type == "ping"


def test_read_ref_only_returns_usable_refs():
    assert read_ref({"ref": 5}) == 5
    assert read_ref({"ref": True}) is None
    assert read_ref([1]) is None


def test_encode_and_error_message():
    assert (
        encode(Error(code="bad", detail="it is bad", ref=1).to_dict())
        == '{"type":"error","code":"bad","detail":"it is bad","ref":1}'
    )
    assert encode({"s": "é"}) == '{"s":"é"}'


def test_core_imports_no_framework():
    import ast
    import pathlib

    import taskhub.core

    for path in pathlib.Path(taskhub.core.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            for name in names:
                assert name.split(".")[0] not in {"django", "channels", "asyncio", "time"}, (path.name, name)
