"""Prometheus metrics (prometheus_client), for every process: web, workers, cron.

Events (launches, machine starts, reconciler passes, roster syncs, grades sent, proxy auth
decisions) are counters and histograms kept by the process that saw them. Under gunicorn and
`labpool run` several processes count, so they write to one folder
(`PROMETHEUS_MULTIPROC_DIR`, set by `labpool run`, the systemd units and the compose file
before any process starts) and a scrape sums the folder's files (prometheus_client's
multiprocess mode). Without that variable each process keeps its own registry (tests, a
single `flask run`).

State (machines by state per pool, queue depths) is read from the database and Redis at
scrape time by a collector: the truth is there, nothing has to be kept in step.

No Flask here: `lti_tool/web/ops_routes.py` serves `/metrics`, workers only count.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def process_identifier() -> str:
    """Names this process's files in the metrics folder: host and pid, because containers
    sharing one folder (deploy/compose.yaml) each have their own pid 7."""
    return f"{socket.gethostname()}-{os.getpid()}"


if os.environ.get(MULTIPROC_ENV):
    values.ValueClass = values.MultiProcessValue(process_identifier)

# A launch is a few database statements and a redirect; a JupyterLab start takes seconds, a
# cloud server minutes: the buckets follow.
_FAST = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SLOW = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900)

LAUNCHES = Counter(
    "labpool_launches_total",
    "LTI launches by outcome (student, teacher, deep_link, refused, rate_limited, error)",
    ["outcome"],
)
LAUNCH_SECONDS = Histogram(
    "labpool_launch_seconds",
    "Time to answer /lti/launch, by outcome",
    ["outcome"],
    buckets=_FAST,
)
MACHINE_STARTS = Counter(
    "labpool_machine_starts_total",
    "Machine start jobs by result (ready, error, other: nothing to do or stopped meanwhile)",
    ["result"],
)
MACHINE_START_SECONDS = Histogram(
    "labpool_machine_start_seconds",
    "Time the backend took to start a machine (process or server created)",
    ["backend"],
    buckets=_SLOW,
)
MACHINE_READY_SECONDS = Histogram(
    "labpool_machine_ready_seconds",
    "From the start of a machine to its IDE answering",
    ["backend"],
    buckets=_SLOW,
)
RECONCILE_SECONDS = Histogram(
    "labpool_reconcile_pass_seconds",
    "Duration of one reconciler pass over one pool",
    buckets=_SLOW,
)
RECONCILE_ACTIONS = Counter(
    "labpool_reconcile_actions_total",
    "What reconciler passes did (created, ready, failed, stopped, orphans_deleted, "
    "warm_requested, volumes_attached, held)",
    ["action"],
)
ROSTER_SYNCS = Counter(
    "labpool_roster_syncs_total", "Roster syncs (NRPS) by result (ok, error)", ["result"]
)
AGS_SENDS = Counter(
    "labpool_ags_sends_total",
    "Scores sent to gradebooks (AGS) by result (sent, retry, failed, superseded, ...)",
    ["result"],
)
PROXY_AUTH = Counter(
    "labpool_proxy_auth_total",
    "nginx auth_request decisions for IDE requests (allowed, unauthenticated, forbidden)",
    ["decision"],
)

_REPORT_ACTIONS = (
    "created",
    "ready",
    "failed",
    "stopped",
    "orphans_deleted",
    "warm_requested",
    "volumes_attached",
)

F = TypeVar("F", bound=Callable[..., Any])


def counted(counter: Counter, result: Callable[[Any], str] = str) -> Callable[[F], F]:
    """Count each call of the decorated function under `result(its return value)`, or
    `error` when it raises (the exception goes on)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                value = fn(*args, **kwargs)
            except Exception:
                _count(counter, lambda: "error")
                raise
            _count(counter, lambda: result(value)[:40])
            return value

        return inner  # type: ignore[return-value]

    return wrap


def _count(counter: Counter, label: Callable[[], str]) -> None:
    """Counting never breaks what is counted."""
    try:
        counter.labels(label()).inc()
    except Exception:
        log.exception("metrics: cannot count %s", counter)


def start_result(value: str) -> str:
    """start_machine's answer as a result: ready (ready or assigned), error, or other (a
    start that had nothing to do, or was stopped meanwhile)."""
    if value in ("ready", "assigned"):
        return "ready"
    return "error" if value == "error" else "other"


