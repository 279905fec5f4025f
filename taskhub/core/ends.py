"""A task's ``end`` carried inside the event before it, both ways.

A transition that ends a task writes two events, ``success`` (or ``fail``) and then
``end``. For a client that says it reads them so (``inline_end`` in ``hello``, or the
``TaskHub-Inline-End`` handshake header), the hub sends the two in one frame: the first
event with ``"end": {"seq": ..., "attempt": ..., "status": ...}``. The hub calls
:func:`fold_ends` on what it forwards; the client calls :func:`unfold_end` on every frame
it reads, and sees the two events it would have had otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Task events an ``end`` may ride on (every task event but ``end`` itself).
CARRIERS = frozenset({"update", "success", "retry", "fail"})


def fold_ends(messages: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The frames to send for a task's events, in order: each with the events it carries.

    An ``end`` right after another event of the same task rides inside it. The messages
    are not changed (a relay's are shared by the process's connections): a frame that
    carries an ``end`` is a copy.
    """
    frames: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for message in messages:
        if message.get("type") == "end" and frames:
            frame, carried = frames[-1]
            if len(carried) == 1 and frame.get("type") in CARRIERS and frame.get("task") == message.get("task"):
                inner = {key: value for key, value in message.items() if key not in ("type", "task")}
                frames[-1] = ({**frame, "end": inner}, [*carried, message])
                continue
        frames.append((message, [message]))
    return frames


def unfold_end(obj: Any) -> list[Any]:
    """The hub's frame as the events it holds: a task event with an ``end`` inside is two,
    the event and then its ``end``; anything else is itself. Never raises: what is not a
    well-formed carrier is left as it came, for the message parser to judge."""
    if not isinstance(obj, dict) or obj.get("type") not in CARRIERS:
        return [obj]
    inner = obj.get("end")
    if not isinstance(inner, dict):
        return [obj]
    event = {key: value for key, value in obj.items() if key != "end"}
    return [event, {**inner, "type": "end", "task": obj.get("task")}]
