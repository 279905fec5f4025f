"""Prometheus metrics, served at ``/taskhub/metrics`` (:func:`view`).

Install the ``metrics`` extra (``prometheus-client``); without it the hub runs as before
and the view answers 501. docs/metrics.md has queries, alerts and a scrape config.

=======================================  =========  ====================  ===========================
metric                                   type       labels                what
=======================================  =========  ====================  ===========================
taskhub_tasks_published_total            counter    action                tasks created (a ``pub`` sent
                                                                          again is not counted twice)
taskhub_tasks_finished_total             counter    action, status,       tasks that finished: status
                                                    reason                ``success``, ``ended``, or
                                                                          ``failed`` with its failure
                                                                          reason (``error``,
                                                                          ``pickup_timeout``, ...)
taskhub_tasks_retried_total              counter    action, reason        attempts that failed and are
                                                                          followed by another (the task's
                                                                          ``retries``)
taskhub_task_wait_seconds                histogram  action                publish to a service's pickup,
                                                                          first attempt
taskhub_task_run_seconds                 histogram  action                an attempt's first pickup to its
                                                                          end (the task's, or a retry)
taskhub_layer_send_failures_total        counter    reason                notices not delivered: ``full``
                                                                          (the channel's queue) or
                                                                          ``error`` (Redis down, say)
taskhub_tasks                            gauge      action, status        unfinished tasks: ``pending``
                                                                          and ``started`` (running)
taskhub_tasks_waiting_for_subscriber     gauge      action                pending tasks whose action no
                                                                          live instance subscribes to
taskhub_instances                        gauge      service               connected instances with a
                                                                          current lease, per active
                                                                          credential (0 included)
=======================================  =========  ====================  ===========================

Two kinds of metrics, made correct with several hub processes in two ways:

- *Events* (the counters and histograms) are counted where they happen, in the process
  that applied the transition: :func:`observe` is called once per transition written
  (:mod:`taskhub.services.transitions`, which applies each exactly once, whatever the
  process), :func:`send_failed` once per notice lost (:mod:`taskhub.notify`). They live in
  TaskHub's own :class:`~prometheus_client.CollectorRegistry`, not the global one, so that
  a project's own metrics are not mixed in. With ``PROMETHEUS_MULTIPROC_DIR`` set (read when
  ``prometheus_client`` is imported, as that library does) every process writes them to
  files there, and any process's answer sums them all: set it when several hub processes
  run on one host. Across hosts, scrape every host (or process) and ``sum()``.
- *Gauges* are read from the database at scrape time (:class:`DatabaseCollector`), so
  every process answers the same: aggregate them across targets with ``max()``, not
  ``sum()``.

Actions are chosen by clients, so their number is bounded: the first
:data:`MAX_ACTIONS` actions a process sees get a label of their own, the others share the
label ``other`` (no action is called that: an action has a colon). The gauges keep the
:data:`MAX_ACTIONS` actions with the most unfinished tasks, and add up the rest as ``other``.
"""

from __future__ import annotations

import contextlib
import glob
import hmac
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .conf import conf
from .core.codes import EventKind
from .core.states import TaskStatus
from .models import Credential, Subscription, TaskEvent, TaskRecord

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector
except ImportError:  # the "metrics" extra is not installed: observe() does nothing
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from .core import machine

log = logging.getLogger(__name__)

#: Actions with a label of their own, per process (and in the gauges); the rest are ``other``.
MAX_ACTIONS = 100
#: The label of the actions beyond :data:`MAX_ACTIONS`. Never an action's name (no colon).
OTHER = "other"
#: Seconds: from a few milliseconds (a task picked up at once) to an hour (a long task).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Where every process writes its counters in prometheus-client's multiprocess mode.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
#: The unfinished statuses the ``taskhub_tasks`` gauge counts.
UNFINISHED = (TaskStatus.PENDING.value, TaskStatus.STARTED.value)
#: What the hook looks at; a transition with none of these costs one set look-up per event.
_OBSERVED = frozenset({EventKind.INIT, EventKind.PICKUP, EventKind.RETRY, EventKind.END})


