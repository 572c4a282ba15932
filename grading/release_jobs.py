"""Releasing published assignments into students' homes (issue 11, item 3), from RQ jobs.

Two triggers, one rule (grading.release: nbgitpuller's), two transports: a home on this host
(local backend: as the home's owner, never following a symlink), or a cloud machine's home
through JupyterLab's contents API (grading.contents_api), never from the web process.
- a student's launch of the activity: the launch only enqueues `release_on_launch` (after its
  transaction, when the activity has a published assignment), so the launch answers as fast
  as before. On the local backend the job runs in the worker after the start job the launch
  enqueued first, and waits (bounded by the machine start timeout) until the machine is
  handed over: the home then exists and belongs to the student's OS user. On the cloud the
  machine is handed over by reconciler passes that run in the same worker, so the job does
  not wait there: while the machine boots, its volume is not attached yet or its IDE does
  not answer, the job puts itself back at the end of the queue (checking again at most
  every `CLOUD_RECHECK_S`, until the cloud start timeout). JupyterLab shows the folder when
  its file browser next refreshes.
- the teacher's "release to class": every current learner of the course whose home exists
  (local: it outlives their machine; cloud: their machine runs, with their volume); the
  others get it at their next launch (a stopped cloud machine's home is a detached volume).

What each student received (version, and the checksum of each placed file, which decides
next time whether a file is untouched) is an `AssignmentRelease` row, on the tool's side.
One release at a time per (assignment, student) (a Redis lock): a launch and a class release
racing never read the same old manifest.

A cloud machine's volume is mounted by the machine a moment after the cloud reports it
attached; a release in that moment would land under the mount, unseen (the next launch's
release adds the files again, as they are missing). Not closed: the tool cannot see the mount.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis
from rq import Queue
from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from config.db import transaction, utcnow
from config.runtime import Runtime, current_runtime
from grading.assignment_files import read_folder
from grading.contents_api import CloudHome, ContentsError, cloud_home, release_to_machine
from grading.models import Assignment, AssignmentRelease
from grading.release import ReleaseError, ReleaseReport, release_files
from lti_tool.launches import RELEASE_OWED_SQL, default_environment
from lti_tool.models import Activity, Enrolment
from lti_tool.roles import is_staff
from provisioning.backends.base import MachineSpec
from provisioning.models import Environment, Machine, MachineState
from provisioning.queue import enqueue_in_one_trip, job_meta

log = logging.getLogger(__name__)
RELEASE_ON_LAUNCH_JOB = "grading.release_jobs.release_on_launch"
RELEASE_TO_CLASS_JOB = "grading.release_jobs.release_to_class"
SETTLE_POLL_S = 0.25
CLOUD_RECHECK_S = 2.0
LOCK_S = 120


def enqueue_release(rt: Runtime, func: str, *args: int | float) -> bool:
    """False (and a log line) when Redis is unreachable."""
    try:
        enqueue_in_one_trip(
            rt.redis,
            rt.settings.queue_name,
            func,
            *args,
            job_timeout=900,
            result_ttl=60,
            failure_ttl=24 * 3600,
            meta=job_meta(),
        )
        return True
    except redis.RedisError as exc:
        log.warning("could not enqueue %s%s: %s", func, args, exc)
        return False


def delivered_assignments(session: Session, activity: Activity) -> list[Assignment]:
    """The published assignments a launch of the activity releases: its own, and the one a
    deep link attached to it."""
    wanted = [Assignment.activity_id == activity.id]
    if activity.assignment_id is not None:
        wanted.append(Assignment.id == activity.assignment_id)
    return list(
        session.scalars(
            select(Assignment)
            .where(
                or_(*wanted),
                Assignment.published_at.is_not(None),
                Assignment.release_path.is_not(None),
            )
            .order_by(Assignment.id)
        )
    )


_RELEASE_OWED = text(f"SELECT {RELEASE_OWED_SQL}")


def release_owed(session: Session, activity_id: int) -> bool:
    """Whether a launch of the activity has published assignments to release (one query; a
    launch has the answer from its own INSERT, `LaunchOutcome.release_owed`)."""
    return bool(session.scalar(_RELEASE_OWED, {"activity_id": activity_id}))


def release_after_launch(rt: Runtime, activity_id: int, user_id: int) -> bool:
    """Enqueue the release to a student who launched the activity, if there is one."""
    with rt.sessions() as session:
        if not release_owed(session, activity_id):
            return False
    return enqueue_release(rt, RELEASE_ON_LAUNCH_JOB, activity_id, user_id)


def local_home(rt: Runtime, session: Session, activity: Activity, user_id: int) -> Path | None:
    """The student's home for this activity's course on the local backend (None for another
    backend)."""
    from provisioning.backends import capabilities
    from provisioning.backends.local import LocalBackend

    environment = (
        session.get(Environment, activity.environment_id)
        if activity.environment_id
        else default_environment(session)
    )
    # Homes on this host only: other backends keep students' files on their own volumes.
    if environment is None or not capabilities(environment.backend).on_host:
        return None
    # Only the home's place is wanted: no `for_environment` (it reads the platforms, in a
    # second session, which SQLite's single writer would make wait on this one).
    backend = LocalBackend(rt.settings.data_dir, settings=rt.settings)
    return backend.home_folder(
        MachineSpec(
            id=0,
            ide_kind=environment.ide_kind.value,
            owner_id=user_id,
            course_id=activity.course_id,
        )
    )


def _summary(report: ReleaseReport) -> str:
    parts = [
        (len(report.added), "added"),
        (len(report.updated), "updated"),
        (len(report.unchanged), "unchanged"),
        (len(report.kept), "kept as the student changed them"),
        (len(report.refused), "refused: a link or special file is in the way"),
    ]
    return ", ".join(f"{n} {what}" for n, what in parts if n) or "no files"


def release_to_student(
    rt: Runtime,
    assignment_id: int,
    user_id: int,
    home: Path | CloudHome,
    read: dict[Path, dict[str, bytes]] | None = None,
) -> str | None:
    """Place the assignment's current student version in `home/<assignment name>` (a home on
    this host, or a cloud machine's); returns the summary (None when the assignment is not
    published). `read`: release folders already read (a class release reads each once)."""
    lock = rt.redis.lock(
        f"labpool:release:{assignment_id}:{user_id}", timeout=LOCK_S, blocking_timeout=LOCK_S
    )
    with lock:
        with rt.sessions() as session:
            assignment = session.get(Assignment, assignment_id)
            if assignment is None or not assignment.published or not assignment.release_path:
                return None
            name, release_path = assignment.name, Path(assignment.release_path)
            record = session.scalars(
                select(AssignmentRelease).where(
                    AssignmentRelease.assignment_id == assignment_id,
                    AssignmentRelease.user_id == user_id,
                )
            ).first()
            previous = dict(record.manifest) if record else {}
        read = {} if read is None else read
        if release_path not in read:
            read[release_path] = read_folder(release_path)
        files = read[release_path]
        try:
            if isinstance(home, CloudHome):
                with home.contents() as ide:
                    report = release_to_machine(ide, name, files, previous)
            else:
                report = release_files(home, name, files, previous)
            manifest, summary, version = report.manifest, _summary(report), release_path.name
        except (ReleaseError, OSError, ContentsError) as exc:
            log.warning(
                "release of assignment %s to user %s failed: %s", assignment_id, user_id, exc
            )
            manifest, summary, version = previous, f"not placed: {exc}", None
        with transaction(rt.sessions) as session:
            record = session.scalars(
                select(AssignmentRelease).where(
                    AssignmentRelease.assignment_id == assignment_id,
                    AssignmentRelease.user_id == user_id,
                )
            ).first()
            if record is None:
                record = AssignmentRelease(
                    assignment_id=assignment_id, user_id=user_id, version=version or ""
                )
                session.add(record)
            if version is not None:
                record.version = version
                record.released_at = utcnow()
            record.manifest = manifest
            record.summary = summary
        return summary


def _settled_machine(rt: Runtime, course_id: int, user_id: int) -> Machine | None:
    """Wait until the student's machine in the course is handed over (or is gone/failed)."""
    deadline = time.monotonic() + rt.settings.machine_start_timeout_s
    while True:
        with rt.sessions() as session:
            machine = session.scalars(
                select(Machine)
                .where(
                    Machine.owner_id == user_id,
                    Machine.course_id == course_id,
                    Machine.state.in_(
                        [
                            MachineState.requested,
                            MachineState.starting,
                            MachineState.ready,
                            MachineState.assigned,
                        ]
                    ),
                )
                .order_by(Machine.id.desc())
            ).first()
            if machine is None or machine.state is MachineState.assigned:
                return machine
        if time.monotonic() >= deadline:
            return None
        time.sleep(SETTLE_POLL_S)


