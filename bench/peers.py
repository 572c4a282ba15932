"""Peers benchmark: Labpool's launch against JupyterHub + ltiauthenticator and against a bare
pylti1p3 tool, in one run, on one load driver.

    .venv/bin/python bench/peers.py [--quick | --smoke] [--db postgres|sqlite] [--no-peers]

Three tools, each launched by the same client code (`bench/launch.py`'s `launch_once` and
`run_concurrent`: a fresh browser per launch, login initiation → the fake Moodle's auth.php
(`tests/fakeplatform/`) → the id_token POST, stopping at the tool's answer to it):

* **labpool**: the web app (`wsgi:app`) under gunicorn as `labpool run` starts it
  (`--config python:lti_tool.gunicorn_conf`, `LABPOOL_WEB_WORKERS` 2 workers × 4 threads),
  PostgreSQL and Redis; no RQ worker, no nginx. Answer: 303 to the student's machine page.
  * *first launch*: a new user (user, enrolment, a machine requested, a launch row, a start
    job enqueued);
  * *relaunch*: a user whose machine is assigned (marked so in the database, as
    `bench/launch.py` does), found and reused.
* **jupyterhub**: JupyterHub 5/6 with ltiauthenticator's `LTI13Authenticator` (login handler
  → auth.php → callback validating the id_token against the platform's JWKS, as it ships: a
  new `PyJWKClient` per launch) and a no-op spawner, behind configurable-http-proxy (which
  JupyterHub starts), its default SQLite database. Answer: the callback's 302 to
  `/hub/home` (nothing is spawned). First launches (new JupyterHub user) and relaunches.
* **bare**: `bench/bare_tool.py` (pylti1p3 validation only, state and JWKS in Redis) under
  gunicorn with the same workers and threads as labpool. It keeps nothing per user, so it has
  no relaunch.

Concurrency 1, 4 and 16 (client threads in this process, with the fake platform), every
launch by a distinct user; per repetition every (concurrency, tool) block runs once, the
tools' order rotating from block to block; relaunch blocks follow each repetition's first
launches. Per block: launches/s (launches ÷ wall time), latency (the whole exchange, and the
tool's own two answers), and CPU per launch of each tool's processes: utime + stime (and
reaped children's) of the whole process tree (gunicorn master and workers; JupyterHub and its
proxy), read from /proc before and after, plus, for labpool, the PostgreSQL backends serving
it (found by `application_name` in `pg_stat_activity`; only when PostgreSQL runs on this
host). Redis's CPU is not counted (shared by labpool and bare, and by other users of it).

The peers are installed on first use into `.bench-peers/` (gitignored): a virtualenv with
`jupyterhub>=5,<7` and `jupyterhub-ltiauthenticator` from PyPI, and `configurable-http-proxy`
from npm. If that fails (no network, no node), the benchmark says so and measures labpool and
bare. `--smoke` never installs or runs the peers (CI stays fast and offline); `--no-peers`
skips them in the other modes.

Storage: PostgreSQL database `labpool_bench` (created if missing), schema
`labpool_bench_peers` (dropped at start and end), or `--db sqlite`; Redis db 14 (flushed at
start and end: do not run another benchmark that uses it meanwhile). Loopback only. Every
process it started is stopped.

Ends with `RESULT labpool_per_s=… jupyterhub_per_s=… bare_per_s=… vs_jupyterhub=…
vs_bare_cpu=…`: first launches at concurrency 16; `vs_jupyterhub` = labpool's launches/s ÷
JupyterHub's (0 when JupyterHub did not run), `vs_bare_cpu` = labpool's CPU per launch
(gunicorn + PostgreSQL) ÷ the bare tool's. Targets (issue 15): vs_jupyterhub ≥ 3,
vs_bare_cpu ≤ 1.25.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bench.burst import CpuMeter  # noqa: E402
from bench.launch import (  # noqa: E402
    DUMMY_ADDRESS,
    QUEUE_NAME,
    BenchError,
    Gunicorn,
    RedisCleaner,
    Sample,
    ServedProcess,
    Target,
    add_server_args,
    free_port,
    in_schema,
    labpool_env,
    percentile,
    postgres_reachable,
    reset_schema,
    run_concurrent,
    size_mode,
    table,
)
from tests.fakeplatform import (  # noqa: E402
    TARGET_LINK_URI,
    FakePlatform,
    FakePlatformError,
    foreign_private_key,
    register_fake_platform,
)

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/labpool_bench"
DEFAULT_SCHEMA = "labpool_bench_peers"
APP_NAME = "labpool-bench-peers"  # application_name of labpool's PostgreSQL connections
PEERS_DIR = ROOT / ".bench-peers"
HUB_SPEC = ("jupyterhub>=5,<7", "jupyterhub-ltiauthenticator>=1.6")
CHP_SPEC = "configurable-http-proxy@^5"
HUB_LOGIN_PATH = "/hub/lti13/oauth_login"
HUB_CALLBACK_PATH = "/hub/lti13/oauth_callback"
HUB_NEXT = "/hub/home"
CONCURRENCY = (1, 4, 16)
SIZES = {
    # repetitions, launches per block at concurrency 1, 4, 16
    "smoke": (1, {1: 3, 4: 8, 16: 16}),
    "quick": (2, {1: 12, 4: 24, 16: 64}),
    "full": (5, {1: 40, 4: 100, 16: 300}),
}
TARGET_VS_JUPYTERHUB = 3.0
TARGET_VS_BARE_CPU = 1.25


# --------------------------------------------------------------------------- the peers


@dataclasses.dataclass
class PeerInstall:
    hub: Path  # the jupyterhub command
    chp: Path  # the configurable-http-proxy command
    versions: str


def install_peers(peers_dir: Path) -> tuple[PeerInstall | None, str]:
    """JupyterHub + ltiauthenticator (a venv) and configurable-http-proxy (npm) under
    `peers_dir`, installed once. Returns (the install, "") or (None, why not)."""
    peers_dir.mkdir(parents=True, exist_ok=True)
    log = peers_dir / "install.log"
    venv = peers_dir / "venv"
    hub = venv / "bin" / "jupyterhub"
    chp = peers_dir / "node_modules" / ".bin" / "configurable-http-proxy"

    def step(argv: list[str], cwd: Path | None = None) -> bool:
        with log.open("ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            try:
                done = subprocess.run(
                    argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=900
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                out.write(f"{exc}\n".encode())
                return False
        return done.returncode == 0

    if not hub.exists():
        print(f"installing JupyterHub and ltiauthenticator into {venv} (once) …", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        if not (
            step([sys.executable, "-m", "venv", str(venv)])
            and step([str(venv / "bin" / "pip"), "install", "-q", *HUB_SPEC])
        ):
            shutil.rmtree(venv, ignore_errors=True)
            return None, f"pip install {' '.join(HUB_SPEC)} failed (see {log})"
    if not chp.exists():
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            return None, "node/npm not found: configurable-http-proxy cannot be installed"
        print(f"installing configurable-http-proxy into {peers_dir} (once) …", flush=True)
        if not step(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(peers_dir), CHP_SPEC],
            cwd=peers_dir,
        ):
            return None, f"npm install {CHP_SPEC} failed (see {log})"
    versions = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from importlib.metadata import version as v; print('jupyterhub', "
            "v('jupyterhub'), '+ ltiauthenticator', v('jupyterhub-ltiauthenticator'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    chp_version = subprocess.run(
        [str(chp), "--version"], capture_output=True, text=True
    ).stdout.strip()
    return PeerInstall(hub, chp, f"{versions} + configurable-http-proxy {chp_version}"), ""


HUB_CONFIG = """\
# Written by bench/peers.py: JupyterHub with ltiauthenticator's LTI 1.3 authenticator and a
# spawner that starts nothing, behind configurable-http-proxy.
from jupyterhub.spawner import Spawner


