"""SIGKILL of the grading worker in the middle of a submission's autograde: the submission is
graded once (one result, one grade, one score in Moodle), by the next worker."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from rq import Queue
from sqlalchemy import select, update

from config.db import transaction, utcnow
from grading.autograde import request_autograde
from grading.models import AutogradeResult, AutogradeState, Grade, ScoreOutbox, ScoreStatus
from tests.test_autograde import CORRECT, lab, student_notebook  # noqa: F401  (lab: fixture)
from tests.test_grades import gradebook  # noqa: F401  (the fixture)

pytestmark = pytest.mark.sandbox
SUBS = [f"g{i}" for i in range(6)]


def results(rt) -> list[AutogradeResult]:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalars(select(AutogradeResult)).all()


def test_grading_worker_killed_mid_grade_each_submission_graded_once(
    rt,
    lab,  # noqa: F811
    gradebook,  # noqa: F811
    fleet,
):
    assignment, _, submit = lab
    for sub in SUBS:
        submit(sub, student_notebook(CORRECT))
    fleet.start("worker")  # the jobs queue: score sends, the periodic passes
    grader = fleet.start("worker", "--queue", "grading")
    assert request_autograde(rt, assignment.id, None) == len(SUBS)
    deadline = time.monotonic() + 60
    while not any(r.state is AutogradeState.running for r in results(rt)):
        assert time.monotonic() < deadline, fleet.log_tail()
        time.sleep(0.05)
    time.sleep(0.5)  # inside the sandbox, nbgrader running
    fleet.kill(grader)
    ended = time.monotonic()
    killed = [r.id for r in results(rt) if r.state is AutogradeState.running]
    assert len(killed) == 1
    fleet.start("worker", "--queue", "grading")
    # The killed job's lease (5 min) runs out: the clock moves; the cron's pass requeues it.
    with transaction(rt.sessions) as session:
        session.execute(
            update(AutogradeResult)
            .where(AutogradeResult.id.in_(killed))
            .values(started_at=utcnow() - timedelta(minutes=6))
        )
    Queue(rt.settings.queue_name, connection=rt.redis).enqueue(
        "grading.autograde.requeue_owed_autogrades_job"
    )
    deadline = ended + 90
    while not all(r.state is AutogradeState.done for r in results(rt)) or _owed(rt):
        assert time.monotonic() < deadline, (
            [(r.id, r.state, r.error) for r in results(rt)],
            fleet.log_tail(),
        )
        time.sleep(0.25)
    took = time.monotonic() - ended
    print(f"every submission graded and in Moodle {took:.1f} s after the kill")

    done = results(rt)
    assert len(done) == len(SUBS)  # one result per submission, none doubled
    assert {r.score for r in done} == {10}
    assert [r.attempts for r in done if r.id in killed] == [2]
    with rt.sessions() as session:
        assert len(session.scalars(select(Grade)).all()) == len(SUBS)
    assert sorted(b["userId"] for b in gradebook.accepted) == sorted(SUBS)  # once each


def _owed(rt) -> bool:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return (
            session.scalars(
                select(ScoreOutbox.id).where(ScoreOutbox.status == ScoreStatus.pending)
            ).first()
            is not None
        )
