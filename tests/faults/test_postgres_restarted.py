"""PostgreSQL restarted in the middle of the class start: every process reconnects (pools
check connections before use) and the class converges. Needs the suite on PostgreSQL on
this host: under `.ci/run` (LABPOOL_TEST_DATABASE_URL, a local cluster run by
pg_ctlcluster); skipped on a developer's SQLite run."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from urllib.parse import urlsplit

import pytest

from tests.conftest import in_ci

ON_POSTGRES = os.environ.get("LABPOOL_TEST_DATABASE_URL", "").startswith("postgresql")
pytestmark = [
    pytest.mark.skipif(
        not ON_POSTGRES,
        reason="needs the suite on PostgreSQL (LABPOOL_TEST_DATABASE_URL, set by .ci/run); "
        "this run uses SQLite",
    ),
    pytest.mark.fake_cloud(
        boot_time=0.3, max_instances=60, ide="stub", enforce_security_groups=True
    ),
]


def local_cluster() -> str:
    """The version of the local cluster the tests' database is on; skips (fails under CI)
    when there is none."""
    url = os.environ.get("LABPOOL_TEST_DATABASE_URL", "")
    problem = None
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        problem = "the tests' PostgreSQL is not on this host: it cannot be restarted from here"
    elif not shutil.which("pg_ctlcluster") or not os.path.isdir("/etc/postgresql"):
        problem = "needs pg_ctlcluster (apt-get install postgresql)"
    if problem is None:
        return sorted(os.listdir("/etc/postgresql"))[-1]
    if in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


def test_postgres_restarted_mid_burst_the_class_converges(class_start, fleet, cloud):
    version = local_cluster()
    cloud.stall_next("POST", "/compute/v2.1/servers", 1.0, count=1000)
    fleet.start("cron")
    fleet.start("worker")
    class_start.burst(0, 10)
    deadline = time.monotonic() + 30
    while cloud.count("POST", "/compute/v2.1/servers") == 0:
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.05)
    # Mid-pass: the worker's transactions and every pooled connection are cut.
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        timeout=120,
    )
    ended = time.monotonic()
    cloud.state.stalls.clear()
    class_start.burst(10, 10)
    took = class_start.wait_converged(fleet, 45, since=ended)
    print(f"converged {took:.1f} s after PostgreSQL was back")
