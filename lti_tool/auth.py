"""Who is asking: the signed Flask session set by an accepted launch, checked on the server
for every route that shows or changes something."""

from __future__ import annotations

import hmac
import secrets

from flask import current_app, request, session
from sqlalchemy.orm import Session

from config.runtime import Runtime
from lti_tool.errors import Forbidden, NotSignedIn
from lti_tool.launches import enrolment_roles, is_staff
from lti_tool.models import Activity


def runtime() -> Runtime:
    """The app's runtime (settings, database sessions, Redis)."""
    return current_app.extensions["labpool"]


def sign_in(user_id: int) -> None:
    session.clear()
    session.permanent = True
    session["uid"] = user_id
    session["csrf"] = secrets.token_urlsafe(24)


def current_user_id() -> int:
    uid = session.get("uid")
    if not isinstance(uid, int):
        raise NotSignedIn(
            "Your session has expired or was never started. Open the activity again from your "
            "course page."
        )
    return uid


def csrf_token() -> str:
    return session.get("csrf", "")


def check_csrf() -> None:
    """Forms that change something carry the session's CSRF token (cookies may be
    SameSite=None inside Moodle's iframe, so the cookie alone proves nothing)."""
    sent = request.form.get("csrf", "")
    if not sent or not hmac.compare_digest(sent, csrf_token()):
        raise Forbidden("This form is out of date; reload the page and try again.")


def taught_activity(db: Session, activity_id: int) -> Activity:
    """The activity, if the signed-in user teaches its course (checked in the database,
    not trusted from the session)."""
    activity = db.get(Activity, activity_id)
    if activity is None:
        raise Forbidden("No such activity.")
    roles = enrolment_roles(db, current_user_id(), activity.course_id)
    if roles is None or not is_staff(roles):
        raise Forbidden("Only the course's instructors can see this page.")
    return activity
