"""For the operator: /metrics, /readyz, JSON logs with a request id and no secrets, the
production files in deploy/, and `labpool run`'s start-up failures (one line, nothing left
running).

The multiprocess test runs the web app as production does (gunicorn with
`lti_tool.gunicorn_conf`, two workers) and a real `labpool worker`, all writing to one
PROMETHEUS_MULTIPROC_DIR, with launches from the fake Moodle and a reconciler pass against
the fake cloud.
"""

from __future__ import annotations

import configparser
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from sqlalchemy import select

from config.logging import JsonFormatter, redact, request_id_filter
from config.runtime import Runtime
from lti_tool.web.app import create_app
from provisioning.environments import add_secured_environment
from provisioning.models import Environment, Machine, Pool
from provisioning.queue import RECONCILE_JOB, enqueue
from tests.conftest import ROOT, ide_env, passable, register_fake_platform, run_worker_burst
from tests.fakeplatform import FakePlatform
from tests.nginx import free_port

DEPLOY = ROOT / "deploy"


def samples(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric in a Prometheus text exposition."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def total(text: str, name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples(text, name).items() if all(w in k for w in wanted))


# -- /metrics, in the test's own process ---------------------------------------------------


def test_metrics_count_launches_by_outcome_and_read_machines_and_queues(
    tool, platform, rt, browser
):
    before = requests.get(f"{tool.url}/metrics", timeout=10).text
    student = platform.launch(browser, tool.url, platform.learner(sub="ops-1"))
    assert student.launch_response.status_code == 303
    teacher = platform.launch(requests.Session(), tool.url, platform.instructor(sub="ops-t"))
    assert teacher.launch_response.status_code == 303
    refused = platform.launch(
        requests.Session(), tool.url, platform.learner(sub="ops-2"), mutate=_expired
    )
    assert refused.launch_response.status_code == 400

    page = requests.get(f"{tool.url}/metrics", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/plain")
    after = page.text
    for outcome in ("student", "teacher", "refused"):
        grew = total(after, "labpool_launches_total", outcome=outcome) - total(
            before, "labpool_launches_total", outcome=outcome
        )
        assert grew == 1, outcome
    assert total(after, "labpool_launch_seconds_count", outcome="student") >= 1
    # The machine the student asked for, from the database at scrape time.
    assert total(after, "labpool_machines", environment="default", state="requested") == 1
    # Its start job, from Redis at scrape time.
    assert total(after, "labpool_queue_jobs", queue=rt.settings.queue_name, state="queued") >= 1


def _expired(claims: dict) -> None:  # type: ignore[type-arg]
    claims["exp"] = int(time.time()) - 3600


def test_metrics_are_for_this_host_or_the_token_holder(rt, tool):
    # Through a proxy (nginx adds X-Forwarded-For) the public does not see them.
    assert (
        requests.get(
            f"{tool.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10
        ).status_code
        == 404
    )
    app = create_app(rt.settings)
    remote = {"REMOTE_ADDR": "198.51.100.7"}
    assert app.test_client().get("/metrics", environ_base=remote).status_code == 404
    assert app.test_client().get("/metrics").status_code == 200  # werkzeug's 127.0.0.1

    token = uuid.uuid4().hex
    guarded = create_app(dataclasses.replace(rt.settings, metrics_token=token))
    client = guarded.test_client()
    assert client.get("/metrics", environ_base=remote).status_code == 404
    assert client.get("/metrics").status_code == 404  # with a token, loopback needs it too
    wrong = {"Authorization": "Bearer " + "x" * 32}
    assert client.get("/metrics", headers=wrong, environ_base=remote).status_code == 404
    right = {"Authorization": f"Bearer {token}"}
    answer = client.get("/metrics", headers=right, environ_base=remote)
    assert answer.status_code == 200
    assert b"labpool_launches_total" in answer.data or b"labpool_machines" in answer.data


# -- /readyz ------------------------------------------------------------------------------


def test_readyz_checks_the_database_and_redis(rt, tool):
    ready = requests.get(f"{tool.url}/readyz", timeout=10)
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True
    assert body["checks"]["database"]["ok"] and body["checks"]["redis"]["ok"]
    assert "cloud" not in body["checks"]  # no environment on a cloud
    assert requests.get(f"{tool.url}/healthz", timeout=10).json() == {"ok": True}


def test_readyz_says_what_is_down_without_its_password(rt):
    port = free_port()  # nothing listens there
    broken = dataclasses.replace(
        rt.settings, redis_url=f"redis://:hunter2secret@127.0.0.1:{port}/0"
    )
    app = create_app(broken)
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 503
    body = answer.get_json()
    assert body["ready"] is False
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is False
    assert "ConnectionError" in body["checks"]["redis"]["error"]
    assert "hunter2secret" not in answer.get_data(as_text=True)


@pytest.mark.fake_cloud(boot_time=0.2, ide="stub")
def test_readyz_asks_the_cloud_when_an_environment_is_on_it(rt, cloud, monkeypatch):
    settings = dataclasses.replace(rt.settings, openstack_cloud="fake")
    crt = Runtime(settings=settings, sessions=rt.sessions, redis=rt.redis)
    _cloud_pool(crt)
    body = create_app(settings).test_client().get("/readyz").get_json()
    assert body["checks"]["cloud"]["ok"] is True, body
    # A cloud the settings cannot reach: not ready, and says which check failed.
    elsewhere = dataclasses.replace(settings, openstack_cloud="no-such-cloud")
    answer = create_app(elsewhere).test_client().get("/readyz")
    assert answer.status_code == 503
    checks = answer.get_json()["checks"]
    assert checks["cloud"]["ok"] is False and checks["database"]["ok"] is True


def _cloud_pool(rt: Runtime, warm: int = 0) -> int:
    name, _, _ = add_secured_environment(
        rt.sessions,
        dataclasses.replace(rt.settings, proxy_addresses=("127.0.0.1/32",)),
        name=f"cloud-{uuid.uuid4().hex[:6]}",
        backend="openstack",
        image_id="img-golden",
        flavor_id="m1.small",
        network_id="net-private",
        warm_target=warm,
        max_size=5,
    )
    with rt.sessions() as session:
        env_id = session.scalar(select(Environment.id).where(Environment.name == name))
        return session.scalar(select(Pool.id).where(Pool.environment_id == env_id))


# -- logs ---------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged in this process during the test, at DEBUG, as the JSON format
    writes it."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(request_id_filter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_json_lines_carry_the_request_id_into_the_job_it_enqueued(
    tool, platform, rt, browser, json_log, monkeypatch
):
    monkeypatch.setenv("LABPOOL_LOG_FORMAT", "json")
    monkeypatch.setenv("LABPOOL_LOG_LEVEL", "DEBUG")
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    browser.headers["X-Request-ID"] = request_id
    result = platform.launch(browser, tool.url, platform.learner(sub="ops-rid"))
    assert result.launch_response.headers["X-Request-ID"] == request_id

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    access = [x for x in lines if x["logger"] == "labpool.access" and "/lti/launch" in x["message"]]
    assert access and access[0]["request_id"] == request_id
    assert {"time", "level", "logger", "message", "process"} <= set(access[0])

    # The machine's start job carries the id; the worker's lines about it say it.
    worker_out = run_worker_burst(rt.settings)
    worker_lines = [json.loads(x) for x in worker_out.splitlines() if x.startswith("{")]
    assert worker_lines, worker_out[-2000:]
    assert any(x.get("request_id") == request_id for x in worker_lines), worker_out[-3000:]
    # A request id the client offers that does not look like one is replaced.
    odd = requests.get(
        f"{tool.url}/healthz", headers={"X-Request-ID": "<script>alert(1)</script>"}, timeout=10
    )
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["X-Request-ID"])


