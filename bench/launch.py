"""Launch benchmark: the LTI 1.3 login + launch exchange for learners who already have a
ready machine, against `labpool` under gunicorn and, in the same run, against a bare
pylti1p3 tool that only validates (`bench/bare_tool.py`).

    .venv/bin/python bench/launch.py [--quick | --smoke] [--db postgres|sqlite] [--profile]

Each launch is what a browser does when a student clicks the activity in Moodle, with a
fresh `requests.Session` (no cookies): POST the login initiation to `<tool>/lti/login`, GET
the fake Moodle's auth.php (tests/fakeplatform/: it checks the OIDC request and signs the
id_token), POST the id_token to `<tool>/lti/launch`, stop at the tool's 303 (the status page
is not fetched). Times:

* full exchange: the three requests, as the student waits for them;
* tool-side: the tool's answers to the login and the launch (requests' `elapsed`), without
  auth.php. `overhead_ratio` is labpool's mean tool-side time ÷ the bare tool's, from the
  sequential pass (one client, so the client's own Python work does not queue behind the
  server's answers).

Launches/s comes from the concurrent pass (`--clients` threads). Both tools run under
gunicorn with the same workers and threads, get the same launches, through the same client
code, and are measured alternately so drift hits both.

Setup: a temporary data folder, PostgreSQL database `test` in a schema of its own
(`labpool_bench`, dropped at start and end; not `public`, which the test suite resets and may
be using at the same time) or SQLite with `--db sqlite`, Redis
db 14 (flushed at start and end: reserved for this benchmark; with another `--redis-url` only
the keys the benchmark made are deleted). Every student launches once to get a machine, which
is then marked `assigned` with a dummy address directly in the database (no JupyterLab, no
worker: the launch only has to find it). Only loopback is used.

`--profile` adds an in-process breakdown of where the server time of one launch goes (both
tools served by werkzeug in this process, functions wrapped with timers).

Ends with `RESULT launches_per_s=… p95_ms=… overhead_ratio=…` (labpool's throughput, its
tool-side p95, and the ratio above). Target: overhead_ratio ≤ 1.25.

`--smoke` (what `.ci/run` runs): 2 learners, a handful of launches, the same code path, a
few seconds; its numbers mean nothing, it proves the benchmark still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.fakeplatform import (  # noqa: E402
    TARGET_LINK_URI,
    FakePlatform,
    FakePlatformError,
    ServedApp,
    foreign_private_key,
    register_fake_platform,
)

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_SCHEMA = "labpool_bench"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
QUEUE_NAME = "bench"
DUMMY_ADDRESS = "127.0.0.1:9"  # the discard port: never contacted, the launch only finds it
# Keys the benchmarks' tools write (labpool's launch storage, JWKS cache and rate counters,
# the LTI Advantage token cache of bench/roster.py, the bare tool's storage, the queue of the
# warm-up's start jobs).
OWN_KEY_PATTERNS = (
    "labpool:lti:*",
    "labpool:platform-jwks:*",
    "labpool:rate:*",
    "labpool:access-token:*",
    "bench:bare:*",
)

SIZES = {
    # students, sequential launches per tool, concurrent launches per tool
    "smoke": (2, 4, 8),
    "quick": (10, 80, 160),
    "full": (50, 600, 1500),
}


class BenchError(Exception):
    """The benchmark could not run or a launch went wrong; the message says what."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ServedProcess:
    """A server the benchmark started, logging to `log`: waited for until its health URL
    answers, read back on failure, stopped at the end."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    health_path: ClassVar[str] = "/healthz"

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited:\n{self.tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + self.health_path, timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not answer {self.health_path}:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 15) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclasses.dataclass
class Gunicorn(ServedProcess):
    @classmethod
    def start(
        cls,
        name: str,
        app_spec: str,
        port: int,
        env: dict[str, str],
        workers: int,
        threads: int,
        log_dir: Path,
        config: str | None = None,
    ) -> Gunicorn:
        """`config`: a gunicorn `--config` (e.g. `python:lti_tool.gunicorn_conf`, as `labpool
        run` starts the web app); the flags below still win over it."""
        log = log_dir / f"gunicorn-{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    *(["--config", config] if config else []),
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--workers",
                    str(workers),
                    "--threads",
                    str(threads),
                    "--log-level",
                    "warning",
                    app_spec,
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return cls(name, f"http://127.0.0.1:{port}", process, log)


def labpool_env(
    data_dir: Path, database_url: str, redis_url: str, port: int, workers: int
) -> dict[str, str]:
    """The environment of a benchmarked labpool web app on 127.0.0.1:`port`."""
    env = dict(os.environ)
    env.update(
        {
            "LABPOOL_DATA_DIR": str(data_dir),
            "LABPOOL_DATABASE_URL": database_url,
            "LABPOOL_REDIS_URL": redis_url,
            "LABPOOL_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "LABPOOL_QUEUE_NAME": QUEUE_NAME,
            "LABPOOL_WEB_WORKERS": str(workers),
            # Every simulated student comes from 127.0.0.1: the per-address limits stay on (their
            # Redis round trip is part of what is measured) but out of reach.
            "LABPOOL_LOGIN_RATE_LIMIT": str(10**9),
            "LABPOOL_LAUNCH_RATE_LIMIT": str(10**9),
        }
    )
    env.pop("LABPOOL_CONFIG", None)
    env.pop("LABPOOL_LISTEN", None)
    return env


# --------------------------------------------------------------------------- storage


def postgres_reachable(url: str) -> bool:
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any failure means "use SQLite"
        return False
    finally:
        engine.dispose()


def in_schema(url: str, schema: str) -> str:
    """The URL with the connection's search_path set to `schema` (libpq `options`)."""
    parsed = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return parsed.render_as_string(hide_password=False)


