"""Assignments and grades on the web: the teacher creates assignments of an activity and
grades each student (score and comment), and sees whether the platform's gradebook has each
grade; a student sees their own grades.

Every route checks who asks, on the server: the teacher routes through `taught_activity`
(an instructor of the course, in the database or by this session's staff launch), every POST
carries the session's CSRF token; a student reads only their own rows. A saved grade is
sent right away by a job; if Redis is down, `labpool cron`'s pass sends it (the outbox row is
in the database either way).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flask import Blueprint, flash, redirect, render_template, request, url_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from grading.assignment_files import remove_folder
from grading.grades import GradeRejected, parse_score, record_grade, send_again
from grading.models import (
    Assignment,
    AutogradeResult,
    Grade,
    LatePolicy,
    ScoreOutbox,
    ScoreStatus,
    Submission,
)
from grading.outbox import SEND_JOB
from lti_tool.launches import enrolment_roles
from lti_tool.models import Activity, Course, Enrolment, User
from lti_tool.names import short_labels
from lti_tool.roles import is_staff
from lti_tool.web.auth import check_csrf, csrf_token, current_user_id, runtime, taught_activity
from lti_tool.web.errors import Forbidden, WebError
from lti_tool.web.release_routes import (
    accept_upload_size,
    incoming_files,
    keep_source,
    release_overview,
)
from provisioning.queue import enqueue

bp = Blueprint("grading", __name__)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _assignment_of(session: Session, activity: Activity, assignment_id: int) -> Assignment:
    assignment = session.get(Assignment, assignment_id)
    if assignment is None or assignment.activity_id != activity.id:
        raise WebError("No such assignment in this activity.", 404)
    return assignment


def _students(session: Session, course_id: int) -> list[tuple[User, str]]:
    """The course's current learners (and anyone who has a grade here), with what the
    teacher calls them (only what this course's registration shared)."""
    rows = session.execute(
        select(User, Enrolment)
        .join(Enrolment, Enrolment.user_id == User.id)
        .where(Enrolment.course_id == course_id, Enrolment.ended_at.is_(None))
    ).all()
    learners = [(u, e) for u, e in rows if not is_staff(e.roles or [])]
    issuer = learners[0][0].issuer if learners else ""
    labels = short_labels(runtime().settings.secret_key, issuer, [u.sub for u, _ in learners])
    named = [(u, e.name or f"Student {labels[u.sub]}") for u, e in learners]
    return sorted(named, key=lambda pair: pair[1].lower())


def delivery(row: ScoreOutbox | None) -> dict:
    """Whether the platform has the grade, as the teacher reads it."""
    if row is None:
        return {"status": "", "text": ""}
    if row.status is ScoreStatus.sent:
        return {"status": "sent", "text": f"in Moodle since {_when(row.sent_at)}"}
    if row.status is ScoreStatus.failed:
        return {"status": "failed", "text": f"not taken: {row.last_error or 'unknown'}"}
    if row.last_error:
        return {
            "status": "waiting",
            "text": f"waiting: {row.last_error}; next try {_when(row.next_attempt_at)}",
        }
    return {"status": "waiting", "text": "waiting to be sent"}


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def newest_rows(session: Session, assignment_id: int) -> dict[int, ScoreOutbox]:
    newest = (
        select(func.max(ScoreOutbox.id))
        .where(ScoreOutbox.assignment_id == assignment_id)
        .group_by(ScoreOutbox.user_id)
    )
    return {
        r.user_id: r for r in session.scalars(select(ScoreOutbox).where(ScoreOutbox.id.in_(newest)))
    }


@bp.post("/activities/<int:activity_id>/assignments")
def create_assignment(activity_id: int):  # type: ignore[no-untyped-def]
    """A new assignment, with its files when a notebook or zip is uploaded (without them it is
    graded only); the upload is checked whole before anything is written."""
    accept_upload_size()
    check_csrf()
    rt = runtime()
    form = request.form
    name = form.get("name", "").strip()
    if not NAME.fullmatch(name):
        raise WebError(
            "The folder name must be 1 to 64 letters, digits, dots, dashes or "
            "underscores, starting with a letter or digit."
        )
    try:
        max_score = float(form.get("max_score", "").strip())
    except ValueError:
        raise WebError("The maximum score must be a number.") from None
    if not 0 < max_score <= 100000:
        raise WebError("The maximum score must be more than 0 (and at most 100000).")
    due_at = None
    if form.get("due_at", "").strip():
        try:
            due_at = datetime.fromisoformat(form["due_at"].strip())
        except ValueError:
            raise WebError("The due date must look like 2026-12-24T18:00.") from None
        due_at = due_at.replace(tzinfo=UTC) if due_at.tzinfo is None else due_at.astimezone(UTC)
    try:
        late_policy = LatePolicy(form.get("late_policy", LatePolicy.mark_late.value))
    except ValueError:
        raise WebError("Unknown late policy.") from None
    title = form.get("title", "").strip()[:500] or name
    with rt.sessions() as session:
        taught_activity(session, activity_id)  # who asks, before any file is read or fetched
    files = incoming_files(required=False)
    folder = None
    try:
        with rt.sessions() as session, session.begin():
            activity = taught_activity(session, activity_id)
            if session.scalar(
                select(Assignment.id).where(
                    Assignment.activity_id == activity.id, Assignment.name == name
                )
            ):
                raise WebError(f"This activity already has an assignment named {name!r}.", 409)
            assignment = Assignment(
                activity_id=activity.id,
                name=name,
                title=title,
                max_score=max_score,
                due_at=due_at,
                late_policy=late_policy,
            )
            session.add(assignment)
            if files:
                session.flush()  # its id names its folder
                folder = keep_source(rt.settings.data_dir, assignment, files)
    except BaseException:
        remove_folder(folder)  # nothing kept of a refused or failed creation
        raise
    flash(
        f"Assignment {title!r} created"
        + (f" with {len(files.files)} files: publish it on its page." if files else ".")
    )
    return redirect(url_for("teacher.class_page", activity_id=activity_id), 303)


@bp.get("/activities/<int:activity_id>/assignments/<int:assignment_id>")
def assignment_page(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    with runtime().sessions() as session:
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
        grades = {
            g.user_id: g
            for g in session.scalars(select(Grade).where(Grade.assignment_id == assignment.id))
        }
        rows = newest_rows(session, assignment.id)
        submissions: dict[int, Submission] = {}
        for s in session.scalars(
            select(Submission)
            .where(Submission.assignment_id == assignment.id)
            .order_by(Submission.version)
        ):
            submissions[s.user_id] = s  # the newest wins
        # The autograder's result of each student's current version (cells and summary).
        autograded = {
            r.user_id: r
            for r in session.scalars(
                select(AutogradeResult).where(
                    AutogradeResult.submission_id.in_([s.id for s in submissions.values()])
                )
            )
        }
        students = [
            {
                "user_id": user.id,
                "name": name,
                "grade": grades.get(user.id),
                "delivery": delivery(rows.get(user.id)),
                "submission": submissions.get(user.id),
                "autograde": autograded.get(user.id),
            }
            for user, name in _students(session, activity.course_id)
        ]
        return render_template(
            "assignment.html",
            activity=activity,
            assignment=assignment,
            students=students,
            course=session.get_one(Course, activity.course_id),
            csrf=csrf_token(),
            when=_when,
            release=release_overview(session, assignment),
        )


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/grades/<int:user_id>")
def enter_grade(activity_id: int, assignment_id: int, user_id: int):  # type: ignore[no-untyped-def]
    """Save a student's grade and owe its score to the platform, in one transaction."""
    check_csrf()
    rt = runtime()
    with rt.sessions() as session, session.begin():
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
        _check_student(session, activity, user_id)
        try:
            score = parse_score(request.form.get("score", ""), assignment.max_score)
            row = record_grade(
                session,
                assignment,
                user_id,
                score,
                request.form.get("comment", ""),
                graded_by=current_user_id(),
            )
        except GradeRejected as exc:
            raise WebError(str(exc)) from None
        row_id = row.id
    enqueue(rt.redis, rt.settings.queue_name, SEND_JOB, row_id)
    flash("Grade saved; it is on its way to the gradebook.")
    return redirect(
        url_for("grading.assignment_page", activity_id=activity_id, assignment_id=assignment_id),
        303,
    )


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/grades/<int:user_id>/send")
def resend_grade(activity_id: int, assignment_id: int, user_id: int):  # type: ignore[no-untyped-def]
    """The teacher's "send again" (after fixing what the platform refused)."""
    check_csrf()
    rt = runtime()
    with rt.sessions() as session, session.begin():
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
        try:
            row_id = send_again(session, assignment, user_id).id
        except GradeRejected as exc:
            raise WebError(str(exc)) from None
    enqueue(rt.redis, rt.settings.queue_name, SEND_JOB, row_id)
    flash("The grade is sent again.")
    return redirect(
        url_for("grading.assignment_page", activity_id=activity_id, assignment_id=assignment_id),
        303,
    )


def _check_student(session: Session, activity: Activity, user_id: int) -> None:
    roles = enrolment_roles(session, user_id, activity.course_id)
    if roles is None:
        raise WebError("This person is not (or no longer) enrolled in the course.", 404)


@bp.get("/courses/<int:course_id>/my-work")
def my_work(course_id: int):  # type: ignore[no-untyped-def]
    """A student's own assignments of the course: submission and grade (nobody else's)."""
    user_id = current_user_id()
    with runtime().sessions() as session:
        if enrolment_roles(session, user_id, course_id) is None:
            raise Forbidden("You are not enrolled in this course.")
        assignments = (
            session.execute(
                select(Assignment)
                .join(Activity, Activity.id == Assignment.activity_id)
                .where(Activity.course_id == course_id)
                .order_by(Assignment.id)
            )
            .scalars()
            .all()
        )
        ids = [a.id for a in assignments]
        grades = {
            g.assignment_id: g
            for g in session.scalars(
                select(Grade).where(Grade.user_id == user_id, Grade.assignment_id.in_(ids))
            )
        }
        submissions: dict[int, Submission] = {}
        for s in session.scalars(
            select(Submission)
            .where(Submission.user_id == user_id, Submission.assignment_id.in_(ids))
            .order_by(Submission.version)
        ):
            submissions[s.assignment_id] = s
        return render_template(
            "my_work.html",
            course=session.get_one(Course, course_id),
            csrf=csrf_token(),
            work=[
                {"assignment": a, "grade": grades.get(a.id), "submission": submissions.get(a.id)}
                for a in assignments
            ],
            when=_when,
        )