def test_no_id_token_cookie_or_ide_token_reaches_the_logs(
    tool, platform, rt, browser, json_log, monkeypatch
):
    monkeypatch.setenv("LABPOOL_LOG_FORMAT", "json")
    monkeypatch.setenv("LABPOOL_LOG_LEVEL", "DEBUG")
    result = platform.launch(browser, tool.url, platform.learner(sub="ops-secret"))
    machine_id = int(result.launch_response.headers["Location"].rstrip("/").split("/")[-1])
    worker_out = run_worker_burst(rt.settings)
    state = {}
    for _ in range(100):
        state = browser.get(f"{tool.url}/machines/{machine_id}/state").json()
        if state["ready"]:
            break
        time.sleep(0.2)
    opened = browser.get(f"{tool.url}{state['open_url']}", allow_redirects=False)
    assert opened.status_code == 303
    with rt.sessions() as session:
        ide_token = session.get(Machine, machine_id).ide_token
    assert ide_token

    secrets = {
        "id_token": result.id_token,
        "id_token signature": result.id_token.rsplit(".", 1)[1],
        "state": result.state,
        "ide token": ide_token,
        **{f"cookie {c.name}": c.value for c in browser.cookies if len(c.value) >= 8},
    }
    logged = json_log.getvalue() + worker_out
    assert "/lti/launch" in logged and "labpool.access" in logged  # the logs were there
    for what, value in secrets.items():
        assert value not in logged, f"the {what} reached the logs"


