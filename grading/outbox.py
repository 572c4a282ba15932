"""Sending the scores the outbox owes (grading.models.ScoreOutbox) with LTI AGS.

The database, not the queue, remembers what is owed: an RQ job sends a row right after the
grade is saved, and `send_due_scores` (in `labpool cron`) sends every row whose time has
come, so a lost job, a dead worker or a Redis restart only delays a score.

One send, in three steps:
1. **Claim** (a short transaction, the student's grade row locked): skip a row that is not
   pending or not due; supersede it if a newer row exists for the same student and
   assignment (only the newest grade is ever sent); pick its timestamp — whole seconds,
   strictly newer than any timestamp claimed before for the same (line item, platform
   user) — and lease it (due again after LEASE if this worker dies).
2. **POST** the score, outside any transaction.
3. **Record** the outcome: sent; or, for 5xx / 429 / no answer, due again after a backoff
   (for RETRY_FOR, then failed); other 4xx failed with the platform's message for the
   teacher. A 409 (Moodle: the timestamp is not newer than its grade's) is claimed again
   with a newer timestamp and sent once more, once: never a loop.

A crash between the POST and step 3 leaves the row pending with its claimed timestamp; if a
newer grade came meanwhile, that one was claimed with a later timestamp and this one is
superseded when it comes due: a stale grade never goes out over a newer one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from config.db import transaction, utcnow
from config.runtime import Runtime, current_runtime
from grading.lineitems import LineItemMissing, resolve_lineitem
from grading.models import Assignment, Grade, ScoreOutbox, ScoreStatus
from lti_tool import metrics
from lti_tool.models import Activity, Platform
from lti_tool.services.ags import AgsClient, AgsError, Score
from lti_tool.services.connector import CachedTokenConnector, connector_for

log = logging.getLogger(__name__)

SEND_JOB = "grading.outbox.send_score_job"
LEASE = timedelta(minutes=2)
RETRY_FOR = timedelta(hours=26)  # at least a day of a platform being down
FIRST_BACKOFF = timedelta(seconds=30)
MAX_BACKOFF = timedelta(hours=1)
DUE_PASS_INTERVAL_S = 60
DUE_PASS_BUDGET_S = 45.0  # a pass stops taking new rows after this; the next one goes on
DUE_PASS_BATCH = 500


def backoff(attempts: int) -> timedelta:
    """30 s, 1 min, 2 min, … capped at an hour: about 30 tries in RETRY_FOR."""
    return min(FIRST_BACKOFF * (2 ** max(attempts - 1, 0)), MAX_BACKOFF)


def whole_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


@dataclass(frozen=True)
class Claim:
    row_id: int
    timestamp: datetime
    lineitem_url: str
    score: Score


def _lock_grade(session: Session, row: ScoreOutbox) -> None:
    """Serialise claims for one student's grade (PostgreSQL; SQLite's BEGIN IMMEDIATE
    already serialises every writer)."""
    session.scalars(
        select(Grade.id)
        .where(Grade.assignment_id == row.assignment_id, Grade.user_id == row.user_id)
        .with_for_update()
    ).all()


def _newest_row_id(session: Session, row: ScoreOutbox) -> int:
    return session.scalar(
        select(func.max(ScoreOutbox.id)).where(
            ScoreOutbox.assignment_id == row.assignment_id, ScoreOutbox.user_id == row.user_id
        )
    )


def _last_timestamp(session: Session, row: ScoreOutbox) -> datetime | None:
    """The newest timestamp ever claimed for this (line item, platform user), whatever came
    of it (a POST whose answer was lost may have been stored by the platform)."""
    return session.scalar(
        select(func.max(ScoreOutbox.timestamp)).where(
            ScoreOutbox.platform_user_id == row.platform_user_id,
            or_(
                ScoreOutbox.lineitem_url == row.lineitem_url,
                (ScoreOutbox.assignment_id == row.assignment_id)
                & (ScoreOutbox.user_id == row.user_id),
            ),
        )
    )


def claim(rt: Runtime, row_id: int, *, after: datetime | None = None) -> Claim | None:
    """Step 1. `after`: a timestamp the platform refused (409); the new one is newer."""
    now = utcnow()
    with transaction(rt.sessions) as session:
        row = session.get(ScoreOutbox, row_id)
        if row is None or row.status is not ScoreStatus.pending or row.lineitem_url is None:
            return None
        _lock_grade(session, row)
        session.refresh(row, with_for_update=True)
        if row.status is not ScoreStatus.pending:
            return None
        if after is None and row.next_attempt_at > now:
            return None  # leased by another worker, or backing off
        if _newest_row_id(session, row) != row.id:
            row.status = ScoreStatus.superseded
            return None
        known = [t for t in (_last_timestamp(session, row), after) if t is not None]
        stamp = whole_second(now)
        if known and stamp <= max(known):
            stamp = whole_second(max(known)) + timedelta(seconds=1)
        row.timestamp = stamp
        row.attempts += 1
        row.next_attempt_at = now + LEASE
        return Claim(
            row.id,
            stamp,
            row.lineitem_url,
            Score(
                user_id=row.platform_user_id,
                score_given=row.score_given,
                score_maximum=row.score_maximum,
                comment=row.comment,
                timestamp=stamp,
            ),
        )


def _record(rt: Runtime, claimed: Claim, error: AgsError | None) -> str:
    """Step 3, unless someone else claimed the row since (their outcome counts)."""
    now = utcnow()
    with transaction(rt.sessions) as session:
        row = session.get(ScoreOutbox, claimed.row_id, with_for_update=True)
        if (
            row is None
            or row.status is not ScoreStatus.pending
            or row.timestamp != claimed.timestamp
        ):
            return "taken over"
        if error is None:
            row.status, row.sent_at, row.last_error = ScoreStatus.sent, now, None
            return "sent"
        row.last_error = str(error)[:2000]
        if error.retryable and now - row.created_at < RETRY_FOR:
            row.next_attempt_at = now + backoff(row.attempts)
            return "retry"
        if error.retryable:
            row.last_error = f"gave up after {RETRY_FOR.total_seconds() / 3600:g} h: {error}"
        row.status = ScoreStatus.failed
        return "failed"


_connectors: dict[int, tuple[float, CachedTokenConnector]] = {}
CONNECTOR_TTL_S = 60.0


def _connector(session: Session, rt: Runtime, platform_id: int) -> CachedTokenConnector:
    """A platform's connector, kept a minute per process: making one reads and decrypts the
    tool's signing key, which costs more than the score's POST (a rotated key is picked up
    within the minute; the old one stays published meanwhile)."""
    hit = _connectors.get(platform_id)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    connector = connector_for(session, rt, session.get_one(Platform, platform_id))
    _connectors[platform_id] = (time.monotonic() + CONNECTOR_TTL_S, connector)
    return connector


def _client(rt: Runtime, row_id: int) -> tuple[AgsClient, int, str | None] | None:
    with rt.sessions() as session:
        row = session.get(ScoreOutbox, row_id)
        if row is None:
            return None
        assignment = session.get_one(Assignment, row.assignment_id)
        activity = session.get_one(Activity, assignment.activity_id)
        client = AgsClient(_connector(session, rt, row.platform_id), activity.ags_scope)
        return client, assignment.id, row.lineitem_url


@metrics.counted(metrics.AGS_SENDS)
def send_score(rt: Runtime, row_id: int) -> str:
    """Send one outbox row if it is due and still the newest; returns what happened."""
    made = _client(rt, row_id)
    if made is None:
        return "gone"
    client, assignment_id, lineitem_url = made
    if lineitem_url is None:
        try:
            resolve_lineitem(rt, client, assignment_id)
        except (AgsError, LineItemMissing) as exc:
            return _fail_unclaimed(rt, row_id, exc)
    claimed = claim(rt, row_id)
    if claimed is None:
        return "not due"
    error = _post(client, claimed)
    if error is not None and error.conflict:
        # Moodle holds a grade at least as new: once more, strictly newer, then stop.
        again = claim(rt, row_id, after=claimed.timestamp)
        if again is None:
            return "superseded"
        claimed, error = again, _post(client, again)
    outcome = _record(rt, claimed, error)
    if error is not None:
        log.warning("score %s for assignment %s: %s (%s)", row_id, assignment_id, error, outcome)
    return outcome


def _post(client: AgsClient, claimed: Claim) -> AgsError | None:
    try:
        client.post_score(claimed.lineitem_url, claimed.score)
    except AgsError as exc:
        return exc
    return None


def _fail_unclaimed(rt: Runtime, row_id: int, error: Exception) -> str:
    """No line item to send to: a platform that did not answer is tried again later; one
    that gives no grade item (or refuses) is the teacher's to fix."""
    now = utcnow()
    with transaction(rt.sessions) as session:
        row = session.get(ScoreOutbox, row_id, with_for_update=True)
        if row is None or row.status is not ScoreStatus.pending:
            return "gone"
        row.last_error = str(error)[:2000]
        row.attempts += 1
        if isinstance(error, AgsError) and error.retryable and now - row.created_at < RETRY_FOR:
            row.next_attempt_at = now + backoff(row.attempts)
            return "retry"
        row.status = ScoreStatus.failed
        return "failed"


def due_rows(session: Session, limit: int = DUE_PASS_BATCH) -> list[int]:
    return list(
        session.scalars(
            select(ScoreOutbox.id)
            .where(
                ScoreOutbox.status == ScoreStatus.pending, ScoreOutbox.next_attempt_at <= utcnow()
            )
            .order_by(ScoreOutbox.next_attempt_at, ScoreOutbox.id)
            .limit(limit)
        )
    )


def send_due_scores(rt: Runtime, budget_s: float = DUE_PASS_BUDGET_S) -> dict[str, int]:
    """The periodic pass: send what is owed and due, oldest first, within a time budget."""
    started = time.monotonic()
    with rt.sessions() as session:
        ids = due_rows(session)
    outcomes: dict[str, int] = {}
    for row_id in ids:
        if time.monotonic() - started > budget_s:
            break
        outcome = send_score(rt, row_id)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def send_score_job(row_id: int) -> str:
    """RQ job: send one score (enqueued when a grade is saved)."""
    return send_score(current_runtime(), row_id)


def send_due_scores_job() -> dict[str, int]:
    """RQ cron job: the periodic pass."""
    return send_due_scores(current_runtime())
