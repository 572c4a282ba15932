"""Launch CPU profile: where the tool's CPU goes in a first launch and a relaunch, phase by
phase, in this process, against the bare pylti1p3 tool (`bench/bare_tool.py`).

    .venv/bin/python bench/launch_profile.py [--quick | --smoke] [--db postgres|sqlite]
        [--cprofile N]

No HTTP server and no gunicorn: each launch is the login initiation and the id_token POST
sent through Flask's test client to `create_app()` (and to the bare tool's app), a fresh
client (no cookies) per launch, the id_token signed by the fake Moodle
(`tests/fakeplatform/`) in this process between the two, outside the measured time. So the
figures are the CPU of the tool's own Python (the WSGI app, pylti1p3, SQLAlchemy, the
drivers' client side), without a server's HTTP parsing or the network, which both tools pay
alike under gunicorn.

* *first launch*: a new user each time (user, course enrolment, activity, a machine
  requested, the launch row, the start job enqueued on RQ, the 303);
* *relaunch*: the same users again once their machines are marked `assigned` (found and
  reused);
* *bare*: the bare tool's login and launch (validation only).

CPU: this thread's CPU time (`time.thread_time`) around each request, and the tool's
functions wrapped with timers that charge each phase its own CPU only (a phase called
inside another is taken out of the outer one). On PostgreSQL the backend's CPU (utime +
stime from /proc of the connections named `application_name=labpool-bench-profile`; only when
PostgreSQL runs on this host) is added per launch; Redis's is not (both tools use it). Also
counted: SQL statements and Redis commands per launch. `--cprofile N` adds cProfile's top N
functions of a separate pass of first launches, by cumulative and by own time.

Storage: PostgreSQL (default `postgresql+psycopg://postgres@127.0.0.1:5432/labpool_bench`) in
schema `labpool_bench_profile` (dropped at start and end), or `--db sqlite` (a temporary
folder); Redis `redis://127.0.0.1:6379/14` (flushed at start and end: a benchmark's db; with
another `--redis-url` only this benchmark's keys are deleted). Loopback only.

Ends with `RESULT first_cpu_ms=… relaunch_cpu_ms=… bare_cpu_ms=… vs_bare_cpu=…`: CPU per
first launch, per relaunch (both with PostgreSQL's backend when measured) and per bare launch,
and the first launch ÷ the bare one. Issue 15's target: vs_bare_cpu ≤ 1.25.

`--smoke` (CI): a few launches, the same code path; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402
from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bench.launch import (  # noqa: E402
    DEFAULT_REDIS,
    BenchError,
    RedisCleaner,
    add_server_args,
    free_port,
    in_schema,
    labpool_env,
    postgres_reachable,
    reset_schema,
    size_mode,
    table,
)
from tests.fakeplatform import (  # noqa: E402
    TARGET_LINK_URI,
    FakePlatform,
    FakePlatformError,
    register_fake_platform,
)

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/labpool_bench"
DEFAULT_SCHEMA = "labpool_bench_profile"
APP_NAME = "labpool-bench-profile"
SIZES = {"smoke": 6, "quick": 300, "full": 1000}  # launches per kind (and the warm-up's tenth)

OTHER = "the rest (Flask, werkzeug, test client, pylti1p3's own steps)"


class PhaseTimer:
    """CPU per (request kind, phase) of this thread, each phase charged only its own time:
    entering a phase pauses the one it was called from."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [phase, started]
        self.kind: str | None = None

    def _switch(self, now: float) -> None:
        if self.stack and self.kind is not None:
            phase, started = self.stack[-1]
            self.totals[(self.kind, phase)] += now - started

    def enter(self, phase: str) -> None:
        now = time.thread_time()
        self._switch(now)
        self.stack.append([phase, now])

    def leave(self) -> None:
        now = time.thread_time()
        self._switch(now)
        self.stack.pop()
        if self.stack:
            self.stack[-1][1] = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    def wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.kind is None:
                return func(*args, **kwargs)
            with self.phase(name):
                return func(*args, **kwargs)

        return timed

    def wrap_cm(self, name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
        """A context manager factory whose enter and exit are charged to `name` (the body
        to whatever runs in it)."""

        @contextlib.contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            if self.kind is None:
                with factory(*args, **kwargs) as value:
                    yield value
                return
            self.enter(name)
            manager = factory(*args, **kwargs)
            value = manager.__enter__()
            self.leave()
            try:
                yield value
            except BaseException:
                self.enter(name)
                try:
                    if not manager.__exit__(*sys.exc_info()):
                        raise
                finally:
                    self.leave()
            else:
                self.enter(name)
                try:
                    manager.__exit__(None, None, None)
                finally:
                    self.leave()

        return timed


def phase_patches(timer: PhaseTimer) -> list[Any]:
    """The tool's functions wrapped with the timer, by phase."""
    import flask.sessions
    import jwt

    import lti_tool.web.lti_routes as routes
    import lti_tool.web.ops_routes as ops
    import lti_tool.web.page_headers as headers
    import lti_tool.web.rate_limits as limits
    from lti_tool import launches
    from lti_tool.lti import DatabaseToolConf, PlatformKeys, RedisLaunchDataStorage
    from lti_tool.web.launch_messages import LabpoolMessageLaunch

    w = timer.wrap
    patches = [
        mock.patch.object(
            limits, "over_limit", w("rate limit (Redis pipeline)", limits.over_limit)
        ),
        mock.patch.object(
            DatabaseToolConf, "platform", w("registration lookup", DatabaseToolConf.platform)
        ),
        mock.patch.object(
            LabpoolMessageLaunch, "validate", w("JWT validation", LabpoolMessageLaunch.validate)
        ),
        mock.patch.object(
            PlatformKeys, "public_key_pem", w("JWKS key (Redis GET)", PlatformKeys.public_key_pem)
        ),
        mock.patch.object(jwt, "decode", w("jwt.decode (RSA verify)", jwt.decode)),
        mock.patch.object(
            routes, "transaction", timer.wrap_cm("DB: begin/commit", routes.transaction)
        ),
        mock.patch.object(launches, "upsert_context", w("DB: upserts", launches.upsert_context)),
        mock.patch.object(
            launches,
            "cached_environment",
            w("DB: environment (cached)", launches.cached_environment),
        ),
        mock.patch.object(
            launches, "machine_for_learner", w("DB: machine claim", launches.machine_for_learner)
        ),
        mock.patch.object(routes, "sign_in", w("sign_in (session)", routes.sign_in)),
        mock.patch.object(routes, "machine_wanted", w("RQ enqueue", routes.machine_wanted)),
        mock.patch.object(
            flask.sessions.SecureCookieSessionInterface,
            "save_session",
            w("session cookie (sign)", flask.sessions.SecureCookieSessionInterface.save_session),
        ),
        mock.patch.object(
            flask.sessions.SecureCookieSessionInterface,
            "open_session",
            w("session cookie (open)", flask.sessions.SecureCookieSessionInterface.open_session),
        ),
        mock.patch.object(ops, "access_log", _TimedLogger(timer, ops.access_log)),
        mock.patch.object(ops.metrics, "observe_launch", w("metrics", ops.metrics.observe_launch)),
        mock.patch.object(
            headers, "frame_ancestors", w("CSP frame-ancestors", headers.frame_ancestors)
        ),
    ]
    # The PostgreSQL path runs the four upserts in record_launch itself; time the statement.
    original_record = launches.record_launch

    def record(session: Any, platform_id: int, claims: Any) -> Any:
        with timer.phase("DB: record_launch (params, upserts on PG, launch row)"):
            return original_record(session, platform_id, claims)

    patches.append(mock.patch.object(routes, "record_launch", record))
    patches.append(_GcPhase(timer))
    for name in ("get_value", "set_value", "check_value", "consume"):
        patches.append(
            mock.patch.object(
                RedisLaunchDataStorage,
                name,
                w("LTI state/nonce (Redis)", getattr(RedisLaunchDataStorage, name)),
            )
        )
    return patches


class _GcPhase:
    """The garbage collector's passes as a phase of their own (they run in the thread that
    allocated, inside whatever phase that was)."""

    def __init__(self, timer: PhaseTimer):
        self._timer = timer

    def _callback(self, event: str, _info: Any) -> None:
        if self._timer.kind is None:
            return
        if event == "start":
            self._timer.enter("garbage collector")
        elif self._timer.stack and self._timer.stack[-1][0] == "garbage collector":
            self._timer.leave()

    def __enter__(self) -> None:
        gc.callbacks.append(self._callback)

    def __exit__(self, *_exc: Any) -> None:
        gc.callbacks.remove(self._callback)


class _TimedLogger:
    """The access logger, its `info` timed."""

    def __init__(self, timer: PhaseTimer, logger: Any):
        self._logger = logger
        self.info = timer.wrap("access log line", logger.info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class Counters:
    """SQL statements (an engine listener) and Redis commands (the client's connections)."""

    def __init__(self, engine: Any) -> None:
        self.sql = 0
        self.redis = 0
        self.engine = engine
        event.listen(engine, "before_cursor_execute", self._statement)
        original = redis.connection.Connection.send_packed_command
        counters = self

        def send(conn: Any, command: Any, check_health: bool = True) -> Any:
            counters.redis += 1
            return original(conn, command, check_health)

        self._patch = mock.patch.object(redis.connection.Connection, "send_packed_command", send)
        self._patch.start()

    def _statement(self, *_args: Any) -> None:
        self.sql += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)
        self._patch.stop()


def postgres_cpu(pg: Any) -> float:
    """CPU seconds so far of the PostgreSQL backends serving the profiled app."""
    if pg is None:
        return 0.0
    with pg.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"), {"a": APP_NAME}
        ).scalars()
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
    return total