def release_on_launch(activity_id: int, user_id: int, deadline: float | None = None) -> str:
    """RQ job: after a student's launch, their machine settled, place the activity's
    published assignments in their home. `deadline` (epoch seconds): how long a cloud
    machine is waited for (set by the first run; see the module's docstring)."""
    rt = current_runtime()
    with rt.sessions() as session:
        activity = session.get(Activity, activity_id)
        if activity is None:
            return "gone"
        course_id = activity.course_id
        assignments = [a.id for a in delivered_assignments(session, activity)]
        home = local_home(rt, session, activity, user_id)
        cloud = None if home is not None else cloud_home(session, course_id, user_id)
    if not assignments:
        return "nothing published"
    if home is None:
        return _release_to_cloud(rt, activity_id, user_id, assignments, cloud, deadline)
    machine = _settled_machine(rt, course_id, user_id)
    if machine is None or not home.is_dir():
        return "no machine handed over"
    return "; ".join(f"{a}: {release_to_student(rt, a, user_id, home)}" for a in assignments)


def _release_to_cloud(
    rt: Runtime,
    activity_id: int,
    user_id: int,
    assignments: list[int],
    cloud: CloudHome | str | None,
    deadline: float | None,
) -> str:
    """The cloud half of `release_on_launch`: release now if the student's home is ready,
    else check again later from the end of the queue (never waiting in the worker)."""
    if deadline is None:
        deadline = time.time() + rt.settings.cloud_start_timeout_s
    if isinstance(cloud, CloudHome) and cloud.answers():
        return "; ".join(f"{a}: {release_to_student(rt, a, user_id, cloud)}" for a in assignments)
    why = cloud if isinstance(cloud, str) else "the IDE does not answer yet"
    if why == "no machine" or "not built" in why or time.time() >= deadline:
        log.info("release to user %s not placed: %s", user_id, why)
        return f"not placed: {why}"
    _check_again_later(rt)
    enqueue_release(rt, RELEASE_ON_LAUNCH_JOB, activity_id, user_id, deadline)
    return f"waiting: {why}"


