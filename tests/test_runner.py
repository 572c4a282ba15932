"""`labpool run` on a public address: one port (nginx) serves the tool and every IDE.

The runner is started as a user would start it (`python -m lti_tool.cli run`), with its own
data folder, SQLite and embedded Redis, on this host's non-loopback address; a student
launches from the fake Moodle through that address and reaches a real, sandboxed JupyterLab
through nginx. Needs nginx and the full sandbox (markers: conftest.py's rule for a missing
tool) and, for the end-to-end run, a non-loopback address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lti_tool.runner import plan
from provisioning.sandbox import Isolation
from tests.conftest import ROOT, ide_env, passable
from tests.fakeplatform import FakePlatform
from tests.nginx import free_port


def public_address() -> str | None:
    """This host's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent for a UDP connect
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


ADDRESS = public_address()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, FakePlatform, subprocess.Popen[bytes]]]:
    passable(tmp_path)
    url = f"http://{ADDRESS}:{free_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LABPOOL_")},
        "LABPOOL_PUBLIC_URL": url,
        "LABPOOL_DATA_DIR": str(tmp_path / "data"),
        "LABPOOL_IDE_ENV": str(ide_env()),
        "LABPOOL_WEB_WORKERS": "1",
    }
    cli = [sys.executable, "-m", "lti_tool.cli"]
    with FakePlatform(tool_url=url) as moodle:
        added = subprocess.run(
            [*cli, *moodle.platform_add_argv()],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert added.returncode == 0, added.stderr
        log = (tmp_path / "run.log").open("wb")
        runner = subprocess.Popen(
            [*cli, "run"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert runner.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
                try:
                    if requests.get(url + "/healthz", timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.3)
            yield url, moodle, runner
        finally:
            runner.send_signal(signal.SIGINT)
            try:
                runner.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(runner.pid, signal.SIGKILL)
            log.close()


@pytest.mark.nginx
@pytest.mark.sandbox
@pytest.mark.skipif(ADDRESS is None, reason="this host has no non-loopback address to serve on")
def test_run_on_a_public_address_serves_a_launch_through_nginx_to_jupyterlab(served):
    url, moodle, runner = served
    with requests.Session() as browser:
        result = moodle.launch(browser, url, moodle.learner(sub="41"))
        status_page = result.launch_response
        assert status_page.status_code == 303
        machine_url = status_page.headers["Location"]
        machine_id = machine_url.rstrip("/").rsplit("/", 1)[1]
        deadline = time.monotonic() + 90
        while True:
            state = browser.get(f"{url}/machines/{machine_id}/state").json()
            if state["ready"]:
                break
            assert state["state"] in ("requested", "starting"), state
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        lab = browser.get(url + state["open_url"])
        assert lab.status_code == 200 and "<title>JupyterLab</title>" in lab.text
        # Everything came through the one public address: the IDE's own socket is not a port.
        assert lab.url.startswith(f"{url}/ide/{machine_id}/")
        assert browser.get(f"{url}/ide/{machine_id}/api/status").json()["started"]
    runner.send_signal(signal.SIGINT)
    assert runner.wait(60) == 0


@pytest.mark.sandbox  # the host's own isolation must be complete for the first plan
def test_run_refuses_a_public_address_it_cannot_keep_students_apart_on():
    from config.settings import load_settings
    from lti_tool.runner import CannotServe

    public = ADDRESS or "192.0.2.10"  # plan() reads the URL only; no need to bind it
    settings = load_settings(
        {"LABPOOL_PUBLIC_URL": f"http://{public}:8080", "LABPOOL_DATA_DIR": "/tmp/labpool-unused"}
    )
    with pytest.raises(CannotServe, match="nginx is needed"):
        plan(settings, nginx=None)
    behind, warnings = plan(settings, nginx="/usr/sbin/nginx")
    assert behind.ide_proxy and behind.proxy_count == 1 and behind.listen.startswith("127.0.0.1:")
    assert warnings == []
    loopback = load_settings(
        {"LABPOOL_PUBLIC_URL": "http://127.0.0.1:8080", "LABPOOL_DATA_DIR": "/tmp/labpool-unused"}
    )
    direct, warnings = plan(loopback, nginx=None)
    assert not direct.ide_proxy and any("nginx is not installed" in w for w in warnings)

    # A host where students could not be kept apart: a trial on loopback still runs, loudly;
    # a public address does not.
    weak = Isolation(own_users=False, sandbox=False, bwrap=None, prlimit="/usr/bin/prlimit")
    with pytest.raises(CannotServe, match="not running as root") as refused:
        plan(settings, nginx="/usr/sbin/nginx", isolation=weak)
    assert "bubblewrap" in str(refused.value)
    _, warnings = plan(loopback, nginx="/usr/sbin/nginx", isolation=weak)
    assert [w for w in warnings if w.startswith("NOT ISOLATED")] and len(warnings) == 2
