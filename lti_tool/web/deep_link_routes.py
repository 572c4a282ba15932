"""Deep linking at the web edge: Moodle's "Select content" in the activity form.

LTI Deep Linking 2.0 (https://www.imsglobal.org/spec/lti-dl/v2p0): the `LtiDeepLinkingRequest`
arrives at `/lti/launch` like any launch (validated there); `begin` checks who asks (staff
roles only, LTI Core §A.2) and the request's settings (§4.4), remembers the request, and sends
the teacher to a page of their own to choose the environment and, optionally, an assignment.
Choosing (or cancelling) answers with the signed `LtiDeepLinkingResponse` (§4.2), posted by
the browser as form field `JWT` to the request's `deep_link_return_url`.

What the teacher chose is checked here, on the server, before anything is signed: an
environment or assignment that does not exist (or, for an assignment, belongs to another
course), or a retired environment, is a 400, an environment not open to the course
(provisioning.course_access) a 403, and no response is made. The page lists only what the
course may pick.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, redirect, render_template, request, url_for
from sqlalchemy import select

from config.db import transaction
from grading.models import Assignment
from jwks.keys import active_signing_key
from lti_tool.deep_linking import (
    DeepLinkingRefused,
    DeepLinkingRequest,
    consume_pending,
    load_pending,
    read_settings,
    record_request_context,
    resource_link,
    response_jwt,
    save_pending,
    score_maximum,
)
from lti_tool.launches import MalformedClaims, claim_roles
from lti_tool.lti import KnownPlatform
from lti_tool.models import Activity, Course
from lti_tool.roles import is_staff
from lti_tool.web.auth import check_csrf, csrf_token, current_user_id, runtime, sign_in
from lti_tool.web.errors import Forbidden, LaunchRejected, WebError
from lti_tool.web.rate_limits import check_rate_limit
from provisioning.course_access import environments_for_course, may_use
from provisioning.models import Environment

log = logging.getLogger(__name__)
bp = Blueprint("deep_link", __name__)
CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
DEFAULT_SCORE_MAXIMUM = 100


class SelectionExpired(WebError):
    status = 410
    title = "This content selection has ended"


def begin(platform: KnownPlatform, client_id: str, claims: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    """Answer a validated deep-linking launch: refuse learners (403) and bad settings (400)
    before anything is written; else sign the teacher in and show the selection page."""
    try:
        roles = claim_roles(claims)
    except MalformedClaims as exc:
        raise LaunchRejected(str(exc)) from None
    if not is_staff(roles):
        raise Forbidden("Only the course's teachers can add Labpool content to a course.")
    try:
        settings = read_settings(claims, platform.issuer)
    except DeepLinkingRefused as exc:
        raise LaunchRejected(str(exc)) from None
    deployment_id = claims.get(CLAIM + "deployment_id")
    rt = runtime()
    try:
        with transaction(rt.sessions) as session:
            user_id, course_id = record_request_context(session, platform.id, claims)
    except MalformedClaims as exc:  # rolled back: nothing was written
        raise LaunchRejected(str(exc)) from None
    pending = DeepLinkingRequest(
        platform_id=platform.id,
        issuer=platform.issuer,
        client_id=client_id,
        deployment_id=str(deployment_id),
        return_url=settings.return_url,
        has_data=settings.has_data,
        data=settings.data,
        user_id=user_id,
        course_id=course_id,
        title=settings.title,
        text=settings.text,
    )
    sign_in(user_id, staff_course_id=course_id)
    token = save_pending(rt.redis, pending)
    return redirect(url_for("deep_link.selection_page", token=token), 303)


def _pending(token: str) -> DeepLinkingRequest:
    """The request behind a selection page, if it is still open and the signed-in teacher's."""
    found = load_pending(runtime().redis, token)
    if found is None:
        raise SelectionExpired(
            "This selection is over (answered already, or open for more than an hour). "
            "Choose “Select content” in Moodle again."
        )
    if current_user_id() != found.user_id:
        raise Forbidden("This content selection was started by someone else.")
    return found