def test_redaction_catches_tokens_in_urls_headers_and_urls_with_passwords():
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    line = (
        f"POST id_token={jwt} GET /ide/3/api?token=abcdef123456&x=1 "
        "Authorization: Bearer s3cr3tv4lu3xyz postgresql://lab:pw0rd@db/lab"
    )
    clean = redact(line)
    for secret in (jwt, "abcdef123456", "s3cr3tv4lu3xyz", "pw0rd"):
        assert secret not in clean
    assert "x=1" in clean and "postgresql://lab:[redacted]@db/lab" in clean


# -- the production wiring: gunicorn workers and an RQ worker, one metrics folder -------


@pytest.mark.fake_cloud(boot_time=0.2, ide="stub")
def test_metrics_under_gunicorn_sum_every_process_after_launches_and_a_reconcile_pass(
    rt, cloud, tmp_path, monkeypatch
):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("LABPOOL_PROXY_ADDRESSES", "127.0.0.1/32")
    env = {
        **os.environ,
        "LABPOOL_PUBLIC_URL": url,
        "LABPOOL_WEB_WORKERS": "2",
        "LABPOOL_LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    web_log = (tmp_path / "web.log").open("w")
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:lti_tool.gunicorn_conf", "wsgi:app"],
        env=env,
        cwd=ROOT,
        stdout=web_log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(f"{url}/healthz", timeout=90)
        with FakePlatform(tool_url=url) as moodle:
            register_fake_platform(rt, moodle)
            for n in range(3):
                launched = moodle.launch(requests.Session(), url, moodle.learner(sub=f"mp-{n}"))
                assert launched.launch_response.status_code == 303
            moodle.launch(requests.Session(), url, moodle.learner(sub="mp-x"), mutate=_expired)

        crt = Runtime(
            settings=dataclasses.replace(rt.settings, openstack_cloud="fake"),
            sessions=rt.sessions,
            redis=rt.redis,
        )
        pool_id = _cloud_pool(crt, warm=1)
        enqueue(rt.redis, rt.settings.queue_name, RECONCILE_JOB, pool_id)
        done = subprocess.run(
            [sys.executable, "-m", "lti_tool.cli", "worker", "--burst"],
            env={**env, **{k: v for k, v in os.environ.items() if k.startswith("OS_")}},
            timeout=180,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]

        text = requests.get(f"{url}/metrics", timeout=10).text
        assert total(text, "labpool_launches_total", outcome="student") == 3
        assert total(text, "labpool_launches_total", outcome="refused") == 1
        assert total(text, "labpool_launch_seconds_count", outcome="student") == 3
        # From the RQ worker's process:
        assert total(text, "labpool_machine_starts_total", result="ready") == 3, text
        assert total(text, "labpool_machine_start_seconds_count", backend="local") == 3
        assert total(text, "labpool_machine_ready_seconds_count", backend="local") == 3
        assert total(text, "labpool_reconcile_pass_seconds_count") >= 1
        assert total(text, "labpool_reconcile_actions_total", action="created") >= 1
        # State, read at scrape time:
        assert total(text, "labpool_machines", environment="default", state="assigned") == 3
        assert total(text, "labpool_pool_warm_target") >= 1
        assert list(metrics_dir.glob("*.db")), "the processes wrote to the shared folder"
        (tmp_path / "metrics-excerpt.txt").write_text(text)
        print("\n".join(x for x in text.splitlines() if x.startswith("labpool_")))
    finally:
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(20)
        except subprocess.TimeoutExpired:
            web.kill()


def _wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=10).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


# -- `labpool run`: start-up failures ------------------------------------------------------


