"""SIGKILL of a worker while it creates or attaches students' volumes: the next worker
gives every student their one volume, attached to their machine, and leaves none behind."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.fake_cloud(
    boot_time=0.3, max_instances=60, ide="stub", enforce_security_groups=True
)


@pytest.mark.parametrize(
    "stalled",
    [
        pytest.param(("POST", "/volume/v3/"), id="mid-volume-create"),
        pytest.param(("POST", "/compute/v2.1/servers/"), id="mid-attach"),
    ],
)
def test_worker_killed_mid_volume_call_the_class_converges(class_start, fleet, cloud, stalled):
    method, prefix = stalled
    cloud.stall_next(method, prefix, 5.0, count=1000)
    fleet.start("cron")
    worker = fleet.start("worker")
    class_start.burst()
    deadline = time.monotonic() + 40
    while not any(r.method == method and r.path.startswith(prefix) for r in cloud.request_log):
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.05)
    time.sleep(0.5)  # several calls in flight, none answered
    fleet.kill(worker)
    cloud.state.stalls.clear()
    ended = time.monotonic()
    fleet.start("worker")
    took = class_start.wait_converged(fleet, 45, since=ended)
    print(f"converged {took:.1f} s after the worker was killed")
