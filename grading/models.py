"""Graded work: assignments of an activity, students' submissions, grades, and the outbox of
scores owed to the platform's gradebook (LTI Assignment and Grade Services).

The outbox is a table, not a queue: a grade and the row saying "send this score" are written
in one transaction, so losing Redis or a worker never loses a grade; a job or the periodic
pass sends what the table says is owed (after hypothesis/lms's `lms/tasks/grading.py`).
"""

from __future__ import annotations

import enum
import json
from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from config.db import Base, UTCDateTime, utcnow


class LatePolicy(enum.StrEnum):
    refuse = "refuse"  # after the due date a submission is refused
    mark_late = "mark_late"  # accepted, flagged late for the teacher


class AssignmentSource(enum.StrEnum):
    files = "files"  # released as uploaded
    nbgrader = "nbgrader"  # nbgrader source notebooks: the student version is generated at publish
    git = "git"  # unused: a git assignment's origin is `git_url`; `source` says how it is published


class Assignment(Base):
    """Work of an activity. `name` is the folder it gets in each student's home (a safe file
    name, unique in the activity); `lineitem_url` is the platform's grade item for it, when
    the activity's own (from the launch's AGS claim) is not the one (see grading.lineitems)."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("activity_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(Text, default="")
    max_score: Mapped[float] = mapped_column(Float, default=10.0)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    late_policy: Mapped[LatePolicy] = mapped_column(
        Enum(LatePolicy, native_enum=False, length=16), default=LatePolicy.mark_late
    )
    source: Mapped[AssignmentSource] = mapped_column(
        Enum(AssignmentSource, native_enum=False, length=16), default=AssignmentSource.files
    )
    # Where the teacher's files are kept, and the student version made from them at publish.
    source_path: Mapped[str | None] = mapped_column(Text)
    release_path: Mapped[str | None] = mapped_column(Text)
    # A git-sourced assignment's repository (https), branch and folder (grading.git_source).
    git_url: Mapped[str | None] = mapped_column(Text)
    git_branch: Mapped[str | None] = mapped_column(String(100))
    git_folder: Mapped[str | None] = mapped_column(Text)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lineitem_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Each new submission is graded by the autograder (grading.autograde) as it is stored.
    auto_grade_on_submit: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")

    @property
    def published(self) -> bool:
        return self.published_at is not None


class Submission(Base):
    """One submitted version, never changed: a resubmission is a new row (version + 1); the
    newest is the current one."""

    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("assignment_id", "user_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # server time
    checksum: Mapped[str] = mapped_column(String(64))  # sha256 of the stored archive
    file_count: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    storage_path: Mapped[str] = mapped_column(Text)  # under DATA_DIR/submissions
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    # The teacher whose "collect now" took this copy (None: the student submitted it).
    collected_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # What the copy left out (links, FIFOs, caches…): a JSON list of {"path", "why"}.
    skipped_json: Mapped[str] = mapped_column("skipped", Text, default="[]", server_default="[]")

    @property
    def skipped(self) -> list[dict[str, str]]:
        return json.loads(self.skipped_json or "[]")


class GradeSource(enum.StrEnum):
    manual = "manual"
    auto = "auto"


class Grade(Base):
    """A student's current grade for an assignment (the newest one entered wins)."""

    __tablename__ = "grades"
    __table_args__ = (UniqueConstraint("assignment_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    score: Mapped[float] = mapped_column(Float)
    comment: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[GradeSource] = mapped_column(
        Enum(GradeSource, native_enum=False, length=16), default=GradeSource.manual
    )
    graded_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    graded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ScoreStatus(enum.StrEnum):
    pending = "pending"  # owed: sent when next_attempt_at has come
    sent = "sent"  # the platform accepted it
    failed = "failed"  # the platform refused it (or retries ran out): the teacher sees why
    superseded = "superseded"  # a newer grade for the same student and line item replaced it


class ScoreOutbox(Base):
    """A score owed to the platform: what to send (copied from the grade, so the row alone is
    enough to send it), where, and how the sending goes.

    `timestamp` is the score's timestamp as last claimed for sending (whole seconds): it is
    written before the POST, so a later send for the same (line item, platform user) always
    picks a strictly newer one, even after a crash between the POST and its commit."""

    __tablename__ = "score_outbox"
    __table_args__ = (
        Index("ix_score_outbox_due", "status", "next_attempt_at"),
        Index("ix_score_outbox_target", "platform_user_id", "lineitem_url"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(
        ForeignKey("assignments.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    grade_id: Mapped[int | None] = mapped_column(ForeignKey("grades.id", ondelete="SET NULL"))
    platform_id: Mapped[int] = mapped_column(ForeignKey("platforms.id", ondelete="CASCADE"))
    platform_user_id: Mapped[str] = mapped_column(String(255))  # the launch's `sub`
    lineitem_url: Mapped[str | None] = mapped_column(Text)  # None until a line item is found
    score_given: Mapped[float] = mapped_column(Float)
    score_maximum: Mapped[float] = mapped_column(Float)
    comment: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[ScoreStatus] = mapped_column(
        Enum(ScoreStatus, native_enum=False, length=16), default=ScoreStatus.pending
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    timestamp: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AssignmentRelease(Base):
    """What a student last received of an assignment: the student version (`version`, the
    release folder's name) and the checksum of each file placed (`manifest`), which decides
    next time whether a file is still untouched (grading.release). Kept on the tool's side,
    where the student cannot change it."""

    __tablename__ = "assignment_releases"
    __table_args__ = (UniqueConstraint("assignment_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(128))
    manifest: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    released_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The last release's outcome, as the teacher reads it: "3 added, 1 kept (edited)".
    summary: Mapped[str] = mapped_column(Text, default="")


class AutogradeState(enum.StrEnum):
    queued = "queued"  # owed: a job is (or should be) on the grading queue
    running = "running"  # a job took it at `started_at`
    done = "done"  # graded: `score` is what the autograder gave (zero where nothing ran)
    failed = "failed"  # the autograder itself could not run (not the student's fault)


class AutogradeResult(Base):
    """The autograder's result for one submitted version (unique: grading a version twice
    updates this row, it never adds a second grade). `cells` holds each grade cell as
    nbgrader names it: [{"grade_id", "score", "max_score", "passed", "message"}];
    `feedback_html` is the page the student and the teachers see."""

    __tablename__ = "autograde_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), unique=True
    )
    assignment_id: Mapped[int] = mapped_column(
        ForeignKey("assignments.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    state: Mapped[AutogradeState] = mapped_column(
        Enum(AutogradeState, native_enum=False, length=16), default=AutogradeState.queued
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[float | None] = mapped_column(Float)
    max_score: Mapped[float | None] = mapped_column(Float)
    cells: Mapped[list] = mapped_column(JSON, default=list)
    summary: Mapped[str] = mapped_column(Text, default="")
    feedback_html: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    seconds: Mapped[float | None] = mapped_column(Float)
