"""SIGKILL of a worker in the middle of cloud calls: the next worker converges."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.fake_cloud(
    boot_time=0.3, max_instances=60, ide="stub", enforce_security_groups=True
)

# The killed worker had claimed (`starting`, token written) more machines than it had sent
# creates for; those have no server and wait out CREATE_GRACE (60 s from the claim) before
# they are queued again: the bound is that grace plus a pass and a boot.
CONVERGES_WITHIN_S = 80


def test_worker_killed_mid_create_a_new_worker_converges(class_start, fleet, cloud):
    """Nova stalls every create for 8 s while the class launches; the only worker is killed
    while its creates are in flight (the servers appear after it died). A new worker
    starts: every student ends on their own machine, the stalled creates' servers are
    adopted, none is left over or doubled."""
    cloud.stall_next("POST", "/compute/v2.1/servers", 8.0, count=1000)
    fleet.start("cron")
    worker = fleet.start("worker")
    class_start.burst()
    deadline = time.monotonic() + 30
    while cloud.count("POST", "/compute/v2.1/servers") == 0:
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.05)
    time.sleep(0.5)  # several creates in flight, none answered
    fleet.kill(worker)
    cloud.state.stalls.clear()
    ended = time.monotonic()
    fleet.start("worker")
    took = class_start.wait_converged(fleet, CONVERGES_WITHIN_S, since=ended)
    print(f"converged {took:.1f} s after the worker was killed")
