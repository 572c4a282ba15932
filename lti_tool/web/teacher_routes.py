"""The teacher's page of an activity, live: the roster with each student's machine, its
state, last activity and storage; the pool's counts against its target and quota; the class
schedule. Instructors of the course only (checked in the database on every request).

The page polls `class.json` every few seconds rather than holding a server-sent-events
stream: it is one small query batch per teacher, passes every proxy and iframe unchanged,
and never pins a web worker while a class of students is launching.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from flask import Blueprint, jsonify, render_template
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config.db import utcnow
from grading.assignments import activity_assignments
from lti_tool.launches import environment_of
from lti_tool.models import Activity, Course, Enrolment, Launch, User
from lti_tool.names import short_labels
from lti_tool.roles import is_staff
from lti_tool.web.auth import csrf_token, current_user_id, runtime, taught_activity
from provisioning.activity import last_activity
from provisioning.backends import capabilities
from provisioning.course_access import environments_for_course, may_use
from provisioning.models import (
    LIVE_STATES,
    ClassSession,
    Environment,
    Machine,
    MachineState,
    Pool,
    StudentVolume,
)
from provisioning.sandbox import host_isolation

bp = Blueprint("teacher", __name__)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def pool_status(session: Session, environment: Environment) -> dict | None:
    """The pool behind a cloud environment, as a teacher reads it."""
    pool = session.scalars(select(Pool).where(Pool.environment_id == environment.id)).first()
    if pool is None:
        return None
    counts = {
        f"{state.value}{'' if owned else '_warm'}": n
        for state, owned, n in session.execute(
            select(Machine.state, Machine.owner_id.is_not(None), func.count())
            .where(
                Machine.environment_id == environment.id,
                Machine.state.notin_([MachineState.stopped]),
            )
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


def host_status(session: Session, environment: Environment) -> dict | None:
    """Single-server mode's answer to the pool section: machines start on demand on this
    host; how many run here now (every course), and what each may use."""
    if not capabilities(environment.backend).on_host:
        return None
    counts = dict(
        session.execute(
            select(Machine.state, func.count())
            .where(Machine.backend == environment.backend, Machine.state.in_(LIVE_STATES))
            .group_by(Machine.state)
        ).all()
    )
    return {
        "running": counts.get(MachineState.assigned, 0) + counts.get(MachineState.ready, 0),
        "starting": counts.get(MachineState.starting, 0) + counts.get(MachineState.requested, 0),
        "memory_mb": environment.memory_mb,
        "max_processes": environment.max_processes,
    }


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


# A student whose IDE showed activity this recently is "working"; longer ago, "idle".
WORKING_WINDOW = timedelta(minutes=10)
# The headline counts, in the order the page shows them.
STATUSES = ("ready", "working", "idle", "starting", "stopped", "no machine", "problem")


def machine_status(
    machine: Machine | None, seen: datetime | None, now: datetime
) -> tuple[str, str]:
    """(status, words) of a student's machine as a teacher reads it: one of STATUSES, and
    the words the page shows ("stopped — files kept", "problem: <what>")."""
    if machine is None:
        return "no machine", "no machine"
    state = machine.state
    if state is MachineState.error:
        return "problem", f"problem: {machine.error or 'the machine failed'}"
    if state in (MachineState.requested, MachineState.starting, MachineState.ready):
        return "starting", "waiting for a slot" if state is MachineState.requested else "starting"
    if state in (MachineState.stopping, MachineState.stopped):
        return "stopped", "stopped — files kept"
    if seen is None:
        return "ready", "ready, not opened yet"
    if now - seen <= WORKING_WINDOW:
        return "working", "working"
    return "idle", "idle"


def class_counts(rows: list[dict]) -> dict[str, int]:
    """How many students (teachers apart) are in each status."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        if row["role"] == "student":
            counts[row["status"]] += 1
    return counts