def reset_schema(url: str, schema: str, create: bool = True) -> None:
    """Drop (and re-create) the benchmark's own schema. Not `public`: the test suite resets
    that one in the same database and may be running meanwhile."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        if create:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


class RedisCleaner:
    """Empties the benchmark's Redis: the whole db when it is the reserved default one, else
    only the keys the benchmark's tools wrote."""

    def __init__(self, url: str):
        self.url = url
        self.conn = redis.Redis.from_url(url, socket_timeout=5)
        self.dedicated = url == DEFAULT_REDIS

    def clean(self) -> None:
        if self.dedicated:
            self.conn.flushdb()
            return
        queue_key = f"rq:queue:{QUEUE_NAME}"
        job_ids = [j.decode() for j in self.conn.lrange(queue_key, 0, -1)]
        doomed = [f"rq:job:{j}" for j in job_ids] + [queue_key]
        for pattern in OWN_KEY_PATTERNS:
            doomed.extend(self.conn.scan_iter(match=pattern, count=1000))
        for start in range(0, len(doomed), 500):
            self.conn.delete(*doomed[start : start + 500])
        self.conn.srem("rq:queues", queue_key)


# --------------------------------------------------------------------------- launches


@dataclasses.dataclass(frozen=True)
class Sample:
    total_s: float  # the whole exchange, as the browser waits for it
    tool_s: float  # the tool's two answers (login + launch), without auth.php


@dataclasses.dataclass
class Target:
    """One tool under test, and how to tell that its launch succeeded."""

    name: str
    url: str
    expect: Callable[[str, str], bool]  # (Location of the 303, student sub) -> ok?
    status: int = 303  # the tool's answer to a valid id_token (JupyterHub's is a 302)
    link: str = ""  # the target_link_uri launched (default: the launch URL)

    @property
    def launch_url(self) -> str:
        return self.link or self.url + FakePlatform.LAUNCH_PATH


def launch_once(platform: FakePlatform, target: Target, sub: str) -> Sample:
    """One full login + launch exchange with a new browser (no cookies)."""
    claims = platform.learner(sub=sub, **{TARGET_LINK_URI: target.launch_url})
    with requests.Session() as browser:
        started = time.perf_counter()
        result = platform.launch(browser, target.url, claims)
        total = time.perf_counter() - started
    response = result.launch_response
    location = response.headers.get("Location", "")
    if response.status_code != target.status or not target.expect(location, sub):
        raise BenchError(
            f"{target.name}: launch of student {sub} answered {response.status_code} "
            f"{location!r}: {response.text[:300]}"
        )
    tool = result.login_response.elapsed.total_seconds() + response.elapsed.total_seconds()
    return Sample(total, tool)


