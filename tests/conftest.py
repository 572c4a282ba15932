"""Shared fixtures: a real tool (our Flask app on a loopback HTTP server) backed by
PostgreSQL and Redis when `LABPOOL_TEST_DATABASE_URL` / `LABPOOL_TEST_REDIS_URL` are set
(`.ci/run` sets them), else SQLite and an embedded Redis; a fake Moodle registered with it;
and a real RQ worker that tests run in burst mode when they want machines started; the fake
OpenStack (`cloud`, configured per module or test with `@pytest.mark.fake_cloud(...)`).

Tests that need a program from outside the virtualenv carry a marker (`nginx`, `browser`,
`sandbox`; pyproject.toml lists them). One rule for a missing one: with CI=true (`.ci/run`,
which installs them all) the test fails; in a developer's run it is skipped. Either way the
message says what to install.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from sqlalchemy import create_engine, text

from config.db import transaction
from config.redis import EmbeddedRedis
from config.runtime import Runtime
from config.settings import Settings, load_settings
from tests.fakecloud import FakeCloud
from tests.fakeplatform import FakePlatform, ServedApp, register_fake_platform
from tests.nginx import nginx_binary

RQ_REGISTRIES = (
    StartedJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    DeferredJobRegistry,
    ScheduledJobRegistry,
    CanceledJobRegistry,
)
TABLES_CLEARED_BETWEEN_TESTS = (
    "launches",
    "machines",
    "activities",
    "enrolments",
    "courses",
    "users",
)


class _LateApp:
    """The WSGI app is created after the server has its port (the app needs its URL)."""

    app: Any = None

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


def _reset_postgres(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    # Students' sandboxes and nginx's workers (other OS users) must pass through the test's
    # folders; pytest's own /tmp/pytest-of-<user> is 0700 and reset by every other session.
    if not config.option.basetemp:
        config.option.basetemp = os.path.join(
            tempfile.gettempdir(), f"labpool-pytest-{os.getpid()}"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.option.basetemp and f"labpool-pytest-{os.getpid()}" in str(config.option.basetemp):
        shutil.rmtree(config.option.basetemp, ignore_errors=True)


# --------------------------------------------------------------------------- outside tools


@dataclass(frozen=True)
class Need:
    """Something a marked test needs from the host, and how to get it."""

    what: str
    present: Callable[[], bool]
    install: str


def chromium_path() -> str | None:
    """Debian's Chromium ($LABPOOL_TEST_CHROMIUM, else `chromium` on PATH); Playwright's own
    browser downloads are never used."""
    found = os.environ.get("LABPOOL_TEST_CHROMIUM") or shutil.which("chromium")
    return found if found and Path(found).is_file() else None


@functools.cache
def _isolation() -> Any:
    from provisioning.sandbox import host_isolation

    return host_isolation()


_APT = "apt-get update && apt-get install -y"
NEEDS: dict[str, tuple[Need, ...]] = {
    "nginx": (Need("nginx", lambda: nginx_binary() is not None, f"{_APT} nginx-light"),),
    "browser": (
        Need(
            "Chromium",
            lambda: chromium_path() is not None,
            f"{_APT} chromium (or set LABPOOL_TEST_CHROMIUM to a Chromium binary)",
        ),
        Need(
            "the Python package playwright",
            lambda: importlib.util.find_spec("playwright") is not None,
            ".venv/bin/pip install -e '.[test]' (do NOT run `playwright install`: the tests "
            "drive Debian's chromium)",
        ),
    ),
    "sandbox": (
        Need(
            "root",
            lambda: _isolation().own_users,
            "run the tests as root (each student's IDE runs as its own OS user)",
        ),
        Need(
            "a working bubblewrap",
            lambda: _isolation().sandbox,
            f"{_APT} bubblewrap (installed but failing: this host or container does not "
            "allow user namespaces)",
        ),
        Need("prlimit", lambda: _isolation().prlimit is not None, f"{_APT} util-linux"),
    ),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The one rule for a missing tool: fail under CI=true, skip otherwise, and say what to
    install either way."""
    missing = [
        need
        for marker, needs in NEEDS.items()
        if item.get_closest_marker(marker)
        for need in needs
        if not need.present()
    ]
    if not missing:
        return
    message = "needs " + "; and ".join(f"{need.what}: {need.install}" for need in missing)
    if in_ci():
        pytest.fail(f"{message} [CI=true: every tool must be installed]", pytrace=False)
    pytest.skip(message)


def ide_env() -> Path:
    """The students' IDE environment, made once per checkout (`labpool ide-env`; about 30 s)
    and shared by test runs: JupyterLab on the system's Python, apart from the tool's."""
    from provisioning.ide_env import make_ide_env

    path = ROOT / ".venv-ide"
    make_ide_env(path)
    return path


def passable(path: Path) -> None:
    """Let the students' users and nginx's workers pass through pytest's private temporary
    folders (0700) to the data folder, as they pass through /var/lib on a real host."""
    for folder in [path, *path.parents]:
        if folder == Path(tempfile.gettempdir()) or folder == folder.parent:
            break
        if folder.stat().st_uid == os.geteuid():
            folder.chmod(folder.stat().st_mode | 0o111)


@pytest.fixture(scope="session")
def tool_server() -> Iterator[ServedApp]:
    holder = _LateApp()
    server = ServedApp(holder)
    server.holder = holder  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="session")
