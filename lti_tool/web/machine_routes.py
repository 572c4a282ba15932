"""A student's machine: the status page that follows it live, its state as JSON, and the
hand-over to the IDE once it is ready.

The page polls `/machines/<id>/state` every second rather than holding a server-sent-events
stream: a launch burst of a whole class must not pin one web worker per waiting student, and
short polls pass every proxy and iframe unchanged.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, current_app, jsonify, redirect, render_template, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.db import transaction, utcnow
from lti_tool.ide_access import IDE_COOKIE
from lti_tool.launches import environment_of
from lti_tool.models import Activity, Course, Enrolment, Launch
from lti_tool.web.auth import check_csrf, csrf_token, current_user_id, runtime
from lti_tool.web.errors import Forbidden, WebError
from lti_tool.web.home_view_routes import recent_views
from provisioning.backends import capabilities
from provisioning.claiming import machine_for_learner
from provisioning.models import LIVE_STATES, Environment, Machine, MachineState
from provisioning.proxy_table import publish_route, withdraw_route
from provisioning.triggers import machine_wanted, nudge

bp = Blueprint("machines", __name__)

MESSAGES = {
    MachineState.requested: "Waiting for a free slot to start your machine…",
    MachineState.starting: "Starting your machine…",
    MachineState.ready: "Your machine is ready.",
    MachineState.assigned: "Your machine is ready. Opening it…",
    MachineState.stopping: "Your machine is being stopped. Your files are kept.",
    MachineState.stopped: "Your machine was stopped (it was idle, or your teacher stopped or "
    "replaced it). Your files are kept.",
    MachineState.error: "Your machine could not be started.",
}
# The state in the words a student reads (the page's headline).
WORDS = {
    MachineState.requested: "waiting",
    MachineState.starting: "starting",
    MachineState.ready: "ready",
    MachineState.assigned: "ready",
    MachineState.stopping: "stopping — files kept",
    MachineState.stopped: "stopped — files kept",
    MachineState.error: "problem",
}
ESTIMATE_SAMPLE = 20  # recent starts the wait estimate is taken from
ESTIMATE_CUTOFF_S = 900  # longer waits are warm machines claimed long after their start
NUDGE_AFTER = timedelta(seconds=10)
CLOUD_NUDGE_AFTER = timedelta(seconds=3)


def _own_machine(session: Session, machine_id: int) -> Machine:
    machine = session.get(Machine, machine_id)
    if machine is None or machine.owner_id != current_user_id():
        raise Forbidden("This is not your machine.")
    return machine


def _nudge_if_stale(machine: Machine) -> None:
    """A `requested` machine nobody picked up (lost job, Redis restarted), or a start whose
    worker died: enqueue the start again; the job resumes it or reports the failure. A short
    Redis guard keeps a page of pollers from enqueueing it many times."""
    rt = runtime()
    age = utcnow() - machine.state_changed_at
    pooled = capabilities(machine.backend).pooled
    if pooled:
        # A pooled machine becomes ready only when a reconciler pass sees its IDE answer:
        # waiting students ask for a pass (at most one queued per pool).
        stale = machine.state in (MachineState.requested, MachineState.starting) and (
            age > CLOUD_NUDGE_AFTER
        )
    else:
        stale = (machine.state is MachineState.requested and age > NUDGE_AFTER) or (
            machine.state is MachineState.starting
            and age > timedelta(seconds=rt.settings.machine_start_timeout_s) + NUDGE_AFTER
        )
    if not stale:
        return
    guard = CLOUD_NUDGE_AFTER if pooled else NUDGE_AFTER
    if rt.redis.set(f"labpool:nudged:{machine.id}", 1, nx=True, ex=int(guard.seconds)):
        nudge(rt, machine)


def state_of(machine: Machine, session: Session | None = None) -> dict:
    """What the status page shows. With a session, a machine that is over (stopped, failed)
    points at the student's newer machine in the course, if one is live (a teacher's reset)."""
    ready = machine.state is MachineState.assigned
    body = {
        "id": machine.id,
        "state": machine.state.value,
        "words": WORDS[machine.state],
        "message": MESSAGES[machine.state],
        "ready": ready,
        "since": machine.state_changed_at.isoformat(),
    }
    if ready:
        body["open_url"] = url_for("machines.open_ide", machine_id=machine.id)
    if machine.state is MachineState.error and machine.error:
        body["error"] = machine.error
    if session is not None and machine.state not in LIVE_STATES:
        newer = session.scalars(
            select(Machine.id)
            .where(
                Machine.owner_id == machine.owner_id,
                Machine.course_id == machine.course_id,
                Machine.id > machine.id,
                Machine.state.in_(LIVE_STATES),
            )
            .order_by(Machine.id.desc())
            .limit(1)
        ).first()
        if newer is not None:
            body["next_url"] = url_for("machines.status_page", machine_id=newer)
    return body


def usual_start_s(session: Session, environment_id: int) -> float | None:
    """How long the environment's recent machines took from request to hand-over (median of
    the last few), or None before there are any."""
    waits = sorted(
        (assigned - created).total_seconds()
        for created, assigned in session.execute(
            select(Machine.created_at, Machine.assigned_at)
            .where(Machine.environment_id == environment_id, Machine.assigned_at.is_not(None))
            .order_by(Machine.id.desc())
            .limit(ESTIMATE_SAMPLE)
        )
    )
    waits = [w for w in waits if 0 <= w <= ESTIMATE_CUTOFF_S]
    return waits[len(waits) // 2] if waits else None


def _launch_of(session: Session, machine: Machine) -> Launch | None:
    """The launch that handed the machine out (None: a teacher's own machine)."""
    return session.scalars(
        select(Launch).where(Launch.machine_id == machine.id).order_by(Launch.id.desc()).limit(1)
    ).first()


@bp.get("/machines/<int:machine_id>")
def status_page(machine_id: int):  # type: ignore[no-untyped-def]
    with runtime().sessions() as session:
        machine = _own_machine(session, machine_id)
        launch = _launch_of(session, machine)
        activity = session.get(Activity, launch.activity_id) if launch is not None else None
        course = session.get(Course, machine.course_id) if machine.course_id else None
        since = launch.at if launch is not None else machine.created_at
        return render_template(
            "status.html",
            machine=machine,
            state=state_of(machine, session),
            activity=activity,
            course=course,
            usual_start_s=usual_start_s(session, machine.environment_id),
            waited_s=max(0.0, (utcnow() - since).total_seconds()),
            viewed=recent_views(session, machine.course_id, machine.owner_id)
            if machine.course_id and machine.owner_id
            else [],
            csrf=csrf_token(),
        )


@bp.post("/machines/<int:machine_id>/again")
def start_again(machine_id: int):  # type: ignore[no-untyped-def]
    """ "Start it again" after an idle stop, a teacher's stop or a failed start, without going
    back to Moodle while the launch's session holds: the same rule as a launch of the
    activity (its environment now; a live machine of the student's is reused). Only for a
    current member of the course."""
    check_csrf()
    rt = runtime()
    with transaction(rt.sessions) as session:
        machine = _own_machine(session, machine_id)
        if machine.state in LIVE_STATES:
            return redirect(url_for("machines.status_page", machine_id=machine.id), 303)
        member = session.scalars(
            select(Enrolment.id).where(
                Enrolment.course_id == machine.course_id,
                Enrolment.user_id == machine.owner_id,
                Enrolment.ended_at.is_(None),
            )
        ).first()
        if machine.course_id is None or member is None:
            raise WebError(
                "You are no longer listed in this course: open the activity from your course page.",
                403,
            )
        launch = _launch_of(session, machine)
        activity = session.get(Activity, launch.activity_id) if launch is not None else None
        environment = (
            environment_of(session, activity.id)
            if activity is not None
            else session.get_one(Environment, machine.environment_id)
        )
        choice = machine_for_learner(
            session,
            environment,
            machine.course_id,
            current_user_id(),
            activity.id if activity is not None else None,
        )
        if launch is not None and activity is not None:
            # Recorded like the launch it repeats (same roles): the new machine is this
            # activity's hand-out too (its page, its next "start again").
            session.add(
                Launch(
                    user_id=launch.user_id,
                    activity_id=activity.id,
                    roles=launch.roles,
                    machine_id=choice.machine.id,
                )
            )
    machine_wanted(rt, choice.machine, choice.how)
    return redirect(url_for("machines.status_page", machine_id=choice.machine.id), 303)


@bp.get("/machines/<int:machine_id>/state")
def machine_state(machine_id: int):  # type: ignore[no-untyped-def]
    with runtime().sessions() as session:
        machine = _own_machine(session, machine_id)
        body = state_of(machine, session)
    # Only once this session is over: a nudge reads the machine's pool in a session of its
    # own, which on SQLite would wait for this one's lock, held by the same request (30 s,
    # then a 500 to every waiting student's page, found by tests/faults).
    _nudge_if_stale(machine)
    response = jsonify(body)
    response.cache_control.no_store = True
    return response


LANDING = {"jupyterlab": "lab", "terminal": "terminals/1", "code-server": ""}


def _still_assigned(machine_id: int, address: str) -> bool:
    with runtime().sessions() as session:
        machine = session.get(Machine, machine_id)
        return bool(
            machine and machine.state is MachineState.assigned and machine.address == address
        )


@bp.get("/machines/<int:machine_id>/open")
def open_ide(machine_id: int):  # type: ignore[no-untyped-def]
    """Hand the owner their IDE. Behind the proxy: publish the machine's route, set the
    cookie that lets this browser (and only to this machine) through, go to `/ide/<id>/`.
    Single-server mode without a proxy: straight to the JupyterLab process, whose token logs
    the browser in once."""
    rt = runtime()
    with rt.sessions() as session, session.begin():
        machine = _own_machine(session, machine_id)
        if machine.state is not MachineState.assigned or not machine.address:
            return redirect(url_for("machines.status_page", machine_id=machine_id), 303)
        machine.last_activity_at = utcnow()
        ide_kind = session.get_one(Environment, machine.environment_id).ide_kind.value
        address, token, owner_id = machine.address, machine.ide_token or "", machine.owner_id
    if not rt.settings.ide_proxy:
        target = f"http://{address}/ide/{machine_id}/{LANDING[ide_kind]}?token={token}"
        response = redirect(target, 303)
    else:
        assert owner_id is not None
        publish_route(rt.redis, machine_id, owner_id, address, token, ide_kind)
        if not _still_assigned(machine_id, address):
            # A stop slipped in between: its withdrawal may have run before this publish.
            withdraw_route(rt.redis, machine_id)
            return redirect(url_for("machines.status_page", machine_id=machine_id), 303)
        response = redirect(f"/ide/{machine_id}/{LANDING[ide_kind]}", 303)
        secure = rt.settings.is_production
        response.set_cookie(
            IDE_COOKIE,
            current_app.extensions["labpool.ide_cookies"].dumps({"u": owner_id, "m": machine_id}),
            max_age=rt.settings.ide_cookie_max_age_s,
            path=f"/ide/{machine_id}/",
            httponly=True,
            secure=secure,
            samesite="None" if secure else "Lax",
            partitioned=secure,
        )
    response.headers["Referrer-Policy"] = "no-referrer"
    response.cache_control.no_store = True
    return response
