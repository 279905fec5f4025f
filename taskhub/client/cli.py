"""``python -m taskhub.client``: publish a task with a progress bar, watch one, or run a worker.

The URL, name and key come from ``--url``/``--name``/``--key`` or from the environment
variables ``TASKHUB_URL``, ``TASKHUB_NAME`` and ``TASKHUB_KEY``.

Exit status of ``pub``: 0 with a result, 1 when the task failed, 2 when it ended without a
result, 3 when the hub refused the command or the credential, 4 when the hub could not be
reached within the connect timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from typing import Any, TextIO

from taskhub.core.errors import AuthenticationFailed, ConnectionFailed, NoResult, ProtocolError, TaskFailed

from .client import Client
from .tasks import Update


class ProgressBar:
    """A one-line progress bar on a terminal stream, driven by updates."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream, self.width = stream, width

    def __call__(self, update: Update) -> None:
        if update.progress is not None:
            filled = round(update.progress * self.width)
            line = f"[{'#' * filled}{'.' * (self.width - filled)}] {update.progress:4.0%}"
        else:
            line = f"update: {json.dumps(update.data)[:60]}"
        self.stream.write(f"\r{line:<50}" if self.stream.isatty() else f"{line}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.stream.isatty():
            self.stream.write("\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m taskhub.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("TASKHUB_URL", "ws://127.0.0.1:8000/ws/taskhub/"))
    parser.add_argument("--name", default=os.environ.get("TASKHUB_NAME"))
    parser.add_argument("--key", default=os.environ.get("TASKHUB_KEY"))
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="seconds to try to reach the hub before giving up (default 30; a worker keeps trying)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("pub", help="publish a task, show its progress, print its result")
    pub.add_argument("action")
    pub.add_argument("payload", nargs="?", default="null", help="the payload as JSON (default: null)")
    pub.add_argument("--timeout", type=float, help="complete timeout in seconds")
    pub.add_argument("--pickup-timeout", type=float, help="pickup timeout in seconds")
    pub.add_argument("--task-id", help="choose the task id (a UUID)")
    watch = sub.add_parser("watch", help="show a task's state and events, and follow it to its end")
    watch.add_argument("task_id")
    worker = sub.add_parser("worker", help="run MODULE:FUNCTION as the handler of one or more actions")
    worker.add_argument("target", metavar="MODULE:FUNCTION")
    worker.add_argument("--action", action="append", required=True, help="an action to subscribe to (repeat)")
    return parser


def _load(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise SystemExit(f"error: {target!r} is not MODULE:FUNCTION")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module_name), attribute)


async def _pub(client: Client, args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise SystemExit(f"error: the payload is not JSON: {exc}") from None
    bar = ProgressBar(sys.stderr)
    async with client:
        handle = client.pub(
            args.action, payload, args.timeout, pickup_timeout=args.pickup_timeout, task_id=args.task_id
        ).on("update", bar)
        try:
            result = await handle.get_result()
        except TaskFailed as exc:
            bar.done()
            print(f"failed: {exc}", file=sys.stderr)
            return 1
        except NoResult as exc:
            bar.done()
            print(str(exc), file=sys.stderr)
            return 2
        bar.done()
        print(json.dumps(result, indent=2))
        return 0


async def _watch(client: Client, args: argparse.Namespace) -> int:
    async with client:
        state = await client.get_task(args.task_id)
        for event in state.events:
            print(f"{event['at']}  {event['kind']:<12} {event['service']:<20} {json.dumps(event['data'])}")
        print(json.dumps(state.task, indent=2))
    return 0


async def _worker(client: Client, args: argparse.Namespace) -> int:
    function = _load(args.target)
    for action in args.action:
        client.sub(action, function)
    print(f"worker {args.target} serving {', '.join(args.action)} at {args.url}", file=sys.stderr)
    await client.run_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.name or not args.key:
        raise SystemExit("error: give --name and --key (or TASKHUB_NAME and TASKHUB_KEY)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    client = Client(args.url, name=args.name, key=args.key, connect_timeout=args.connect_timeout)
    command = {"pub": _pub, "watch": _watch, "worker": _worker}[args.command]
    try:
        return asyncio.run(command(client, args))
    except (AuthenticationFailed, ProtocolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ConnectionFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        return 130
