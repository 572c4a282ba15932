"""IDE proxy benchmark: what the authenticating nginx proxy (`labpool nginx-config`) adds to
a request to a student's IDE, against nginx passing the same request straight to the
machine.

    .venv/bin/python bench/proxy.py [--quick | --smoke] [--upstream static|jupyterlab]
                                    [--clients N]

Three ways to the same machine, in the same run, with the same client:

* `direct`: nginx proxying `/ide/<id>/…` to the machine with the template's own proxy
  settings (variable upstream, the token and cookie headers) but no `auth_request`;
* `auth, cached`: the rendered configuration with `--auth-cache 5` (nginx reuses the tool's
  answer for 5 s per machine and cookie);
* `auth, uncached`: the rendered configuration with `--auth-cache 0` (every request asks the
  tool's `/proxy/auth`).

The tool runs under gunicorn (`wsgi:app`, like bench/launch.py) with `LABPOOL_IDE_PROXY=true`;
its route for the machine is published in Redis and the browser's cookie minted as the
hand-over does. The machine (`--upstream`) is by default a tiny static upstream (a separate
nginx answering 200 with a small JSON body), so the upstream's own cost is small and stable
and the difference is the proxy's; `--upstream jupyterlab` starts a real JupyterLab with the
local backend and asks its `/ide/<id>/api/status`.

Latency: one keep-alive `requests.Session`, sequential requests, the three targets
interleaved in small chunks so drift hits all of them. Throughput: `--clients` client
processes (not threads: one Python process could not keep nginx busy), each with one
keep-alive session, for a fixed time per target. The tool's own time per `/proxy/auth` is
measured in-process too (the view alone with its Redis round trip, and a whole request
through Flask's test client).

Ends with `RESULT added_p50_ms=… uncached_added_p50_ms=… rps=…`: p50(auth, cached) −
p50(direct), the same for uncached, and requests/s through the cached proxy. Target:
added_p50_ms < 2.

`--smoke` (what `.ci/run` runs): 100 requests per target and half a second of load, the same
code path in a few seconds; it proves the benchmark runs, its numbers mean little.

Needs nginx with auth_request (Debian's nginx-light) and Redis (default
`redis://127.0.0.1:6379/13`; only the benchmark's own keys are written and deleted). The
tool's database is SQLite in a temporary folder (`/proxy/auth` does no SQL). Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402

from bench.launch import (  # noqa: E402
    BenchError,
    Gunicorn,
    free_port,
    percentile,
    size_mode,
    table,
)
from tests.nginx import Nginx, NginxError, nginx_binary  # noqa: E402

DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
OWNER_ID = 7
SIZES = {
    # sequential requests per target, seconds of concurrent load per target, in-process calls
    "smoke": (100, 0.5, 100),
    "quick": (1500, 3.0, 2000),
    "full": (10000, 10.0, 20000),
}
CHUNK = 50  # sequential requests to one target before moving to the next


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    url: str  # the full URL of the request
    headers: dict[str, str]


# --------------------------------------------------------------------------- nginx configs


def insert_into_http(conf: str, blocks: str) -> str:
    """Add server blocks at the end of a standalone config's http context."""
    head, _, _ = conf.rstrip().rpartition("}")
    return f"{head}{blocks}\n}}\n"


def static_upstream_conf(prefix: Path, port: int) -> str:
    prefix.mkdir(parents=True, exist_ok=True)
    return f"""worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000;
        location / {{
            default_type application/json;
            return 200 '{{"started": "bench", "kernels": 0, "connections": 0}}';
        }}
    }}
}}
"""


def direct_block(port: int, upstream: str, token: str) -> str:
    """The template's /ide/ location without auth_request (same maps, same headers)."""
    from provisioning.ide_http import nginx_upstream

    return f"""
    # bench: nginx straight to the machine, no auth
    server {{
        listen 127.0.0.1:{port};
        location /ide/ {{
            set $bench_upstream "{nginx_upstream(upstream)}";
            proxy_pass http://$bench_upstream;
            proxy_set_header X-Labpool-Token "{token}";
            proxy_set_header Authorization "token {token}";
            proxy_set_header Cookie $labpool_upstream_cookie;
            proxy_set_header Host $host;
            proxy_set_header Origin $http_origin;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Upstream "";
            proxy_set_header X-IDE-Token "";
            proxy_set_header X-Labpool-Proxy "";
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $labpool_connection_upgrade;
            proxy_buffering off;
        }}
    }}
"""


