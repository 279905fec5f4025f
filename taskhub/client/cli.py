"""``python -m taskhub.client``: publish a task with a progress bar, watch one, or run a worker.

The URL, name and key come from ``--url``/``--name``/``--key`` or from the environment
variables ``TASKHUB_URL``, ``TASKHUB_NAME`` and ``TASKHUB_KEY``.

``pub`` and ``watch`` print the task's result (JSON) alone on standard output; the task
id, the progress bar, retries and anything worth saying while it runs go to standard
error. Their exit status: 0 with a result, 1 when the task failed, 2 when it ended without
a result, 3 when the command or the credential was refused (by the hub, or before
anything was sent: a payload that is not JSON, a task id that is not a UUID), 4 when the
hub could not be reached within the connect timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from taskhub.core.errors import AuthenticationFailed, ConnectionFailed, NoResult, ProtocolError, TaskFailed
from taskhub.core.messages import State

from .client import Client
from .handle import TERMINAL_STATUSES, Retrying, TaskHandle
from .tasks import Update

#: Seconds ``pub`` waits for a pickup before it says on standard error what the task waits
#: for (a subscriber, or a pickup by the services it was offered to).
WAITING_NOTICE = 3.0

#: Exit statuses.
OK, FAILED, NO_RESULT, REFUSED, UNREACHABLE = 0, 1, 2, 3, 4


class UsageError(Exception):
    """A command refused before anything is sent; its message is the one line shown."""


class ProgressBar:
    """A one-line progress bar on a terminal stream, driven by updates (one line per
    update when the stream is not a terminal)."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream, self.width = stream, width
        self._drawn = False

    def __call__(self, update: Update) -> None:
        if update.progress is not None:
            filled = round(update.progress * self.width)
            line = f"[{'#' * filled}{'.' * (self.width - filled)}] {update.progress:4.0%}"
        else:
            line = f"update: {json.dumps(update.data)[:60]}"
        self.stream.write(f"\r{line:<50}" if self.stream.isatty() else f"{line}\n")
        self.stream.flush()
        self._drawn = True

    def say(self, text: str) -> None:
        """Write a line of its own (after the bar, on a terminal)."""
        self.done()
        self.stream.write(f"{text}\n")
        self.stream.flush()

    def done(self) -> None:
        """End the bar's line, if one is drawn on a terminal."""
        if self._drawn and self.stream.isatty():
            self.stream.write("\n")
        self._drawn = False


#: What ``pub --help`` and ``watch --help`` say of their exit status.
EXIT_STATUS = (
    "exit status: 0 with a result, 1 when the task failed, 2 when it ended without a result, 3 when the "
    "command or the credential was refused, 4 when the hub could not be reached"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m taskhub.client", description="Publish a task with a progress bar, watch one, or run a worker."
    )
    url = os.environ.get("TASKHUB_URL", "ws://127.0.0.1:8000/ws/taskhub/")
    parser.add_argument("--url", default=url, help=f"the hub's WebSocket URL (TASKHUB_URL; now {url})")
    parser.add_argument("--name", default=os.environ.get("TASKHUB_NAME"), help="the credential's name (TASKHUB_NAME)")
    parser.add_argument("--key", default=os.environ.get("TASKHUB_KEY"), help="the credential's key (TASKHUB_KEY)")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="seconds to try to reach the hub before giving up (default 30; a worker keeps trying)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("pub", help="publish a task, show its progress, print its result", epilog=EXIT_STATUS)
    pub.add_argument("action")
    pub.add_argument(
        "payload",
        nargs="?",
        default="null",
        help="the payload: JSON, @FILE to read it from a file, or - to read it from standard input (default: null)",
    )
    pub.add_argument("--timeout", type=float, help="complete timeout in seconds")
    pub.add_argument("--pickup-timeout", type=float, help="pickup timeout in seconds")
    pub.add_argument("--task-id", help="choose the task id (a UUID)")
    pub.add_argument(
        "--no-wait", action="store_true", help="print the task id on standard output once published, and exit"
    )
    watch = sub.add_parser("watch", help="show a task's state and events, and follow it to its end", epilog=EXIT_STATUS)
    watch.add_argument("task_id")
    worker = sub.add_parser("worker", help="run MODULE:FUNCTION as the handler of one or more actions")
    worker.add_argument("target", metavar="MODULE:FUNCTION")
    worker.add_argument("--action", action="append", required=True, help="an action to subscribe to (repeat)")
    worker.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="of the client's log on standard error (default INFO: a line per task)",
    )
    return parser


def _payload(text: str, stdin: TextIO) -> Any:
    """The payload argument as JSON: given inline, ``@FILE`` or ``-`` (standard input).

    Raises:
        UsageError: the file cannot be read, or the text is not JSON.
    """
    source = "the payload"
    if text == "-":
        text, source = stdin.read(), "the payload on standard input"
    elif text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the payload file {str(path)!r}: {exc}") from None
        source = f"the payload in {str(path)!r}"
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{source} is not JSON: {exc}") from None


def _task_id(text: str, what: str) -> str:
    """The task id ``what`` gives (an option, an argument) as the hub spells it.

    Raises:
        UsageError: ``text`` is not a UUID.
    """
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a UUID (task ids look like {uuid.uuid4()})") from None


