"""Grades to Moodle's gradebook through the outbox (issue 11, item 5): a teacher's manual
grade reaches the fake Moodle's AGS endpoint under Moodle's rules (required fields, the 409
timestamp rule, the line item's query string), survives the platform being down, never lets
a stale grade overwrite a newer one (a worker killed mid-POST included), and only teachers
grade; a student reads their own grade only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import requests
from sqlalchemy import select, update

from config.db import transaction, utcnow
from grading.models import Assignment, Grade, ScoreOutbox, ScoreStatus
from grading.outbox import SEND_JOB, send_due_scores
from lti_tool.models import Activity, Course
from lti_tool.services.ags import LINEITEM_READONLY_SCOPE, scores_url
from provisioning.queue import enqueue
from tests.fakeplatform.ags import FakeGradebook


@pytest.fixture
def gradebook(platform, tool):  # type: ignore[no-untyped-def]
    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    platform.gradebook = FakeGradebook(platform)
    return platform.gradebook


def launch_teacher(platform, tool, browser, **claims):  # type: ignore[no-untyped-def]
    response = platform.launch(
        browser, tool.url, platform.instructor(sub="3", **claims)
    ).launch_response
    assert response.status_code == 303, response.text[:300]
    class_url = tool.url + response.headers["Location"]
    return class_url, int(class_url.split("/activities/")[1].split("/")[0])


def launch_student(platform, tool, sub: str, **claims) -> requests.Session:  # type: ignore[no-untyped-def]
    browser = requests.Session()
    response = platform.launch(
        browser, tool.url, platform.learner(sub=sub, **claims)
    ).launch_response
    assert response.status_code == 303, response.text[:300]
    return browser


def csrf_of(browser, url: str) -> str:  # type: ignore[no-untyped-def]
    return browser.get(url).text.split('name="csrf" value="')[1].split('"')[0]


def create_assignment(tool, browser, activity_id, name="lab1", max_score="10"):  # type: ignore[no-untyped-def]
    """Through the class page's form; returns the new assignment's id."""
    class_url = f"{tool.url}/activities/{activity_id}/class"
    response = browser.post(
        f"{tool.url}/activities/{activity_id}/assignments",
        data={
            "csrf": csrf_of(browser, class_url),
            "name": name,
            "title": f"Lab {name}",
            "max_score": max_score,
        },
        allow_redirects=False,
    )
    assert response.status_code == 303, response.text[:500]
    page = browser.get(class_url).text
    assert name in page
    return int(page.split(f"/activities/{activity_id}/assignments/")[1].split('"')[0])


def session_csrf(browser, settings) -> str:  # type: ignore[no-untyped-def]
    """The CSRF token of a browser's own Labpool session (read from its signed cookie)."""
    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    app = Flask("reader")
    app.secret_key = settings.secret_key
    serializer = SecureCookieSessionInterface().get_signing_serializer(app)
    return serializer.loads(browser.cookies["labpool_session"])["csrf"]


def user_id_of(rt, sub: str) -> int:  # type: ignore[no-untyped-def]
    from lti_tool.models import User

    with rt.sessions() as session:
        return session.scalars(select(User.id).where(User.sub == sub)).one()


def grade(tool, browser, activity_id, assignment, user_id, score, comment=""):  # type: ignore[no-untyped-def]
    page = f"{tool.url}/activities/{activity_id}/assignments/{assignment}"
    return browser.post(
        f"{page}/grades/{user_id}",
        data={"csrf": csrf_of(browser, page), "score": score, "comment": comment},
        allow_redirects=False,
    )