def run_sequential(
    platform: FakePlatform, targets: list[Target], students: list[str], n: int
) -> dict[str, list[Sample]]:
    """n launches per target, one at a time, alternating targets (and which goes first)."""
    samples: dict[str, list[Sample]] = {t.name: [] for t in targets}
    for i in range(n):
        order = targets if i % 2 == 0 else list(reversed(targets))
        for target in order:
            samples[target.name].append(launch_once(platform, target, students[i % len(students)]))
    return samples


def run_concurrent(
    platform: FakePlatform, target: Target, students: list[str], n: int, clients: int
) -> tuple[list[Sample], float]:
    """n launches with `clients` threads; returns the samples and the wall time."""
    counter = itertools.count()
    lock = threading.Lock()
    samples: list[Sample] = []

    def client() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= n:
                return
            sample = launch_once(platform, target, students[i % len(students)])
            with lock:
                samples.append(sample)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        for future in futures:
            future.result()  # re-raises a failed launch
    return samples, time.perf_counter() - started


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass(frozen=True)
class Summary:
    launches: int
    per_s: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @classmethod
    def of(cls, values_s: list[float], wall_s: float) -> Summary:
        ms = [v * 1000 for v in values_s]
        return cls(
            launches=len(ms),
            per_s=len(ms) / wall_s if wall_s else 0.0,
            mean_ms=sum(ms) / len(ms),
            p50_ms=percentile(ms, 50),
            p95_ms=percentile(ms, 95),
            p99_ms=percentile(ms, 99),
        )