def observe_launch(status: int, location: str, seconds: float) -> None:
    """A launch's outcome from its answer: a redirect to a machine is a student's, another
    redirect a teacher's class page, a page a teacher's content selection."""
    if status == 303:
        outcome = "student" if "/machines/" in location else "teacher"
    elif status == 200:
        outcome = "deep_link"
    elif status == 429:
        outcome = "rate_limited"
    elif status < 500:
        outcome = "refused"
    else:
        outcome = "error"
    LAUNCHES.labels(outcome).inc()
    LAUNCH_SECONDS.labels(outcome).observe(seconds)


def observe_proxy_auth(status: int) -> None:
    decision = {200: "allowed", 401: "unauthenticated"}.get(status, "forbidden")
    PROXY_AUTH.labels(decision).inc()


def observe_reconcile(report: Any, seconds: float) -> None:
    """One pass's PassReport (provisioning.reconciler) and how long it took."""
    RECONCILE_SECONDS.observe(seconds)
    for action in _REPORT_ACTIONS:
        count = getattr(report, action, 0) or 0
        if count:
            RECONCILE_ACTIONS.labels(action).inc(count)
    if getattr(report, "held", None):
        RECONCILE_ACTIONS.labels("held").inc()


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


class StateCollector(Collector):
    """Machines by state per pool, pools' targets, and RQ queue depths, read at scrape time."""

    def __init__(self, sessions: sessionmaker[Session], conn: redis.Redis, queue_name: str):
        self.sessions = sessions
        self.redis = conn
        self.queue_name = queue_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from provisioning.models import Environment, Machine, MachineState, Pool

        machines = GaugeMetricFamily(
            "labpool_machines",
            "Machines by environment (pool), backend and state, from the database",
            labels=["environment", "backend", "state"],
        )
        warm_target = GaugeMetricFamily(
            "labpool_pool_warm_target", "Warm machines each pool aims at", labels=["environment"]
        )
        backing_off = GaugeMetricFamily(
            "labpool_pool_backing_off",
            "1 while a pool's creation is held by a backoff",
            labels=["environment"],
        )
        try:
            with self.sessions() as session:
                envs = {e.id: (e.name, e.backend) for e in session.scalars(select(Environment))}
                counts = {
                    (env_id, state): n
                    for env_id, state, n in session.execute(
                        select(Machine.environment_id, Machine.state, func.count()).group_by(
                            Machine.environment_id, Machine.state
                        )
                    )
                }
                pools = list(session.scalars(select(Pool)))
        except Exception as exc:  # a scrape must not fail because the database does
            log.warning("metrics: cannot read machines: %s", type(exc).__name__)
            return
        for env_id, (name, backend) in sorted(envs.items()):
            for state in MachineState:
                if state is MachineState.stopped:
                    continue  # grows without bound and says nothing about now
                machines.add_metric([name, backend, state.value], counts.get((env_id, state), 0))
        from config.db import utcnow
        from provisioning.reconcile_decisions import is_held

        now = utcnow()
        for pool in pools:
            name = envs.get(pool.environment_id, (str(pool.environment_id), ""))[0]
            warm_target.add_metric([name], pool.warm_target)
            backing_off.add_metric([name], 1 if is_held(pool.backoff_until, now) else 0)
        yield machines
        yield warm_target
        yield backing_off

        depth = GaugeMetricFamily(
            "labpool_queue_jobs",
            "RQ jobs by queue and state (queued, started, failed)",
            labels=["queue", "state"],
        )
        try:
            from rq import Queue

            for name in (self.queue_name, f"{self.queue_name}-grading"):
                queue = Queue(name, connection=self.redis)
                depth.add_metric([name, "queued"], queue.count)
                depth.add_metric([name, "started"], queue.started_job_registry.count)
                depth.add_metric([name, "failed"], queue.failed_job_registry.count)
        except redis.RedisError as exc:
            log.warning("metrics: cannot read queues: %s", type(exc).__name__)
            return
        yield depth


def render(sessions: sessionmaker[Session], conn: redis.Redis, queue_name: str) -> bytes:
    """The text exposition of every process's events and the current state."""
    registry: CollectorRegistry
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_ProcessRegistry())
    registry.register(StateCollector(sessions, conn, queue_name))
    return generate_latest(registry)


class _ProcessRegistry(Collector):
    """This process's own metrics (no multiprocess folder), minus the state collector."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


CONTENT_TYPE = CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """gunicorn's child_exit hook: a dead worker's live gauges stop counting."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(f"{socket.gethostname()}-{pid}")  # type: ignore[arg-type]