class NoopSpawner(Spawner):
    _running = False

    async def start(self):
        self._running = True
        return ("127.0.0.1", 9)

    async def poll(self):
        return None if self._running else 0

    async def stop(self, now=False):
        self._running = False


c = get_config()  # noqa: F821
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{data}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{data}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{data}/jupyterhub.pid"
c.JupyterHub.log_level = "WARN"
c.JupyterHub.spawner_class = NoopSpawner
c.ConfigurableHTTPProxy.command = ["{chp}"]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.auth_token = "bench-peers-proxy-token"
c.JupyterHub.authenticator_class = "ltiauthenticator.lti13.auth.LTI13Authenticator"
c.Authenticator.allow_all = True
c.LTI13Authenticator.issuer = "{issuer}"
c.LTI13Authenticator.client_id = ["{client_id}"]
c.LTI13Authenticator.authorize_url = "{auth_url}"
c.LTI13Authenticator.jwks_endpoint = "{jwks_url}"
c.LTI13Authenticator.username_key = "sub"
c.LTI13Authenticator.uri_scheme = "http"
"""


@dataclasses.dataclass
class Hub(ServedProcess):
    db: Path
    health_path: ClassVar[str] = "/hub/health"

    @classmethod
    def start(cls, peers: PeerInstall, reg: dict[str, str], data: Path) -> Hub:
        port = free_port()
        config = data / "jupyterhub_config.py"
        config.write_text(
            HUB_CONFIG.format(
                port=port,
                hub_port=free_port(),
                api_port=free_port(),
                data=data,
                chp=peers.chp,
                **{k: reg[k] for k in ("issuer", "client_id", "auth_url", "jwks_url")},
            )
        )
        log = data / "jupyterhub.log"
        env = dict(os.environ, PATH=f"{peers.hub.parent}:{os.environ.get('PATH', '')}")
        env.pop("VIRTUAL_ENV", None)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(peers.hub), "-f", str(config)],
                cwd=data,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return cls(
            "jupyterhub", f"http://127.0.0.1:{port}", process, log, data / "jupyterhub.sqlite"
        )

    def wait_healthy(self, timeout: float = 90) -> None:
        super().wait_healthy(timeout)

    def users(self) -> int:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute("SELECT count(*) FROM users").fetchone()[0]

    def stop(self) -> None:
        """SIGTERM: JupyterHub stops the proxy it started (then both are made sure of)."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        super().stop(grace=20)
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    child.kill()


