"""Redis emptied (FLUSHDB of the test database) in the middle of the class start: jobs
are triggers, the database says what is wanted, the cron's next pass finds the work."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.fake_cloud(
    boot_time=0.3, max_instances=60, ide="stub", enforce_security_groups=True
)


def test_redis_flushed_mid_burst_the_class_converges(class_start, fleet, cloud):
    """Half the class has launched and creates are in flight (Nova slow: 1 s a create)
    when every key goes: queued passes, the reconcile lock, the proxy's routes, RQ's own
    registries. The other half launches after; the class converges, nothing doubled."""
    cloud.stall_next("POST", "/compute/v2.1/servers", 1.0, count=1000)
    fleet.start("cron")
    fleet.start("worker")
    class_start.burst(0, 10)
    deadline = time.monotonic() + 30
    while cloud.count("POST", "/compute/v2.1/servers") == 0:
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.05)
    class_start.rt.redis.flushdb()
    ended = time.monotonic()
    class_start.burst(10, 10)
    cloud.state.stalls.clear()
    took = class_start.wait_converged(fleet, 45, since=ended)
    print(f"converged {took:.1f} s after the flush")
