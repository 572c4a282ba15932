"""Submissions (issue 11, item 4): a student's "Submit", and the teacher's "collect now" for
the whole class, copy the assignment's folder (named after the assignment) out of the
student's home into an immutable archive on the tool's side.

Storage: `DATA_DIR/submissions/assignment-<id>/user-<id>/v<version>-<sha256[:16]>-<random>.zip`,
folders 0700 and files 0600 owned by the tool. An archive is written under a temporary name
(grading.collect_folder), then hard-linked to its final name, which fails rather than
replace an existing file: a stored version is never overwritten. The row (server timestamp,
sha256 of the archive, file count, what was skipped) is the record; the newest version is the
current one, and every version is kept.

Rules:
- Before the due date a resubmission makes a new current version. After it, the assignment's
  late policy decides: refused (nothing stored) or stored and marked late. The server's
  clock decides, at the moment the copy is stored.
- A folder identical to the current version (same archive checksum) makes no new version:
  a double click, or a collection of a folder the student already submitted, stores nothing.
- One copy at a time per student and assignment (a Redis lock; the unique version number is
  the backstop when Redis is away).
- A teacher's collection ("collect now") is never refused nor marked late: the teacher chose
  the moment; the row says who collected it.

Where the folder is read: a home on this host (local backend, grading.collect_folder), or a
running cloud machine through JupyterLab's contents API (grading.contents_api: the same
limits, the same archive, stored by the same code below). A student's "Submit" on the cloud
is a job (`start_submission`): the web request only enqueues it, and the student's page
follows its progress. A stopped cloud machine's home is a detached volume: it cannot be
collected until the student's next launch, and the teacher is told so per student.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.db import transaction, utcnow
from config.runtime import Runtime, current_runtime
from grading.collect_folder import Collected, FolderError, Limits, NoFolder, collect_folder
from grading.contents_api import CloudHome, cloud_home, collect_from_machine
from grading.models import Assignment, LatePolicy, Submission
from lti_tool.launches import environment_of
from lti_tool.models import Activity, Enrolment
from lti_tool.roles import is_staff
from provisioning.backends import capabilities
from provisioning.backends.base import MachineSpec
from provisioning.backends.local import LocalBackend
from provisioning.queue import enqueue_in_one_trip, job_meta

log = logging.getLogger(__name__)

COLLECT_JOB = "grading.submissions.collect_class_job"
SUBMIT_JOB = "grading.submissions.submit_job"
DEFAULT_LIMITS = Limits()
LOCK_S = 300  # a copy within the limits takes seconds; the lock outlives a crashed one
PROGRESS_TTL_S = 24 * 3600
DIR_MODE = 0o700


class SubmissionRefused(FolderError):
    """Refused by the assignment's rules (the due date has passed); nothing was stored."""


class SubmissionBusy(FolderError):
    """Another copy of the same student's folder is being stored right now."""


class MachineNotRunning(FolderError):
    """A cloud student's home is on a volume no running machine holds: not reachable now."""


@dataclass
class Outcome:
    submission: Submission
    unchanged: bool  # the folder is the current version already: nothing new was stored
    skipped: list[dict[str, str]] = field(default_factory=list)


def submissions_root(data_dir: Path) -> Path:
    return data_dir.resolve() / "submissions"


def stored_path(data_dir: Path, submission: Submission) -> Path:
    return submissions_root(data_dir) / submission.storage_path


def collects_in_worker(session: Session, activity: Activity) -> bool:
    """Is the activity's students' folder read from a cloud machine (then a student's
    "Submit" is a job, not the web request's work)?"""
    return not capabilities(environment_of(session, activity.id).backend).on_host


def student_home(
    rt: Runtime, session: Session, activity: Activity, user_id: int
) -> Path | CloudHome:
    """The student's home: on this host (local backend; it outlives their machines), or
    their running cloud machine's. Raises MachineNotRunning when the cloud machine is not
    running (or not ready: its volume not attached yet)."""
    environment = environment_of(session, activity.id)
    if not capabilities(environment.backend).on_host:
        home = cloud_home(session, activity.course_id, user_id)
        if isinstance(home, CloudHome):
            return home
        if home == "no machine":
            raise MachineNotRunning(
                "Not collected: no machine of this student is running, and their files are "
                "on their volume, which is attached only to a running machine. It can be "
                "collected while they work (or they submit themselves)."
            )
        raise MachineNotRunning(f"Not collected now: {home}; try again in a minute.")
    backend = LocalBackend(rt.settings.data_dir, settings=rt.settings)
    return backend.home_folder(
        MachineSpec(id=0, ide_kind="jupyterlab", owner_id=user_id, course_id=activity.course_id)
    )


