"""Autograding submissions with nbgrader's rules, student code in a sandbox (issue 12).

A submitted version owes an autograde when its assignment grades on submit (one call from
grading.submissions after the version is stored) or when the teacher asks ("grade all",
"regrade" one student). The database remembers what is owed — one `AutogradeResult` row per
submission id, unique — and RQ jobs on their own queue (`<QUEUE_NAME>-grading`, run by
`labpool worker --queue grading`) are only triggers: `requeue_owed_autogrades` (in
`labpool cron`) enqueues again rows whose job was lost or whose worker was killed.

One job: claim the row (queued, or running past its lease) → for each nbgrader notebook of
the assignment, build the notebook to execute on the tool's side (grading.autograde_notebook),
execute it in the sandbox (grading.grader_sandbox), score what comes back → store the cells,
the total, the feedback page, the summary → record the grade.

**Which grade wins.** The autograde becomes the student's grade (grading.grades.record_grade,
source `auto`, comment = the summary; the outbox sends it) unless the teacher entered a
manual grade after this version was submitted: a manual grade entered after the submission
wins, and the result is kept for the teacher to see. A re-run of the same version that gives
the same score and summary writes no new grade and owes no new score (nothing is counted or
sent twice). The grade is the assignment's maximum scaled by the share of autograded points.

Submission time is the server's (`Submission.submitted_at`); nothing in the submitted files
(notebook metadata, a `timestamp.txt`) is read for it.
"""

from __future__ import annotations

import logging
import zipfile
from datetime import timedelta
from pathlib import Path, PurePosixPath

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.db import transaction, utcnow
from config.runtime import Runtime, current_runtime
from grading import autograde_feedback, autograde_notebook
from grading.assignment_files import read_folder
from grading.grader_sandbox import GradingLimits, SandboxUnavailable, execute
from grading.grades import record_grade
from grading.models import (
    Assignment,
    AutogradeResult,
    AutogradeState,
    Grade,
    GradeSource,
    Submission,
)
from grading.publish import nbgrader_notebooks
from grading.submissions import stored_path

log = logging.getLogger(__name__)

GRADE_JOB = "grading.autograde.grade_submission_job"
REQUEUE_INTERVAL_S = 60
LEASE = timedelta(minutes=5)  # a running job older than this was lost
REQUEUE_AFTER = timedelta(minutes=2)  # a queued row not taken by then lost its job
MAX_ATTEMPTS = 3
MAX_SUBMISSION_BYTES = 50 * 1024 * 1024
DEFAULT_LIMITS = GradingLimits()


class AutogradeRefused(ValueError):
    """The teacher's request cannot be done (not autogradable); nothing was changed."""


def grading_queue(rt: Runtime) -> str:
    return f"{rt.settings.queue_name}-grading"


def _enqueue(rt: Runtime, result_id: int) -> bool:
    from provisioning.queue import enqueue

    return enqueue(rt.redis, grading_queue(rt), GRADE_JOB, result_id)


def is_autogradable(assignment: Assignment) -> bool:
    return bool(assignment.published and assignment.source_path and assignment.release_path)


def owe_autograde(session: Session, submission: Submission) -> AutogradeResult:
    """Mark the version as owed a (re)grade, in the caller's transaction."""
    row = session.scalars(
        select(AutogradeResult).where(AutogradeResult.submission_id == submission.id)
    ).first()
    if row is None:
        row = AutogradeResult(
            submission_id=submission.id,
            assignment_id=submission.assignment_id,
            user_id=submission.user_id,
            cells=[],
        )
        session.add(row)
    row.state, row.attempts, row.queued_at, row.error = AutogradeState.queued, 0, utcnow(), None
    session.flush()
    return row


def autograde_if_wanted(rt: Runtime, submission_id: int) -> bool:
    """The submission hook: queue the new version if its assignment grades on submit."""
    try:
        with transaction(rt.sessions) as session:
            submission = session.get_one(Submission, submission_id)
            assignment = session.get_one(Assignment, submission.assignment_id)
            if not (assignment.auto_grade_on_submit and is_autogradable(assignment)):
                return False
            row_id = owe_autograde(session, submission).id
    except IntegrityError:  # the same version queued at the same moment: that one goes
        return False
    _enqueue(rt, row_id)
    return True