# --------------------------------------------------------------------------- CPU


def postgres_backends(engine: object | None) -> list[int]:
    """Pids of the PostgreSQL backends serving labpool (its connections' application_name)."""
    if engine is None:
        return []
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return list(
            conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"),
                {"a": APP_NAME},
            ).scalars()
        )


def pids_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


@dataclasses.dataclass
class Block:
    tool: str
    kind: str  # "first" or "relaunch"
    clients: int
    rep: int
    samples: list[Sample]
    wall_s: float
    cpu_s: float  # the tool's process tree
    pg_s: float | None  # its PostgreSQL backends (labpool on PostgreSQL only)
    driver_s: float  # this process: client threads and the fake platform


def measure_block(
    platform: FakePlatform,
    target: Target,
    root_pid: int,
    users: list[str],
    clients: int,
    kind: str,
    rep: int,
    pg_engine: object | None,
) -> Block:
    pg_before = pids_cpu(postgres_backends(pg_engine)) if pg_engine is not None else {}
    cpu_before = CpuMeter._tree(root_pid)
    me = psutil.Process()
    t = me.cpu_times()
    driver_before = t.user + t.system
    samples, wall = run_concurrent(platform, target, users, len(users), clients)
    t = me.cpu_times()
    driver_s = t.user + t.system - driver_before
    cpu_s = CpuMeter._tree(root_pid) - cpu_before
    pg_s = None
    if pg_engine is not None:
        after = pids_cpu(postgres_backends(pg_engine) + list(pg_before))
        pg_s = sum(v - pg_before.get(pid, 0.0) for pid, v in after.items())
    return Block(target.name, kind, clients, rep, samples, wall, cpu_s, pg_s, driver_s)


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a few seconds, labpool and bare only (CI)",
    )
    add_server_args(parser, postgres=DEFAULT_POSTGRES, schema=DEFAULT_SCHEMA)
    parser.add_argument("--reps", type=int, default=None, help="repetitions")
    parser.add_argument("--no-peers", action="store_true", help="skip JupyterHub")
    parser.add_argument("--peers-dir", type=Path, default=PEERS_DIR)
    args = parser.parse_args(argv)
    reps, sizes = SIZES[size_mode(args)]
    args.reps = args.reps or reps
    args.sizes = sizes
    return args