def is_late(assignment: Assignment, at: datetime) -> bool:
    return assignment.due_at is not None and at > assignment.due_at


def _refuse_if_late(assignment: Assignment, at: datetime) -> None:
    if is_late(assignment, at) and assignment.late_policy is LatePolicy.refuse:
        due = assignment.due_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")  # type: ignore[union-attr]
        raise SubmissionRefused(
            f"The due date ({due}) has passed and this assignment does "
            "not take late work; nothing was submitted."
        )


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)  # whatever the umask made of it
    return path


def current_submission(session: Session, assignment_id: int, user_id: int) -> Submission | None:
    return session.scalars(
        select(Submission)
        .where(Submission.assignment_id == assignment_id, Submission.user_id == user_id)
        .order_by(Submission.version.desc())
        .limit(1)
    ).first()


def versions_of(session: Session, assignment_id: int, user_id: int) -> list[Submission]:
    """Every version a student has, newest first."""
    return list(
        session.scalars(
            select(Submission)
            .where(Submission.assignment_id == assignment_id, Submission.user_id == user_id)
            .order_by(Submission.version.desc())
        )
    )


def submit_folder(
    rt: Runtime,
    assignment_id: int,
    user_id: int,
    *,
    collected_by: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Outcome:
    """Copy the student's folder of the assignment and store it as their new current version
    (or find it is the current one already). `collected_by`: the teacher collecting it; None
    when the student submits. Raises a FolderError subclass with a message for the person
    asking; then nothing was stored."""
    with rt.sessions() as session:
        assignment = session.get(Assignment, assignment_id)
        if assignment is None:
            raise FolderError("No such assignment.")
        activity = session.get_one(Activity, assignment.activity_id)
        if collected_by is None:
            _refuse_if_late(assignment, utcnow())
        home = student_home(rt, session, activity, user_id)
        folder = assignment.name
    lock = _lock(rt, assignment_id, user_id)
    root = submissions_root(rt.settings.data_dir)
    incoming = _private_dir(root / "incoming") / f"{secrets.token_hex(12)}.zip"
    try:
        if isinstance(home, CloudHome):
            with home.contents() as ide:
                collected = collect_from_machine(ide, folder, incoming, limits)
        else:
            collected = collect_folder(home, folder, incoming, limits)
        outcome = _store(rt, assignment_id, user_id, collected, collected_by)
    finally:
        incoming.unlink(missing_ok=True)
        _unlock(lock)
    if not outcome.unchanged:  # stored and committed: the autograder may take it now
        from grading.autograde import autograde_if_wanted

        autograde_if_wanted(rt, outcome.submission.id)
    return outcome


def _store(
    rt: Runtime, assignment_id: int, user_id: int, collected: Collected, collected_by: int | None
) -> Outcome:
    root = submissions_root(rt.settings.data_dir)
    final: Path | None = None
    try:
        with transaction(rt.sessions) as session:
            assignment = session.get_one(Assignment, assignment_id)
            current = current_submission(session, assignment_id, user_id)
            if current is not None and current.checksum == collected.checksum:
                return Outcome(current, unchanged=True, skipped=collected.skipped)
            now = utcnow()
            if collected_by is None:
                _refuse_if_late(assignment, now)  # the clock when it is stored decides
            version = (current.version if current else 0) + 1
            folder = _private_dir(root / f"assignment-{assignment_id}" / f"user-{user_id}")
            # The random part: ids of deleted rows may come back, their files stay.
            final = folder / f"v{version}-{collected.checksum[:16]}-{secrets.token_hex(4)}.zip"
            try:
                os.link(collected.archive, final)  # never replaces an existing file
            except FileExistsError:
                final = None
                raise SubmissionBusy(
                    "This version is being stored by another request; reload the page."
                ) from None
            row = Submission(
                assignment_id=assignment_id,
                user_id=user_id,
                version=version,
                submitted_at=now,
                checksum=collected.checksum,
                file_count=collected.file_count,
                size_bytes=collected.size_bytes,
                storage_path=str(final.relative_to(root)),
                late=collected_by is None and is_late(assignment, now),
                collected_by=collected_by,
                skipped_json=json.dumps(collected.skipped),
            )
            session.add(row)
            session.flush()
        return Outcome(row, unchanged=False, skipped=collected.skipped)
    except IntegrityError:
        _discard(final)
        raise SubmissionBusy(
            "Another copy of this folder was stored at the same moment; reload the page to see it."
        ) from None
    except BaseException:
        _discard(final)
        raise


def _discard(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _lock(rt: Runtime, assignment_id: int, user_id: int) -> redis.lock.Lock | None:
    """One copy per student and assignment at a time; without Redis, the unique version
    number still keeps two copies from becoming one version."""
    lock = rt.redis.lock(
        f"labpool:submit:{assignment_id}:{user_id}", timeout=LOCK_S, blocking_timeout=0
    )
    try:
        if not lock.acquire(blocking=False):
            raise SubmissionBusy(
                "Your folder is being submitted already (a second click?); "
                "reload the page in a moment."
            )
    except redis.RedisError as exc:
        log.warning("submission lock unavailable, relying on the version number: %s", exc)
        return None
    return lock


def _unlock(lock: redis.lock.Lock | None) -> None:
    if lock is not None:
        with contextlib.suppress(redis.RedisError, redis.exceptions.LockError):
            lock.release()


# ------------------------------------------------------- a student's Submit, as a job (cloud)


def _submission_key(assignment_id: int, user_id: int) -> str:
    return f"labpool:submission:{assignment_id}:{user_id}"


def submission_progress(rt: Runtime, assignment_id: int, user_id: int) -> dict | None:
    """The student's last "Submit" done by a job: {"state": "collecting" | "done" |
    "failed", "text"} (None: none lately, or Redis away)."""
    try:
        raw = rt.redis.get(_submission_key(assignment_id, user_id))
    except redis.RedisError:
        return None
    return json.loads(raw) if raw else None


def _save_submission(rt: Runtime, assignment_id: int, user_id: int, progress: dict) -> None:
    rt.redis.set(_submission_key(assignment_id, user_id), json.dumps(progress), ex=PROGRESS_TTL_S)


def start_submission(rt: Runtime, assignment_id: int, user_id: int) -> bool:
    """Queue the student's "Submit" (their folder is on a cloud machine); False when one is
    already under way. Refuses a late submission at once (the job checks again)."""
    with rt.sessions() as session:
        assignment = session.get(Assignment, assignment_id)
        if assignment is None:
            raise FolderError("No such assignment.")
        _refuse_if_late(assignment, utcnow())
    current = submission_progress(rt, assignment_id, user_id)
    if (
        current is not None
        and current.get("state") == "collecting"
        and time.time() - float(current.get("since", 0)) < LOCK_S  # else its job was lost
    ):
        return False
    _save_submission(
        rt,
        assignment_id,
        user_id,
        {"state": "collecting", "text": "Collecting your folder…", "since": time.time()},
    )
    try:
        enqueue_in_one_trip(
            rt.redis,
            rt.settings.queue_name,
            SUBMIT_JOB,
            assignment_id,
            user_id,
            job_timeout=LOCK_S,
            result_ttl=60,  # as every other job: RQ's default keeps a done job 500 s
            failure_ttl=24 * 3600,
            meta=job_meta(),
        )
    except redis.RedisError:
        raise FolderError("The job queue is not reachable; try again in a minute.") from None
    return True


def submit_job(assignment_id: int, user_id: int) -> dict:
    """RQ job: a student's "Submit" of a folder on their cloud machine."""
    rt = current_runtime()
    try:
        outcome = submit_folder(rt, assignment_id, user_id)
    except FolderError as exc:
        progress = {"state": "failed", "text": str(exc)}
    except Exception as exc:
        log.exception("submission of assignment %s by user %s failed", assignment_id, user_id)
        progress = {"state": "failed", "text": f"Not submitted: {exc.__class__.__name__}."}
    else:
        s = outcome.submission
        when = s.submitted_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        text = (
            f"Nothing changed since version {s.version} (submitted at {when}, "
            f"{s.file_count} files): it stays your submission."
            if outcome.unchanged
            else f"Submitted at {when}, {s.file_count} files (version {s.version})"
            f"{' — late' if s.late else ''}."
        )
        skipped = [f"Not included: {i['path']} ({i['why']})." for i in outcome.skipped]
        progress = {"state": "done", "text": text, "skipped": skipped}
    _save_submission(rt, assignment_id, user_id, progress)
    return progress


# ------------------------------------------------------------------ collect now (teacher)


def _progress_key(assignment_id: int) -> str:
    return f"labpool:collect:{assignment_id}"


def collection_progress(rt: Runtime, assignment_id: int) -> dict | None:
    """The last "collect now" of the assignment, as the job reports it (None: none lately)."""
    raw = rt.redis.get(_progress_key(assignment_id))
    return json.loads(raw) if raw else None


def _save_progress(rt: Runtime, assignment_id: int, progress: dict) -> None:
    rt.redis.set(_progress_key(assignment_id), json.dumps(progress), ex=PROGRESS_TTL_S)


def start_collection(rt: Runtime, assignment_id: int, teacher_id: int) -> bool:
    """Queue a collection of every current student's folder; False if one is already queued
    or running (a second press waits for it)."""
    from provisioning.queue import enqueue

    if not rt.redis.set(f"{_progress_key(assignment_id)}:running", "1", nx=True, ex=1800):
        return False
    _save_progress(
        rt,
        assignment_id,
        {"state": "queued", "teacher_id": teacher_id, "total": 0, "done": 0, "outcomes": {}},
    )
    if not enqueue(rt.redis, rt.settings.queue_name, COLLECT_JOB, assignment_id):
        rt.redis.delete(f"{_progress_key(assignment_id)}:running")
        raise FolderError("The job queue is not reachable; try again in a minute.")
    return True


def current_learners(session: Session, course_id: int) -> list[int]:
    rows = session.execute(
        select(Enrolment.user_id, Enrolment.roles)
        .where(Enrolment.course_id == course_id, Enrolment.ended_at.is_(None))
        .order_by(Enrolment.user_id)
    ).all()
    return [user_id for user_id, roles in rows if not is_staff(roles or [])]


def collect_class(
    rt: Runtime, assignment_id: int, teacher_id: int | None, limits: Limits = DEFAULT_LIMITS
) -> dict:
    """Collect every current student's folder (from their home, whether a machine runs or
    not), reporting progress after each student. Returns the final progress."""
    with rt.sessions() as session:
        assignment = session.get(Assignment, assignment_id)
        if assignment is None:
            return {"state": "failed", "error": "no such assignment"}
        activity = session.get_one(Activity, assignment.activity_id)
        students = current_learners(session, activity.course_id)
    progress: dict = {
        "state": "running",
        "teacher_id": teacher_id,
        "total": len(students),
        "done": 0,
        "outcomes": {},
        "started_at": utcnow().isoformat(),
    }
    _save_progress(rt, assignment_id, progress)
    for user_id in students:
        try:
            outcome = submit_folder(
                rt, assignment_id, user_id, collected_by=teacher_id, limits=limits
            )
            s = outcome.submission
            text = (
                f"unchanged (version {s.version})"
                if outcome.unchanged
                else f"collected: version {s.version}, {s.file_count} files"
            )
            kind = "unchanged" if outcome.unchanged else "collected"
        except NoFolder:
            kind, text = "no_folder", "no folder"
        except MachineNotRunning as exc:
            kind, text = "not_running", str(exc)
        except FolderError as exc:
            kind, text = "refused", str(exc)
        except Exception as exc:  # one student's odd home never stops the class's collection
            log.exception("collecting assignment %s of user %s failed", assignment_id, user_id)
            kind, text = "failed", f"failed: {exc.__class__.__name__}"
        progress["outcomes"][str(user_id)] = {"kind": kind, "text": text}
        progress["done"] += 1
        _save_progress(rt, assignment_id, progress)
    progress["state"] = "done"
    progress["finished_at"] = utcnow().isoformat()
    _save_progress(rt, assignment_id, progress)
    rt.redis.delete(f"{_progress_key(assignment_id)}:running")
    return progress


def collect_class_job(assignment_id: int) -> dict:
    """RQ job: the teacher's "collect now" (the teacher's id travels in the progress)."""
    rt = current_runtime()
    started = collection_progress(rt, assignment_id) or {}
    try:
        return collect_class(rt, assignment_id, started.get("teacher_id"))
    except BaseException:
        rt.redis.delete(f"{_progress_key(assignment_id)}:running")
        _save_progress(rt, assignment_id, {**started, "state": "failed"})
        raise