def request_autograde(rt: Runtime, assignment_id: int, user_id: int | None) -> int:
    """The teacher's "grade all" (user_id None) or "regrade" of one student's current
    version; returns how many versions were queued."""
    with transaction(rt.sessions) as session:
        assignment = session.get_one(Assignment, assignment_id)
        if not is_autogradable(assignment):
            raise AutogradeRefused(
                "Only a published assignment made from nbgrader notebooks can be autograded."
            )
        newest: dict[int, Submission] = {}
        query = select(Submission).where(Submission.assignment_id == assignment_id)
        if user_id is not None:
            query = query.where(Submission.user_id == user_id)
        for s in session.scalars(query.order_by(Submission.version)):
            newest[s.user_id] = s
        if user_id is not None and not newest:
            raise AutogradeRefused("This student has not submitted anything.")
        ids = [owe_autograde(session, s).id for s in newest.values()]
    for row_id in ids:
        _enqueue(rt, row_id)
    return len(ids)


def _claim(rt: Runtime, result_id: int) -> bool:
    now = utcnow()
    with transaction(rt.sessions) as session:
        taken = session.execute(
            update(AutogradeResult)
            .where(
                AutogradeResult.id == result_id,
                or_(
                    AutogradeResult.state == AutogradeState.queued,
                    (AutogradeResult.state == AutogradeState.running)
                    & (AutogradeResult.started_at < now - LEASE),
                ),
            )
            .values(
                state=AutogradeState.running,
                started_at=now,
                attempts=AutogradeResult.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        return taken.rowcount == 1


def _submitted_files(path: Path) -> dict[str, bytes]:
    """The stored zip's files, read with a bound (the zip is ours, written at submission)."""
    files: dict[str, bytes] = {}
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir() or name.is_absolute() or ".." in name.parts:
                continue
            with archive.open(info) as entry:
                content = entry.read(MAX_SUBMISSION_BYTES - total + 1)
            total += len(content)
            if total > MAX_SUBMISSION_BYTES:
                raise ValueError("the submission is larger than the autograder takes")
            files[str(name)] = content
    return files


def grade_submission(
    rt: Runtime, result_id: int, limits: GradingLimits = DEFAULT_LIMITS
) -> AutogradeState | None:
    """Grade one owed version (None: another job has it, or it is graded already)."""
    if not _claim(rt, result_id):
        return None
    with rt.sessions() as session:
        row = session.get_one(AutogradeResult, result_id)
        submission = session.get_one(Submission, row.submission_id)
        assignment = session.get_one(Assignment, row.assignment_id)
        title = assignment.title or assignment.name
        source_path, release_path = (
            Path(assignment.source_path or ""),
            Path(assignment.release_path or ""),
        )
        archive = stored_path(rt.settings.data_dir, submission)
    try:
        outcome = _run(rt, title, source_path, release_path, archive, limits)
    except (autograde_notebook.NotGradable, SandboxUnavailable, OSError, ValueError) as exc:
        log.warning("autograde %s could not run: %s", result_id, exc)
        with transaction(rt.sessions) as session:
            row = session.get_one(AutogradeResult, result_id)
            row.state, row.error, row.finished_at = AutogradeState.failed, str(exc)[:1000], utcnow()
        return AutogradeState.failed
    scores, total_points, max_points, summary, html, seconds = outcome
    with transaction(rt.sessions) as session:
        row = session.get_one(AutogradeResult, result_id)
        assignment = session.get_one(Assignment, row.assignment_id)
        submission = session.get_one(Submission, row.submission_id)
        grade_score = round(assignment.max_score * total_points / max_points, 4)
        row.cells = [s.as_dict() for s in scores]
        row.score, row.max_score = grade_score, assignment.max_score
        row.summary, row.feedback_html, row.error = summary, html, None
        row.state, row.finished_at, row.seconds = AutogradeState.done, utcnow(), seconds
        _record(session, assignment, submission, grade_score, summary)
    return AutogradeState.done


def _record(
    session: Session,
    assignment: Assignment,
    submission: Submission,
    score: float,
    summary: str,
) -> None:
    current = session.scalars(
        select(Grade).where(
            Grade.assignment_id == assignment.id, Grade.user_id == submission.user_id
        )
    ).first()
    if (
        current is not None
        and current.source is GradeSource.manual
        and current.graded_at >= submission.submitted_at
    ):
        return  # the teacher graded this version by hand: theirs wins
    if (
        current is not None
        and current.source is GradeSource.auto
        and current.score == score
        and current.comment == summary.strip()
    ):
        return  # the same grade again: nothing new to count or send
    record_grade(session, assignment, submission.user_id, score, summary, source=GradeSource.auto)


def _run(
    rt: Runtime,
    title: str,
    source_path: Path,
    release_path: Path,
    archive: Path,
    limits: GradingLimits,
):  # type: ignore[no-untyped-def]
    source = read_folder(source_path)
    release = read_folder(release_path)
    notebooks = nbgrader_notebooks(source)
    if not notebooks:
        raise autograde_notebook.NotGradable("the assignment has no nbgrader notebooks")
    submitted = _submitted_files(archive)
    # The working folder: the assignment's released data files, then the student's files;
    # never a notebook being graded (those go to the executor on stdin only).
    workfiles = {p: c for p, c in release.items() if p not in notebooks}
    workfiles.update({p: c for p, c in submitted.items() if p not in notebooks})
    ide_python = rt.settings.ide_env_dir / "bin" / "python"
    scores: list[autograde_notebook.CellScore] = []
    notes: list[str] = []
    pages: list[tuple] = []
    seconds = 0.0
    for name in notebooks:
        prepared = autograde_notebook.prepare(source[name], release[name], submitted.get(name))
        ran = execute(_nbformat_text(prepared.notebook), workfiles, ide_python, limits)
        seconds += ran.seconds
        scored = autograde_notebook.score(prepared, ran.notebook, ran.problem)
        scores += scored
        notes += prepared.notes
        if ran.problem:
            notes.append(f"{name}: {ran.problem}; tests that did not run score 0.")
        if prepared.tampering:
            notes.append(
                f"{name}: the code uses {', '.join(prepared.tampering)}, which can change what "
                "the tests see; the teacher may check it by hand."
            )
        pages.append((name, prepared, _cells(ran.notebook)))
    total = sum(s.score for s in scores)
    maximum = sum(s.max_score for s in scores)
    if maximum <= 0:
        raise autograde_notebook.NotGradable("the tests are worth no points")
    summary = autograde_feedback.summary(scores, total, maximum, notes)
    html = autograde_feedback.page(
        title,
        pages[0][1] if len(pages) == 1 else None,
        pages[0][2] if pages else None,
        scores,
        total,
        maximum,
        notes,
    )
    return scores, total, maximum, summary, html, seconds


def _nbformat_text(notebook) -> str:  # type: ignore[no-untyped-def]
    import nbformat

    return nbformat.writes(notebook)


def _cells(text: str | None) -> list | None:
    if text is None:
        return None
    try:
        return autograde_notebook._read(text, "the executed notebook").cells
    except Exception:  # noqa: BLE001 - shown as "no output"
        return None


def requeue_owed_autogrades(rt: Runtime) -> int:
    """The periodic pass: enqueue again every owed version whose job is gone (queued and not
    taken for a while, or running past its lease); after MAX_ATTEMPTS it is marked failed
    (a submission that kills its worker each time is not retried for ever)."""
    now = utcnow()
    with transaction(rt.sessions) as session:
        stale = list(
            session.scalars(
                select(AutogradeResult).where(
                    or_(
                        (AutogradeResult.state == AutogradeState.queued)
                        & (AutogradeResult.queued_at < now - REQUEUE_AFTER),
                        (AutogradeResult.state == AutogradeState.running)
                        & (AutogradeResult.started_at < now - LEASE),
                    )
                )
            )
        )
        again = []
        for row in stale:
            if row.attempts >= MAX_ATTEMPTS:
                row.state, row.error = AutogradeState.failed, "the grading job died every time"
            else:
                row.queued_at = now
                again.append(row.id)
    for row_id in again:
        _enqueue(rt, row_id)
    return len(again)


def grade_submission_job(result_id: int) -> str:
    """RQ job on the grading queue."""
    rt = current_runtime()
    state = grade_submission(rt, result_id)
    _send_owed(rt, result_id)
    return str(state)


def _send_owed(rt: Runtime, result_id: int) -> None:
    """Send the newest owed score of the result's student right away (the outbox's due pass
    would otherwise send it within a minute)."""
    from grading.models import ScoreOutbox, ScoreStatus
    from grading.outbox import SEND_JOB
    from provisioning.queue import enqueue

    with rt.sessions() as session:
        row = session.get(AutogradeResult, result_id)
        if row is None:
            return
        owed = session.scalars(
            select(ScoreOutbox.id).where(
                ScoreOutbox.assignment_id == row.assignment_id,
                ScoreOutbox.user_id == row.user_id,
                ScoreOutbox.status == ScoreStatus.pending,
            )
        ).all()
    for outbox_id in owed:
        enqueue(rt.redis, rt.settings.queue_name, SEND_JOB, outbox_id)


def requeue_owed_autogrades_job() -> int:
    """RQ cron job: the periodic pass."""
    return requeue_owed_autogrades(current_runtime())


def result_for(session: Session, submission_id: int) -> AutogradeResult | None:
    return session.scalars(
        select(AutogradeResult).where(AutogradeResult.submission_id == submission_id)
    ).first()