# --------------------------------------------------------------------------- clients


def _check(response: requests.Response, target: Target) -> None:
    if response.status_code != 200:
        raise BenchError(
            f"{target.name}: HTTP {response.status_code} for {target.url}: {response.text[:300]}"
        )


def run_sequential(targets: list[Target], per_target: int) -> dict[str, list[float]]:
    """Latency: one keep-alive session per target, chunks interleaved across targets."""
    sessions = {t.name: requests.Session() for t in targets}
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for target in targets:  # warm up: connections, caches
            for _ in range(20):
                _check(sessions[target.name].get(target.url, headers=target.headers), target)
        done = 0
        while done < per_target:
            n = min(CHUNK, per_target - done)
            for target in targets:
                session, out = sessions[target.name], samples[target.name]
                for _ in range(n):
                    start = time.perf_counter()
                    response = session.get(target.url, headers=target.headers)
                    out.append(time.perf_counter() - start)
                    _check(response, target)
            done += n
    finally:
        for session in sessions.values():
            session.close()
    return samples


def _load_client(target: Target, seconds: float, start_at: float) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    failures = 0
    with requests.Session() as session:
        session.get(target.url, headers=target.headers)  # connect before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = time.perf_counter() + seconds
        while (now := time.perf_counter()) < deadline:
            response = session.get(target.url, headers=target.headers)
            latencies.append(time.perf_counter() - now)
            failures += response.status_code != 200
    return len(latencies), latencies, failures


def run_concurrent(
    pool: Any, target: Target, clients: int, seconds: float
) -> tuple[float, list[float]]:
    start_at = time.time() + 0.5
    results = pool.starmap(_load_client, [(target, seconds, start_at)] * clients)
    count = sum(r[0] for r in results)
    failures = sum(r[2] for r in results)
    if failures:
        raise BenchError(f"{target.name}: {failures} of {count} requests failed under load")
    return count / seconds, [v for r in results for v in r[1]]


# --------------------------------------------------------------------------- the tool in-process


def tool_time_per_auth(
    env: dict[str, str], machine_id: int, cookie: str, calls: int
) -> dict[str, float]:
    """The tool's own time per /proxy/auth, in this process: the view alone (with its one
    Redis round trip), a whole request through Flask's test client, and the bare Redis
    round trip for comparison."""
    from config.settings import load_settings
    from lti_tool.ide_access import IDE_COOKIE, PROXY_HEADER, proxy_secret
    from lti_tool.web.app import create_app
    from provisioning.proxy_table import route_for_owner

    settings = load_settings(env)
    app = create_app(settings)
    view = app.view_functions["proxy.auth"]
    spent: list[float] = []

    def timed_view() -> Any:
        start = time.perf_counter()
        try:
            return view()
        finally:
            spent.append(time.perf_counter() - start)

    app.view_functions["proxy.auth"] = timed_view
    client = app.test_client()
    # What nginx sends: the browser's cookie, the original URI and the proxy's secret.
    client.set_cookie(IDE_COOKIE, cookie)
    headers = {
        PROXY_HEADER: proxy_secret(settings),
        "X-Original-URI": f"/ide/{machine_id}/api/status",
    }
    for _ in range(50):
        answer = client.get("/proxy/auth", headers=headers)
        if answer.status_code != 200:
            raise BenchError(f"in-process /proxy/auth answered {answer.status_code}")
    spent.clear()
    start = time.perf_counter()
    for _ in range(calls):
        client.get("/proxy/auth", headers=headers)
    whole = (time.perf_counter() - start) / calls
    conn = app.extensions["labpool"].redis
    start = time.perf_counter()
    for _ in range(calls):
        route_for_owner(conn, machine_id, OWNER_ID)
    redis_rt = (time.perf_counter() - start) / calls
    ms = [v * 1000 for v in spent]
    return {
        "view_p50_ms": percentile(ms, 50),
        "view_mean_ms": sum(ms) / len(ms),
        "test_client_ms": whole * 1000,
        "redis_ms": redis_rt * 1000,
    }


# --------------------------------------------------------------------------- main


