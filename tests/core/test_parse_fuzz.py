"""Any JSON at all: the core's frame decoding and command parsing either return or
raise InvalidMessage; nothing else escapes (hypothesis, pure and fast)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from taskhub.core.commands import COMMANDS, parse_command, read_ref
from taskhub.core.errors import InvalidMessage
from taskhub.core.frames import decode_frame, encode

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=10
)
field_names = st.sampled_from(
    sorted({name for cls in COMMANDS.values() for name, *_ in cls.fields} | {"ref", "type", "again"})
)


@st.composite
def frames(draw: st.DrawFn) -> dict[str, Any]:
    frame = {"type": draw(st.sampled_from(sorted(COMMANDS)) | values)}
    for name in draw(st.lists(field_names, max_size=8)):
        frame[name] = draw(values)
    return frame


@settings(max_examples=1500, deadline=None)
@given(frames())
def test_parsing_any_object_returns_a_command_or_raises_invalid_message(frame):
    read_ref(frame)
    try:
        text = json.dumps(frame)
    except ValueError:
        return  # an integer longer than Python prints
    try:
        command = parse_command(decode_frame(text, 10**7))
    except InvalidMessage:
        return
    # What passed goes back on the wire as it came (a client re-sends it after a reconnect).
    assert parse_command(decode_frame(encode(command.to_dict()), 10**7)) == command
