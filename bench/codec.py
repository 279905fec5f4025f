"""JSON codecs for the hub's frames, measured: ``python -m bench.codec [--quick]``.

What ``taskhub/core/frames.py`` does with each frame, timed per frame in µs (the best of
several repeats, one core) with the standard library's ``json`` (what the hub uses),
``orjson`` and ``msgspec`` (``pip install -r bench/requirements.txt``; a codec that is
not installed is left out):

- **decode**: the text of a client's frame to a Python object, as the hub reads every
  frame (strict: ``NaN`` and ``Infinity`` refused, a float out of a double's range
  refused);
- **encode**: a message's object to the text of a text frame (compact, UTF-8 kept), as
  the hub writes every frame. orjson and msgspec write bytes: the time includes the
  decoding to ``str`` that an ASGI ``websocket.send`` of text needs.

The frames are those of one sequential round trip of ``bench/run.py`` (about 200 bytes
of payload), the sizes the hub actually sees, and a 64 KiB payload for scale. It also
prints where the codecs disagree with ``frames.py``'s rules (what a switch would have to
check on its own), and what ``decode_frame`` costs in all, of which ``json.loads`` is a
part.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from taskhub.core import frames

TASK = str(uuid.UUID(int=0x6A1D))
PAYLOAD = {"id": 1, "to": "someone@example.org", "subject": "x" * 120, "n": [1, 2, 3, 4, 5]}  # as bench/run.py
BIG = {"rows": [{"id": i, "name": f"row {i}", "value": i * 1.5, "tags": ["a", "b"]} for i in range(1100)]}

#: What the hub reads in a round trip (the caller's pub, the worker's pickup and return).
READ = {
    "pub": {"type": "pub", "action": "bench:echo", "payload": PAYLOAD, "task_id": TASK, "ref": 1},
    "pickup": {"type": "pickup", "task": TASK, "attempt": 1, "ack": False, "ref": 2},
    "update": {"type": "update", "task": TASK, "attempt": 1, "data": {"step": 1}, "progress": 0.5, "ref": 3},
    "return": {"type": "return", "task": TASK, "attempt": 1, "result": PAYLOAD, "ack": False, "ref": 4},
    "pub, 64 KiB payload": {"type": "pub", "action": "bench:echo", "payload": BIG, "ref": 5},
}
#: What the hub writes in a round trip (acks, the offer, the outcome).
WRITTEN = {
    "ack": {"type": "ack", "ref": 1, "task": TASK, "created": True},
    "offer": {
        "type": "task",
        "task": TASK,
        "action": "bench:echo",
        "attempt": 1,
        "publisher": "caller-1a2b3c4d",
        "payload_size": 180,
        "payload": PAYLOAD,
    },
    "success": {"type": "success", "task": TASK, "seq": 45, "attempt": 1, "service": "svc-1a2b", "result": PAYLOAD},
    "end": {"type": "end", "task": TASK, "seq": 46, "attempt": 1, "status": "success"},
    "success, end inside": {
        **{"type": "success", "task": TASK, "seq": 45, "attempt": 1, "service": "svc-1a2b", "result": PAYLOAD},
        "end": {"seq": 46, "attempt": 1, "status": "success"},
    },
    "success, 64 KiB result": {"type": "success", "task": TASK, "seq": 45, "attempt": 1, "service": "s", "result": BIG},
}
#: Frames of a sequential round trip: read (pub, pickup, return: the last two ask for no
#: answer), written (the pub's ack, the offer, the success with its end inside).
ROUND_TRIP = {"decode": ["pub", "pickup", "return"], "encode": ["ack", "offer", "success, end inside"]}


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def codecs() -> dict[str, tuple[Callable[[str], Any], Callable[[Any], str]]]:
    """``name: (decode, encode)`` of each installed codec, each as strict as it can be
    made without a walk over the value."""
    found: dict[str, tuple[Callable[[str], Any], Callable[[Any], str]]] = {
        "json": (
            lambda text: json.loads(text, parse_constant=_no_constant, parse_float=_finite),
            frames.encode,
        ),
    }
    try:
        orjson = importlib.import_module("orjson")
        found["orjson"] = (orjson.loads, lambda obj: orjson.dumps(obj).decode())
    except ImportError:
        pass
    try:
        msgspec_json = importlib.import_module("msgspec.json")
        decoder, encoder = msgspec_json.Decoder(), msgspec_json.Encoder()
        found["msgspec"] = (decoder.decode, lambda obj: encoder.encode(obj).decode())
    except ImportError:
        pass
    return found


def per_call(fn: Callable[[], Any], budget: float) -> float:
    """µs per call of ``fn``: the best of five timed batches, each about ``budget`` / 5 s."""
    n, start = 1, time.perf_counter()
    while time.perf_counter() - start < 0.01:  # size the batch
        fn()
        n += 1
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(max(1, int(n * budget / 5 / 0.01))):
            fn()
        best = min(best, (time.perf_counter() - t0) / max(1, int(n * budget / 5 / 0.01)))
    return best * 1e6


def disagreements(found: dict[str, tuple[Callable[[str], Any], Callable[[Any], str]]]) -> list[str]:
    """What each codec does with the values ``frames.py`` refuses or must keep."""
    cases: list[tuple[str, str, Any]] = [
        ("decode", "NaN", '{"x": NaN}'),
        ("decode", "1e400", '{"x": 1e400}'),
        ("decode", "2**64", '{"x": 18446744073709551616}'),
        ("decode", "nested 1,000", "[" * 1000 + "]" * 1000),
        ("decode", "lone surrogate", '{"x": "\\ud800"}'),
        ("encode", "NaN", {"x": float("nan")}),
        ("encode", "2**64", {"x": 2**64}),
        ("encode", "non-ASCII", {"x": "é"}),
    ]
    lines = []
    for name, (decode, encode) in found.items():
        said = []
        for way, label, value in cases:
            try:
                out = decode(value) if way == "decode" else encode(value)
                shown = repr(out)[:24] if way == "encode" else "accepted"
            except Exception as exc:
                shown = f"refused ({type(exc).__name__})"
            said.append(f"{way} {label}: {shown}")
        lines.append(f"- {name}: " + "; ".join(said))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run; the figures mean little")
    args = parser.parse_args()
    budget = 0.05 if args.quick else 0.5
    found = codecs()
    names = list(found)
    print(f"µs per frame, best of 5 (codecs: {', '.join(names)}; json is the reference)\n")
    print("| way | frame | bytes | " + " | ".join(names) + " |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    timings: dict[tuple[str, str, str], float] = {}
    for way, table in (("decode", READ), ("encode", WRITTEN)):
        for label, obj in table.items():
            text = frames.encode(obj)
            cells = []
            for name in names:
                decode, encode = found[name]
                call = functools.partial(decode, text) if way == "decode" else functools.partial(encode, obj)
                us = per_call(call, budget)
                timings[(way, label, name)] = us
                ratio = "" if name == "json" else f" ({timings[(way, label, 'json')] / us:.1f}x)"
                cells.append(f"{us:.2f}{ratio}")
            print(f"| {way} | {label} | {len(text.encode()):,} | " + " | ".join(cells) + " |")
    print("\nA sequential round trip (the hub decodes pub, pickup, return; encodes the pub's ack, the offer,")
    print("and the success with its end inside):")
    for name in names:
        total = sum(timings[(way, label, name)] for way, labels in ROUND_TRIP.items() for label in labels)
        print(f"- {name}: {total:.1f} µs")
    text = frames.encode(READ["pub"])
    whole = per_call(lambda: frames.decode_frame(text, 768 * 1024), budget)
    print(f"\nframes.decode_frame of the pub, all its checks included: {whole:.2f} µs")
    print("\nWhere the codecs differ from frames.py's rules:")
    for line in disagreements(found):
        print(line)


if __name__ == "__main__":
    main()
