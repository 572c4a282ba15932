"""SIGKILL of a worker in the middle of an AGS score POST while a class is graded: every
grade arrives once, the newest; the killed worker's stale POST, arriving late, loses."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.faults.test_platform_down import DUE_PASS, pending, time_passes
from tests.test_grades import (  # noqa: F401  (gradebook: the fixture)
    create_assignment,
    grade,
    gradebook,
    launch_teacher,
    user_id_of,
)

pytestmark = pytest.mark.fake_cloud(
    boot_time=0.3, max_instances=60, ide="stub", enforce_security_groups=True
)


def test_worker_killed_mid_ags_send_every_grade_once_and_newest(
    class_start,
    fleet,
    platform,
    tool,
    gradebook,  # noqa: F811
):
    from rq import Queue

    rt = class_start.rt
    fleet.start("cron")
    worker = fleet.start("worker")
    class_start.burst()
    students = [user_id_of(rt, s.sub) for s in class_start.students]
    subs = {user_id_of(rt, s.sub): s.sub for s in class_start.students}
    victim = class_start.students[5].sub
    in_flight, release = threading.Event(), threading.Event()

    def hold_victims_first(body):  # type: ignore[no-untyped-def]
        if body["userId"] == victim and not in_flight.is_set():
            in_flight.set()
            release.wait(60)

    gradebook.on_score = hold_victims_first
    newest = {}
    with requests.Session() as teacher:
        _, activity_id = launch_teacher(platform, tool, teacher)
        lab = create_assignment(tool, teacher, activity_id)
        for n, user in enumerate(students):
            assert grade(tool, teacher, activity_id, lab, user, str(n % 10)).status_code == 303
            newest[user] = n % 10
        assert in_flight.wait(30), fleet.log_tail()
        fleet.kill(worker)  # mid-POST: Moodle has the request, the worker records nothing
        ended = time.monotonic()
        victim_id = next(u for u, s in subs.items() if s == victim)
        time.sleep(1.1)  # the regrade's timestamp is a later second
        assert grade(tool, teacher, activity_id, lab, victim_id, "10", "again").status_code == 303
        newest[victim_id] = 10
    fleet.start("worker")
    # The killed worker's leases (2 min) run out: the clock moves, the cron's pass runs.
    deadline = ended + 30
    while pending(rt):
        assert time.monotonic() < deadline, fleet.log_tail()
        time_passes(rt, 3)
        Queue(rt.settings.queue_name, connection=rt.redis).enqueue(DUE_PASS)
        time.sleep(0.5)
    took = time.monotonic() - ended
    print(f"every grade in the gradebook {took:.1f} s after the worker was killed")
    release.set()  # the dead worker's POST reaches Moodle's code only now
    deadline = time.monotonic() + 10
    while (
        not any(b["userId"] == victim and s != 200 for s, b in gradebook.score_posts)
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)

    accepted = sorted(body["userId"] for body in gradebook.accepted)
    assert accepted == sorted(subs[u] for u in students)  # each exactly once
    for user in students:
        assert gradebook.grade(subs[user])["score_given"] == newest[user]
    stale = [s for s, b in gradebook.score_posts if b["userId"] == victim and s != 200]
    assert stale == [409]  # the held POST was older than the grade Moodle holds
    class_start.wait_converged(fleet, 45)
