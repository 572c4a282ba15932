"""The teacher's page of an activity: the class's machines and their states (refreshed by
short polling), and a machine of their own. Instructors of the course only."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, redirect, render_template, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.db import transaction
from lti_tool.auth import check_csrf, csrf_token, current_user_id
from lti_tool.errors import Forbidden
from lti_tool.launches import enrolment_roles, environment_of, is_staff
from lti_tool.models import Activity, Course, User
from provisioning.claims import machine_for_learner
from provisioning.models import Machine
from provisioning.triggers import machine_wanted

bp = Blueprint("teacher", __name__)


def _rt():  # type: ignore[no-untyped-def]
    return current_app.extensions["labpool"]


def _taught_activity(session: Session, activity_id: int) -> Activity:
    """The activity, if the signed-in user teaches its course (checked in the database)."""
    activity = session.get(Activity, activity_id)
    if activity is None:
        raise Forbidden("No such activity.")
    roles = enrolment_roles(session, current_user_id(), activity.course_id)
    if roles is None or not is_staff(roles):
        raise Forbidden("Only the course's instructors can see this page.")
    return activity


def class_machines(session: Session, activity: Activity) -> list[dict]:
    environment = environment_of(session, activity.id)
    rows = session.execute(
        select(Machine, User)
        .join(User, User.id == Machine.owner_id)
        .where(Machine.course_id == activity.course_id, Machine.environment_id == environment.id)
        .order_by(Machine.id.desc())
    ).all()
    return [
        {
            "id": machine.id,
            "student": user.name or f"user {user.sub}",
            "state": machine.state.value,
            "since": machine.state_changed_at.isoformat(timespec="seconds"),
            "error": machine.error or "",
            "mine": machine.owner_id == current_user_id(),
        }
        for machine, user in rows
    ]


@bp.get("/activities/<int:activity_id>/class")
def class_page(activity_id: int):  # type: ignore[no-untyped-def]
    with _rt().sessions() as session:
        activity = _taught_activity(session, activity_id)
        course = session.get_one(Course, activity.course_id)
        return render_template(
            "class.html",
            activity=activity,
            course=course,
            machines=class_machines(session, activity),
            csrf=csrf_token(),
        )


@bp.get("/activities/<int:activity_id>/class.json")
def class_state(activity_id: int):  # type: ignore[no-untyped-def]
    with _rt().sessions() as session:
        activity = _taught_activity(session, activity_id)
        response = jsonify(machines=class_machines(session, activity))
    response.cache_control.no_store = True
    return response


@bp.post("/activities/<int:activity_id>/my-machine")
def my_machine(activity_id: int):  # type: ignore[no-untyped-def]
    """A teacher opens a machine of their own in the activity's environment."""
    check_csrf()
    rt = _rt()
    with transaction(rt.sessions) as session:
        activity = _taught_activity(session, activity_id)
        environment = environment_of(session, activity.id)
        choice = machine_for_learner(session, environment, activity.course_id, current_user_id())
    machine_wanted(rt, choice.machine, choice.how)
    return redirect(url_for("machines.status_page", machine_id=choice.machine.id), 303)