def table(headers: list[str], rows: list[list[str]], text_columns: int = 2) -> str:
    """A plain-text table; the first `text_columns` columns left-aligned, numbers right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def summary_rows(
    by_tool: dict[str, tuple[list[Sample], float]],
) -> tuple[list[list[str]], dict[str, dict[str, Summary]]]:
    rows: list[list[str]] = []
    found: dict[str, dict[str, Summary]] = {}
    for tool, (samples, wall) in by_tool.items():
        found[tool] = {}
        for timing, values in (
            ("full exchange", [s.total_s for s in samples]),
            ("tool-side", [s.tool_s for s in samples]),
        ):
            s = Summary.of(values, wall)
            found[tool][timing] = s
            rows.append(
                [
                    tool,
                    timing,
                    str(s.launches),
                    f"{s.per_s:.1f}" if timing == "full exchange" else "",
                    f"{s.mean_ms:.2f}",
                    f"{s.p50_ms:.2f}",
                    f"{s.p95_ms:.2f}",
                    f"{s.p99_ms:.2f}",
                ]
            )
    return rows, found


HEADERS = ["tool", "timing", "launches", "launches/s", "mean ms", "p50 ms", "p95 ms", "p99 ms"]


# --------------------------------------------------------------------------- in-process breakdown

WHOLE = "whole request (WSGI app)"
STEPS = [
    WHOLE,
    "DB: platform lookup (DatabaseToolConf.platform)",
    "DB: launch transaction (checkout, record_launch, COMMIT)",
    "DB:   of which record_launch (4 upserts, 2 env selects, machine select, insert)",
    "DB: all SQL statements of the request (execute + fetch)",
    "DB: all pool pre-pings (SELECT 1 at each checkout)",
    "Redis launch storage: get_value",
    "Redis launch storage: set_value",
    "Redis launch storage: check_value",
    "Redis launch storage: consume (nonce DEL)",
    "JWKS: Redis GET + JWK→PEM",
    "jwt.decode (RSA verify + claims)",
    "sign_in (Flask session)",
]


class StepTimer:
    """Accumulates time per (tool, endpoint, step) for the request being served in this
    thread; the endpoint is set by a WSGI wrapper around each app."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.totals: dict[tuple[str, str, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, str, str], int] = defaultdict(int)

    def add(self, step: str, seconds: float) -> None:
        where = getattr(self.local, "where", None)
        if where is not None:
            self.totals[(*where, step)] += seconds
            self.counts[(*where, step)] += 1

    def wrap(self, step: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(step, time.perf_counter() - started)

        return timed

    def wsgi(self, tool: str, app: Callable[..., Any]) -> Callable[..., Any]:
        def timed_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            endpoint = environ.get("PATH_INFO", "").rsplit("/", 1)[-1]
            self.local.where = (tool, endpoint)
            started = time.perf_counter()
            try:
                return list(app(environ, start_response))
            finally:
                self.add(WHOLE, time.perf_counter() - started)
                self.local.where = None

        return timed_app

    def clear(self) -> None:
        self.totals.clear()
        self.counts.clear()


class _LateApp:
    """A WSGI app set after its server has a port (the app needs its own URL)."""

    app: Any = None

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


def _step_patches(timer: StepTimer, engine: Any) -> list[Any]:
    """mock.patch objects wrapping the steps of both tools with timers."""
    import jwt
    from pylti1p3.message_launch import MessageLaunch

    import lti_tool.lti as lti
    import lti_tool.web.lti_routes as routes
    from bench import bare_tool

    original_transaction = routes.transaction

    @contextlib.contextmanager
    def timed_transaction(factory: Any) -> Any:
        started = time.perf_counter()
        try:
            with original_transaction(factory) as session:
                yield session
        finally:
            timer.add(STEPS[2], time.perf_counter() - started)

    w = timer.wrap
    patches = [
        mock.patch.object(
            lti.DatabaseToolConf, "platform", w(STEPS[1], lti.DatabaseToolConf.platform)
        ),
        mock.patch.object(routes, "transaction", timed_transaction),
        mock.patch.object(routes, "record_launch", w(STEPS[3], routes.record_launch)),
        mock.patch.object(engine.dialect, "do_ping", w(STEPS[5], engine.dialect.do_ping)),
        mock.patch.object(
            lti.PlatformKeys, "public_key_pem", w(STEPS[10], lti.PlatformKeys.public_key_pem)
        ),
        mock.patch.object(
            MessageLaunch, "get_public_key", w(STEPS[10], MessageLaunch.get_public_key)
        ),
        # Both lti.py and pylti1p3 call it as `jwt.decode`.
        mock.patch.object(jwt, "decode", w(STEPS[11], jwt.decode)),
        mock.patch.object(routes, "sign_in", w(STEPS[12], routes.sign_in)),
    ]
    for cls in (lti.RedisLaunchDataStorage, bare_tool.RedisJsonStorage):
        for name, step in (
            ("get_value", STEPS[6]),
            ("set_value", STEPS[7]),
            ("check_value", STEPS[8]),
            ("consume", STEPS[9]),
        ):
            if name in cls.__dict__:
                patches.append(mock.patch.object(cls, name, w(step, getattr(cls, name))))
    return patches


def profile_breakdown(
    settings: Any,
    rt: Any,
    platform: FakePlatform,
    bare_conf: dict[str, str],
    students: list[str],
    n: int,
) -> str:
    """Serve both tools in this process (werkzeug), wrap their steps with timers, run n
    sequential launches on each, and tabulate the mean time per launch of every step."""
    from sqlalchemy import event

    from bench import bare_tool
    from lti_tool.web.app import create_app

    timer = StepTimer()
    labpool_holder, bare_holder = _LateApp(), _LateApp()
    labpool_server, bare_server = ServedApp(labpool_holder), ServedApp(bare_holder)
    labpool_holder.app = timer.wsgi(
        "labpool", create_app(dataclasses.replace(settings, public_url=labpool_server.url))
    )
    bare_holder.app = timer.wsgi(
        "bare", bare_tool.create_app({**bare_conf, "public_url": bare_server.url})
    )
    targets = [
        Target("labpool", labpool_server.url, lambda loc, sub: "/machines/" in loc),
        Target("bare", bare_server.url, lambda loc, sub: loc.endswith(bare_tool.DONE_PATH)),
    ]
    saved_uris = list(platform.registered_redirect_uris)
    platform.registered_redirect_uris += [t.launch_url for t in targets]

    engine = rt.sessions.kw["bind"]
    statement_started = threading.local()

    def before_sql(*_args: Any) -> None:
        statement_started.at = time.perf_counter()

    def after_sql(*_args: Any) -> None:
        timer.add(STEPS[4], time.perf_counter() - statement_started.at)

    labpool_server.start()
    bare_server.start()
    try:
        with contextlib.ExitStack() as stack:
            for patch in _step_patches(timer, engine):
                stack.enter_context(patch)
            event.listen(engine, "before_cursor_execute", before_sql)
            event.listen(engine, "after_cursor_execute", after_sql)
            stack.callback(event.remove, engine, "before_cursor_execute", before_sql)
            stack.callback(event.remove, engine, "after_cursor_execute", after_sql)
            run_sequential(platform, targets, students, 10)  # warm-up, not counted
            timer.clear()
            run_sequential(platform, targets, students, n)
    finally:
        labpool_server.stop()
        bare_server.stop()
        platform.registered_redirect_uris = saved_uris

    columns = [(tool, endpoint) for tool in ("labpool", "bare") for endpoint in ("login", "launch")]
    rows = []
    for step in STEPS:
        cells = [step]
        for tool, endpoint in columns:
            key = (tool, endpoint, step)
            if key not in timer.totals:
                cells.append("")
                continue
            calls = timer.counts[key] / n
            cells.append(
                f"{timer.totals[key] / n * 1000:.2f}" + (f" ×{calls:.0f}" if calls >= 1.5 else "")
            )
        if any(cells[1:]):
            rows.append(cells)
    headers = ["step: mean ms per launch (×calls)"] + [f"{t} {e}" for t, e in columns]
    return table(headers, rows, text_columns=1)


# --------------------------------------------------------------------------- the run


def add_server_args(
    parser: argparse.ArgumentParser,
    *,
    postgres: str = DEFAULT_POSTGRES,
    schema: str = DEFAULT_SCHEMA,
    redis: str = DEFAULT_REDIS,
) -> None:
    """The options every launch benchmark shares: where Labpool's database and Redis are,
    and how gunicorn runs (bench/launch.py, bench/burst.py, bench/peers.py; each with its
    own schema)."""
    parser.add_argument(
        "--db",
        choices=("postgres", "sqlite"),
        default=None,
        help="Labpool's database; default: postgres if reachable, else sqlite",
    )
    parser.add_argument("--postgres-url", default=postgres)
    parser.add_argument(
        "--schema",
        default=schema,
        help="PostgreSQL schema the benchmark owns (dropped at start and end)",
    )
    parser.add_argument("--redis-url", default=redis)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per tool")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a few seconds: does the benchmark still run (CI)",
    )
    add_server_args(parser)
    parser.add_argument("--clients", type=int, default=4, help="threads of the concurrent pass")
    parser.add_argument("--students", type=int, default=None)
    parser.add_argument("--sequential", type=int, default=None, help="launches per tool")
    parser.add_argument("--concurrent", type=int, default=None, help="launches per tool")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also break the server time down by step (in-process)",
    )
    args = parser.parse_args(argv)
    students, seq, conc = SIZES[size_mode(args)]
    args.students = args.students or students
    args.sequential = args.sequential or seq
    args.concurrent = args.concurrent or conc
    return args