class _Series:
    """One action's labelled children, looked up once: ``labels()`` costs a lock and a
    dict look-up per call on the hot path."""

    __slots__ = ("action", "finished", "metrics", "published", "retried", "run", "wait")

    def __init__(self, metrics: TaskMetrics, action: str) -> None:
        self.metrics, self.action = metrics, action
        self.published = metrics.published.labels(action)
        self.wait = metrics.wait.labels(action)
        self.run = metrics.run.labels(action)
        self.finished: dict[tuple[str, str], Any] = {}
        self.retried: dict[str, Any] = {}

    def finish(self, status: str, reason: str) -> None:
        child = self.finished.get((status, reason))
        if child is None:
            child = self.finished[status, reason] = self.metrics.finished.labels(self.action, status, reason)
        child.inc()

    def retry(self, reason: str) -> None:
        child = self.retried.get(reason)
        if child is None:
            child = self.retried[reason] = self.metrics.retried.labels(self.action, reason)
        child.inc()


class TaskMetrics:
    """The counters and histograms of this process, in ``registry`` (a new one by default).

    The hub uses one, :data:`EVENTS`; a test may put a fresh one in its place.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, max_actions: int | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        #: Actions with a label of their own; ``None``: :data:`MAX_ACTIONS`, read when one comes.
        self.max_actions = max_actions
        r = self.registry
        self.published = Counter("taskhub_tasks_published", "Tasks published.", ["action"], registry=r)
        self.finished = Counter(
            "taskhub_tasks_finished",
            "Tasks that finished, by status (success, failed, ended) and failure reason.",
            ["action", "status", "reason"],
            registry=r,
        )
        self.retried = Counter(
            "taskhub_tasks_retried",
            "Attempts that failed and are followed by another, by failure reason.",
            ["action", "reason"],
            registry=r,
        )
        self.wait = Histogram(
            "taskhub_task_wait_seconds",
            "Seconds from a task's publication to a service's pickup (first attempt).",
            ["action"],
            buckets=BUCKETS,
            registry=r,
        )
        self.run = Histogram(
            "taskhub_task_run_seconds",
            "Seconds from an attempt's first pickup to its end.",
            ["action"],
            buckets=BUCKETS,
            registry=r,
        )
        self.send_failures = Counter(
            "taskhub_layer_send_failures",
            "Notices that could not be delivered (full: the channel's queue; error: any other).",
            ["reason"],
            registry=r,
        )
        for reason in ("full", "error"):  # at 0 from the start, so that increase() sees the first
            self.send_failures.labels(reason)
        self._series: dict[str, _Series] = {}
        self._other: _Series | None = None
        self._lock = threading.Lock()

    def series(self, action: str) -> _Series:
        """The children of ``action``, or of ``other`` once :attr:`max_actions` are taken."""
        found = self._series.get(action)
        if found is not None:
            return found
        limit = MAX_ACTIONS if self.max_actions is None else self.max_actions
        with self._lock:  # database threads observe at once
            found = self._series.get(action)
            if found is None:
                if len(self._series) < limit:
                    found = self._series[action] = _Series(self, action)
                else:  # not remembered by name: random names must not grow memory
                    if self._other is None:
                        self._other = _Series(self, OTHER)
                    found = self._other
            return found

    def observe(self, record: TaskRecord, task: machine.Task, events: Sequence[machine.Event], now: datetime) -> None:
        """Count one transition, written at ``now``: ``record`` as it was read (before the
        transition's changes), ``task`` and ``events`` as the core decided.

        Raises:
            DatabaseError: reading a pickup time failed (a task without a complete timeout).
        """
        series = None
        for event in events:
            kind = event.kind
            if kind not in _OBSERVED:
                continue
            series = series or self.series(record.action)
            if kind is EventKind.PICKUP:
                # Later attempts waited for their retry's backoff first: the first only.
                if event.attempt == 1:
                    series.wait.observe(max((now - record.created_at).total_seconds(), 0.0))
            elif kind is EventKind.END:
                series.finish(task.status.value, task.failure_reason)
                if record.status == TaskStatus.STARTED:
                    self._ran(series, record, event.attempt, now)
            elif kind is EventKind.INIT:
                series.published.inc()
            elif record.status == TaskStatus.STARTED:  # a retry after a failed attempt, not on request
                series.retry(event.data["reason"])
                self._ran(series, record, event.attempt, now)

    @staticmethod
    def _ran(series: _Series, record: TaskRecord, attempt: int, now: datetime) -> None:
        """Observe the run time of the attempt that ends ``now``, if it was picked up.

        The task's row says when: an attempt's first pickup starts its complete deadline.
        Only a task without a complete timeout needs its pickup event read.
        """
        if record.complete_timeout is not None:
            if record.complete_deadline is None:
                return  # never picked up (returned, dropped or failed straight from the offer)
            picked_up = record.complete_deadline - timedelta(seconds=record.complete_timeout)
        else:
            with _savepoint():
                found = (
                    TaskEvent.objects.filter(task_id=record.pk, attempt=attempt, kind=EventKind.PICKUP)
                    .order_by("id")
                    .values_list("created_at", flat=True)
                    .first()
                )
            if found is None:
                return
            picked_up = found
        series.run.observe(max((now - picked_up).total_seconds(), 0.0))


def _savepoint() -> contextlib.AbstractContextManager[Any]:
    """A savepoint inside a transaction, so that a failed read leaves it usable; outside
    one, nothing (a transaction would cost two more round trips)."""
    return transaction.atomic() if transaction.get_connection().in_atomic_block else contextlib.nullcontext()


def _events() -> TaskMetrics | None:
    return TaskMetrics() if AVAILABLE else None


#: This process's counters and histograms (``None`` without prometheus-client).
EVENTS: TaskMetrics | None = _events()


def observe(record: TaskRecord, task: machine.Task, events: Sequence[machine.Event], now: datetime) -> None:
    """Count a transition just written: call once per transition applied, after its write,
    with ``record`` as it was read (:meth:`TaskMetrics.observe`). Never raises: the
    transition happened whatever the metrics make of it."""
    metrics = EVENTS
    if metrics is None:
        return
    try:
        metrics.observe(record, task, events, now)
    except Exception:
        log.exception("could not count a transition of task %s in the metrics", record.pk)


def send_failed(reason: str) -> None:
    """Count a notice that could not be delivered: ``"full"`` (the channel's queue is
    full) or ``"error"``. Call where the failure is caught (:mod:`taskhub.notify`)."""
    metrics = EVENTS
    if metrics is not None:
        metrics.send_failures.labels(reason).inc()


# -- the gauges, read at scrape time ----------------------------------------------------------


def capped(counts: dict[str, int], limit: int) -> dict[str, int]:
    """``counts`` by action, the ``limit`` largest kept (ties by name, so that every
    process keeps the same) and the rest added up under ``other``."""
    if len(counts) <= limit:
        return counts
    ranked = sorted(counts, key=lambda action: (-counts[action], action))
    kept = {action: counts[action] for action in ranked[:limit]}
    kept[OTHER] = sum(counts[action] for action in ranked[limit:])
    return kept


class DatabaseCollector:
    """The gauges, from three indexed queries on every scrape: every hub process answers
    the same. Collect on a thread where Django may query (not an event loop).

    Raises (from ``collect``):
        DatabaseError: the database cannot be read; the scrape fails (``up`` is 0).
    """

    def describe(self) -> Iterable[Metric]:
        # Names only: the registry checks them for clashes without querying the database.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        tasks, waiting, instances = self._families()
        now = timezone.now()
        rows = (
            TaskRecord.objects.filter(status__in=UNFINISHED)
            .values("action", "status")
            .annotate(n=Count("pk"))
            .order_by()
            .values_list("action", "status", "n")
        )
        by_status: dict[str, dict[str, int]] = {status: {} for status in UNFINISHED}
        for action, status, n in rows:
            by_status[status][action] = n
        # The actions kept are those with the most unfinished tasks, whatever their status.
        totals: dict[str, int] = {}
        for counts in by_status.values():
            for action, n in counts.items():
                totals[action] = totals.get(action, 0) + n
        kept = capped(totals, MAX_ACTIONS).keys()
        for status, counts in by_status.items():
            for action, n in _fold(counts, kept).items():
                tasks.add_metric([action, status], n)
        # As dispatch sees it (services.dispatch.dispatch_waiting): a live, attached instance.
        live = Q(instance__lease_expires_at__gt=now, instance__detached_at__isnull=True)
        subscribed = set(Subscription.objects.filter(live).values_list("action", flat=True).distinct())
        pending = by_status[TaskStatus.PENDING.value]
        unheard = {action: n for action, n in pending.items() if action not in subscribed}
        for action, n in _fold(unheard, kept).items():
            waiting.add_metric([action], n)
        connected = Q(instances__lease_expires_at__gt=now, instances__detached_at__isnull=True)
        services = (
            Credential.objects.filter(is_active=True)
            .annotate(n=Count("instances", filter=connected))
            .order_by("name")
            .values_list("name", "n")
        )
        for name, n in services:
            instances.add_metric([name], n)
        return [tasks, waiting, instances]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "taskhub_tasks", "Unfinished tasks: pending, and started (running).", labels=["action", "status"]
            ),
            GaugeMetricFamily(
                "taskhub_tasks_waiting_for_subscriber",
                "Pending tasks whose action no live instance subscribes to.",
                labels=["action"],
            ),
            GaugeMetricFamily(
                "taskhub_instances",
                "Connected instances with a current lease, per active credential.",
                labels=["service"],
            ),
        ]


def _fold(counts: dict[str, int], kept: Iterable[str]) -> dict[str, int]:
    """``counts`` with the actions not ``kept`` added up under ``other``."""
    kept = set(kept)
    folded: dict[str, int] = {}
    for action, n in counts.items():
        label = action if action in kept else OTHER
        folded[label] = folded.get(label, 0) + n
    return folded


class _ProcessFiles:
    """Every process's TaskHub metrics from the multiprocess directory, summed; the
    project's own metrics in the same directory are left to the project."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        files = glob.glob(os.path.join(self.path, "*.db"))
        for metric in MultiProcessCollector.merge(files, accumulate=True):  # type: ignore[no-untyped-call]
            if metric.name.startswith("taskhub_"):
                yield metric


def exposition_registry() -> CollectorRegistry:
    """What ``/taskhub/metrics`` serves: the events (every process's, in multiprocess
    mode; else this process's) and the gauges, read from the database when collected.

    Raises:
        RuntimeError: prometheus-client is not installed.
    """
    if EVENTS is None:
        raise RuntimeError("prometheus-client is not installed: pip install 'django-taskhub[metrics]'")
    registry = CollectorRegistry()
    registry.register(_ProcessFiles(MULTIPROCESS_DIR) if MULTIPROCESS_DIR else EVENTS.registry)
    registry.register(DatabaseCollector())
    return registry


# -- the view ---------------------------------------------------------------------------------

REALM = 'Bearer realm="taskhub"'


def refusal(request: HttpRequest) -> HttpResponse | None:
    """Why ``request`` may not read the metrics, as the answer to send; ``None`` for an
    active staff user's session or ``Authorization: Bearer <TASKHUB_METRICS_TOKEN>``.

    401 (with a ``WWW-Authenticate`` challenge, RFC 6750) without credentials or with a
    wrong token; 403 for a session whose user is not active staff.
    """
    user = getattr(request, "user", None)  # None without AuthenticationMiddleware
    if user is not None and user.is_active and user.is_staff:
        return None
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, given = header.partition(" ")
        token = conf.METRICS_TOKEN
        if scheme.lower() == "bearer" and token and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None
        answer = HttpResponse("Invalid token.\n", status=401, content_type="text/plain")
        answer["WWW-Authenticate"] = f'{REALM}, error="invalid_token"'
        return answer
    if user is not None and user.is_authenticated:
        return HttpResponse("Staff only.\n", status=403, content_type="text/plain")
    answer = HttpResponse(
        "Log in as a staff user, or send Authorization: Bearer <TASKHUB_METRICS_TOKEN>.\n",
        status=401,
        content_type="text/plain",
    )
    answer["WWW-Authenticate"] = REALM
    return answer


@never_cache
@require_safe
def view(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition (text, or OpenMetrics when the scraper asks for it), for
    staff sessions and the bearer token; 501 without prometheus-client.

    A sync view: Django runs it on a thread, where the gauges' queries may run.
    """
    refused = refusal(request)
    if refused is not None:
        return refused
    if not AVAILABLE:
        return HttpResponse(
            "prometheus-client is not installed: pip install 'django-taskhub[metrics]'.\n",
            status=501,
            content_type="text/plain",
        )
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(exposition_registry()), content_type=content_type)
