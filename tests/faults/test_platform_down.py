"""Moodle's token and grade endpoints down for a simulated hour while a class is graded:
every grade arrives once, the newest wins."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import requests
from rq import Queue
from sqlalchemy import select, update

from config.db import transaction, utcnow
from grading.models import ScoreOutbox, ScoreStatus
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
DUE_PASS = "grading.outbox.send_due_scores_job"


def pending(rt) -> list[ScoreOutbox]:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalars(
            select(ScoreOutbox).where(ScoreOutbox.status == ScoreStatus.pending)
        ).all()


def time_passes(rt, minutes: float) -> None:  # type: ignore[no-untyped-def]
    """Move the outbox's clock instead of sleeping: every pending row was due `minutes` ago."""
    with transaction(rt.sessions) as session:
        session.execute(
            update(ScoreOutbox)
            .where(ScoreOutbox.status == ScoreStatus.pending)
            .values(next_attempt_at=utcnow() - timedelta(minutes=minutes))
        )


def due_pass(rt, fleet) -> None:  # type: ignore[no-untyped-def]
    """The cron's periodic pass, triggered now on the real worker; waits until it has
    tried every due row."""
    Queue(rt.settings.queue_name, connection=rt.redis).enqueue(DUE_PASS)
    deadline = time.monotonic() + 30
    while any(r.next_attempt_at <= utcnow() for r in pending(rt)):
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.1)


def test_token_and_grade_endpoints_down_for_an_hour_every_grade_arrives_once_newest(
    class_start,
    fleet,
    platform,
    tool,
    gradebook,  # noqa: F811
):
    rt = class_start.rt
    fleet.start("cron")
    fleet.start("worker")
    class_start.burst()
    with requests.Session() as teacher:
        _, activity_id = launch_teacher(platform, tool, teacher)
        lab = create_assignment(tool, teacher, activity_id)
        # Down: tokens already handed out stop working, token.php and the AGS answer 503.
        platform.expire_tokens()
        platform.token_down = 503
        gradebook.down(503)
        students = [user_id_of(rt, s.sub) for s in class_start.students]
        newest = {}
        for n, user in enumerate(students):
            assert grade(tool, teacher, activity_id, lab, user, str(n % 10)).status_code == 303
            newest[user] = n % 10
        for user in students[:5]:  # regraded while Moodle is down
            assert grade(tool, teacher, activity_id, lab, user, "10", "regraded").status_code == 303
            newest[user] = 10
        # A simulated hour: the back-off's tries (30 s, 1, 2, 4, 8, 16, 32 min), each due at once.
        for minutes in (0.5, 1, 2, 4, 8, 16, 32):
            time_passes(rt, minutes)
            due_pass(rt, fleet)
        assert not gradebook.accepted
        assert len(pending(rt)) == len(students)  # the regrades replaced the waiting ones
        # Each tried all hour long (a row still without its line item is not counted as an
        # attempt: the line item lookup failed first), and waiting with the reason.
        assert all(r.last_error and "503" in r.last_error for r in pending(rt))

        platform.token_down = None
        gradebook.up()
        ended = time.monotonic()
        time_passes(rt, 1)
        Queue(rt.settings.queue_name, connection=rt.redis).enqueue(DUE_PASS)
        deadline = ended + 30
        while pending(rt):
            assert time.monotonic() < deadline, fleet.log_tail()
            time.sleep(0.1)
        took = time.monotonic() - ended
        print(f"every grade in the gradebook {took:.1f} s after Moodle came back")

    subs = {user_id_of(rt, s.sub): s.sub for s in class_start.students}
    accepted = sorted(body["userId"] for body in gradebook.accepted)
    assert accepted == sorted(subs[u] for u in students)  # each exactly once
    for user in students:
        assert gradebook.grade(subs[user])["score_given"] == newest[user]
    class_start.wait_converged(fleet, 45)  # and the class's machines meanwhile