class Driver:
    """One launch = a fresh test client: login initiation, the id_token signed by the fake
    platform (not timed), the id_token POST."""

    def __init__(self, platform: FakePlatform, app: Any, public_url: str, timer: PhaseTimer):
        self.platform = platform
        self.app = app
        self.url = public_url.rstrip("/")
        self.timer = timer
        self.hint = 0
        self.profile: cProfile.Profile | None = None  # enabled around the two requests

    def launch(self, sub: str, kind: str | None) -> tuple[float, str]:
        """(CPU seconds of the tool's two answers, the launch's Location)."""
        claims = self.platform.learner(sub=sub, **{TARGET_LINK_URI: self.url + "/lti/launch"})
        self.hint += 1
        form = self.platform.login_form(
            claims,
            login_hint=sub,
            lti_message_hint=json.dumps({"cmid": 1, "launchid": f"p{self.hint}"}),
        )
        client = self.app.test_client()
        self.timer.kind = kind
        started = time.thread_time()
        with self.timer.phase(OTHER), self._profiled():
            login = client.post("/lti/login", data=form, base_url=self.url)
        login_s = time.thread_time() - started
        self.timer.kind = None
        if login.status_code != 302:
            raise BenchError(f"login answered {login.status_code}: {login.text[:300]}")
        query = parse_qs(urlsplit(login.headers["Location"]).query)
        claims["nonce"] = query["nonce"][0]
        id_token, _ = self.platform.sign(claims)
        self.timer.kind = kind
        started = time.thread_time()
        with self.timer.phase(OTHER), self._profiled():
            answer = client.post(
                "/lti/launch",
                data={"id_token": id_token, "state": query["state"][0]},
                base_url=self.url,
            )
        launch_s = time.thread_time() - started
        self.timer.kind = None
        if answer.status_code != 303:
            raise BenchError(f"launch answered {answer.status_code}: {answer.text[:300]}")
        return login_s + launch_s, answer.headers["Location"]

    @contextlib.contextmanager
    def _profiled(self) -> Iterator[None]:
        if self.profile is None:
            yield
            return
        self.profile.enable()
        try:
            yield
        finally:
            self.profile.disable()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="300 launches per kind, ~1 minute")
    size.add_argument(
        "--smoke", action="store_true", help="a few launches, a few seconds: does it run (CI)"
    )
    add_server_args(parser, postgres=DEFAULT_POSTGRES, schema=DEFAULT_SCHEMA)
    parser.add_argument("--launches", type=int, default=None, help="launches per kind")
    parser.add_argument(
        "--cprofile", type=int, default=0, metavar="N", help="also print cProfile's top N"
    )
    args = parser.parse_args(argv)
    args.launches = args.launches or SIZES[size_mode(args)]
    return args


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
    if args.redis_url != DEFAULT_REDIS:
        cleaner.dedicated = False
    data_dir = Path(tempfile.mkdtemp(prefix="labpool-profile-"))
    try:
        cleaner.clean()
        return _run(args, data_dir)
    finally:
        with contextlib.suppress(redis.RedisError):
            cleaner.clean()
        if args.db == "postgres":
            with contextlib.suppress(Exception):
                reset_schema(args.postgres_url, args.schema, create=False)
        shutil.rmtree(data_dir, ignore_errors=True)


