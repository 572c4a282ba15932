"""Submissions on the web (issue 11, items 4 and 6): a student submits their folder of an
assignment and sees their own versions; the teacher collects the whole class ("collect
now", an RQ job whose progress the assignment page polls), lists every version and downloads
one as the stored zip.

Who asks is checked on the server for every route: a student's routes act on the signed-in
user only (no user id is ever read from the request) and need a current enrolment in the
assignment's course; the teacher's go through `taught_activity`; every POST carries the
session's CSRF token. Downloads are for the course's instructors only.
"""

from __future__ import annotations

import os

from flask import Blueprint, flash, jsonify, redirect, render_template, send_file, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from grading.collect_folder import FolderError, LimitExceeded, NoFolder
from grading.models import Assignment, Submission
from grading.submissions import (
    SubmissionBusy,
    SubmissionRefused,
    collection_progress,
    collects_in_worker,
    start_collection,
    start_submission,
    stored_path,
    submission_progress,
    submit_folder,
    versions_of,
)
from lti_tool.launches import enrolment_roles
from lti_tool.models import Activity, Course
from lti_tool.web.auth import check_csrf, csrf_token, current_user_id, runtime, taught_activity
from lti_tool.web.errors import Forbidden, WebError
from lti_tool.web.grading_routes import _assignment_of, _students, _when

bp = Blueprint("submissions", __name__)


def _students_assignment(session: Session, course_id: int, assignment_id: int) -> Assignment:
    """The assignment, if the signed-in user is enrolled in its course (and it is one)."""
    if enrolment_roles(session, current_user_id(), course_id) is None:
        raise Forbidden("You are not enrolled in this course.")
    assignment = session.get(Assignment, assignment_id)
    activity = session.get(Activity, assignment.activity_id) if assignment else None
    if assignment is None or activity is None or activity.course_id != course_id:
        raise WebError("No such assignment in this course.", 404)
    return assignment


def _status_of(exc: FolderError) -> int:
    if isinstance(exc, SubmissionBusy):
        return 409
    if isinstance(exc, SubmissionRefused):
        return 403
    if isinstance(exc, LimitExceeded):
        return 413
    if isinstance(exc, NoFolder):
        return 404
    return 400


@bp.get("/courses/<int:course_id>/assignments/<int:assignment_id>/submission")
def my_submission(course_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """The student's own versions of an assignment and the Submit button."""
    user_id = current_user_id()
    rt = runtime()
    with rt.sessions() as session:
        assignment = _students_assignment(session, course_id, assignment_id)
        return render_template(
            "my_submission.html",
            course=session.get_one(Course, course_id),
            assignment=assignment,
            # A Submit from a cloud machine runs in a job: its progress, or its outcome.
            progress=submission_progress(rt, assignment.id, user_id),
            versions=versions_of(session, assignment.id, user_id),
            csrf=csrf_token(),
            when=_when,
        )


@bp.post("/courses/<int:course_id>/assignments/<int:assignment_id>/submit")
def submit(course_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """Copy the signed-in student's folder and store it as their current version."""
    check_csrf()
    rt = runtime()
    user_id = current_user_id()  # only ever the asker's own folder
    with rt.sessions() as session:
        assignment = _students_assignment(session, course_id, assignment_id)
        in_worker = collects_in_worker(session, session.get_one(Activity, assignment.activity_id))
    back = url_for("submissions.my_submission", course_id=course_id, assignment_id=assignment_id)
    if in_worker:  # the folder is on a cloud machine: never read in the web request
        try:
            started = start_submission(rt, assignment_id, user_id)
        except FolderError as exc:
            raise WebError(str(exc), _status_of(exc)) from None
        if not started:
            flash("Your folder is being collected already; this page follows it.")
        return redirect(back, 303)
    try:
        outcome = submit_folder(rt, assignment_id, user_id)
    except FolderError as exc:
        raise WebError(str(exc), _status_of(exc)) from None
    s = outcome.submission
    if outcome.unchanged:
        flash(
            f"Nothing changed since version {s.version} (submitted at {_when(s.submitted_at)}, "
            f"{s.file_count} files): it stays your submission."
        )
    else:
        flash(
            f"Submitted at {_when(s.submitted_at)}, {s.file_count} files "
            f"(version {s.version}){' — late' if s.late else ''}."
        )
    for item in outcome.skipped:
        flash(f"Not included: {item['path']} ({item['why']}).")
    return redirect(
        url_for("submissions.my_submission", course_id=course_id, assignment_id=assignment_id), 303
    )


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/collect")
def collect_now(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """The teacher's "collect now": every current student's folder, in a job."""
    check_csrf()
    rt = runtime()
    with rt.sessions() as session:
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
    try:
        started = start_collection(rt, assignment.id, current_user_id())
    except FolderError as exc:
        raise WebError(str(exc), 503) from None
    flash(
        "Collecting every student's folder…"
        if started
        else "A collection of this assignment is already under way."
    )
    return redirect(
        url_for("grading.assignment_page", activity_id=activity_id, assignment_id=assignment_id),
        303,
    )


@bp.get("/activities/<int:activity_id>/assignments/<int:assignment_id>/collect")
def collect_progress(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """The last collection's progress, for the assignment page's polling."""
    rt = runtime()
    with rt.sessions() as session:
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
    progress = collection_progress(rt, assignment.id) or {"state": "none"}
    progress.pop("teacher_id", None)
    return jsonify(progress)


@bp.get("/activities/<int:activity_id>/assignments/<int:assignment_id>/submissions")
def class_submissions(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """Every version of every student, newest first, with downloads."""
    with runtime().sessions() as session:
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
        names = {u.id: name for u, name in _students(session, activity.course_id)}
        rows = session.scalars(
            select(Submission)
            .where(Submission.assignment_id == assignment.id)
            .order_by(Submission.user_id, Submission.version.desc())
        ).all()
        by_student: dict[int, list[Submission]] = {}
        for row in rows:
            by_student.setdefault(row.user_id, []).append(row)
        students = [
            {
                "user_id": uid,
                "name": names.get(uid, f"Former student #{uid}"),
                "versions": by_student.get(uid, []),
            }
            for uid in [*names, *[u for u in by_student if u not in names]]
        ]
        return render_template(
            "submissions.html",
            activity=activity,
            assignment=assignment,
            students=students,
            course=session.get_one(Course, activity.course_id),
            when=_when,
        )


@bp.get(
    "/activities/<int:activity_id>/assignments/<int:assignment_id>"
    "/submissions/<int:submission_id>.zip"
)
def download(activity_id: int, assignment_id: int, submission_id: int):  # type: ignore[no-untyped-def]
    """A stored version as its zip, streamed from the stored copy (instructors only)."""
    rt = runtime()
    with rt.sessions() as session:
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
        submission = session.get(Submission, submission_id)
        if submission is None or submission.assignment_id != assignment.id:
            raise WebError("No such submission of this assignment.", 404)
        path = stored_path(rt.settings.data_dir, submission)
        name = f"{assignment.name}-user{submission.user_id}-v{submission.version}.zip"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise WebError(
            "The stored copy of this submission is missing on the server.", 410
        ) from None
    return send_file(
        os.fdopen(fd, "rb"),
        mimetype="application/zip",
        as_attachment=True,
        download_name=name,
        max_age=0,
    )