def _check_again_later(rt: Runtime) -> None:
    """Pace a waiting release: other jobs queued (a reconciler pass, other students'
    releases) run first anyway, and with nothing else to do the worker pauses a moment
    rather than spin."""
    try:
        queued = Queue(rt.settings.queue_name, connection=rt.redis).count
    except redis.RedisError:
        queued = 0
    time.sleep(CLOUD_RECHECK_S / (1 + queued))


def class_learners(session: Session, course_id: int) -> list[int]:
    rows = session.execute(
        select(Enrolment.user_id, Enrolment.roles).where(
            Enrolment.course_id == course_id, Enrolment.ended_at.is_(None)
        )
    ).all()
    return [user_id for user_id, roles in rows if not is_staff(roles or [])]


def release_to_class(assignment_id: int) -> str:
    """RQ job: the teacher's "release to class": every learner of the course who has a home
    (on the cloud: a running machine with their volume); the others get it at their next
    launch."""
    rt = current_runtime()
    with rt.sessions() as session:
        assignment = session.get(Assignment, assignment_id)
        if assignment is None or not assignment.published or not assignment.release_path:
            return "not published"
        activity = session.get_one(Activity, assignment.activity_id)
        homes: dict[int, Path | CloudHome | str | None] = {}
        for user_id in class_learners(session, activity.course_id):
            home = local_home(rt, session, activity, user_id)
            homes[user_id] = (
                home if home is not None else cloud_home(session, activity.course_id, user_id)
            )
    read: dict[Path, dict[str, bytes]] = {}
    placed = 0
    for user_id, where in homes.items():
        if isinstance(where, Path) and not where.is_dir():
            continue
        if isinstance(where, CloudHome) and not where.answers():
            continue
        if not isinstance(where, (Path, CloudHome)):
            continue  # a cloud student without a running machine: at their next launch
        if release_to_student(rt, assignment_id, user_id, where, read) is not None:
            placed += 1
    return f"placed in {placed} of {len(homes)} homes"