def class_roster(session: Session, activity: Activity) -> list[dict]:
    """Every current member of the course (and anyone else holding a machine here), with
    their newest machine in the activity's environment."""
    environment = environment_of(session, activity.id)
    volumes = {
        v.owner_id: v
        for v in session.scalars(
            select(StudentVolume).where(StudentVolume.course_id == activity.course_id)
        )
    }
    # A machine this activity handed out stays the student's after the teacher picks another
    # environment (provisioning.claiming), so it is listed too.
    handed_out = select(Launch.machine_id).where(
        Launch.activity_id == activity.id, Launch.machine_id.is_not(None)
    )
    newest = {}
    for machine in session.scalars(
        select(Machine)
        .where(
            Machine.course_id == activity.course_id,
            (Machine.environment_id == environment.id) | Machine.id.in_(handed_out),
            Machine.owner_id.is_not(None),
        )
        .order_by(Machine.id)
    ):
        newest[machine.owner_id] = machine  # the last one wins
    other_environments = {
        env.id: env.name
        for env in session.scalars(
            select(Environment).where(
                Environment.id.in_({m.environment_id for m in newest.values()} - {environment.id})
            )
        )
    }
    enrolled = session.execute(
        select(User, Enrolment)
        .join(Enrolment, Enrolment.user_id == User.id)
        .where(
            Enrolment.course_id == activity.course_id,
            Enrolment.ended_at.is_(None) | User.id.in_(newest),
        )
    ).all()
    listed = {user.id for user, _ in enrolled}
    extra = session.scalars(select(User).where(User.id.in_(set(newest) - listed))).all()
    people = [*enrolled, *((u, None) for u in extra)]
    issuer = people[0][0].issuer if people else ""
    labels = short_labels(runtime().settings.secret_key, issuer, [u.sub for u, _ in people])
    rows = []
    redis = runtime().redis
    now = utcnow()
    for user, enrolment in people:
        roles = None if enrolment is None or enrolment.ended_at else enrolment.roles
        role = "left the course" if roles is None else ("teacher" if is_staff(roles) else "student")
        # Only what this course's registration shared (the enrolment's), never User.name.
        shown = (enrolment.name if enrolment else None) or (
            f"{'Teacher' if role == 'teacher' else 'Student'} {labels[user.sub]}"
        )
        machine = newest.get(user.id)
        # The idle rules' own reading (no IDE asked: one page, a whole class).
        seen = last_activity(redis, machine) if machine is not None else None
        status, words = machine_status(machine, seen, now)
        rows.append(
            {
                "user_id": user.id,
                "student": shown,
                "named": bool(enrolment and enrolment.name),
                "lms_user_id": user.sub,
                "email": (enrolment.email or "") if enrolment else "",
                "role": role,
                "machine": machine.id if machine else None,
                "state": machine.state.value if machine else "no machine",
                "status": status,
                "words": words,
                "since": _when(machine.state_changed_at) if machine else "",
                "last_activity": _when(seen),
                "error": (machine.error or "") if machine else "",
                "storage": _storage(environment, volumes.get(user.id)),
                # A machine kept from before the teacher chose this environment says so.
                "environment": other_environments.get(machine.environment_id, "")
                if machine
                else "",
                "mine": user.id == current_user_id(),
            }
        )
    rows.sort(key=lambda r: (r["role"] != "student", r["student"].lower()))
    return rows


def _storage(environment: Environment, volume: StudentVolume | None) -> str:
    if not capabilities(environment.backend).volumes:
        return "home folder"
    if volume is None:
        return "volume created at first launch"
    state = {"in-use": "attached", "available": "kept, not attached"}.get(
        volume.status, volume.status
    )
    return f"volume {volume.size_gb} GB, {state}" + (f": {volume.error}" if volume.error else "")


def class_schedule(session: Session, activity: Activity) -> list[dict]:
    return [
        {
            "id": m.id,
            "day": WEEKDAYS[m.weekday],
            "starts": m.starts.strftime("%H:%M"),
            "ends": m.ends.strftime("%H:%M"),
            "timezone": m.timezone,
            "lead_minutes": m.lead_minutes,
        }
        for m in session.scalars(
            select(ClassSession)
            .where(ClassSession.activity_id == activity.id)
            .order_by(ClassSession.weekday, ClassSession.starts)
        )
    ]


def platform_status(course: Course) -> dict:
    """The conversation with the platform as the teacher needs it: when the roster was last
    read, and the last failure (what, when, what to do) until a success clears it."""
    return {
        "roster_service": bool(course.memberships_url),
        "roster_synced_at": _when(course.roster_synced_at),
        "error": course.platform_error or "",
        "error_at": _when(course.platform_error_at),
    }


def class_view(session: Session, activity: Activity) -> dict:
    environment = environment_of(session, activity.id)
    roster = class_roster(session, activity)
    return {
        "platform": platform_status(session.get_one(Course, activity.course_id)),
        "roster": roster,
        "counts": class_counts(roster),
        "pool": pool_status(session, environment),
        "host": host_status(session, environment),
        "schedule": class_schedule(session, activity),
    }


@bp.get("/activities/<int:activity_id>/class")
def class_page(activity_id: int):  # type: ignore[no-untyped-def]
    with runtime().sessions() as session:
        activity = taught_activity(session, activity_id)
        environment = environment_of(session, activity.id)
        return render_template(
            "class.html",
            activity=activity,
            course=session.get_one(Course, activity.course_id),
            environment=environment,
            # Said where the teacher looks, not only on the server's console.
            isolation_problems=host_isolation().problems
            if capabilities(environment.backend).on_host
            else [],
            # What the course may pick (in use, open to it), and the current one whatever it
            # is now: the page says when it starts no new machine.
            environments=sorted(
                {
                    *environments_for_course(session, activity.course_id),
                    environment,
                },
                key=lambda env: env.name,
            ),
            environment_unusable=environment.retired_at is not None
            or not may_use(session, environment, activity.course_id),
            view=class_view(session, activity),
            assignments=activity_assignments(session, activity.id),
            weekdays=WEEKDAYS,
            statuses=STATUSES,
            can_view_files=capabilities(environment.backend).on_host,
            csrf=csrf_token(),
        )


@bp.get("/activities/<int:activity_id>/class.json")
def class_state(activity_id: int):  # type: ignore[no-untyped-def]
    with runtime().sessions() as session:
        activity = taught_activity(session, activity_id)
        response = jsonify(class_view(session, activity))
    response.cache_control.no_store = True
    return response