def start_jupyterlab(settings: Any, machine_id: int) -> tuple[Any, Any]:
    """A real JupyterLab as `labpool run` starts it: sandboxed, on a unix socket."""
    from provisioning.backends.base import MachineSpec
    from provisioning.backends.local import LocalBackend
    from provisioning.ide_env import make_ide_env

    make_ide_env(settings.ide_env_dir)
    backend = LocalBackend(settings.data_dir, settings=settings)
    spec = MachineSpec(id=machine_id, ide_kind="jupyterlab", owner_id=OWNER_ID, course_id=1)
    started = backend.start(spec)
    spec = dataclasses.replace(
        spec, ref=started.ref, address=started.address, ide_token=started.ide_token
    )
    deadline = time.monotonic() + 90
    while not backend.health(spec):
        if not backend.poll(spec) or time.monotonic() > deadline:
            backend.stop(spec)
            raise BenchError("JupyterLab did not start (see its ide.log under the data folder)")
        time.sleep(0.2)
    return backend, spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes (under a minute)")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a few seconds: does the benchmark still run (CI)",
    )
    parser.add_argument("--upstream", choices=("static", "jupyterlab"), default="static")
    parser.add_argument("--clients", type=int, default=4, help="client processes for rps")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS)
    args = parser.parse_args(argv)
    sequential, load_s, auth_calls = SIZES[size_mode(args)]

    if nginx_binary() is None:
        print("nginx is not installed (apt-get install nginx-light)", file=sys.stderr)
        return 2
    conn = redis.Redis.from_url(args.redis_url, socket_timeout=5)
    try:
        conn.ping()
    except redis.RedisError as exc:
        print(f"Redis at {args.redis_url} is not reachable: {exc}", file=sys.stderr)
        return 2

    from lti_tool.ide_access import IDE_COOKIE, ide_cookies
    from lti_tool.nginx import render_standalone
    from provisioning.proxy_table import ACTIVITY_KEY, ROUTE_KEY, publish_route

    work = Path(tempfile.mkdtemp(prefix="labpool-bench-proxy-"))
    work.chmod(0o711)  # the sandbox's user and nginx's workers pass through to the data
    machine_id = 700000 + secrets.randbelow(100000)
    cached_port, uncached_port, direct_port, tool_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABPOOL_")}
    env.update(
        {
            "LABPOOL_DATA_DIR": str(work / "data"),
            "LABPOOL_PUBLIC_URL": f"http://127.0.0.1:{cached_port}",
            "LABPOOL_REDIS_URL": args.redis_url,
            "LABPOOL_SECRET_KEY": secrets.token_urlsafe(32),
            "LABPOOL_IDE_PROXY": "true",
            "LABPOOL_PROXY_COUNT": "1",
            "LABPOOL_LISTEN": f"127.0.0.1:{tool_port}",
            "LABPOOL_LOG_LEVEL": "WARNING",
            # The students' IDE environment, shared with the tests (made once, ~30 s).
            "LABPOOL_IDE_ENV": str(Path(__file__).resolve().parent.parent / ".venv-ide"),
        }
    )
    from config.settings import load_settings

    settings = load_settings(env)
    running: list[Any] = []
    machine = None
    try:
        # The machine.
        if args.upstream == "jupyterlab":
            backend, spec = start_jupyterlab(settings, machine_id)
            machine = (backend, spec)
            address, token = spec.address, spec.ide_token
            upstream_note = "a real JupyterLab (local backend), GET /ide/<id>/api/status"
        else:
            upstream_port = free_port()
            static = Nginx(
                static_upstream_conf(work / "upstream", upstream_port),
                work / "upstream",
                ports=(upstream_port,),
            )
            running.append(static.start())
            address, token = f"127.0.0.1:{upstream_port}", secrets.token_urlsafe(32)
            upstream_note = "a static nginx upstream answering 200 with 56 bytes of JSON"
        publish_route(conn, machine_id, OWNER_ID, address, token)
        cookie = ide_cookies(settings).dumps({"u": OWNER_ID, "m": machine_id})

        # The tool (auth upstream; its database migrated, as `labpool run` does), and the two
        # proxies.
        from lti_tool.startup import prepare

        prepare(settings)
        (work / "logs").mkdir(parents=True)
        tool = Gunicorn.start(
            "tool", "wsgi:app", tool_port, env, args.workers, args.threads, work / "logs"
        )
        running.append(tool)
        tool.wait_healthy()
        upstream_of_tool = f"127.0.0.1:{tool_port}"
        cached_conf = render_standalone(
            settings,
            prefix=work / "cached",
            auth_cache_s=5,
            tool_upstream=upstream_of_tool,
            listen=f"127.0.0.1:{cached_port}",
        )
        cached_conf = insert_into_http(cached_conf, direct_block(direct_port, address, token))
        running.append(
            Nginx(cached_conf, work / "cached", ports=(cached_port, direct_port)).start()
        )
        uncached_conf = render_standalone(
            settings,
            prefix=work / "uncached",
            auth_cache_s=0,
            tool_upstream=upstream_of_tool,
            listen=f"127.0.0.1:{uncached_port}",
        )
        running.append(Nginx(uncached_conf, work / "uncached", ports=(uncached_port,)).start())

        path = f"/ide/{machine_id}/api/status"
        with_cookie = {"Cookie": f"{IDE_COOKIE}={cookie}"}
        targets = [
            Target("direct (nginx, no auth)", f"http://127.0.0.1:{direct_port}{path}", {}),
            Target("auth, cached 5 s", f"http://127.0.0.1:{cached_port}{path}", with_cookie),
            Target("auth, uncached", f"http://127.0.0.1:{uncached_port}{path}", with_cookie),
        ]
        # The proxy does refuse without the cookie (so the numbers are for a checked path).
        for target in targets[1:]:
            refused = requests.get(target.url, allow_redirects=False)
            if refused.status_code != 302:
                raise BenchError(f"{target.name}: no cookie answered {refused.status_code}")

        print(f"machine: {upstream_note}")
        print(
            f"tool: gunicorn {args.workers} workers x {args.threads} threads; nginx: 1 worker "
            f"each; {os.cpu_count()} CPUs; {sequential} sequential requests per target, "
            f"{args.clients} client processes x {load_s:g} s per target"
        )
        latencies = run_sequential(targets, sequential)
        ctx = multiprocessing.get_context("fork")
        throughput: dict[str, tuple[float, list[float]]] = {}
        with ctx.Pool(args.clients) as pool:
            for target in targets:
                throughput[target.name] = run_concurrent(pool, target, args.clients, load_s)

        tool_time = tool_time_per_auth(env, machine_id, cookie, auth_calls)
    except (BenchError, NginxError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        for process in running:
            if isinstance(process, Gunicorn):
                print(process.tail(), file=sys.stderr)
        return 1
    finally:
        for process in reversed(running):
            process.stop()
        if machine is not None:
            machine[0].stop(machine[1])
        conn.delete(ROUTE_KEY.format(machine_id), ACTIVITY_KEY.format(machine_id))
        shutil.rmtree(work, ignore_errors=True)

    base = percentile([v * 1000 for v in latencies[targets[0].name]], 50)
    rows = []
    p50s: dict[str, float] = {}
    for target in targets:
        ms = [v * 1000 for v in latencies[target.name]]
        p50s[target.name] = percentile(ms, 50)
        rps, loaded = throughput[target.name]
        loaded_ms = [v * 1000 for v in loaded]
        rows.append(
            [
                target.name,
                f"{percentile(ms, 50):.3f}",
                f"{percentile(ms, 95):.3f}",
                f"{percentile(ms, 99):.3f}",
                f"{percentile(ms, 50) - base:+.3f}",
                f"{rps:.0f}",
                f"{percentile(loaded_ms, 50):.3f}",
                f"{percentile(loaded_ms, 95):.3f}",
            ]
        )
    print()
    print(
        table(
            ["path", "p50 ms", "p95 ms", "p99 ms", "added p50", "rps", "load p50", "load p95"],
            rows,
            text_columns=1,
        )
    )
    print()
    print(
        f"tool time per /proxy/auth (in-process, {auth_calls} calls): view incl. its Redis "
        f"round trip p50 {tool_time['view_p50_ms']:.3f} ms (mean "
        f"{tool_time['view_mean_ms']:.3f}); whole request via Flask's test client "
        f"{tool_time['test_client_ms']:.3f} ms; the Redis round trip alone "
        f"{tool_time['redis_ms']:.3f} ms"
    )
    added = p50s[targets[1].name] - base
    uncached_added = p50s[targets[2].name] - base
    print(f"target: added p50 with the cache < 2 ms: {'met' if added < 2 else 'NOT met'}")
    print(
        f"RESULT added_p50_ms={added:.3f} uncached_added_p50_ms={uncached_added:.3f} "
        f"rps={throughput[targets[1].name][0]:.0f}"
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
