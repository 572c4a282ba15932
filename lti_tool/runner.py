"""`labpool run` and `labpool demo`: the single-server mode in one command.

Starts, in order: the embedded Redis (when no LABPOOL_REDIS_URL is given), the migrations and
keys, the web app under gunicorn, one RQ worker, the periodic reconciler trigger (`labpool
cron`), and for the demo a practice platform. Prints
the URLs and the values for Moodle, then waits. Ctrl-C (or SIGTERM) stops everything it
started, the machines included; a child that dies on its own stops the rest too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from config.redis import EmbeddedRedis
from config.settings import Settings, load_settings
from lti_tool.cli import moodle_values, prepare


def _child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["LABPOOL_DATA_DIR"] = str(settings.data_dir.resolve())
    env["LABPOOL_REDIS_URL"] = redis_url
    env["LABPOOL_DATABASE_URL"] = settings.database_url
    env["LABPOOL_PUBLIC_URL"] = settings.public_url
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


def serve(settings: Settings, demo: bool) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    embedded: EmbeddedRedis | None = None
    if settings.uses_embedded_redis:
        embedded = EmbeddedRedis(settings.embedded_redis_socket).start()
        redis_url = embedded.url
    else:
        redis_url = settings.redis_url
    env = _child_env(settings, redis_url)
    # The runner's own view of the settings, with the Redis it just started.
    settings = load_settings(env)
    rt = prepare(settings)

    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    practice = None
    if demo:
        from config.db import transaction
        from lti_tool.practice_platform import PracticePlatform
        from lti_tool.registrations import register_platform

        practice = PracticePlatform(
            settings.data_dir, settings.public_url, port=settings.listen_port + 1
        )
        practice.start()
        reg = practice.registration()
        with transaction(rt.sessions) as session:
            register_platform(session, settings, **reg)

    children = {
        "web": subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn",
                "--bind", f"{settings.listen_host}:{settings.listen_port}",
                "--workers", str(settings.web_workers),
                "--threads", "4",
                "--access-logfile", "-",
                "--log-level", "warning",
                "wsgi:app",
            ],
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        ),
        "worker": subprocess.Popen(
            [sys.executable, "-m", "lti_tool.cli", "worker"], env=env
        ),
        "cron": subprocess.Popen([sys.executable, "-m", "lti_tool.cli", "cron"], env=env),
    }

    click.echo("")
    click.echo(f"Labpool is running at {settings.public_url}")
    click.echo(f"  data folder: {settings.data_dir.resolve()}")
    click.echo(f"  redis: {'embedded, ' if embedded else ''}{redis_url}")
    click.echo("Values for Moodle (Site administration → Plugins → Manage tools → configure a tool manually):")
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
        if practice is not None:
            practice.stop()
        if embedded is not None:
            embedded.stop()
    return exit_code
