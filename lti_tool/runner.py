"""`labpool run` and `labpool demo`: the single-server mode in one command.

Starts, in order: the embedded Redis (when no LABPOOL_REDIS_URL is given), the migrations and
keys, the IDE environment (once), nginx on the public URL's port in front of everything (the
tool, its pages and every student's IDE behind one address, `auth_request` before each IDE
request), the web app under gunicorn on a loopback port behind it, one RQ worker (and
`GRADING_WORKERS` for the autograder's queue, default one per CPU), the
periodic reconciler trigger (`labpool cron`), and for the demo a practice platform. Prints the
URLs and the values for Moodle, then waits. Ctrl-C (or SIGTERM) stops everything it started,
the machines included; a child that dies on its own stops the rest too.

Without nginx the tool serves the public URL itself and sends browsers straight to each IDE
on 127.0.0.1: only for a loopback public URL (a trial on one computer), and it says so. A
public URL that others reach needs nginx and the students' sandbox (`provisioning/sandbox.py`):
without them `run` refuses to start and says what is missing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import click
from sqlalchemy.exc import SQLAlchemyError

from config.redis import EmbeddedRedis
from config.settings import Settings, load_settings
from lti_tool.registrations import moodle_values
from lti_tool.startup import prepare
from provisioning.backends import capabilities
from provisioning.sandbox import Isolation, host_isolation


def _child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["LABPOOL_DATA_DIR"] = str(settings.data_dir.resolve())
    env["LABPOOL_REDIS_URL"] = redis_url
    env["LABPOOL_DATABASE_URL"] = settings.database_url
    env["LABPOOL_PUBLIC_URL"] = settings.public_url
    env["LABPOOL_IDE_PROXY"] = "true" if settings.ide_proxy else "false"
    env["LABPOOL_PROXY_COUNT"] = str(settings.proxy_count)
    if settings.listen:
        env["LABPOOL_LISTEN"] = settings.listen
    return env


def _stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class CannotServe(click.ClickException):
    """The single-server mode cannot start safely here; the message says why and what to do."""


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plan(
    settings: Settings,
    nginx: str | None,
    isolation: Isolation | None = None,
) -> tuple[Settings, list[str]]:
    """How to serve: the settings the children get (behind nginx: the tool on a loopback
    port, IDEs through the proxy) and the warnings to print. Raises CannotServe when the
    public URL is reachable by others and students could not be kept apart."""
    warnings: list[str] = []
    local_only = is_loopback(settings.public_url)
    if capabilities(settings.backend).on_host:
        problems = (isolation or host_isolation()).problems
        if problems and not local_only:
            raise CannotServe(
                "Labpool will not serve students' machines on this host at "
                f"{settings.public_url}:\n  - "
                + "\n  - ".join(problems)
                + "\nRun it as root on a host with bubblewrap (apt-get install bubblewrap), "
                "or use a loopback LABPOOL_PUBLIC_URL for a trial on this computer only."
            )
        warnings += [f"NOT ISOLATED: {problem}" for problem in problems]
    if nginx is None:
        if not local_only:
            raise CannotServe(
                f"nginx is needed to serve {settings.public_url}: it is the one public port for "
                "the tool and every student's IDE (apt-get install nginx-light)."
            )
        warnings.append(
            "nginx is not installed (apt-get install nginx-light): browsers go "
            "straight to each IDE on 127.0.0.1, so only this computer can use it, "
            "and students' IDEs share the host's network."
        )
        return settings, warnings
    if urlsplit(settings.public_url).scheme == "https":
        raise CannotServe(
            "`labpool run` serves plain http; for https, run Labpool behind your TLS-terminating "
            'nginx (README: "IDEs behind nginx") with `labpool nginx-config`.'
        )
    behind = dataclasses.replace(
        settings,
        ide_proxy=True,
        proxy_count=1,
        listen=settings.listen or f"127.0.0.1:{_free_loopback_port()}",
    )
    return behind, warnings


def _start_nginx(settings: Settings, binary: str, prefix: Path) -> subprocess.Popen[bytes]:
    from lti_tool.nginx import render_standalone

    public = urlsplit(settings.public_url)
    port = public.port or 80
    listen = f"127.0.0.1:{port}" if is_loopback(settings.public_url) else str(port)
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        render_standalone(settings, prefix=prefix, tool_upstream=settings.listen, listen=listen)
    )
    command = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")]
    checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
    if checked.returncode != 0:
        raise CannotServe(f"nginx refused its configuration ({conf}):\n{checked.stderr}")
    return subprocess.Popen([*command, "-g", "daemon off;"], stdin=subprocess.DEVNULL)


def url_without_password(url: str) -> str:
    """A database or Redis URL fit for a message: its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(settings: Settings, behind_nginx: bool) -> None:
    """Before anything starts: the ports `run` will listen on are free, or one line naming
    the setting to change."""
    public = urlsplit(settings.public_url)
    wanted: list[tuple[str, int, str]] = []
    if behind_nginx:
        host = "127.0.0.1" if is_loopback(settings.public_url) else "0.0.0.0"
        wanted.append((host, public.port or 80, "LABPOOL_PUBLIC_URL"))
        wanted.append((settings.listen_host, settings.listen_port, "LABPOOL_LISTEN"))
    else:
        setting = "LABPOOL_LISTEN" if settings.listen else "LABPOOL_PUBLIC_URL"
        wanted.append((settings.listen_host, settings.listen_port, setting))
    for host, port, setting in wanted:
        if _port_taken(host, port):
            raise CannotServe(
                f"port {port} on {host} is already in use: stop what listens there, or set "
                f"{setting} to another port"
            )


