"""``manage.py taskhub_purge [--status S] [--older-than AGE] [--dry-run] [--batch N] [--limit N]``:
delete old finished tasks with their events and assignments, in batches."""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from taskhub.conf import conf
from taskhub.core.states import TaskStatus
from taskhub.services.retention import FINISHED, KEEP_SETTING, Purged, purge

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` or a bare number of seconds.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 3600s"
        )
    number, unit = match.groups()
    return timedelta(seconds=float(number) * UNITS[unit or "s"])


def finished_status(text: str) -> TaskStatus:
    """A finished status by name.

    Raises:
        argparse.ArgumentTypeError: an unknown status, or one of an unfinished task.
    """
    names = ", ".join(FINISHED)
    if text in FINISHED:
        return TaskStatus(text)
    if text in {s.value for s in TaskStatus}:
        raise argparse.ArgumentTypeError(f"{text} tasks are not finished and never purged; choose from {names}")
    raise argparse.ArgumentTypeError(f"unknown status {text!r}; choose from {names}")


def positive(text: str) -> int:
    """A positive integer.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


class Command(BaseCommand):
    help = (
        "Delete finished tasks older than --older-than (default: TASKHUB_KEEP_SUCCEEDED for succeeded "
        "and ended tasks, TASKHUB_KEEP_FAILED for failed ones), with their events and assignments, "
        "in batches of --batch tasks, each its own transaction."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--status",
            action="append",
            type=finished_status,
            metavar="STATUS",
            help=f"purge tasks that finished in this status: {', '.join(FINISHED)} (repeat; default: all three)",
        )
        parser.add_argument(
            "--older-than",
            type=duration,
            metavar="AGE",
            help="that finished longer ago than this: 30d, 12h, 90m, 3600s (default: the settings)",
        )
        parser.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
        parser.add_argument(
            "--batch",
            type=positive,
            help=f"tasks deleted per transaction (default TASKHUB_PURGE_BATCH, {conf.PURGE_BATCH})",
        )
        parser.add_argument("--limit", type=positive, help="delete at most this many tasks in all")

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        chosen: list[TaskStatus] = list(dict.fromkeys(options["status"] or FINISHED))
        age: timedelta | None = options["older_than"]
        # Each status's cutoff: --older-than for all, else its setting's, if set.
        cutoffs: dict[TaskStatus, datetime] = {}
        for status in chosen:
            keep = getattr(conf, KEEP_SETTING[status])
            if age is not None:
                cutoffs[status] = now - age
            elif keep is not None:
                cutoffs[status] = now - timedelta(seconds=keep)
            elif options["status"]:
                setting = f"TASKHUB_{KEEP_SETTING[status]}"
                raise CommandError(f"nothing says how old {status} tasks must be: give --older-than or set {setting}")
        if not cutoffs:
            raise CommandError(
                "nothing says how old tasks must be: give --older-than, "
                "or set TASKHUB_KEEP_SUCCEEDED or TASKHUB_KEEP_FAILED"
            )
        verb = "would delete" if options["dry_run"] else "deleted"
        total = Purged()
        left = options["limit"]
        for status in chosen:
            if status not in cutoffs:
                self.stdout.write(f"{status}: kept (TASKHUB_{KEEP_SETTING[status]} is None)")
                continue
            if left == 0:
                total.more = True
                break
            purged = purge(
                statuses=[status],
                older_than=cutoffs[status],
                batch=options["batch"],
                dry_run=options["dry_run"],
                limit=left,
            )
            total += purged
            if left is not None:
                left -= purged.total
            self.stdout.write(
                f"{status}: {verb} {purged.tasks[status]} tasks ({purged.events[status]} events, "
                f"{purged.assignments[status]} assignments) that finished before {cutoffs[status]:%Y-%m-%d %H:%M:%S %Z}"
            )
        summary = f"{verb.capitalize()} {total.total} tasks in {total.batches} batches."
        if total.more:
            summary += " Stopped at --limit: more may be left."
        self.stdout.write(summary)
