"""What a teacher can do from the class page: open a machine of their own, pick the
environment, warm the pool now, stop idle machines, reset a student's machine (new machine,
same files), sync the roster now, and set the weekly schedule. Every action checks, in the
database, that the user teaches the course, and carries the session's CSRF token."""

from __future__ import annotations

from datetime import time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import Blueprint, flash, redirect, request, url_for
from sqlalchemy import select

from config.db import transaction, upsert, utcnow
from lti_tool.launches import environment_of
from lti_tool.models import Course
from lti_tool.services.nrps import SYNC_JOB
from lti_tool.web.app import ROW_ID_MAX
from lti_tool.web.auth import check_csrf, current_user_id, runtime, taught_activity
from lti_tool.web.errors import WebError
from lti_tool.web.rate_limits import check_rate_limit
from provisioning.activity import idle_among
from provisioning.claiming import machine_for_learner
from provisioning.course_access import may_use
from provisioning.models import (
    LIVE_STATES,
    ClassSession,
    Environment,
    Machine,
    MachineState,
    Pool,
    WarmBoost,
)
from provisioning.proxy_table import withdraw_route
from provisioning.queue import STOP_JOB, enqueue
from provisioning.schedule import class_size
from provisioning.triggers import machine_wanted, pool_of, reconcile_soon

bp = Blueprint("teacher_actions", __name__)
# Every action here is a POST that may enqueue work or touch many machines.
bp.before_request(lambda: check_rate_limit("teacher", "teacher_action_rate_limit"))
WARM_NOW_FOR = timedelta(hours=2)
# Shorter than the environment's idle timeout on purpose: the teacher asks now, for this
# class; what counts as activity is the idle release's rule (`provisioning.activity`).
IDLE_AFTER = timedelta(minutes=10)


def _back(activity_id: int, message: str | None = None):  # type: ignore[no-untyped-def]
    if message:
        flash(message)
    return redirect(url_for("teacher.class_page", activity_id=activity_id), 303)


@bp.post("/activities/<int:activity_id>/my-machine")
def my_machine(activity_id: int):  # type: ignore[no-untyped-def]
    """A teacher opens a machine of their own in the activity's environment."""
    check_csrf()
    rt = runtime()
    with transaction(rt.sessions) as session:
        activity = taught_activity(session, activity_id)
        environment = environment_of(session, activity.id)
        choice = machine_for_learner(session, environment, activity.course_id, current_user_id())
    machine_wanted(rt, choice.machine, choice.how)
    return redirect(url_for("machines.status_page", machine_id=choice.machine.id), 303)


@bp.post("/activities/<int:activity_id>/environment")
def choose_environment(activity_id: int):  # type: ignore[no-untyped-def]
    """New launches get the chosen environment; machines already handed out stay."""
    check_csrf()
    rt = runtime()
    env_id = _int_field("environment_id", "Choose an environment from the list.")
    with transaction(rt.sessions) as session:
        activity = taught_activity(session, activity_id)
        chosen = session.get(Environment, env_id)
        if chosen is None:
            raise WebError("That environment does not exist.")
        if chosen.retired_at is not None:
            raise WebError(f"The environment {chosen.name!r} is retired: pick another one.")
        if not may_use(session, chosen, activity.course_id):
            raise WebError(
                f"The environment {chosen.name!r} is not open to this course (Labpool's "
                "administrator decides which courses may use it): pick another one.",
                403,
            )
        activity.environment_id = env_id
    pool_id = pool_of(rt, env_id)
    if pool_id is not None:
        reconcile_soon(rt, pool_id)
    return _back(activity_id)


@bp.post("/activities/<int:activity_id>/warm-now")
def warm_now(activity_id: int):  # type: ignore[no-untyped-def]
    """Warm a machine for every student of the class for the next two hours. The boost is
    this activity's: another course's boost on the same pool neither replaces nor cancels it
    (the pool keeps the largest)."""
    check_csrf()
    rt = runtime()
    with transaction(rt.sessions) as session:
        activity = taught_activity(session, activity_id)
        environment = environment_of(session, activity.id)
        if environment.retired_at is not None or not may_use(
            session, environment, activity.course_id
        ):
            raise WebError(
                f"The environment {environment.name!r} starts no new machine in this course: "
                "pick another one first.",
                409,
            )
        pool = session.scalars(select(Pool).where(Pool.environment_id == environment.id)).first()
        if pool is None:
            raise WebError(
                "Warm pools need a cloud environment; this activity's machines are "
                "started on demand."
            )
        target = min(class_size(session, activity.course_id), pool.max_size)
        # One statement: a double click (two requests at once) updates, never collides.
        upsert(
            session,
            WarmBoost,
            {"activity_id": activity.id},
            {"target": target, "until": utcnow() + WARM_NOW_FOR},
        )
        pool_id = pool.id
    reconcile_soon(rt, pool_id)
    return _back(activity_id, f"Warming {target} machine(s) for the next two hours.")