def ensure_database(url: str) -> None:
    """Create the benchmark's PostgreSQL database if it is missing (as .ci/run does)."""
    parsed = make_url(url)
    admin = create_engine(
        parsed.set(database="postgres").render_as_string(hide_password=False),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 3},
    )
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": parsed.database}
            ).first()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    finally:
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.db != "sqlite":
        with contextlib.suppress(Exception):
            ensure_database(args.postgres_url)
    if args.db is None:
        args.db = "postgres" if postgres_reachable(args.postgres_url) else "sqlite"
    elif args.db == "postgres" and not postgres_reachable(args.postgres_url):
        raise BenchError(f"PostgreSQL is not reachable at {args.postgres_url}")
    cleaner = RedisCleaner(args.redis_url)
    try:
        cleaner.conn.ping()
    except redis.RedisError as exc:
        raise BenchError(f"Redis is not reachable at {args.redis_url}: {exc}") from exc

    data_dir = Path(tempfile.mkdtemp(prefix="labpool-bench-peers-"))
    servers: list[Gunicorn] = []
    hubs: list[Hub] = []
    try:
        cleaner.clean()
        return _run(args, data_dir, servers, hubs)
    except (BenchError, FakePlatformError):
        for name, tail in [(s.name, s.tail()) for s in servers] + [
            ("jupyterhub", h.tail()) for h in hubs
        ]:
            if tail.strip():
                print(f"--- {name} log, last lines:\n{tail}", file=sys.stderr)
        raise
    finally:
        for server in servers:
            server.stop()
        for hub in hubs:
            hub.stop()
        with contextlib.suppress(redis.RedisError):
            cleaner.clean()
        if args.db == "postgres":
            with contextlib.suppress(Exception):
                reset_schema(args.postgres_url, args.schema, create=False)
        shutil.rmtree(data_dir, ignore_errors=True)


