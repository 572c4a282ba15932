"""A teacher looks over a student's shoulder (issue 13): a read-only view of the student's
files — folders listed, notebooks rendered, text shown — from the student's home on this host,
whether or not their machine runs (single-server mode: the home outlives the machine).

Who asks is checked on the server: the teacher of the activity's course (`taught_activity`)
looking at a member (current or past) of that course; anyone else gets 403. Every look is
recorded (`HomeView`) and logged; the student's page says "your teacher viewed your files
at …". Only GET routes exist and the reader opens nothing for writing
(provisioning.home_view). A notebook's rendering is the student's content: it is served on
its own, under a CSP that runs no script and sandboxes the document, into a sandboxed iframe.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from flask import Blueprint, Response, render_template, request, url_for
from markupsafe import escape
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.db import transaction
from lti_tool.models import Activity, Enrolment, User
from lti_tool.web.auth import current_user_id, runtime, taught_activity
from lti_tool.web.errors import WebError
from lti_tool.web.page_headers import UNTRUSTED_HTML_CSP
from provisioning.backends import capabilities
from provisioning.home_view import (
    HomeViewError,
    is_text,
    list_folder,
    read_file,
    render_notebook,
)
from provisioning.models import HomeView

log = logging.getLogger(__name__)
bp = Blueprint("home_view", __name__)


def _student_home(session: Session, activity: Activity, student_id: int):  # type: ignore[no-untyped-def]
    """The student's home, if they are (or were) in the course and it lives on this host."""
    from grading.submissions import student_home
    from lti_tool.launches import environment_of

    member = session.scalars(
        select(Enrolment.id).where(
            Enrolment.course_id == activity.course_id, Enrolment.user_id == student_id
        )
    ).first()
    if member is None:
        raise WebError("That person is not in this course.", 403)
    if not capabilities(environment_of(session, activity.id).backend).on_host:
        raise WebError(
            "This activity's machines run in the cloud: looking at a student's files there "
            "is not built yet (single-server mode only).",
            501,
        )
    return student_home(runtime(), session, activity, student_id)


def _record(activity: Activity, student_id: int, path: str) -> None:
    viewer = current_user_id()
    with transaction(runtime().sessions) as session:
        session.add(
            HomeView(
                course_id=activity.course_id, student_id=student_id, viewer_id=viewer, path=path
            )
        )
    log.info(
        "teacher %s viewed the files of user %s in course %s: %r",
        viewer,
        student_id,
        activity.course_id,
        path,
    )


def recent_views(session: Session, course_id: int, student_id: int, limit: int = 5) -> list:
    """The student's last looks by a teacher in this course: (when, teacher's name)."""
    rows = session.execute(
        select(HomeView.at, Enrolment.name)
        .outerjoin(
            Enrolment,
            (Enrolment.user_id == HomeView.viewer_id) & (Enrolment.course_id == course_id),
        )
        .where(HomeView.course_id == course_id, HomeView.student_id == student_id)
        .order_by(HomeView.at.desc(), HomeView.id.desc())
        .limit(limit)
    ).all()
    return [(at, name or "your teacher") for at, name in rows]


def _path() -> str:
    raw = request.args.get("path", "")
    if len(raw) > 1024 or "\0" in raw:
        raise WebError("That path is not valid.")
    return str(PurePosixPath(raw)) if raw else ""


@bp.get("/activities/<int:activity_id>/students/<int:student_id>/files")
def files(activity_id: int, student_id: int):  # type: ignore[no-untyped-def]
    path = _path()
    rt = runtime()
    with rt.sessions() as session:
        activity = taught_activity(session, activity_id)
        home = _student_home(session, activity, student_id)
        student = session.get_one(User, student_id)
        enrolment = session.scalars(
            select(Enrolment).where(
                Enrolment.course_id == activity.course_id, Enrolment.user_id == student_id
            )
        ).first()
        name = (enrolment.name if enrolment else "") or f"user {student.sub}"
    entries, text, notebook, problem = None, None, False, None
    try:
        if path == "" or request.args.get("kind") != "file":
            entries = list_folder(home, path)
        else:
            data = read_file(home, path)
            if path.endswith(".ipynb"):
                notebook = True
            elif is_text(path, data):
                text = data.decode("utf-8", errors="replace")
            else:
                problem = f"A binary file of {len(data)} bytes: not shown."
    except HomeViewError as exc:
        problem = str(exc)
    _record(activity, student_id, path or ".")
    parent = str(PurePosixPath(path).parent) if path else None
    return render_template(
        "home_view.html",
        activity=activity,
        student_id=student_id,
        name=name,
        path=path,
        parent="" if parent == "." else parent,
        entries=entries,
        text=text,
        notebook=notebook,
        problem=problem,
        render_url=url_for(
            "home_view.rendered",
            activity_id=activity_id,
            student_id=student_id,
            path=path,
        ),
    )


@bp.get("/activities/<int:activity_id>/students/<int:student_id>/files/rendered")
def rendered(activity_id: int, student_id: int):  # type: ignore[no-untyped-def]
    """A notebook rendered to HTML: the student's content, so no script runs and the
    document is sandboxed (an opaque origin, no access to the tool's cookies or pages)."""
    path = _path()
    with runtime().sessions() as session:
        activity = taught_activity(session, activity_id)
        home = _student_home(session, activity, student_id)
    try:
        body = render_notebook(read_file(home, path))
    except HomeViewError as exc:
        body = f"<p>{escape(str(exc))}</p>"
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><style>'
        "body{font:15px/1.5 system-ui,sans-serif;margin:1rem;color:#1d2430}"
        "pre{white-space:pre-wrap;background:#f5f7fa;padding:.5rem;overflow-x:auto}"
        ".jp-InputPrompt,.jp-OutputPrompt{color:#5b6575;font-size:.8rem}"
        f"</style></head><body>{body}</body></html>"
    )
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = UNTRUSTED_HTML_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