def check_database(database_url: str) -> None:
    """The database answers, or one line with its URL (without the password)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url, connect_args=_connect_timeout(database_url))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise CannotServe(
            f"cannot reach the database at {url_without_password(database_url)} "
            f"(LABPOOL_DATABASE_URL): {_first_line(exc)}"
        ) from None
    finally:
        engine.dispose()


def check_redis(redis_url: str) -> None:
    """Redis answers, or one line with its URL (without the password)."""
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise CannotServe(
            f"cannot reach Redis at {url_without_password(redis_url)} (LABPOOL_REDIS_URL): "
            f"{_first_line(exc)}"
        ) from None


def _connect_timeout(database_url: str) -> dict[str, object]:
    return {"connect_timeout": 5} if database_url.startswith("postgresql") else {}


def _first_line(exc: Exception) -> str:
    from config.logging import redact

    orig = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    text = str(orig).strip().splitlines()
    return redact(text[0] if text else type(orig).__name__)[:200]


def metrics_dir(settings: Settings) -> Path:
    """Where every process of `run` writes its Prometheus counters (emptied at each start)."""
    return settings.data_dir.resolve() / "metrics"


def serve(settings: Settings, demo: bool) -> int:
    """Start everything; on a failure before it runs, stop what was started (the embedded
    Redis included) and say what failed in one line (CannotServe)."""
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    cleanup: list[object] = []
    try:
        return _serve(settings, demo, started, cleanup)
    finally:
        for _name, process in reversed(started):
            _stop(process)
        for thing in reversed(cleanup):
            thing.stop()  # type: ignore[attr-defined]


def _serve(
    settings: Settings,
    demo: bool,
    started: list[tuple[str, subprocess.Popen[bytes]]],
    cleanup: list[object],
) -> int:
    from lti_tool.startup import protect_data_dir
    from provisioning.ide_env import IdeEnvError, make_ide_env

    protect_data_dir(settings)
    nginx = nginx_binary()
    settings, warnings = plan(settings, nginx)
    check_ports(settings, behind_nginx=bool(settings.ide_proxy and nginx))
    if not settings.uses_embedded_redis:
        check_redis(settings.redis_url)
    if capabilities(settings.backend).on_host:
        try:
            make_ide_env(settings.ide_env_dir, echo=click.echo)
        except IdeEnvError as exc:
            raise CannotServe(str(exc)) from exc
    embedded: EmbeddedRedis | None = None
    if settings.uses_embedded_redis:
        embedded = EmbeddedRedis(settings.embedded_redis_socket)
        cleanup.append(embedded)
        try:
            embedded.start()
        except RuntimeError as exc:
            raise CannotServe(f"the embedded Redis did not start: {exc}") from None
        redis_url = embedded.url
    else:
        redis_url = settings.redis_url
    check_database(settings.database_url)
    env = _child_env(settings, redis_url)
    metrics = metrics_dir(settings)
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir(mode=0o700)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    # The runner's own view of the settings, with the Redis it just started.
    settings = load_settings(env)
    try:
        rt = prepare(settings)
    except SQLAlchemyError as exc:
        raise CannotServe(
            f"the database at {url_without_password(settings.database_url)} could not be "
            f"prepared (migrations, keys): {_first_line(exc)}"
        ) from None

    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    practice = None
    if demo:
        from config.db import transaction
        from lti_tool.registrations import register_platform
        from lti_tool.web.practice_platform import PracticePlatform

        practice = PracticePlatform(
            settings.data_dir,
            settings.public_url,
            port=(urlsplit(settings.public_url).port or 80) + 1,
        )
        practice.start()
        cleanup.append(practice)
        reg = practice.registration()
        with transaction(rt.sessions) as session:
            register_platform(session, settings, **reg)

    def launch(name: str, process: subprocess.Popen[bytes]) -> None:
        started.append((name, process))

    launch(
        "web",
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                "python:lti_tool.gunicorn_conf",
                "--bind",
                f"{settings.listen_host}:{settings.listen_port}",
                "--workers",
                str(settings.web_workers),
                "--threads",
                "4",
                "--log-level",
                "warning",
                "wsgi:app",
            ],
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        ),
    )
    if settings.ide_proxy and nginx:
        launch("nginx", _start_nginx(settings, nginx, settings.data_dir / "nginx"))
    launch("worker", subprocess.Popen([sys.executable, "-m", "lti_tool.cli", "worker"], env=env))
    for n in range(settings.grading_workers):  # each grades one submission at a time
        launch(
            f"grading worker {n + 1}",
            subprocess.Popen(
                [sys.executable, "-m", "lti_tool.cli", "worker", "--queue", "grading"], env=env
            ),
        )
    launch("cron", subprocess.Popen([sys.executable, "-m", "lti_tool.cli", "cron"], env=env))
    children = dict(started)

    click.echo("")
    click.echo(f"Labpool is running at {settings.public_url}")
    click.echo(f"  data folder: {settings.data_dir.resolve()}")
    click.echo(f"  redis: {'embedded, ' if embedded else ''}{url_without_password(redis_url)}")
    if settings.ide_proxy:
        click.echo(f"  nginx on the public port; the tool itself on {settings.listen}")
    click.echo(
        f"  health: {settings.public_url}/healthz, /readyz; metrics: "
        f"http://{settings.listen_host}:{settings.listen_port}/metrics (from this host)"
    )
    for warning in warnings:
        click.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    click.echo(
        "Values for Moodle (Site administration → Plugins → Manage tools → configure a tool manually):"
    )
    for label, value in moodle_values(settings):
        click.echo(f"  {label + ':':22} {value}")
    if practice is not None:
        click.echo(f"Practice platform: open {practice.url}/ and click “Launch as student 1”.")
    click.echo("Press Ctrl-C to stop (machines are stopped too).")

    exit_code = 0
    try:
        while not stopping:
            for name, process in children.items():
                if process.poll() is not None:
                    click.echo(f"{name} exited with code {process.returncode}; stopping", err=True)
                    stopping, exit_code = True, 1
            time.sleep(0.5)
    finally:
        click.echo("stopping…")
        for process in children.values():
            _stop(process)
        from provisioning.jobs import stop_all_machines

        stopped = stop_all_machines(rt)
        click.echo(f"stopped {stopped} machine(s)")
    return exit_code