def _run(args: argparse.Namespace, data_dir: Path, servers: list[Gunicorn], hubs: list[Hub]) -> int:
    from bench import bare_tool
    from config.db import transaction
    from config.settings import load_settings
    from lti_tool.startup import prepare

    mode = size_mode(args)
    peers: PeerInstall | None = None
    skipped = ""
    if args.smoke:
        skipped = "--smoke never installs or runs the peers"
    elif args.no_peers:
        skipped = "--no-peers"
    else:
        peers, skipped = install_peers(args.peers_dir)

    setup_started = time.perf_counter()
    pg_engine = None
    if args.db == "postgres":
        reset_schema(args.postgres_url, args.schema)
        database_url = in_schema(args.postgres_url, args.schema)
        database_url = (
            make_url(database_url)
            .update_query_dict({"application_name": APP_NAME})
            .render_as_string(hide_password=False)
        )
        if make_url(args.postgres_url).host in ("127.0.0.1", "localhost", "::1"):
            pg_engine = create_engine(args.postgres_url, poolclass=None)
    else:
        database_url = f"sqlite:///{data_dir / 'labpool.db'}"
    labpool_port, bare_port = free_port(), free_port()
    env = labpool_env(data_dir, database_url, args.redis_url, labpool_port, args.workers)
    settings = load_settings(env)
    rt = prepare(settings)

    with FakePlatform(tool_url=settings.public_url) as platform, FakePlatform() as hub_platform:
        # The hub's login initiation URL is not the fake's `/lti/login`.
        hub_platform.LOGIN_PATH = HUB_LOGIN_PATH
        reg = register_fake_platform(rt, platform)
        bare_url = f"http://127.0.0.1:{bare_port}"
        bare_conf = {**reg, "public_url": bare_url, "redis_url": args.redis_url}
        platform.register_tool(
            settings.public_url,
            [settings.url("/lti/launch"), bare_url + FakePlatform.LAUNCH_PATH],
        )
        servers.append(
            Gunicorn.start(
                "labpool",
                "wsgi:app",
                labpool_port,
                env,
                args.workers,
                args.threads,
                data_dir,
                config="python:lti_tool.gunicorn_conf",
            )
        )
        servers.append(
            Gunicorn.start(
                "bare",
                "bench.bare_tool:create_app()",
                bare_port,
                dict(env, BENCH_BARE_CONF=json.dumps(bare_conf)),
                args.workers,
                args.threads,
                data_dir,
            )
        )
        hub: Hub | None = None
        if peers is not None:
            hub_data = data_dir / "jupyterhub"
            hub_data.mkdir()
            hub = Hub.start(peers, hub_platform.platform_add_args(), hub_data)
            hubs.append(hub)
            hub_platform.register_tool(hub.url, [hub.url + HUB_CALLBACK_PATH])
        for server in servers:
            server.wait_healthy()
        if hub is not None:
            hub.wait_healthy()

        targets = [
            Target("labpool", servers[0].url, lambda loc, sub: "/machines/" in loc),
            Target("bare", servers[1].url, lambda loc, sub: loc.endswith(bare_tool.DONE_PATH)),
        ]
        platform_of = {"labpool": platform, "bare": platform}
        root_of = {"labpool": servers[0].process.pid, "bare": servers[1].process.pid}
        if hub is not None:
            targets.insert(
                1,
                Target(
                    "jupyterhub",
                    hub.url,
                    lambda loc, sub: loc.endswith(HUB_NEXT),
                    status=302,
                    link=hub.url + HUB_NEXT,
                ),
            )
            platform_of["jupyterhub"] = hub_platform
            root_of["jupyterhub"] = hub.process.pid

        # Every tool must refuse a forged id_token, or the comparison is meaningless.
        for target in targets:
            plat = platform_of[target.name]
            claims = plat.learner(sub="forger", **{TARGET_LINK_URI: target.launch_url})
            with requests.Session() as browser:
                forged = plat.launch(
                    browser, target.url, claims, sign_with=foreign_private_key()
                ).launch_response
            if forged.status_code in (302, 303):
                raise BenchError(f"{target.name} accepted an id_token with a foreign signature")

        # Warm every worker thread (imports, pools, JWKS caches), with users of their own.
        warm = (1 if args.smoke else 3) * args.workers * args.threads
        for target in targets:
            users = [f"warm-{target.name}-{i}" for i in range(warm)]
            run_concurrent(platform_of[target.name], target, users, warm, 4)
        with rt.sessions() as session:
            launches_before = session.execute(text("SELECT count(*) FROM launches")).scalar_one()
            machines_before = session.execute(text("SELECT count(*) FROM machines")).scalar_one()
        hub_users_before = hub.users() if hub is not None else 0
        setup_s = time.perf_counter() - setup_started

        blocks: list[Block] = []
        first_users: dict[tuple[str, int, int], list[str]] = {}
        measure_started = time.perf_counter()
        turn = 0
        for rep in range(args.reps):
            for clients in CONCURRENCY:
                n = args.sizes[clients]
                order = targets[turn % len(targets) :] + targets[: turn % len(targets)]
                turn += 1
                for target in order:
                    users = [f"{target.name[0]}{rep}c{clients}u{i}" for i in range(n)]
                    first_users[(target.name, rep, clients)] = users
                    blocks.append(
                        measure_block(
                            platform_of[target.name],
                            target,
                            root_of[target.name],
                            users,
                            clients,
                            "first",
                            rep,
                            pg_engine if target.name == "labpool" else None,
                        )
                    )
            # This repetition's labpool users now hold a running machine: they relaunch.
            with transaction(rt.sessions) as session:
                session.execute(
                    text(
                        "UPDATE machines SET state = 'assigned', address = :address, "
                        "ide_token = 'x', assigned_at = CURRENT_TIMESTAMP "
                        "WHERE state = 'requested'"
                    ),
                    {"address": DUMMY_ADDRESS},
                )
            stateful = [t for t in targets if t.name != "bare"]
            for clients in CONCURRENCY:
                order = stateful[turn % len(stateful) :] + stateful[: turn % len(stateful)]
                turn += 1
                for target in order:
                    blocks.append(
                        measure_block(
                            platform_of[target.name],
                            target,
                            root_of[target.name],
                            first_users[(target.name, rep, clients)],
                            clients,
                            "relaunch",
                            rep,
                            pg_engine if target.name == "labpool" else None,
                        )
                    )
        measure_s = time.perf_counter() - measure_started

        # What the measured launches did.
        problems = []
        with rt.sessions() as session:
            launches = session.execute(text("SELECT count(*) FROM launches")).scalar_one()
            machines = session.execute(text("SELECT count(*) FROM machines")).scalar_one()
        measured = sum(len(b.samples) for b in blocks if b.tool == "labpool")
        new_users = sum(len(b.samples) for b in blocks if b.tool == "labpool" and b.kind == "first")
        if launches - launches_before != measured:
            problems.append(f"labpool: {launches - launches_before} launch rows for {measured}")
        if machines - machines_before != new_users:
            problems.append(f"labpool: {machines - machines_before} machines for {new_users} users")
        if hub is not None:
            hub_new = sum(
                len(b.samples) for b in blocks if b.tool == "jupyterhub" and b.kind == "first"
            )
            if hub.users() - hub_users_before != hub_new:
                problems.append(
                    f"jupyterhub: {hub.users() - hub_users_before} users for {hub_new} new ones"
                )
        if problems:
            raise BenchError("; ".join(problems))
        queued = cleaner_len(args.redis_url)
        jwks = (platform.jwks_fetches, hub_platform.jwks_fetches)
    if pg_engine is not None:
        pg_engine.dispose()

    return report(args, mode, blocks, peers, skipped, setup_s, measure_s, queued, jwks)