@bp.get("/lti/deep-link/<token>")
def selection_page(token: str):  # type: ignore[no-untyped-def]
    pending = _pending(token)
    rt = runtime()
    with rt.sessions() as session:
        course = session.get_one(Course, pending.course_id)
        environments = environments_for_course(session, pending.course_id)
        assignments = _course_assignments(session, pending.course_id)
        # Where a teacher creates an assignment: the class page of an activity of this course.
        class_activity = session.scalars(
            select(Activity.id)
            .where(Activity.course_id == pending.course_id)
            .order_by(Activity.id.desc())
            .limit(1)
        ).first()
        return render_template(
            "deep_link.html",
            token=token,
            pending=pending,
            course=course,
            environments=environments,
            assignments=assignments,
            class_activity=class_activity,
            csrf=csrf_token(),
            default_score=DEFAULT_SCORE_MAXIMUM,
        )


def _course_assignments(session: Any, course_id: int) -> list[tuple[Assignment, str]]:
    """The course's assignments (each belongs to an activity of the course), with the
    activity's title."""
    return [
        (assignment, title)
        for assignment, title in session.execute(
            select(Assignment, Activity.title)
            .join(Activity, Activity.id == Assignment.activity_id)
            .where(Activity.course_id == course_id)
            .order_by(Assignment.title, Assignment.id)
        )
    ]


@bp.post("/lti/deep-link/<token>")
def choose(token: str):  # type: ignore[no-untyped-def]
    """The teacher's choice, checked, becomes one signed resource link (§4.2, §3.1)."""
    limited = check_rate_limit("teacher", "teacher_action_rate_limit")
    if limited is not None:
        return limited
    check_csrf()
    pending = _pending(token)
    rt = runtime()
    form = request.form
    with rt.sessions() as session:
        environment = session.get(Environment, _int_field(form, "environment_id"))
        if environment is None:
            raise WebError("That environment does not exist; choose one from the list.")
        if environment.retired_at is not None:
            raise WebError(
                f"The environment {environment.name!r} is retired; choose one from the list."
            )
        if not may_use(session, environment, pending.course_id):
            raise WebError(
                f"The environment {environment.name!r} is not open to this course (Labpool's "
                "administrator decides which courses may use it); choose one from the list.",
                403,
            )
        assignment = None
        raw_assignment = form.get("assignment_id", "").strip()
        if raw_assignment:
            assignment = session.scalars(
                select(Assignment)
                .join(Activity, Activity.id == Assignment.activity_id)
                .where(
                    Assignment.id == _int_field(form, "assignment_id"),
                    Activity.course_id == pending.course_id,
                )
            ).first()
            if assignment is None:
                raise WebError(
                    "That assignment is not one of this course's; choose one from the list."
                )
        try:
            score_max = score_maximum(
                form.get("score_maximum", "").strip()
                or str(assignment.max_score if assignment else DEFAULT_SCORE_MAXIMUM)
            )
        except DeepLinkingRefused as exc:
            raise WebError(str(exc)) from None
        title = form.get("title", "").strip()[:255] or (
            assignment.title if assignment and assignment.title else environment.name
        )
        text = form.get("text", "").strip()[:2000]
        item = resource_link(
            launch_url=rt.settings.url("/lti/launch"),
            title=title,
            text=text,
            environment_id=environment.id,
            score_max=score_max,
            assignment_id=assignment.id if assignment else None,
        )
        key = active_signing_key(session, rt.settings.secret_key)
    return _respond(token, pending, response_jwt(pending, key, [item]))


@bp.post("/lti/deep-link/<token>/cancel")
def cancel(token: str):  # type: ignore[no-untyped-def]
    """Nothing chosen: a response with no content items (§4.2), `data` still echoed."""
    check_csrf()
    pending = _pending(token)
    rt = runtime()
    with rt.sessions() as session:
        key = active_signing_key(session, rt.settings.secret_key)
    return _respond(token, pending, response_jwt(pending, key, []))


def _respond(token: str, pending: DeepLinkingRequest, jwt: str):  # type: ignore[no-untyped-def]
    # One response per request: a second POST (double click, back button) finds it gone.
    if not consume_pending(runtime().redis, token):
        raise SelectionExpired(
            "This selection was answered already. Choose “Select content” in Moodle again."
        )
    log.info(
        "deep linking response for course %s sent to %s",
        pending.course_id,
        pending.return_url.split("?")[0],
    )
    return render_template("deep_link_return.html", return_url=pending.return_url, jwt=jwt)


def _int_field(form: Mapping[str, str], name: str) -> int:
    raw = form.get(name, "").strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise WebError(f"The form's {name} is not an id from the list.")
    return int(raw)
