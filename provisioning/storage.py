"""Students' persistent storage on the cloud: one Cinder volume per (student, course),
created on first need, attached to whichever machine the student holds (a warm one claimed
later too), and mounted as their home by the image's agent (see cloud_init). Releasing the
machine deletes its server, which detaches the volume; the volume itself is never deleted
here — only an admin's `labpool volumes delete` does that.

Run by the reconciler after it has listed the pool's servers: only machines whose volume is
not attached yet cost cloud calls.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, tuple_, update

from config.db import transaction, utcnow
from config.runtime import Runtime
from provisioning.backends import ServerView, StudentVolumes
from provisioning.errors import ProvisioningError
from provisioning.models import Environment, Machine, MachineState, StudentVolume

log = logging.getLogger(__name__)
PARALLEL_VOLUME_CALLS = 8


def attach_student_volumes(
    rt: Runtime,
    cloud: StudentVolumes,
    env: Environment,
    servers_by_machine: dict[int, list[ServerView]],
) -> int:
    """Give every assigned machine of the environment its student's volume; returns how
    many were attached in this pass."""
    with rt.sessions() as session:
        # Only machines whose volume is not attached to them yet: in the steady state of a
        # big pool this is an empty answer, not thousands of rows.
        machines = session.execute(
            select(Machine.id, Machine.owner_id, Machine.course_id)
            .outerjoin(
                StudentVolume,
                (StudentVolume.owner_id == Machine.owner_id)
                & (StudentVolume.course_id == Machine.course_id),
            )
            .where(
                Machine.environment_id == env.id,
                Machine.state == MachineState.assigned,
                Machine.owner_id.is_not(None),
                Machine.course_id.is_not(None),
                or_(
                    StudentVolume.id.is_(None),
                    StudentVolume.status != "in-use",
                    StudentVolume.machine_id.is_distinct_from(Machine.id),
                ),
            )
        ).all()
        pairs = [(m.owner_id, m.course_id) for m in machines]
        volumes = (
            {
                (v.owner_id, v.course_id): v
                for v in session.scalars(
                    select(StudentVolume).where(
                        tuple_(StudentVolume.owner_id, StudentVolume.course_id).in_(pairs)
                    )
                )
            }
            if pairs
            else {}
        )

    def settle(machine: Any) -> bool:
        machine_id, owner_id, course_id = machine
        volume = volumes.get((owner_id, course_id))
        if volume is not None and volume.machine_id == machine_id and volume.status == "in-use":
            return False
        active = [s for s in servers_by_machine.get(machine_id, []) if s.status == "ACTIVE"]
        if not active:
            return False
        try:
            if volume is None:
                _create(rt, cloud, env, owner_id, course_id)
                return False
            if not volume.volume_id:
                _adopt(rt, cloud, env, volume)
                return False
            return bool(volume.volume_id) and _attach(
                rt, cloud, volume, machine_id, active[0].server_id
            )
        except ProvisioningError as exc:  # the next pass tries again
            log.warning("volume of user %s in course %s: %s", owner_id, course_id, exc)
            return False

    # Cloud calls for many students at once (a class claiming its warm machines).
    with ThreadPoolExecutor(PARALLEL_VOLUME_CALLS) as pool:
        return sum(pool.map(settle, machines))


def _create(
    rt: Runtime, cloud: StudentVolumes, env: Environment, owner_id: int, course_id: int
) -> None:
    with transaction(rt.sessions) as session:
        volume = StudentVolume(
            owner_id=owner_id, course_id=course_id, size_gb=env.volume_size_gb, status="creating"
        )
        session.add(volume)
        session.flush()
        row_id = volume.id
    volume_id = cloud.create_volume(
        volume_name(owner_id, course_id),
        env.volume_size_gb,
        {"labpool_owner": str(owner_id), "labpool_course": str(course_id)},
    )
    with transaction(rt.sessions) as session:
        session.get_one(StudentVolume, row_id).volume_id = volume_id


def volume_name(owner_id: int, course_id: int) -> str:
    return f"labpool-home-u{owner_id}-c{course_id}"


# A volume row without the cloud's id whose volume the cloud does not show after this long:
# its create never happened (the worker died first), so it is created again.
CREATE_GRACE = timedelta(seconds=60)


def _adopt(rt: Runtime, cloud: StudentVolumes, env: Environment, volume: StudentVolume) -> None:
    """A row left without the cloud's id (the worker creating it was killed, or the answer
    was lost): take the volume the cloud made under its name, never a second one; or create
    it, once the create can no longer be in flight."""
    volume_id = cloud.find_volume(volume_name(volume.owner_id, volume.course_id))
    if volume_id is None:
        if utcnow() - volume.created_at < CREATE_GRACE:
            return
        volume_id = cloud.create_volume(
            volume_name(volume.owner_id, volume.course_id),
            env.volume_size_gb,
            {"labpool_owner": str(volume.owner_id), "labpool_course": str(volume.course_id)},
        )
    with transaction(rt.sessions) as session:
        row = session.get_one(StudentVolume, volume.id)
        if row.volume_id is None:
            row.volume_id = volume_id


def _attach(
    rt: Runtime, cloud: StudentVolumes, volume: StudentVolume, machine_id: int, server_id: str
) -> bool:
    assert volume.volume_id is not None
    status = cloud.volume_status(volume.volume_id)
    if status == "in-use" and server_id in cloud.volume_servers(volume.volume_id):
        pass  # attached by a worker killed before it recorded it: record it now
    elif status != "available":  # still creating, or still on the student's previous server
        if status in ("error", "gone"):
            with transaction(rt.sessions) as session:
                row = session.get_one(StudentVolume, volume.id)
                row.status, row.error = "error", f"the cloud reports the volume {status}"
        return False
    else:
        cloud.attach_volume(server_id, volume.volume_id)
    with transaction(rt.sessions) as session:
        row = session.get_one(StudentVolume, volume.id)
        row.status, row.machine_id, row.error = "in-use", machine_id, None
    return True


def volumes_released(session: Any, machine_ids: list[int]) -> None:
    """The machines' servers are gone, and with them the attachments (Nova detaches a
    deleted server's volumes): the volumes are kept, free for the student's next machine."""
    if machine_ids:
        session.execute(
            update(StudentVolume)
            .where(StudentVolume.machine_id.in_(machine_ids), StudentVolume.status == "in-use")
            .values(status="available")
        )