def make_due(rt) -> None:  # type: ignore[no-untyped-def]
    """Time passes: every pending row's next attempt has come."""
    with transaction(rt.sessions) as session:
        session.execute(
            update(ScoreOutbox)
            .where(ScoreOutbox.status == ScoreStatus.pending)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


def rows(rt, user_id):  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalars(
            select(ScoreOutbox).where(ScoreOutbox.user_id == user_id).order_by(ScoreOutbox.id)
        ).all()


# -------------------------------------------------------------------------------- tests


def test_manual_grade_arrives_in_moodles_gradebook(tool, platform, rt, browser, gradebook):
    launch_student(platform, tool, "4")
    _, activity_id = launch_teacher(platform, tool, browser)
    with rt.sessions() as session:
        activity = session.get_one(Activity, activity_id)
        assert activity.ags_lineitem and activity.ags_lineitem.endswith("/lineitem?type_id=1")
        assert "https://purl.imsglobal.org/spec/lti-ags/scope/score" in activity.ags_scope
    lab = create_assignment(tool, browser, activity_id)
    student = user_id_of(rt, "4")

    assert grade(tool, browser, activity_id, lab, student, "7.5", "Good work").status_code == 303
    assert rows(rt, student)[0].status is ScoreStatus.pending  # saved with the grade
    assert send_due_scores(rt) == {"sent": 1}

    stored = gradebook.grade("4")
    assert stored["score_given"] == 7.5 and stored["grade"] == 75.0  # rescaled to Moodle's 100
    assert stored["comment"] == "Good work"
    posted = gradebook.accepted[-1]
    assert posted["scoreMaximum"] == 10 and posted["gradingProgress"] == "FullyGraded"
    assert posted["activityProgress"] == "Completed" and posted["userId"] == "4"
    assert LINEITEM_READONLY_SCOPE in platform.token_requests[-1]["scope"].split()
    page = browser.get(f"{tool.url}/activities/{activity_id}/assignments/{lab}").text
    assert "in Moodle since" in page


def test_scores_url_keeps_the_line_items_query_string():
    url = "http://m/mod/lti/services.php/2/lineitems/2/lineitem?type_id=1"
    assert (
        scores_url(url) == "http://m/mod/lti/services.php/2/lineitems/2/lineitem/scores?type_id=1"
    )


def test_a_409_is_resent_once_with_a_newer_timestamp(tool, platform, rt, browser, gradebook):
    launch_student(platform, tool, "4")
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    student = user_id_of(rt, "4")
    # Moodle already holds a grade stamped this very second (a teacher's edit in Moodle).
    gradebook.grades[("2", "2", "4")] = {
        "timestamp": utcnow(),
        "comment": "",
        "grade": 1,
        "score_given": 1,
    }
    grade(tool, browser, activity_id, lab, student, "9")
    send_due_scores(rt)
    statuses = [status for status, _ in gradebook.score_posts]
    assert statuses[-2:] == [409, 200] or statuses[-1:] == [200]
    assert gradebook.grade("4")["score_given"] == 9
    assert rows(rt, student)[-1].status is ScoreStatus.sent


def test_a_second_409_fails_with_moodles_reason_and_never_loops(
    tool, platform, rt, browser, gradebook
):
    launch_student(platform, tool, "4")
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    student = user_id_of(rt, "4")
    gradebook.grades[("2", "2", "4")] = {
        "timestamp": utcnow() + timedelta(hours=1),
        "comment": "",
        "grade": 1,
        "score_given": 1,
    }
    grade(tool, browser, activity_id, lab, student, "9")
    send_due_scores(rt)
    assert [s for s, _ in gradebook.score_posts] == [409, 409]
    row = rows(rt, student)[-1]
    assert (
        row.status is ScoreStatus.failed
        and "Refusing score with an earlier timestamp" in row.last_error
    )
    page = browser.get(f"{tool.url}/activities/{activity_id}/assignments/{lab}").text
    assert "Refusing score with an earlier timestamp" in page and "Send again" in page
    make_due(rt)
    send_due_scores(rt)
    assert len(gradebook.score_posts) == 2  # a failed row is not retried by itself


def test_platform_down_then_back_every_grade_arrives_once_and_the_newest_wins(
    tool, platform, rt, browser, gradebook
):
    for sub in ("4", "5", "6"):
        launch_student(platform, tool, sub)
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    gradebook.down(503)
    for sub, score in (("4", "3"), ("5", "5"), ("6", "6"), ("4", "8")):  # student 4 regraded
        assert grade(tool, browser, activity_id, lab, user_id_of(rt, sub), score).status_code == 303
    assert send_due_scores(rt) == {"retry": 3}
    waiting = rows(rt, user_id_of(rt, "5"))[-1]
    assert waiting.status is ScoreStatus.pending and "HTTP 503" in waiting.last_error
    assert waiting.next_attempt_at > utcnow() + timedelta(seconds=20)  # backing off
    assert send_due_scores(rt) == {}  # not due yet
    page = browser.get(f"{tool.url}/activities/{activity_id}/assignments/{lab}").text
    assert "waiting: the platform refused: HTTP 503" in page

    for _ in range(5):  # an hour of failed tries
        make_due(rt)
        send_due_scores(rt)
    gradebook.up()
    make_due(rt)
    assert send_due_scores(rt) == {"sent": 3}
    accepted = [p["userId"] for p in gradebook.accepted]
    assert sorted(accepted) == ["4", "5", "6"]  # once each
    assert gradebook.grade("4")["score_given"] == 8  # the newest, not 3
    assert [r.status for r in rows(rt, user_id_of(rt, "4"))] == [
        ScoreStatus.superseded,
        ScoreStatus.sent,
    ]


def test_a_stale_post_held_up_in_flight_never_overwrites_a_newer_grade(
    tool, platform, rt, browser, gradebook, settings
):
    """A worker POSTs grade 3, is killed before it records anything; the teacher regrades 9,
    which is sent; the old POST reaching Moodle after it loses (older timestamp), and the old
    row is never sent again."""
    launch_student(platform, tool, "4")
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    student = user_id_of(rt, "4")
    rt.redis.delete(f"rq:queue:{settings.queue_name}")
    grade(tool, browser, activity_id, lab, student, "3")
    old_row = rows(rt, student)[-1].id
    rt.redis.delete(f"rq:queue:{settings.queue_name}")

    in_flight, release = threading.Event(), threading.Event()

    def hold_first(body):  # type: ignore[no-untyped-def]
        if body.get("scoreGiven") == 3:
            in_flight.set()
            release.wait(30)

    gradebook.on_score = hold_first
    enqueue(rt.redis, settings.queue_name, SEND_JOB, old_row)
    worker = subprocess.Popen(
        [sys.executable, "-m", "lti_tool.cli", "worker", "--burst"],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert in_flight.wait(60), "the worker never POSTed"
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    assert rows(rt, student)[-1].status is ScoreStatus.pending  # nothing recorded

    time.sleep(1.1)  # (the claimed timestamp is this second; the next is newer anyway)
    grade(tool, browser, activity_id, lab, student, "9", "regraded")
    rt.redis.delete(f"rq:queue:{settings.queue_name}")
    assert send_due_scores(rt) == {"sent": 1}
    release.set()  # the killed worker's request now reaches Moodle's code
    deadline = time.monotonic() + 10
    while len(gradebook.score_posts) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gradebook.grade("4")["score_given"] == 9
    assert tuple(s for s, b in gradebook.score_posts if b.get("scoreGiven") == 3) == (409,)

    make_due(rt)  # the old row's lease runs out: it is not sent again
    send_due_scores(rt)
    assert [b["scoreGiven"] for b in gradebook.accepted] == [9]
    with rt.sessions() as session:
        assert session.get_one(ScoreOutbox, old_row).status is ScoreStatus.superseded


def test_an_answer_lost_after_moodle_stored_the_score_is_resent_newer(
    tool, platform, rt, browser, gradebook
):
    launch_student(platform, tool, "4")
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    student = user_id_of(rt, "4")
    gradebook.lose_answers(1)
    grade(tool, browser, activity_id, lab, student, "4")
    assert send_due_scores(rt) == {"retry": 1}
    make_due(rt)
    assert send_due_scores(rt) == {"sent": 1}  # a newer timestamp: no 409 loop
    assert [s for s, _ in gradebook.score_posts] == [200, 200]
    assert gradebook.grade("4")["score_given"] == 4


def test_a_line_item_is_created_when_the_activity_has_none(tool, platform, rt, browser, gradebook):
    launch_student(platform, tool, "4", lineitem_id=None)
    _, activity_id = launch_teacher(platform, tool, browser, lineitem_id=None)
    lab = create_assignment(tool, browser, activity_id, max_score="20")
    grade(tool, browser, activity_id, lab, user_id_of(rt, "4"), "15")
    assert send_due_scores(rt) == {"sent": 1}
    created = [
        (key, item)
        for key, item in gradebook.lineitems.items()
        if item["resourceId"] == f"labpool-assignment-{lab}"
    ]
    assert len(created) == 1 and created[0][1]["scoreMaximum"] == 20
    (course, item_id), _ = created[0]
    assert gradebook.grade("4", course, item_id)["score_given"] == 15
    with rt.sessions() as session:
        assert session.get_one(Assignment, lab).lineitem_url.endswith(
            f"/lineitems/{item_id}/lineitem?type_id=1"
        )


def test_a_deep_linked_activitys_grade_item_takes_its_assignments_grades(
    tool, platform, rt, browser, gradebook
):
    """The teacher made assignment `lab` on activity X's class page (X has Moodle's grade item
    2), then added activity Y with "Select content" naming `lab`: Moodle made Y's grade item
    from the answer's lineItem. The grades go to Y's item, the one the teacher chose."""
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    item_y = gradebook.add_lineitem(
        "2", "300", label="Lab lab1", score_maximum=10, resource_id=f"labpool-assignment-{lab}"
    )
    deep_linked = {"resource_link_id": "81", "custom": {"labpool_assignment": str(lab)}}
    launch_student(platform, tool, "4", lineitem_id="300", **deep_linked)
    with rt.sessions() as session:
        linked = session.scalars(select(Activity).where(Activity.resource_link_id == "81")).one()
        assert linked.assignment_id == lab and linked.ags_lineitem == item_y

    assert grade(tool, browser, activity_id, lab, user_id_of(rt, "4"), "9").status_code == 303
    assert send_due_scores(rt) == {"sent": 1}
    assert gradebook.grade("4", "2", "300")["score_given"] == 9
    assert gradebook.grade("4", "2", "2") is None  # not X's own grade item


def test_bad_grades_are_refused_and_change_nothing(tool, platform, rt, browser, gradebook):
    launch_student(platform, tool, "4")
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    student = user_id_of(rt, "4")
    for score in ("11", "-1", "ten", "nan", ""):
        assert grade(tool, browser, activity_id, lab, student, score).status_code == 400
    page = f"{tool.url}/activities/{activity_id}/assignments/{lab}"
    no_csrf = browser.post(f"{page}/grades/{student}", data={"score": "5"}, allow_redirects=False)
    assert no_csrf.status_code == 403
    with rt.sessions() as session:
        assert session.scalars(select(Grade)).all() == []
        assert session.scalars(select(ScoreOutbox)).all() == []


def test_a_learner_can_neither_grade_nor_read_another_students_grade(
    tool, platform, rt, browser, gradebook, settings
):
    mallory = launch_student(platform, tool, "5")
    launch_student(platform, tool, "4")
    _, activity_id = launch_teacher(platform, tool, browser)
    lab = create_assignment(tool, browser, activity_id)
    alice, mallory_id = user_id_of(rt, "4"), user_id_of(rt, "5")
    grade(tool, browser, activity_id, lab, alice, "9", "secret feedback for alice")
    with rt.sessions() as session:
        course_id = session.get_one(Activity, activity_id).course_id

    page = f"{tool.url}/activities/{activity_id}/assignments/{lab}"
    assert mallory.get(page).status_code == 403
    assert mallory.get(f"{tool.url}/activities/{activity_id}/class").status_code == 403
    token = session_csrf(mallory, settings)  # her own session's valid token
    for target in (alice, mallory_id):
        answer = mallory.post(
            f"{page}/grades/{target}", data={"csrf": token, "score": "10"}, allow_redirects=False
        )
        assert answer.status_code == 403
    assert (
        mallory.post(
            f"{tool.url}/activities/{activity_id}/assignments",
            data={"csrf": token, "name": "x", "max_score": "1"},
        ).status_code
        == 403
    )
    mine = mallory.get(f"{tool.url}/courses/{course_id}/my-work")
    assert mine.status_code == 200 and "not graded yet" in mine.text
    assert "secret feedback" not in mine.text and "9 / 10" not in mine.text
    with rt.sessions() as session:
        other_course = session.scalars(select(Course.id).where(Course.id != course_id)).first()
    if other_course is not None:
        assert mallory.get(f"{tool.url}/courses/{other_course}/my-work").status_code == 403
    assert mallory.get(f"{tool.url}/courses/999999/my-work").status_code == 403

    alice_browser = launch_student(platform, tool, "4")
    own = alice_browser.get(f"{tool.url}/courses/{course_id}/my-work").text
    assert "9 / 10" in own and "secret feedback for alice" in own


def test_the_send_job_name_resolves():
    import importlib

    module, _, name = SEND_JOB.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