def cleaner_len(url: str) -> int:
    with contextlib.closing(redis.Redis.from_url(url, socket_timeout=5)) as conn:
        return conn.llen(f"rq:queue:{QUEUE_NAME}")


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Row:
    tool: str
    kind: str
    clients: int
    launches: int
    per_s: float
    per_s_min: float
    per_s_max: float
    p50_ms: float
    p95_ms: float
    tool_p50_ms: float
    cpu_ms: float
    pg_ms: float | None
    driver_ms: float

    @property
    def total_cpu_ms(self) -> float:
        return self.cpu_ms + (self.pg_ms or 0.0)


def rows_of(blocks: list[Block]) -> list[Row]:
    rows = []
    keys = sorted(
        {(b.tool, b.kind, b.clients) for b in blocks},
        key=lambda k: (["labpool", "jupyterhub", "bare"].index(k[0]), k[1] != "first", k[2]),
    )
    for tool, kind, clients in keys:
        mine = [b for b in blocks if (b.tool, b.kind, b.clients) == (tool, kind, clients)]
        samples = [s for b in mine for s in b.samples]
        n = len(samples)
        wall = sum(b.wall_s for b in mine)
        rates = [len(b.samples) / b.wall_s for b in mine]
        pg = [b.pg_s for b in mine if b.pg_s is not None]
        rows.append(
            Row(
                tool,
                kind,
                clients,
                n,
                n / wall,
                min(rates),
                max(rates),
                percentile([s.total_s * 1000 for s in samples], 50),
                percentile([s.total_s * 1000 for s in samples], 95),
                percentile([s.tool_s * 1000 for s in samples], 50),
                sum(b.cpu_s for b in mine) * 1000 / n,
                sum(pg) * 1000 / n if pg else None,
                sum(b.driver_s for b in mine) * 1000 / n,
            )
        )
    return rows


def ratio(mine: float, theirs: float) -> float:
    """mine ÷ theirs; nan when theirs is 0, as a small block's CPU can be: the kernel counts a
    process's CPU in 10 ms ticks, so a few launches may add up to none."""
    return mine / theirs if theirs > 0 else math.nan


