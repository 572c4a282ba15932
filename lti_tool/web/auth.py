"""Who is asking: the signed Flask session set by an accepted launch, checked on the server
for every route that shows or changes something."""

from __future__ import annotations

import hmac
import secrets

from flask import current_app, request, session
from sqlalchemy.orm import Session

from config.runtime import Runtime
from lti_tool.launches import enrolment_roles
from lti_tool.models import Activity
from lti_tool.roles import is_staff
from lti_tool.web.errors import Forbidden, NotSignedIn


def runtime() -> Runtime:
    """The app's runtime (settings, database sessions, Redis)."""
    return current_app.extensions["labpool"]


STAFF_GRANTS_KEPT = 20  # courses a session remembers teaching (a teacher with many tabs)


def sign_in(user_id: int, staff_course_id: int | None = None, *, admin: bool = False) -> None:
    """Start the session of a launch. A staff launch also grants its course's class page for
    this session, whatever the roster says later; grants of the same user's earlier launches
    in this browser stay (one teacher, several courses in several tabs). `admin`: the launch
    carried an institution or system Administrator role (lti_tool.roles.is_admin): the
    session may open the admin page."""
    grants = session.get("staff", []) if session.get("uid") == user_id else []
    session.clear()
    session.permanent = True
    session["uid"] = user_id
    session["csrf"] = secrets.token_urlsafe(24)
    if staff_course_id is not None:
        grants = [c for c in grants if c != staff_course_id] + [staff_course_id]
    if grants:
        session["staff"] = grants[-STAFF_GRANTS_KEPT:]
    if admin:
        session["admin"] = True


def sign_in_admin() -> None:
    """Start an admin session from an admin token (no user: the admin page only)."""
    session.clear()
    session.permanent = True
    session["admin"] = True
    session["csrf"] = secrets.token_urlsafe(24)


def require_admin() -> None:
    """The admin page's check, on every admin route: an admin launch or an admin token
    opened this session (both signed by the tool); anyone else gets 403."""
    if session.get("admin") is not True:
        raise Forbidden(
            "Only Labpool's administrators can open this page: launch Labpool from Moodle "
            "as a site administrator, or open a link from `labpool admin-token`."
        )


def staff_by_launch(course_id: int) -> bool:
    """Did this session's launch carry a staff role for the course? (The session is signed
    by the tool: only an accepted launch can have put the course there.)"""
    grants = session.get("staff", [])
    return isinstance(grants, list) and course_id in grants


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
    # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError).
    if not sent or not hmac.compare_digest(sent.encode(), csrf_token().encode()):
        raise Forbidden("This form is out of date; reload the page and try again.")


def taught_activity(db: Session, activity_id: int) -> Activity:
    """The activity, if the signed-in user teaches its course: a current enrolment with a
    staff role (checked in the database), or a staff launch into the course in this session
    (an administrator the roster does not list)."""
    activity = db.get(Activity, activity_id)
    if activity is None:
        raise Forbidden("No such activity.")
    user_id = current_user_id()
    if staff_by_launch(activity.course_id):
        return activity
    roles = enrolment_roles(db, user_id, activity.course_id)
    if roles is None or not is_staff(roles):
        raise Forbidden("Only the course's instructors can see this page.")
    return activity
