"""The teacher's page of an activity: the class's machines and their states (refreshed by
short polling), and a machine of their own. Instructors of the course only."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, redirect, render_template, request, url_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config.db import transaction
from lti_tool.auth import check_csrf, csrf_token, current_user_id
from lti_tool.errors import Forbidden, WebError
from lti_tool.launches import enrolment_roles, environment_of, is_staff
from lti_tool.models import Activity, Course, User
from provisioning.claims import machine_for_learner
from provisioning.models import Environment, Machine, MachineState, Pool
from provisioning.triggers import machine_wanted, pool_of, reconcile_soon

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


def pool_status(session: Session, environment: Environment) -> dict | None:
    """The pool behind a cloud environment, as a teacher reads it."""
    pool = session.scalars(select(Pool).where(Pool.environment_id == environment.id)).first()
    if pool is None:
        return None
    counts = {
        f"{state.value}{'' if owned else '_warm'}": n
        for state, owned, n in session.execute(
            select(Machine.state, Machine.owner_id.is_not(None), func.count())
            .where(Machine.environment_id == environment.id,
                   Machine.state.notin_([MachineState.stopped]))
            .group_by(Machine.state, Machine.owner_id.is_not(None))
        )
    }
    return {
        "warm_target": pool.warm_target,
        "max_size": pool.max_size,
        "paused": pool.paused,
        "ready_warm": counts.get("ready_warm", 0),
        "assigned": counts.get("assigned", 0),
        "starting": counts.get("starting", 0) + counts.get("starting_warm", 0),
        "requested": counts.get("requested", 0) + counts.get("requested_warm", 0),
        "error": counts.get("error", 0) + counts.get("error_warm", 0),
        "notes": [note for note in (pool.quota_note, pool.hold_note) if note],
    }


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
        environment = environment_of(session, activity.id)
        return render_template(
            "class.html",
            activity=activity,
            course=course,
            machines=class_machines(session, activity),
            environment=environment,
            environments=session.scalars(select(Environment).order_by(Environment.name)).all(),
            pool=pool_status(session, environment),
            csrf=csrf_token(),
        )


@bp.get("/activities/<int:activity_id>/class.json")
def class_state(activity_id: int):  # type: ignore[no-untyped-def]
    with _rt().sessions() as session:
        activity = _taught_activity(session, activity_id)
        response = jsonify(
            machines=class_machines(session, activity),
            pool=pool_status(session, environment_of(session, activity.id)),
        )
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


@bp.post("/activities/<int:activity_id>/environment")
def choose_environment(activity_id: int):  # type: ignore[no-untyped-def]
    """The teacher picks what the activity's machines run; machines already handed out stay
    as they are, new launches get the new environment."""
    check_csrf()
    rt = _rt()
    try:
        env_id = int(request.form.get("environment_id", ""))
    except ValueError:
        raise WebError("Choose an environment from the list.") from None
    with transaction(rt.sessions) as session:
        activity = _taught_activity(session, activity_id)
        environment = session.get(Environment, env_id)
        if environment is None:
            raise WebError("That environment does not exist.")
        activity.environment_id = environment.id
    pool_id = pool_of(rt, env_id)
    if pool_id is not None:
        reconcile_soon(rt, pool_id)
    return redirect(url_for("teacher.class_page", activity_id=activity_id), 303)
