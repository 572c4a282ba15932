"""Releasing machines nobody uses: the student's files stay (their home folder, or their
volume on the cloud), the machine is stopped, and the next launch gets one again.

A machine is released when its student left the course (the roster ended the enrolment),
when it has been assigned longer than the environment's `max_session_s`, or when nothing
happened for `idle_timeout_s`: no request through the proxy, no activity the IDE reports
(open connections, kernels or terminals working).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import column, select, table, tuple_

from config.runtime import Runtime, current_runtime
from provisioning.activity import idle_among
from provisioning.jobs import stop_machine_now
from provisioning.models import Environment, Machine, MachineState

log = logging.getLogger(__name__)
enrolments = table("enrolments", column("course_id"), column("user_id"), column("ended_at"))


def machines_to_release(rt: Runtime, now: datetime) -> list[tuple[int, str]]:
    """(machine id, why) for every assigned machine that should be released now."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Machine, Environment)
            .join(Environment, Environment.id == Machine.environment_id)
            .where(Machine.state == MachineState.assigned, Machine.owner_id.is_not(None))
        ).all()
        pairs = [(m.course_id, m.owner_id) for m, _ in rows]
        left = (
            {
                tuple(row)
                for row in session.execute(
                    select(enrolments.c.course_id, enrolments.c.user_id).where(
                        tuple_(enrolments.c.course_id, enrolments.c.user_id).in_(pairs),
                        enrolments.c.ended_at.is_not(None),
                    )
                )
            }
            if pairs
            else set()
        )
    chosen: list[tuple[int, str]] = []
    maybe_idle: list[Machine] = []
    timeouts: dict[int, timedelta] = {}
    for machine, env in rows:
        since = machine.assigned_at or machine.state_changed_at
        if (machine.course_id, machine.owner_id) in left:
            chosen.append((machine.id, "the student is no longer enrolled"))
        elif now - since > timedelta(seconds=env.max_session_s):
            chosen.append((machine.id, "the maximum session length was reached"))
        else:
            maybe_idle.append(machine)
            timeouts[machine.id] = timedelta(seconds=env.idle_timeout_s)
    for machine in idle_among(rt.redis, maybe_idle, now, timeouts):
        minutes = int(timeouts[machine.id].total_seconds()) // 60
        chosen.append((machine.id, f"no activity for {minutes} min"))
    return chosen


def release_idle_machines(rt: Runtime, now: datetime | None = None) -> list[int]:
    """Release what `machines_to_release` names; returns the machine ids."""
    now = now or datetime.now(UTC)
    released = []
    for machine_id, why in machines_to_release(rt, now):
        log.info("releasing machine %s: %s", machine_id, why)
        if stop_machine_now(rt, machine_id, only_if=MachineState.assigned) == "stopped":
            released.append(machine_id)
    return released


def release_idle_job() -> int:
    """RQ cron job (`labpool cron`): release idle machines (their files stay). Here, not in
    `provisioning.jobs`: the idle rules use the jobs' stop, never the other way round."""
    return len(release_idle_machines(current_runtime()))
