"""Entering a grade: the grade and the score it owes the platform are written in one
transaction (the caller's), so a grade the teacher saw saved is a grade the outbox will send.

Only the newest grade of a student for an assignment is ever sent: entering one supersedes
every unsent row before it (grading.outbox checks again at send time).
"""

from __future__ import annotations

import math

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config.db import utcnow
from grading.models import Assignment, Grade, GradeSource, ScoreOutbox, ScoreStatus
from lti_tool.models import Activity, Course, User

MAX_COMMENT = 4000


class GradeRejected(ValueError):
    """The grade is not valid; nothing was written. The message says what to fix."""


def parse_score(raw: str, maximum: float) -> float:
    """A score typed by a teacher: a number from 0 to the assignment's maximum."""
    try:
        score = float((raw or "").strip().replace(",", "."))
    except ValueError:
        raise GradeRejected(f"The score must be a number from 0 to {maximum:g}.") from None
    if not math.isfinite(score) or score < 0 or score > maximum:
        raise GradeRejected(f"The score must be a number from 0 to {maximum:g}.")
    return score


def record_grade(
    session: Session,
    assignment: Assignment,
    student_id: int,
    score: float,
    comment: str,
    *,
    source: GradeSource = GradeSource.manual,
    graded_by: int | None = None,
) -> ScoreOutbox:
    """Set the student's grade and owe the platform its score (one new outbox row; older
    unsent ones are superseded). Inside the caller's transaction."""
    if not (0 <= score <= assignment.max_score) or not math.isfinite(score):
        raise GradeRejected(f"The score must be a number from 0 to {assignment.max_score:g}.")
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT:
        raise GradeRejected(f"The comment is longer than {MAX_COMMENT} characters.")
    student = session.get(User, student_id)
    if student is None:
        raise GradeRejected("No such student.")
    now = utcnow()
    grade = session.scalars(
        select(Grade)
        .where(Grade.assignment_id == assignment.id, Grade.user_id == student_id)
        .with_for_update()
    ).first()
    if grade is None:
        grade = Grade(assignment_id=assignment.id, user_id=student_id)
        session.add(grade)
    grade.score, grade.comment, grade.source = score, comment, source
    grade.graded_by, grade.graded_at = graded_by, now
    session.flush()
    return owe_score(session, assignment, grade, student)


def owe_score(session: Session, assignment: Assignment, grade: Grade, student: User) -> ScoreOutbox:
    """A new outbox row for the grade as it is now; earlier unsent rows are superseded."""
    session.execute(
        update(ScoreOutbox)
        .where(
            ScoreOutbox.assignment_id == assignment.id,
            ScoreOutbox.user_id == student.id,
            ScoreOutbox.status.in_([ScoreStatus.pending, ScoreStatus.failed]),
        )
        .values(status=ScoreStatus.superseded)
        .execution_options(synchronize_session=False)
    )
    activity = session.get_one(Activity, assignment.activity_id)
    course = session.get_one(Course, activity.course_id)
    row = ScoreOutbox(
        assignment_id=assignment.id,
        user_id=student.id,
        grade_id=grade.id,
        platform_id=course.platform_id,
        platform_user_id=student.sub,
        lineitem_url=known_lineitem(session, assignment, activity),
        score_given=grade.score,
        score_maximum=assignment.max_score,
        comment=grade.comment,
        status=ScoreStatus.pending,
        attempts=0,
        next_attempt_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def send_again(session: Session, assignment: Assignment, student_id: int) -> ScoreOutbox:
    """The teacher's "send again": owe the current grade once more (a fresh row, a fresh
    timestamp), e.g. after fixing what the platform refused."""
    grade = session.scalars(
        select(Grade).where(Grade.assignment_id == assignment.id, Grade.user_id == student_id)
    ).first()
    if grade is None:
        raise GradeRejected("This student has no grade to send.")
    return owe_score(session, assignment, grade, session.get_one(User, student_id))


def known_lineitem(session: Session, assignment: Assignment, activity: Activity) -> str | None:
    """The assignment's line item if known without asking the platform, in this order:
    1. its own (found or created earlier by grading.lineitems);
    2. the grade item of an activity deep-linked to it (the activity's `assignment_id` names
       it; Moodle made that grade item from the deep-linking answer's `lineItem`, and the
       teacher chose it for this assignment) — the oldest such activity if several;
    3. its home activity's (from the launch's AGS claim) when it is that activity's first
       assignment and the activity is not deep-linked to another one.
    None: the sender finds or creates one (grading.lineitems)."""
    if assignment.lineitem_url:
        return assignment.lineitem_url
    linked = session.scalars(
        select(Activity.ags_lineitem)
        .where(Activity.assignment_id == assignment.id, Activity.ags_lineitem.is_not(None))
        .order_by(Activity.id)
        .limit(1)
    ).first()
    if linked:
        return linked
    if activity.ags_lineitem and activity.assignment_id in (None, assignment.id):
        first = session.scalars(
            select(Assignment.id)
            .where(Assignment.activity_id == activity.id)
            .order_by(Assignment.id)
            .limit(1)
        ).first()
        if first == assignment.id:
            return activity.ags_lineitem
    return None