def settings(
    tmp_path_factory: pytest.TempPathFactory, tool_server: ServedApp
) -> Iterator[Settings]:
    data_dir = tmp_path_factory.mktemp("labpool-data")
    passable(data_dir)
    db_url = os.environ.get("LABPOOL_TEST_DATABASE_URL")
    redis_url = os.environ.get("LABPOOL_TEST_REDIS_URL")
    embedded = None
    if db_url:
        _reset_postgres(db_url)
    else:
        db_url = f"sqlite:///{data_dir / 'labpool.db'}"
    if not redis_url:
        embedded = EmbeddedRedis(data_dir / "redis.sock").start()
        redis_url = embedded.url
    else:
        # The tests' own Redis database starts empty, as the PostgreSQL one is reset: what an
        # earlier run left (jobs, tokens, counters) must not count against this one.
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    env = {
        "LABPOOL_DATA_DIR": str(data_dir),
        "LABPOOL_DATABASE_URL": db_url,
        "LABPOOL_REDIS_URL": redis_url,
        "LABPOOL_PUBLIC_URL": tool_server.url,
        "LABPOOL_QUEUE_NAME": f"labpool-test-{os.getpid()}",
        "LABPOOL_MACHINE_START_TIMEOUT_S": "90",
        "LABPOOL_IDE_ENV": str(ide_env()),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the RQ worker and in-process jobs read their settings from here
    yield load_settings()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if embedded:
        embedded.stop()


@pytest.fixture(scope="session")
def rt(settings: Settings) -> Runtime:
    from lti_tool.startup import prepare

    return prepare(settings)


@pytest.fixture(scope="session")
def tool(rt: Runtime, tool_server: ServedApp) -> ServedApp:
    from lti_tool.web.app import create_app

    tool_server.holder.app = create_app(rt.settings)  # type: ignore[attr-defined]
    return tool_server.start()


@pytest.fixture(scope="session")
def platform(tool: ServedApp, rt: Runtime) -> Iterator[FakePlatform]:
    with FakePlatform(tool_url=tool.url) as fake:
        register_fake_platform(rt, fake)
        yield fake


@pytest.fixture(autouse=True)
def _clean_slate(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with no users, courses or machines, and an empty queue; machines a
    test started are stopped after it."""
    yield
    if "rt" not in request.fixturenames:
        return
    rt: Runtime = request.getfixturevalue("rt")
    from provisioning.jobs import stop_all_machines

    if "platform" in request.fixturenames:
        request.getfixturevalue("platform").forget_rosters()

    # The queue and its registries: a job a test's worker was running when it was stopped
    # or killed stays "started" until its timeout, and would be the next test's.
    for queue in (rt.settings.queue_name, f"{rt.settings.queue_name}-grading"):
        rt.redis.delete(
            f"rq:queue:{queue}",
            *(registry(queue, connection=rt.redis).key for registry in RQ_REGISTRIES),
        )
    for key in rt.redis.scan_iter("labpool:reconcile-*"):
        rt.redis.delete(key)
    stop_all_machines(rt)
    with transaction(rt.sessions) as session:
        for table in TABLES_CLEARED_BETWEEN_TESTS:
            session.execute(text(f"DELETE FROM {table}"))
        session.execute(text("DELETE FROM pools"))
        session.execute(text("DELETE FROM environments WHERE name <> 'default'"))


@pytest.fixture
def browser() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def cloud(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeCloud]:
    """The fake OpenStack (tests/fakecloud), the only cloud openstacksdk sees as `cloud="fake"`
    (here and in RQ workers this test starts). Configure it with
    `@pytest.mark.fake_cloud(boot_time=0.2, ide="stub", ...)`: any `FakeCloud` keyword; the
    test's own mark overrides its module's, key by key."""
    from provisioning.backends.openstack import forget_connections

    options: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers("fake_cloud"))):
        options.update(mark.kwargs)
    folder = tmp_path / "fake-cloud"
    folder.mkdir()
    with FakeCloud(**options) as fake:
        port = fake.port
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fake.write_clouds_yaml(folder)))
        for name in [k for k in os.environ if k.startswith("OS_") and k != "OS_CLIENT_CONFIG_FILE"]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("LABPOOL_OPENSTACK_CLOUD", "fake")
        forget_connections()  # cached connections point at an earlier test's cloud
        yield fake
        forget_connections()
    assert fake_cloud_threads(port) == [], "stop() must end every IDE thread of the cloud"


def fake_cloud_threads(port: int) -> list[str]:
    """Names of the threads that run the IDEs of the fake cloud on `port`."""
    prefix = f"fakecloud-ide:{port}-"
    return sorted(t.name[len(prefix) :] for t in threading.enumerate() if t.name.startswith(prefix))


def run_worker_burst(settings: Settings, timeout: float = 120) -> str:
    """Run a real RQ worker (`labpool worker --burst`) until the queue is empty."""
    done = subprocess.run(
        [sys.executable, "-m", "lti_tool.cli", "worker", "--burst"],
        env=dict(os.environ),
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def count_rows(rt: Runtime) -> dict[str, int]:
    with rt.sessions() as session:
        return {
            table: session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in TABLES_CLEARED_BETWEEN_TESTS
        }


ROOT = Path(__file__).resolve().parent.parent