def _run(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    passable(tmp_path)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LABPOOL_", "PROMETHEUS"))},
        "LABPOOL_DATA_DIR": str(tmp_path / "data"),
        "LABPOOL_IDE_ENV": str(ide_env()),
        "LABPOOL_WEB_WORKERS": "1",
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "lti_tool.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.strip() and not x.startswith("WARNING")]
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("Error: ")
    return lines[0]


def _left_running(data_dir: Path) -> list[str]:
    """Processes whose command line names this data folder (redis-server, gunicorn, …)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(data_dir.resolve()) in cmdline:
            found.append(cmdline)
    return found


def test_run_on_a_taken_port_names_the_setting_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run(tmp_path, LABPOOL_PUBLIC_URL=f"http://127.0.0.1:{port}")
    line = _error_line(done)
    assert f"port {port}" in line and "LABPOOL_PUBLIC_URL" in line, line
    assert "running at" not in done.stdout
    assert _left_running(tmp_path / "data") == []


def test_run_with_an_unreachable_database_says_where_without_the_password_and_stops_its_redis(
    tmp_path,
):
    port = free_port()
    done = _run(
        tmp_path,
        LABPOOL_PUBLIC_URL=f"http://127.0.0.1:{free_port()}",
        LABPOOL_DATABASE_URL=f"postgresql+psycopg://labpool:s3cretpw@127.0.0.1:{port}/labpool",
    )
    line = _error_line(done)
    assert f"postgresql+psycopg://labpool:***@127.0.0.1:{port}/labpool" in line, line
    assert "LABPOOL_DATABASE_URL" in line
    assert "s3cretpw" not in done.stdout + done.stderr
    # The embedded Redis had started (the database is checked after it): it is gone again.
    assert (tmp_path / "data" / "redis.log").exists()
    assert _left_running(tmp_path / "data") == []


def test_run_with_an_unreachable_redis_says_where_without_the_password(tmp_path):
    port = free_port()
    done = _run(
        tmp_path,
        LABPOOL_PUBLIC_URL=f"http://127.0.0.1:{free_port()}",
        LABPOOL_REDIS_URL=f"redis://:r3dispw@127.0.0.1:{port}/0",
    )
    line = _error_line(done)
    assert f"redis://:***@127.0.0.1:{port}/0" in line and "LABPOOL_REDIS_URL" in line, line
    assert "r3dispw" not in done.stdout + done.stderr
    assert _left_running(tmp_path / "data") == []


# -- deploy/ ------------------------------------------------------------------------------

UNITS = {
    "labpool-web.service": "gunicorn -c python:lti_tool.gunicorn_conf",
    "labpool-worker.service": "labpool worker",
    "labpool-grading-worker.service": "labpool worker --queue grading",
    "labpool-cron.service": "labpool cron",
}


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_units_run_labpool_with_its_settings_and_metrics_folder(unit):
    path = DEPLOY / "systemd" / unit
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    service = parser["Service"]
    assert UNITS[unit] in service["ExecStart"]
    assert service["ExecStart"].startswith("/")  # systemd wants an absolute path
    assert "EnvironmentFile" in service and "/etc/labpool/" in service["EnvironmentFile"]
    assert "PROMETHEUS_MULTIPROC_DIR=/run/labpool-metrics" in service["Environment"]
    assert "LABPOOL_LOG_FORMAT=json" in service["Environment"]
    assert service["User"] == "labpool"
    assert service.get("Restart") in ("on-failure", "always")
    assert "labpool.target" in parser["Install"]["WantedBy"]
    if unit != "labpool-web.service":
        assert "labpool-migrate.service" in parser["Unit"]["After"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the files' content was checked")


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the content test checks the files)")
    # verify needs the ExecStart binaries to exist: point them at this virtualenv.
    units = tmp_path / "units"
    units.mkdir()
    for path in (DEPLOY / "systemd").iterdir():
        text = path.read_text().replace("/opt/labpool/venv/bin/", f"{Path(sys.executable).parent}/")
        (units / path.name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in units.iterdir() if p.suffix != ".example")],
        capture_output=True,
        text=True,
    )
    # verify prints a warning per bad line (and fails on a missing binary or dependency)
    assert done.returncode == 0, done.stderr
    assert not [x for x in done.stderr.splitlines() if ".service:" in x or ".target:" in x], (
        done.stderr
    )


def test_procfile_reads_the_settings():
    procfile = (DEPLOY / "Procfile").read_text()
    web = next(x for x in procfile.splitlines() if x.startswith("web:"))
    assert "lti_tool.gunicorn_conf" in web
    assert "--bind" not in web and "--workers" not in web
    assert "worker: labpool worker" in procfile and "cron: labpool cron" in procfile
    assert "labpool worker --queue grading" in procfile


def test_gunicorn_conf_takes_bind_and_workers_from_the_settings():
    code = "import lti_tool.gunicorn_conf as c; print(c.bind[0], c.workers)"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LABPOOL_")},
        "LABPOOL_LISTEN": "127.0.0.1:8123",
        "LABPOOL_WEB_WORKERS": "7",
        "LABPOOL_DATA_DIR": "/tmp/labpool-gunicorn-conf",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert done.stdout.split() == ["127.0.0.1:8123", "7"], done.stderr


def test_compose_file_runs_labpool_with_postgresql_redis_and_nginx():
    compose = DEPLOY / "compose.yaml"
    document = yaml.safe_load(compose.read_text())
    services = document["services"]
    assert {
        "postgres",
        "redis",
        "nginx",
        "web",
        "worker",
        "grading-worker",
        "cron",
        "migrate",
    } <= set(services)
    assert services["grading-worker"]["command"] == ["worker", "--queue", "grading"]
    for name in ("web", "worker", "grading-worker", "cron"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in ("web", "worker", "grading-worker", "cron", "migrate"):
        env = services[name]["environment"]
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/var/lib/labpool-metrics"
        assert "metrics:/var/lib/labpool-metrics" in services[name]["volumes"]
        assert env["LABPOOL_REDIS_URL"] == "redis://redis:6379/0"
        assert env["LABPOOL_DATABASE_URL"].endswith("@postgres/labpool")
    assert services["web"]["entrypoint"] == ["gunicorn"]
    assert "python:lti_tool.gunicorn_conf" in services["web"]["command"]
    assert "nginx-conf:/etc/nginx/conf.d:ro" in services["nginx"]["volumes"]
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        return  # no compose plugin on this machine: the checks above are the test
    done = subprocess.run(
        [docker, "compose", "-f", str(compose), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=DEPLOY,
        env={**os.environ, "LABPOOL_SECRET_KEY": "x" * 48, "POSTGRES_PASSWORD": "pw"},
    )
    assert done.returncode == 0, done.stderr


def test_dockerfile_installs_from_the_lock_and_runs_as_a_user():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "requirements.lock" in text and "--no-deps" in text
    assert re.search(r"^USER labpool", text, re.M)
    assert (
        'ENTRYPOINT ["labpool"]' in text or 'ENTRYPOINT ["/opt/labpool/venv/bin/labpool"]' in text
    )


def test_grafana_dashboard_uses_the_series_labpool_exports():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queries = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    exported = set(
        re.findall(r'"(labpool_[a-z_]+)"', (ROOT / "lti_tool" / "metrics.py").read_text())
    )
    used = set(re.findall(r"labpool_[a-z_]+", queries))
    base = {re.sub(r"_(bucket|count|sum)$", "", x) for x in used}
    assert base <= exported, base - exported
    assert exported <= base, f"not on the dashboard: {exported - base}"


def test_proxy_auth_roster_and_grade_results_are_counted(rt, tool):
    from grading.outbox import send_score
    from lti_tool.services.nrps import RosterError, sync_course

    def scrape() -> str:
        return requests.get(f"{tool.url}/metrics", timeout=10).text

    before = scrape()
    # nginx's auth check without the proxy's secret: refused, and counted as such
    assert requests.get(f"{tool.url}/proxy/auth", timeout=10).status_code == 403
    # a score row that does not exist, a course that does not exist
    assert send_score(rt, 987654321) == "gone"
    with pytest.raises(RosterError):
        sync_course(rt, 987654321)
    after = scrape()
    for name, labels in (
        ("labpool_proxy_auth_total", {"decision": "forbidden"}),
        ("labpool_ags_sends_total", {"result": "gone"}),
        ("labpool_roster_syncs_total", {"result": "error"}),
    ):
        assert total(after, name, **labels) - total(before, name, **labels) == 1, name
