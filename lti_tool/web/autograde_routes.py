"""Autograding on the web (issue 12): the teacher's "grade all", "regrade" of one student and
the assignment's "auto-grade on submit" setting; the feedback page of a graded submission.

Who asks is checked on the server: the teacher's routes go through `taught_activity` and
carry the session's CSRF token; a feedback page is shown to the student who submitted it
(the signed-in user, still enrolled) and to the course's instructors, to nobody else (403).
The page is the tool's own escaped HTML (grading.autograde_feedback), served with a CSP that
runs no script at all and `sandbox` (an opaque origin, even if something slipped through).
"""

from __future__ import annotations

from flask import Blueprint, Response, flash, redirect, request, url_for

from config.db import transaction
from grading.autograde import AutogradeRefused, request_autograde, result_for
from grading.models import Assignment, AutogradeState, Submission
from lti_tool.launches import enrolment_roles
from lti_tool.models import Activity
from lti_tool.roles import is_staff
from lti_tool.web.auth import check_csrf, current_user_id, runtime, staff_by_launch, taught_activity
from lti_tool.web.errors import Forbidden, WebError
from lti_tool.web.grading_routes import _assignment_of
from lti_tool.web.page_headers import UNTRUSTED_HTML_CSP

bp = Blueprint("autograde", __name__)


def _back(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    return redirect(
        url_for("grading.assignment_page", activity_id=activity_id, assignment_id=assignment_id),
        303,
    )


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/autograde")
def grade_all(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """Queue every student's current version for the autograder."""
    return _request(activity_id, assignment_id, None)


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/autograde/<int:user_id>")
def regrade(activity_id: int, assignment_id: int, user_id: int):  # type: ignore[no-untyped-def]
    """Queue one student's current version again."""
    return _request(activity_id, assignment_id, user_id)


def _request(activity_id: int, assignment_id: int, user_id: int | None):  # type: ignore[no-untyped-def]
    check_csrf()
    rt = runtime()
    with rt.sessions() as session:
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
    try:
        queued = request_autograde(rt, assignment.id, user_id)
    except AutogradeRefused as exc:
        raise WebError(str(exc)) from None
    flash(f"{queued} submission(s) queued for the autograder.")
    return _back(activity_id, assignment_id)


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/autograde-on-submit")
def auto_grade_setting(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """Turn "auto-grade on submit" on or off (form field `on`: "1" or "0")."""
    check_csrf()
    value = request.form.get("on", "")
    if value not in ("0", "1"):
        raise WebError("`on` must be 0 or 1.")
    with transaction(runtime().sessions) as session:
        activity = taught_activity(session, activity_id)
        assignment = _assignment_of(session, activity, assignment_id)
        assignment.auto_grade_on_submit = value == "1"
    flash("Auto-grade on submit is " + ("on." if value == "1" else "off."))
    return _back(activity_id, assignment_id)


@bp.get("/submissions/<int:submission_id>/feedback")
def feedback(submission_id: int):  # type: ignore[no-untyped-def]
    """The autograder's feedback page of one submitted version."""
    user_id = current_user_id()
    with runtime().sessions() as session:
        submission = session.get(Submission, submission_id)
        if submission is None:
            raise WebError("No such submission.", 404)
        assignment = session.get_one(Assignment, submission.assignment_id)
        activity = session.get_one(Activity, assignment.activity_id)
        roles = enrolment_roles(session, user_id, activity.course_id)
        teacher = staff_by_launch(activity.course_id) or (roles is not None and is_staff(roles))
        if not teacher and (submission.user_id != user_id or roles is None):
            raise Forbidden("This feedback is for the student who submitted it and the teachers.")
        result = result_for(session, submission.id)
        if result is None or result.state is not AutogradeState.done:
            raise WebError("This submission has not been autograded (yet).", 404)
        body = result.feedback_html
    response = Response(body, mimetype="text/html")
    response.headers["Content-Security-Policy"] = UNTRUSTED_HTML_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response