def _run(args: argparse.Namespace, data_dir: Path) -> int:
    from bench import bare_tool
    from config.db import transaction
    from config.settings import load_settings
    from lti_tool.startup import prepare
    from lti_tool.web.app import create_app

    pg = None
    if args.db == "postgres":
        reset_schema(args.postgres_url, args.schema)
        database_url = (
            make_url(in_schema(args.postgres_url, args.schema))
            .update_query_dict({"application_name": APP_NAME})
            .render_as_string(hide_password=False)
        )
        if make_url(args.postgres_url).host in ("127.0.0.1", "localhost", "::1"):
            pg = create_engine(args.postgres_url)
    else:
        database_url = f"sqlite:///{data_dir / 'labpool.db'}"
    env = labpool_env(data_dir, database_url, args.redis_url, free_port(), 1)
    settings = load_settings(env)
    rt = prepare(settings)
    n = args.launches
    timer = PhaseTimer()
    cpu: dict[str, list[float]] = {}
    pg_ms: dict[str, float] = {}
    counts: dict[str, tuple[float, float]] = {}

    with FakePlatform(tool_url=settings.public_url) as platform:
        reg = register_fake_platform(rt, platform)
        bare_url = f"http://127.0.0.1:{free_port()}"
        platform.register_tool(
            settings.public_url, [settings.url("/lti/launch"), bare_url + "/lti/launch"]
        )
        labpool = Driver(platform, create_app(settings), settings.public_url, timer)
        bare = Driver(
            platform,
            bare_tool.create_app({**reg, "public_url": bare_url, "redis_url": args.redis_url}),
            bare_url,
            timer,
        )
        gc.collect()
        gc.freeze()  # as lti_tool.gunicorn_conf does in each worker once the app is loaded
        engine = rt.sessions.kw["bind"]
        counters = Counters(engine)
        try:
            with contextlib.ExitStack() as stack:
                for patch in phase_patches(timer):
                    stack.enter_context(patch)
                # Warm-up (imports, statement caches, JWKS, connections): not counted.
                warm = max(2, n // 10)
                for i in range(warm):
                    labpool.launch(f"warm{i}", None)
                    bare.launch(f"warm{i}", None)
                subs = [f"s{i}" for i in range(n)]

                def measure(kind: str, driver: Driver, subs: list[str]) -> list[str]:
                    locations = []
                    sql, cmds = counters.sql, counters.redis
                    pg_before = postgres_cpu(pg)
                    samples = []
                    for sub in subs:
                        spent, location = driver.launch(sub, kind)
                        samples.append(spent)
                        locations.append(location)
                    pg_ms[kind] = (postgres_cpu(pg) - pg_before) * 1000 / len(subs)
                    counts[kind] = (
                        (counters.sql - sql) / len(subs),
                        (counters.redis - cmds) / len(subs),
                    )
                    cpu[kind] = samples
                    return locations

                locations = measure("first launch", labpool, subs)
                measure("bare", bare, subs)
                with transaction(rt.sessions) as session:
                    session.execute(
                        text(
                            "UPDATE machines SET state = 'assigned', address = '127.0.0.1:9', "
                            "ide_token = 'x', assigned_at = CURRENT_TIMESTAMP "
                            "WHERE state = 'requested'"
                        )
                    )
                again = measure("relaunch", labpool, subs)
                if again != locations:
                    raise BenchError("a relaunch did not find the machine of the first launch")
                profile_text = ""
                if args.cprofile:
                    profile_text = cprofile_pass(labpool, n, args.cprofile)
        finally:
            counters.close()
            if pg is not None:
                pg.dispose()

    kinds = ["first launch", "relaunch", "bare"]
    ms = {k: sum(cpu[k]) * 1000 / len(cpu[k]) for k in kinds}
    phases: dict[str, dict[str, float]] = defaultdict(dict)
    for (kind, phase), seconds in timer.totals.items():
        phases[phase][kind] = seconds * 1000 / n
    rows = []
    for phase in sorted(phases, key=lambda p: (p == OTHER, -phases[p].get("first launch", 0))):
        rows.append([phase, *(_ms(phases[phase].get(k)) for k in kinds)])
    rows.append(["tool process: all of the above", *(f"{ms[k]:.2f}" for k in kinds)])
    rows.append(
        ["  its median launch", *(f"{statistics.median(cpu[k]) * 1000:.2f}" for k in kinds)]
    )
    if pg is not None:
        rows.append(["PostgreSQL backend", *(_ms(pg_ms.get(k)) for k in kinds)])
    total = {k: ms[k] + pg_ms.get(k, 0.0) for k in kinds}
    rows.append(["total CPU per launch", *(f"{total[k]:.2f}" for k in kinds)])
    rows.append(["SQL statements per launch", *(f"{counts[k][0]:.1f}" for k in kinds)])
    rows.append(["Redis commands per launch", *(f"{counts[k][1]:.1f}" for k in kinds)])

    print(
        f"Launch CPU profile ({size_mode(args)}): {n} launches per kind, in-process (Flask test "
        f"client), database {args.db}{'' if pg is not None or args.db != 'postgres' else ' (backend CPU not measurable: not on this host)'}; "
        "CPU ms per launch (login + launch), each phase its own time"
    )
    print(table(["phase", *kinds], rows, text_columns=1))
    if profile_text:
        print()
        print(profile_text)
    ratio = total["first launch"] / total["bare"]
    print(
        f"RESULT first_cpu_ms={total['first launch']:.2f} relaunch_cpu_ms={total['relaunch']:.2f} "
        f"bare_cpu_ms={total['bare']:.2f} vs_bare_cpu={ratio:.3f}"
    )
    return 0


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def cprofile_pass(driver: Driver, n: int, top: int) -> str:
    """cProfile over n more first launches (new users), its top functions twice sorted."""
    profile = cProfile.Profile(time.thread_time)  # CPU, not waiting on sockets
    driver.profile = profile
    try:
        for i in range(n):
            driver.launch(f"p{i}", None)
    finally:
        driver.profile = None
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs()
    for order in ("cumulative", "tottime"):
        out.write(f"cProfile (thread CPU time), {n} first launches, top {top} by {order}:\n")
        stats.sort_stats(order).print_stats(top)
    return out.getvalue()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, FakePlatformError) as exc:
        print(f"launch profile failed: {exc}", file=sys.stderr)
        sys.exit(1)