@bp.post("/activities/<int:activity_id>/stop-idle")
def stop_idle(activity_id: int):  # type: ignore[no-untyped-def]
    """Release the class's machines nobody used for ten minutes (their files stay). The
    IDEs are asked outside any transaction; a machine that changed meanwhile is left."""
    check_csrf()
    rt = runtime()
    now = utcnow()
    with rt.sessions() as session:
        activity = taught_activity(session, activity_id)
        environment = environment_of(session, activity.id)
        machines = session.scalars(
            select(Machine).where(
                Machine.course_id == activity.course_id,
                Machine.environment_id == environment.id,
                Machine.state == MachineState.assigned,
            )
        ).all()
    candidates = [m.id for m in idle_among(rt.redis, machines, now, IDLE_AFTER)]
    idle = []
    with transaction(rt.sessions) as session:
        for machine_id in candidates:
            machine = session.get(Machine, machine_id, with_for_update=True)
            if machine is not None and machine.state is MachineState.assigned:
                machine.move_to(MachineState.stopping)
                idle.append(machine.id)
    for machine_id in idle:
        withdraw_route(rt.redis, machine_id)
        enqueue(rt.redis, rt.settings.queue_name, STOP_JOB, machine_id)
    return _back(activity_id, f"Stopping {len(idle)} idle machine(s).")


@bp.post("/activities/<int:activity_id>/machines/<int:machine_id>/reset")
def reset_machine(activity_id: int, machine_id: int):  # type: ignore[no-untyped-def]
    """A student's machine is replaced by a new one; their files stay."""
    check_csrf()
    rt = runtime()
    with transaction(rt.sessions) as session:
        activity = taught_activity(session, activity_id)
        environment = environment_of(session, activity.id)
        machine = session.get(Machine, machine_id, with_for_update=True)
        if machine is None or machine.course_id != activity.course_id or machine.owner_id is None:
            raise WebError("That machine is not one of this class's.", 404)
        owner_id = machine.owner_id
        if machine.state in LIVE_STATES or machine.state is MachineState.error:
            machine.move_to(MachineState.stopping)
        session.flush()
        choice = machine_for_learner(session, environment, activity.course_id, owner_id)
    withdraw_route(rt.redis, machine_id)
    enqueue(rt.redis, rt.settings.queue_name, STOP_JOB, machine_id)
    machine_wanted(rt, choice.machine, choice.how)
    return _back(activity_id, f"Machine #{machine_id} is being replaced by #{choice.machine.id}.")


@bp.post("/activities/<int:activity_id>/roster-sync")
def roster_sync(activity_id: int):  # type: ignore[no-untyped-def]
    check_csrf()
    rt = runtime()
    with rt.sessions() as session:
        activity = taught_activity(session, activity_id)
        course = session.get_one(Course, activity.course_id)
        if not course.memberships_url:
            raise WebError(
                "Moodle does not share this course's roster with Labpool: turn on "
                "“IMS LTI Names and Role Provisioning” for the tool."
            )
    enqueue(rt.redis, rt.settings.queue_name, SYNC_JOB, activity.course_id)
    return _back(activity_id, "The roster is being synced.")


@bp.post("/activities/<int:activity_id>/schedule")
def add_class_session(activity_id: int):  # type: ignore[no-untyped-def]
    check_csrf()
    weekday = _int_field("weekday", "Choose a day of the week.")
    if not 0 <= weekday <= 6:
        raise WebError("Choose a day of the week.")
    starts, ends = _time_field("starts"), _time_field("ends")
    if ends <= starts:
        raise WebError("The class must end after it starts (on the same day).")
    zone = request.form.get("timezone", "UTC").strip() or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise WebError(f"Unknown time zone {zone!r} (use a name like Europe/Paris).") from None
    lead = _int_field("lead_minutes", "The lead time is a number of minutes.", default=10)
    if not 0 <= lead <= 240:
        raise WebError("The lead time must be between 0 and 240 minutes.")
    rt = runtime()
    with transaction(rt.sessions) as session:
        activity = taught_activity(session, activity_id)
        session.add(
            ClassSession(
                activity_id=activity.id,
                weekday=weekday,
                starts=starts,
                ends=ends,
                timezone=zone,
                lead_minutes=lead,
            )
        )
        environment = environment_of(session, activity.id)
    pool_id = pool_of(rt, environment.id)
    if pool_id is not None:
        reconcile_soon(rt, pool_id)
    return _back(activity_id)


@bp.post("/activities/<int:activity_id>/schedule/<int:session_id>/delete")
def delete_class_session(activity_id: int, session_id: int):  # type: ignore[no-untyped-def]
    check_csrf()
    with transaction(runtime().sessions) as session:
        activity = taught_activity(session, activity_id)
        meeting = session.get(ClassSession, session_id)
        if meeting is None or meeting.activity_id != activity.id:
            raise WebError("No such class session.", 404)
        session.delete(meeting)
    return _back(activity_id)


def _int_field(name: str, message: str, default: int | None = None) -> int:
    raw = request.form.get(name, "").strip()
    if not raw and default is not None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise WebError(message) from None
    if abs(value) > ROW_ID_MAX:  # an INTEGER column (and id) holds no more
        raise WebError(message)
    return value


def _time_field(name: str) -> time:
    try:
        return time.fromisoformat(request.form.get(name, "").strip())
    except ValueError:
        raise WebError(f"The {name} time must look like 09:30.") from None
