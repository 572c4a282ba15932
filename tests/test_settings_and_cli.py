"""Settings from the environment and TOML, the errors that name the variable, and the
admin's CLI: registering platforms and the values for Moodle's form."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from config.settings import SettingsError, load_settings
from lti_tool.cli import main


def test_defaults_give_the_single_server_mode(tmp_path):
    settings = load_settings({"LABPOOL_DATA_DIR": str(tmp_path)})
    assert settings.public_url == "http://127.0.0.1:8080"
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'labpool.db'}"
    assert settings.uses_embedded_redis
    assert settings.backend == "local"
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 8080)
    # The generated secret is kept, private, and the same on the next start.
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    assert load_settings({"LABPOOL_DATA_DIR": str(tmp_path)}).secret_key == settings.secret_key


@pytest.mark.parametrize(
    "missing", ["LABPOOL_DATABASE_URL", "LABPOOL_REDIS_URL", "LABPOOL_SECRET_KEY"]
)
def test_production_names_each_missing_setting(missing, tmp_path):
    env = {
        "LABPOOL_DATA_DIR": str(tmp_path),
        "LABPOOL_PUBLIC_URL": "https://labpool.example.edu",
        "LABPOOL_DATABASE_URL": "postgresql+psycopg://labpool@db/labpool",
        "LABPOOL_REDIS_URL": "redis://cache:6379/0",
        "LABPOOL_SECRET_KEY": "x" * 40,
    }
    del env[missing]
    with pytest.raises(SettingsError, match=missing):
        load_settings(env)


def test_malformed_values_name_the_variable(tmp_path):
    with pytest.raises(SettingsError, match="LABPOOL_WEB_WORKERS"):
        load_settings({"LABPOOL_DATA_DIR": str(tmp_path), "LABPOOL_WEB_WORKERS": "many"})
    with pytest.raises(SettingsError, match="LABPOOL_PUBLIC_URL"):
        load_settings({"LABPOOL_DATA_DIR": str(tmp_path), "LABPOOL_PUBLIC_URL": "ftp://x"})
    with pytest.raises(SettingsError, match="LABPOOL_BACKEND"):
        load_settings({"LABPOOL_DATA_DIR": str(tmp_path), "LABPOOL_BACKEND": "kubernetes"})


def test_toml_file_is_read_and_the_environment_wins(tmp_path):
    path = tmp_path / "labpool.toml"
    path.write_text('web_workers = 7\npublic_url = "http://127.0.0.1:9000"\n')
    env = {
        "LABPOOL_CONFIG": str(path),
        "LABPOOL_DATA_DIR": str(tmp_path),
        "LABPOOL_WEB_WORKERS": "3",
    }
    settings = load_settings(env)
    assert settings.web_workers == 3
    assert settings.listen_port == 9000
    path.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match="colour"):
        load_settings(env)


def test_a_short_production_secret_key_is_refused(tmp_path):
    env = {
        "LABPOOL_DATA_DIR": str(tmp_path),
        "LABPOOL_PUBLIC_URL": "https://labpool.example.edu",
        "LABPOOL_DATABASE_URL": "postgresql+psycopg://labpool@db/labpool",
        "LABPOOL_REDIS_URL": "redis://cache:6379/0",
        "LABPOOL_SECRET_KEY": "short",
    }
    with pytest.raises(SettingsError, match="LABPOOL_SECRET_KEY: at least 32 characters"):
        load_settings(env)
    assert load_settings({**env, "LABPOOL_SECRET_KEY": "k" * 32}).secret_key == "k" * 32


def test_toml_keys_work_as_the_readme_spells_them(tmp_path):
    path = tmp_path / "labpool.toml"
    path.write_text('WEB_WORKERS = 5\nLABPOOL_PUBLIC_URL = "http://127.0.0.1:9001"\n')
    settings = load_settings({"LABPOOL_CONFIG": str(path), "LABPOOL_DATA_DIR": str(tmp_path)})
    assert settings.web_workers == 5 and settings.listen_port == 9001


def test_volumes_list_says_when_there_are_none(rt):
    result = CliRunner().invoke(main, ["volumes", "list"])
    assert result.exit_code == 0 and "no student volumes" in result.output


def test_every_command_has_help_text():
    import click

    missing = []

    def walk(command: click.Command, path: str) -> None:
        if not (command.help or "").strip():
            missing.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(main, "labpool")
    assert missing == []


def test_platform_add_and_list(rt):
    runner = CliRunner()
    args = [
        "platform",
        "add",
        "--issuer",
        "http://moodle.test:8081",
        "--client-id",
        "abc",
        "--deployment-id",
        "1",
        "--deployment-id",
        "2",
        "--auth-url",
        "http://moodle.test:8081/mod/lti/auth.php",
        "--token-url",
        "http://moodle.test:8081/mod/lti/token.php",
        "--jwks-url",
        "http://moodle.test:8081/mod/lti/certs.php",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    # The same issuer may register the tool again under another client id.
    result = runner.invoke(main, [a if a != "abc" else "def" for a in args])
    assert result.exit_code == 0, result.output
    listing = runner.invoke(main, ["platform", "list"]).output
    assert "client abc  deployments [1, 2]" in listing
    assert "client def" in listing


def test_platform_add_refuses_bad_urls(rt):
    result = CliRunner().invoke(
        main,
        [
            "platform",
            "add",
            "--issuer",
            "moodle.test",
            "--client-id",
            "abc",
            "--deployment-id",
            "1",
            "--auth-url",
            "x",
            "--token-url",
            "x",
            "--jwks-url",
            "x",
        ],
    )
    assert result.exit_code != 0
    assert "issuer must be an http(s) URL" in result.output


def test_moodle_values_are_the_tool_urls(rt):
    output = CliRunner().invoke(main, ["moodle-values"]).output
    base = rt.settings.public_url
    assert f"Initiate login URL:    {base}/lti/login" in output
    assert f"Public keyset:         {base}/lti/jwks.json" in output
    assert f"Redirection URI(s):    {base}/lti/launch" in output


def test_env_add_sets_the_sandbox_limits_and_refuses_ones_an_ide_cannot_start_under(rt):
    from sqlalchemy import select

    from provisioning.models import Environment

    runner = CliRunner()
    added = runner.invoke(
        main,
        [
            "env",
            "add",
            "small",
            "--memory-mb",
            "1024",
            "--max-processes",
            "64",
            "--cpu-seconds",
            "3600",
        ],
    )
    assert added.exit_code == 0, added.output
    refused = runner.invoke(main, ["env", "add", "tiny", "--memory-mb", "16"])
    assert (
        refused.exit_code != 0
        and "memory-mb must be 0 (no limit) or at least 512" in refused.output
    )
    with rt.sessions() as session:
        small = session.scalars(select(Environment).where(Environment.name == "small")).one()
        assert (
            session.scalars(select(Environment).where(Environment.name == "tiny")).first() is None
        )
    limits = small.limits
    assert (limits.memory_mb, limits.processes, limits.open_files, limits.cpu_seconds) == (
        1024,
        64,
        1024,
        3600,
    )
    assert f"--as={1024 * 1024 * 1024}" in limits.prlimit_args()


def test_an_idle_worker_does_not_fill_the_log(rt):
    """Issue 13: the worker wrote four lines per periodic job (every 15 s when idle)."""
    from rq import Queue

    from tests.conftest import run_worker_burst

    queue = Queue(rt.settings.queue_name, connection=rt.redis)
    for _ in range(3):  # what `labpool cron` enqueues every 15 s
        queue.enqueue("provisioning.jobs.reconcile_all")
    output = run_worker_burst(rt.settings)
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == [f"labpool worker: taking jobs from {rt.settings.queue_name!r}"], lines
    assert rt.redis.llen(f"rq:queue:{rt.settings.queue_name}") == 0  # the jobs ran


def test_an_idle_cron_does_not_fill_the_log(rt):
    """`labpool cron` said one "Enqueued job" line per periodic pass (every 15 s)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "LABPOOL_RECONCILE_INTERVAL_S": "1"}
    cron = subprocess.Popen(
        [sys.executable, "-m", "lti_tool.cli", "cron"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        queue = f"rq:queue:{rt.settings.queue_name}"
        while rt.redis.llen(queue) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)  # a few passes enqueued: the scheduler ran
        assert rt.redis.llen(queue) >= 3
    finally:
        cron.send_signal(signal.SIGTERM)
        output, _ = cron.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    assert not [line for line in lines if "Enqueued" in line or "Registered" in line], lines
    assert len(lines) <= 3, lines