def size_mode(args: argparse.Namespace) -> str:
    """`smoke`, `quick` or `full`, from the benchmark's --smoke / --quick flags."""
    return "smoke" if getattr(args, "smoke", False) else "quick" if args.quick else "full"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.db is None:
        args.db = "postgres" if postgres_reachable(args.postgres_url) else "sqlite"
    elif args.db == "postgres" and not postgres_reachable(args.postgres_url):
        raise BenchError(f"PostgreSQL is not reachable at {args.postgres_url}")

    cleaner = RedisCleaner(args.redis_url)
    try:
        cleaner.conn.ping()
    except redis.RedisError as exc:
        raise BenchError(f"Redis is not reachable at {args.redis_url}: {exc}") from exc

    data_dir = Path(tempfile.mkdtemp(prefix="labpool-bench-"))
    servers: list[Gunicorn] = []
    try:
        cleaner.clean()
        return _run(args, data_dir, cleaner, servers)
    except (BenchError, FakePlatformError):
        for server in servers:
            if server.tail().strip():
                print(
                    f"--- gunicorn ({server.name}) log, last lines:\n{server.tail()}",
                    file=sys.stderr,
                )
        raise
    finally:
        for server in servers:
            server.stop()
        with contextlib.suppress(redis.RedisError):
            cleaner.clean()
        if args.db == "postgres":
            with contextlib.suppress(Exception):
                reset_schema(args.postgres_url, args.schema, create=False)
        shutil.rmtree(data_dir, ignore_errors=True)