def _load(target: str) -> Any:
    """The handler ``MODULE:FUNCTION`` names, imported from the current folder first.

    Raises:
        UsageError: the target is malformed, or cannot be imported.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{target!r} is not MODULE:FUNCTION")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} (from {os.getcwd()}): {exc}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise UsageError(f"{module_name!r} has no {attribute!r}") from None


def _retrying(bar: ProgressBar) -> Callable[[Retrying], None]:
    """The ``retry`` callback: a line of its own for each failed attempt."""
    return lambda r: bar.say(f"attempt {r.attempt} failed ({r.reason}); attempt {r.next_attempt} follows")


async def _outcome(handle: TaskHandle, bar: ProgressBar) -> int:
    """Wait for the task's end: print its result on standard output, or say why there is
    none on standard error. Returns the exit status."""
    try:
        result = await handle.get_result()
    except TaskFailed as exc:
        bar.say(f"failed: {exc}")
        return FAILED
    except NoResult as exc:
        bar.say(str(exc))
        return NO_RESULT
    bar.done()
    print(json.dumps(result, indent=2))
    return OK


async def _say_if_waiting(client: Client, handle: TaskHandle, action: str, bar: ProgressBar) -> None:
    """After :data:`WAITING_NOTICE` seconds, say what the task waits for if nobody picked
    it up: otherwise a task with no subscriber looks like a hung command."""
    await asyncio.sleep(WAITING_NOTICE)
    state = await client.get_task(handle.task_id)
    task = state.task
    if task["status"] in TERMINAL_STATUSES or task.get("retry_at"):
        return  # over, or waiting for its retry (which the retry line said)
    current = [e for e in state.events if e.get("attempt", 1) == task.get("attempt", 1)]
    if any(e["kind"] in ("pickup", "update") for e in current):
        return
    if task["status"] == "pending":
        bar.say(
            f"task {handle.task_id} is waiting for a subscriber of {action} "
            "(start a worker for it; the task fails after its pickup timeout)"
        )
    else:
        services = sorted({str(e.get("service")) for e in current if e["kind"] == "start"})
        bar.say(f"task {handle.task_id} was offered to {', '.join(services) or 'a service'}, waiting for a pickup")


async def _pub(client: Client, args: argparse.Namespace) -> int:
    payload = _payload(args.payload, sys.stdin)
    task_id = _task_id(args.task_id, "--task-id") if args.task_id else None
    bar = ProgressBar(sys.stderr)
    async with client:
        handle = client.pub(args.action, payload, args.timeout, pickup_timeout=args.pickup_timeout, task_id=task_id)
        # An update read with the ack (one read, a fast server) waits for the task's line.
        held = _Replayed(bar)
        handle.on("update", held).on("retry", held)
        await handle.published  # raises the hub's refusal
        if args.no_wait:
            print(handle.task_id)
            return OK
        bar.say(f"task {handle.task_id}")
        held.release(State(task={}, events=[]))
        notice = asyncio.create_task(_say_if_waiting(client, handle, args.action, bar))
        try:
            return await _outcome(handle, bar)
        finally:
            notice.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await notice


class _Replayed:
    """A watch's callbacks: hold what the watch replays until its answer says which events
    the timeline printed already, then pass on only the newer ones."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar
        self.held: list[Update | Retrying] | None = []

    def __call__(self, heard: Update | Retrying) -> None:
        if self.held is not None:
            self.held.append(heard)
        elif isinstance(heard, Update):
            self.bar(heard)
        else:
            _retrying(self.bar)(heard)

    def release(self, state: State) -> None:
        """Pass on what came after the events of ``state`` (the replay comes first, in order)."""
        held, self.held = self.held or [], None
        updates = sum(e["kind"] == "update" for e in state.events)
        retries = sum(e["kind"] == "retry" for e in state.events)
        for heard in held:
            if isinstance(heard, Update) and updates:
                updates -= 1
            elif isinstance(heard, Retrying) and retries:
                retries -= 1
            else:
                self(heard)


async def _watch(client: Client, args: argparse.Namespace) -> int:
    task_id = _task_id(args.task_id, "the task id")
    bar = ProgressBar(sys.stderr)
    async with client:
        follow = _Replayed(bar)
        handle = client.watch(task_id).on("update", follow).on("retry", follow)
        state = await handle.published  # raises the hub's refusal
        assert isinstance(state, State)
        for event in state.events:
            data = "" if event.get("data") is None else json.dumps(event["data"])[:200]
            bar.say(f"{event.get('at', '')}  {event['kind']:<12} {event.get('service') or '-':<20} {data}")
        task = state.task
        bar.say(f"{task['action']} {task['status']}, attempt {task.get('attempt', 1)}")
        follow.release(state)
        return await _outcome(handle, bar)


async def _worker(client: Client, args: argparse.Namespace) -> int:
    function = _load(args.target)
    for action in args.action:
        client.sub(action, function)
    print(f"worker {args.target} serving {', '.join(args.action)} at {args.url}", file=sys.stderr, flush=True)
    await client.run_forever()
    return OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); returns the exit status."""
    args = _parser().parse_args(argv)
    # The worker logs a line per task (INFO on "taskhub.client"); the others only problems.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "worker":
        logging.getLogger("taskhub").setLevel(args.log_level)
    command = {"pub": _pub, "watch": _watch, "worker": _worker}[args.command]
    try:
        if not args.name or not args.key:
            raise UsageError("give --name and --key (or TASKHUB_NAME and TASKHUB_KEY)")
        try:
            client = Client(args.url, name=args.name, key=args.key, connect_timeout=args.connect_timeout)
        except ValueError as exc:  # a URL that is not ws:// or wss://
            raise UsageError(str(exc)) from None
        return asyncio.run(command(client, args))
    except (UsageError, AuthenticationFailed, ProtocolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return REFUSED
    except ConnectionFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UNREACHABLE
    except KeyboardInterrupt:
        return 130
