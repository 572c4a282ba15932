"""Releasing machines nobody uses: the student's files stay (their home folder, or their
volume on the cloud), the machine is stopped, and the next launch gets one again.

A machine is released when its student left the course (the roster ended the enrolment),
when it has been assigned longer than the environment's `max_session_s`, or when nothing
happened for `idle_timeout_s`: no request through the proxy, no activity the IDE reports
(open connections, kernels or terminals working).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import requests
from sqlalchemy import column, select, table, tuple_

from config.runtime import Runtime
from provisioning.models import Environment, Machine, MachineState
from provisioning.routes import last_activity

log = logging.getLogger(__name__)
enrolments = table("enrolments", column("course_id"), column("user_id"), column("ended_at"))


def ide_activity(address: str | None, machine_id: int, token: str | None) -> datetime | None:
    """When the IDE last saw its user (Jupyter's /api/status); now if a browser is connected."""
    if not address or not token:
        return None
    try:
        resp = requests.get(f"http://{address}/ide/{machine_id}/api/status",
                            headers={"Authorization": f"token {token}"}, timeout=2)
        status = resp.json() if resp.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return None
    if status.get("connections"):
        return datetime.now().astimezone()
    try:
        return datetime.fromisoformat(str(status.get("last_activity")).replace("Z", "+00:00"))
    except ValueError:
        return None


def machines_to_release(rt: Runtime, now: datetime) -> list[tuple[int, str]]:
    """(machine id, why) for every assigned machine that should be released now."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Machine, Environment)
            .join(Environment, Environment.id == Machine.environment_id)
            .where(Machine.state == MachineState.assigned, Machine.owner_id.is_not(None))
        ).all()
        pairs = [(m.course_id, m.owner_id) for m, _ in rows]
        left = {tuple(row) for row in session.execute(
            select(enrolments.c.course_id, enrolments.c.user_id)
            .where(tuple_(enrolments.c.course_id, enrolments.c.user_id).in_(pairs),
                   enrolments.c.ended_at.is_not(None))
        )} if pairs else set()
    chosen: list[tuple[int, str]] = []
    for machine, env in rows:
        since = machine.assigned_at or machine.state_changed_at
        if (machine.course_id, machine.owner_id) in left:
            chosen.append((machine.id, "the student is no longer enrolled"))
            continue
        if now - since > timedelta(seconds=env.max_session_s):
            chosen.append((machine.id, "the maximum session length was reached"))
            continue
        idle_for = timedelta(seconds=env.idle_timeout_s)
        seen = [t for t in (since, machine.last_activity_at) if t is not None]
        proxied = last_activity(rt.redis, machine.id)
        if proxied:
            seen.append(datetime.fromtimestamp(proxied).astimezone())
        if now - max(seen) <= idle_for:
            continue
        # The cheap signals say idle: ask the IDE before taking it away.
        reported = ide_activity(machine.address, machine.id, machine.ide_token)
        if reported is not None and now - reported <= idle_for:
            continue
        chosen.append((machine.id, f"no activity for {env.idle_timeout_s // 60} min"))
    return chosen


def release_idle_machines(rt: Runtime, now: datetime | None = None) -> list[int]:
    """Release what `machines_to_release` names; returns the machine ids."""
    from provisioning.jobs import stop_machine_now

    now = now or datetime.now().astimezone()
    released = []
    for machine_id, why in machines_to_release(rt, now):
        log.info("releasing machine %s: %s", machine_id, why)
        if stop_machine_now(rt, machine_id, only_if=MachineState.assigned) == "stopped":
            released.append(machine_id)
    return released