def _run(
    args: argparse.Namespace, data_dir: Path, cleaner: RedisCleaner, servers: list[Gunicorn]
) -> int:
    from bench import bare_tool
    from config.db import transaction
    from config.settings import load_settings
    from lti_tool.startup import prepare

    setup_started = time.perf_counter()
    if args.db == "postgres":
        reset_schema(args.postgres_url, args.schema)
        database_url = in_schema(args.postgres_url, args.schema)
    else:
        database_url = f"sqlite:///{data_dir / 'labpool.db'}"
    labpool_port, bare_port = free_port(), free_port()
    env = labpool_env(data_dir, database_url, args.redis_url, labpool_port, args.workers)
    settings = load_settings(env)
    rt = prepare(settings)

    with FakePlatform(tool_url=settings.public_url) as platform:
        reg = register_fake_platform(rt, platform)
        bare_conf = {
            **reg,
            "public_url": f"http://127.0.0.1:{bare_port}",
            "redis_url": args.redis_url,
        }
        platform.register_tool(
            settings.public_url,
            [settings.url("/lti/launch"), bare_conf["public_url"] + FakePlatform.LAUNCH_PATH],
        )
        bare_env = dict(env, BENCH_BARE_CONF=json.dumps(bare_conf))
        servers.append(
            Gunicorn.start(
                "labpool", "wsgi:app", labpool_port, env, args.workers, args.threads, data_dir
            )
        )
        servers.append(
            Gunicorn.start(
                "bare",
                "bench.bare_tool:create_app()",
                bare_port,
                bare_env,
                args.workers,
                args.threads,
                data_dir,
            )
        )
        for server in servers:
            server.wait_healthy()
        labpool_url, bare_url = servers[0].url, servers[1].url

        # Learners with a ready machine: one launch each creates it, the database says it is
        # assigned and running.
        students = [str(100 + i) for i in range(args.students)]
        machine_of: dict[str, int] = {}
        for sub in students:
            claims = platform.learner(sub=sub)
            with requests.Session() as browser:
                response = platform.launch(browser, labpool_url, claims).launch_response
            if response.status_code != 303 or "/machines/" not in response.headers.get(
                "Location", ""
            ):
                raise BenchError(
                    f"warm-up launch failed: {response.status_code} "
                    f"{response.text[:300]}\n{servers[0].tail()}"
                )
            machine_of[sub] = int(response.headers["Location"].rstrip("/").rsplit("/", 1)[1])
        with transaction(rt.sessions) as session:
            updated = session.execute(
                text(
                    "UPDATE machines SET state = 'assigned', address = :address, "
                    "ide_token = 'x', assigned_at = CURRENT_TIMESTAMP "
                    "WHERE state = 'requested'"
                ),
                {"address": DUMMY_ADDRESS},
            ).rowcount
        if updated != len(students):
            raise BenchError(f"expected {len(students)} requested machines, updated {updated}")
        queued_after_warmup = cleaner.conn.llen(f"rq:queue:{QUEUE_NAME}")

        targets = [
            Target(
                "labpool",
                labpool_url,
                lambda loc, sub: loc.rstrip("/").endswith(f"/machines/{machine_of[sub]}"),
            ),
            Target("bare", bare_url, lambda loc, sub: loc.endswith(bare_tool.DONE_PATH)),
        ]

        # Both tools must refuse a forged id_token, or the comparison is meaningless.
        for target in targets:
            claims = platform.learner(sub=students[0], **{TARGET_LINK_URI: target.launch_url})
            with requests.Session() as browser:
                forged = platform.launch(
                    browser, target.url, claims, sign_with=foreign_private_key()
                ).launch_response
            if forged.status_code == 303:
                raise BenchError(f"{target.name} accepted an id_token with a foreign signature")

        # Warm every worker thread of both tools (imports, pools, JWKS cache).
        warm = (1 if args.smoke else 4) * args.workers * args.threads
        for target in targets:
            run_concurrent(platform, target, students, warm, args.clients)
        with rt.sessions() as session:
            launches_before = session.execute(text("SELECT count(*) FROM launches")).scalar_one()
        setup_s = time.perf_counter() - setup_started

        measure_started = time.perf_counter()
        sequential = run_sequential(platform, targets, students, args.sequential)
        concurrent: dict[str, tuple[list[Sample], float]] = {t.name: ([], 0.0) for t in targets}
        half = args.concurrent // 2
        for round_ in range(2):  # L B B L: each tool once first, once second
            order = targets if round_ == 0 else list(reversed(targets))
            for target in order:
                size = half if round_ == 0 else args.concurrent - half
                samples, wall = run_concurrent(platform, target, students, size, args.clients)
                kept, walls = concurrent[target.name]
                concurrent[target.name] = (kept + samples, walls + wall)
        measure_s = time.perf_counter() - measure_started

        # What the measured launches did to the database and the queue.
        with rt.sessions() as session:
            launches_after = session.execute(text("SELECT count(*) FROM launches")).scalar_one()
            machines = session.execute(text("SELECT count(*) FROM machines")).scalar_one()
        measured_labpool = args.sequential + args.concurrent
        problems = []
        if launches_after - launches_before != measured_labpool:
            problems.append(
                f"launches table grew by {launches_after - launches_before}, "
                f"expected {measured_labpool}"
            )
        if machines != len(students):
            problems.append(f"{machines} machines for {len(students)} students")
        queued = cleaner.conn.llen(f"rq:queue:{QUEUE_NAME}")
        if queued != queued_after_warmup:
            problems.append(
                f"{queued - queued_after_warmup} start jobs enqueued during the "
                "measurement (machines should have been reused)"
            )
        if problems:
            raise BenchError("; ".join(problems))

        profile = None
        if args.profile:
            profile = profile_breakdown(
                settings, rt, platform, bare_conf, students, max(50, args.sequential // 4)
            )
        jwks_fetches = platform.jwks_fetches

    seq_rows, seq = summary_rows(
        {name: (samples, sum(s.total_s for s in samples)) for name, samples in sequential.items()}
    )
    conc_rows, conc = summary_rows(concurrent)

    mode = size_mode(args)
    print(
        f"Launch benchmark{'' if mode == 'full' else f' ({mode})'}: {len(students)} learners "
        f"with an assigned machine; database {args.db}; gunicorn {args.workers} workers × "
        f"{args.threads} threads per tool; {os.cpu_count()} CPUs"
    )
    print(
        f"setup {setup_s:.1f} s, measurement {measure_s:.1f} s; platform JWKS fetches: "
        f"{jwks_fetches} (public keys cached in Redis by both tools)"
    )
    print()
    print("Sequential pass (1 client, tools alternating): latency")
    print(table(HEADERS, seq_rows))
    print()
    print(f"Concurrent pass ({args.clients} client threads): throughput and latency under load")
    print(table(HEADERS, conc_rows))
    print()
    ratio = seq["labpool"]["tool-side"].mean_ms / seq["bare"]["tool-side"].mean_ms
    ratio_full = seq["labpool"]["full exchange"].mean_ms / seq["bare"]["full exchange"].mean_ms
    ratio_load = conc["labpool"]["tool-side"].mean_ms / conc["bare"]["tool-side"].mean_ms
    throughput = conc["labpool"]["full exchange"].per_s
    throughput_bare = conc["bare"]["full exchange"].per_s
    extra_ms = seq["labpool"]["tool-side"].mean_ms - seq["bare"]["tool-side"].mean_ms
    print(
        f"overhead_ratio = labpool ÷ bare, mean tool-side time (login + launch, without "
        f"auth.php), sequential pass: {ratio:.2f}  (target ≤ 1.25; "
        f"{'met' if ratio <= 1.25 else 'NOT met'}; labpool spends {extra_ms:+.2f} ms more)"
    )
    print(
        f"  same ratio on the full exchange: {ratio_full:.2f}; tool-side under load: "
        f"{ratio_load:.2f}; throughput labpool ÷ bare: {throughput / throughput_bare:.2f}"
    )
    if profile:
        print()
        print("Where the server time goes (in-process werkzeug, sequential, timers around steps):")
        print(profile)
    print(
        f"RESULT launches_per_s={throughput:.1f} "
        f"p95_ms={seq['labpool']['tool-side'].p95_ms:.2f} overhead_ratio={ratio:.3f}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, FakePlatformError) as exc:
        print(f"launch benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
