"""The cloud misbehaves during the class start, then recovers: the class converges."""

from __future__ import annotations

import time

import pytest

from provisioning.models import Pool

pytestmark = pytest.mark.fake_cloud(
    boot_time=0.3, max_instances=60, ide="stub", enforce_security_groups=True
)

SERVERS = "/compute/v2.1/servers"


def quota_note(class_start) -> str | None:  # type: ignore[no-untyped-def]
    with class_start.rt.sessions() as session:
        return session.get_one(Pool, class_start.pool_id).quota_note


def test_quota_conflicts_and_error_servers_then_the_class_converges(class_start, fleet, cloud):
    """Over quota (403) with room for 8, Nova answering 409 to creates and putting servers in
    ERROR ("No valid host") while 20 students launch; the quota is raised: every student
    ends on their own machine, the quota note was on the class page and is gone, the ERROR
    servers were deleted."""
    cloud.set_quota(8)
    cloud.fail_next("POST", SERVERS, 409, count=3, message="Cannot 'create' while in task_state")
    cloud.error_next_create(count=3)
    fleet.start("cron")
    fleet.start("worker")
    class_start.burst()
    deadline = time.monotonic() + 30
    while not (note := quota_note(class_start)):
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.2)
    assert "quota" in note.lower()
    time.sleep(3)  # the class waits on the quota a little
    cloud.set_quota(60)
    ended = time.monotonic()
    took = class_start.wait_converged(fleet, 45, since=ended)
    print(f"converged {took:.1f} s after the quota was raised")
    assert quota_note(class_start) is None
    assert cloud.count("POST", SERVERS) >= 20 + 3 + 3  # the refusals and the failed boots


def test_5xx_and_lost_create_answers_then_the_class_converges(class_start, fleet, cloud):
    """Nova answers 503 to a create and loses the answers of two creates it carried out
    (502 after creating, and a reset connection): the pool backs off (30 s after one failing
    pass), adopts the servers it never heard of, creates the rest, and doubles none. The
    bound is CREATE_GRACE (60 s): the machine whose create got the 503 may have a server
    coming, so it waits that long before it is queued again. (A 503 to the listing as well
    would add a second, 60 s, hold: the backoff doubles per failing pass.)"""
    cloud.fail_next("POST", SERVERS, 503)
    cloud.lose_next_create_response("502")
    cloud.lose_next_create_response("reset")
    fleet.start("cron")
    fleet.start("worker")
    class_start.burst()
    deadline = time.monotonic() + 30
    while cloud.state.fail_rules or cloud.state.lost_creates:
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.1)
    ended = time.monotonic()  # every injected failure has been answered
    took = class_start.wait_converged(fleet, 75, since=ended)
    print(f"converged {took:.1f} s after the last failed answer")