def report(
    args: argparse.Namespace,
    mode: str,
    blocks: list[Block],
    peers: PeerInstall | None,
    skipped: str,
    setup_s: float,
    measure_s: float,
    queued: int,
    jwks: tuple[int, int],
) -> int:
    rows = rows_of(blocks)
    load = os.getloadavg()
    print(
        f"Peers benchmark{'' if mode == 'full' else f' ({mode})'}: {args.reps} repetition(s), "
        f"launches per block {args.sizes[1]}/{args.sizes[4]}/{args.sizes[16]} at concurrency "
        f"1/4/16, every launch a distinct user; labpool on {args.db}; gunicorn {args.workers} "
        f"workers × {args.threads} threads (labpool with lti_tool.gunicorn_conf); "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    if peers is not None:
        print(f"peers: {peers.versions} (JupyterHub's SQLite, a no-op spawner)")
    else:
        print(f"peers SKIPPED: {skipped}; JupyterHub not measured")
    print(
        f"setup {setup_s:.1f} s, measurement {measure_s:.1f} s; JWKS fetches from the platform: "
        f"labpool + bare {jwks[0]}, jupyterhub {jwks[1]}; labpool start jobs queued {queued}"
    )
    print()
    headers = [
        "tool",
        "launches",
        "C",
        "n",
        "launches/s",
        "range/s",
        "p50 ms",
        "p95 ms",
        "tool p50",
        "CPU ms",
        "of it PG",
        "driver ms",
    ]
    cells = [
        [
            r.tool,
            r.kind,
            str(r.clients),
            str(r.launches),
            f"{r.per_s:.1f}",
            f"{r.per_s_min:.0f}–{r.per_s_max:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            f"{r.tool_p50_ms:.1f}",
            f"{r.total_cpu_ms:.2f}",
            "" if r.pg_ms is None else f"{r.pg_ms:.2f}",
            f"{r.driver_ms:.2f}",
        ]
        for r in rows
    ]
    print(table(headers, cells))
    print(
        "launches/s: launches ÷ wall time over all repetitions (range: per repetition); p50/p95: "
        "the whole exchange as the browser waits; tool p50: the tool's two answers; CPU ms: per "
        "launch, the tool's process tree (+ its PostgreSQL backends for labpool); driver ms: "
        "this process (clients and the fake platform) per launch."
    )
    print()

    def row(tool: str, kind: str = "first", clients: int = 16) -> Row | None:
        return next((r for r in rows if (r.tool, r.kind, r.clients) == (tool, kind, clients)), None)

    lab, hub, bare = row("labpool"), row("jupyterhub"), row("bare")
    assert lab is not None and bare is not None
    vs_hub = lab.per_s / hub.per_s if hub else 0.0
    vs_bare_cpu = ratio(lab.total_cpu_ms, bare.total_cpu_ms)
    for clients in CONCURRENCY:
        parts = []
        for kind in ("first", "relaunch"):
            lr, hr, br = (
                row("labpool", kind, clients),
                row("jupyterhub", kind, clients),
                row("bare", "first", clients),
            )
            if lr is None:
                continue
            text_ = (
                f"{kind}: labpool ÷ bare CPU {ratio(lr.total_cpu_ms, br.total_cpu_ms):.2f}"
                if br
                else ""
            )
            if hr:
                text_ += f", labpool ÷ jupyterhub launches/s {lr.per_s / hr.per_s:.2f}"
            parts.append(text_)
        print(f"C={clients:<2}  " + "; ".join(parts))
    if hub is None:
        print(f"vs_jupyterhub: NOT measured ({skipped})")
    else:
        print(
            f"vs_jupyterhub = {vs_hub:.2f} (first launches, C=16; target ≥ {TARGET_VS_JUPYTERHUB:g}: "
            f"{'met' if vs_hub >= TARGET_VS_JUPYTERHUB else 'NOT met'})"
        )
    if math.isnan(vs_bare_cpu):
        cpu_verdict = "not measurable: the bare tool used less than one 10 ms clock tick"
    else:
        cpu_verdict = "met" if vs_bare_cpu <= TARGET_VS_BARE_CPU else "NOT met"
    print(
        f"vs_bare_cpu = {vs_bare_cpu:.2f} (labpool's CPU per first launch incl. PostgreSQL ÷ the "
        f"bare tool's, C=16; target ≤ {TARGET_VS_BARE_CPU:g}: {cpu_verdict})"
    )
    if mode == "smoke":
        print("(smoke: the numbers mean nothing; this proves the benchmark runs)")
    print(
        f"RESULT labpool_per_s={lab.per_s:.1f} jupyterhub_per_s={hub.per_s if hub else 0:.1f} "
        f"bare_per_s={bare.per_s:.1f} vs_jupyterhub={vs_hub:.2f} vs_bare_cpu={vs_bare_cpu:.2f}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, FakePlatformError) as exc:
        print(f"peers benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
