"""Who and where: platforms and their deployments, users, courses, enrolments, activities,
and a record of each accepted launch."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from config.db import Base, UTCDateTime, utcnow


class Platform(Base):
    """A registration: one issuer may register the tool several times (several client ids)."""

    __tablename__ = "platforms"
    __table_args__ = (UniqueConstraint("issuer", "client_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    issuer: Mapped[str] = mapped_column(String(255))
    client_id: Mapped[str] = mapped_column(String(255))
    auth_url: Mapped[str] = mapped_column(Text)
    token_url: Mapped[str] = mapped_column(Text)
    jwks_url: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set while an admin has disabled the registration: its launches are refused.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    deployments: Mapped[list[Deployment]] = relationship(
        back_populates="platform", cascade="all, delete-orphan"
    )


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("platform_id", "deployment_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform_id: Mapped[int] = mapped_column(ForeignKey("platforms.id", ondelete="CASCADE"))
    deployment_id: Mapped[str] = mapped_column(String(255))

    platform: Mapped[Platform] = relationship(back_populates="deployments")


class User(Base):
    """A person as a platform knows them: keyed by (issuer, sub), never by name or email.
    `name`/`email` are the newest any registration of the issuer shared, for the admin's
    CLI; teachers see the enrolment's (their own registration's) instead."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("issuer", "sub"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    issuer: Mapped[str] = mapped_column(String(255))
    sub: Mapped[str] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Course(Base):
    """An LTI context (a Moodle course)."""

    __tablename__ = "courses"
    __table_args__ = (UniqueConstraint("platform_id", "context_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform_id: Mapped[int] = mapped_column(ForeignKey("platforms.id", ondelete="CASCADE"))
    context_id: Mapped[str] = mapped_column(String(255))
    label: Mapped[str] = mapped_column(String(255), default="")
    title: Mapped[str] = mapped_column(Text, default="")
    # From the NRPS claim, for roster sync in a worker.
    memberships_url: Mapped[str | None] = mapped_column(Text)
    # What the teacher's class page says about the conversation with the platform: the last
    # roster sync that worked, and the last call that failed (cleared by the next success).
    roster_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    platform_error: Mapped[str | None] = mapped_column(Text)
    platform_error_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Enrolment(Base):
    """A user in a course. `name`/`email` are what this course's registration shared (by
    launch or roster): names are kept per course, hence per registration, so a registration
    that does not share them never shows what another registration of the same issuer did."""

    __tablename__ = "enrolments"
    __table_args__ = (UniqueConstraint("course_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    name: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(255))


class Activity(Base):
    """An LTI resource link (a Moodle activity) and the environment its machines run."""

    __tablename__ = "activities"
    __table_args__ = (UniqueConstraint("course_id", "resource_link_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id", ondelete="CASCADE"))
    resource_link_id: Mapped[str] = mapped_column(String(255))
    title: Mapped[str] = mapped_column(Text, default="")
    environment_id: Mapped[int | None] = mapped_column(ForeignKey("environments.id"))
    # The assignment a deep-linked activity delivers: its first launch's `labpool_assignment`
    # custom parameter (lti_tool/deep_linking.py). use_alter: assignments refer to
    # activities too.
    assignment_id: Mapped[int | None] = mapped_column(
        ForeignKey("assignments.id", ondelete="SET NULL", use_alter=True)
    )
    # The launch's AGS claim (LTI AGS 2.0 §3.1): the scopes the platform grants for grades,
    # its line items container and, when the activity has a grade item, that line item.
    ags_scope: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))  # NULL, not 'null'
    ags_lineitems: Mapped[str | None] = mapped_column(Text)
    ags_lineitem: Mapped[str | None] = mapped_column(Text)


class Launch(Base):
    """One accepted launch: who, where, as what (an audit trail and the teacher's 'last seen')."""

    __tablename__ = "launches"
    __table_args__ = (Index("ix_launches_activity_at", "activity_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.id", ondelete="CASCADE"))
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    machine_id: Mapped[int | None] = mapped_column(ForeignKey("machines.id", ondelete="SET NULL"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
