"""Environments and machines, with the machine's explicit state machine.

    requested → starting → ready → assigned → stopping → stopped
        (and `error` from any of them)

`ready` means the IDE answered its health check, not merely that a process or server exists.
A machine with an owner skips the wait in `ready` and becomes `assigned` at once.
"""

from __future__ import annotations

import enum
from datetime import datetime, time

from sqlalchemy import (
    JSON,
    Boolean,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Time,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from config.db import Base, UTCDateTime, utcnow
from provisioning.sandbox import Limits


class MachineState(enum.StrEnum):
    requested = "requested"
    starting = "starting"
    ready = "ready"
    assigned = "assigned"
    stopping = "stopping"
    stopped = "stopped"
    error = "error"


S = MachineState
ALLOWED: dict[MachineState, frozenset[MachineState]] = {
    S.requested: frozenset({S.starting, S.stopping, S.stopped, S.error}),
    S.starting: frozenset({S.ready, S.assigned, S.stopping, S.error}),
    S.ready: frozenset({S.assigned, S.stopping, S.error}),
    S.assigned: frozenset({S.stopping, S.error}),
    S.stopping: frozenset({S.stopped, S.error}),
    S.stopped: frozenset(),
    S.error: frozenset({S.stopping, S.stopped}),
}

# A student holds at most one machine in these states per (environment, course).
LIVE_STATES = (S.requested, S.starting, S.ready, S.assigned)


class IllegalTransition(Exception):
    def __init__(self, machine_id: int, old: MachineState, new: MachineState):
        super().__init__(f"machine {machine_id}: {old.value} → {new.value} is not allowed")


class IdeKind(enum.StrEnum):
    jupyterlab = "jupyterlab"
    code_server = "code-server"
    terminal = "terminal"


class Environment(Base):
    """What a machine runs: the IDE and, for the cloud, the image and flavor behind it."""

    __tablename__ = "environments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    ide_kind: Mapped[IdeKind] = mapped_column(
        Enum(IdeKind, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e]),
        default=IdeKind.jupyterlab,
    )
    backend: Mapped[str] = mapped_column(String(32), default="local")
    idle_timeout_s: Mapped[int] = mapped_column(Integer, default=3600)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The cloud side (openstack backend only): golden image, size, private network.
    image_id: Mapped[str | None] = mapped_column(String(64))
    flavor_id: Mapped[str | None] = mapped_column(String(64))
    network_id: Mapped[str | None] = mapped_column(String(64))
    network_name: Mapped[str | None] = mapped_column(String(255))
    security_groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    key_name: Mapped[str | None] = mapped_column(String(255))
    volume_size_gb: Mapped[int] = mapped_column(Integer, default=10)
    ide_port: Mapped[int] = mapped_column(Integer, default=8888)
    # A machine is released after this long, active or not (its files stay).
    max_session_s: Mapped[int] = mapped_column(Integer, default=8 * 3600)
    # The sandbox's limits (local backend; see provisioning/sandbox.py). 0: no limit.
    memory_mb: Mapped[int] = mapped_column(Integer, default=2048)
    max_processes: Mapped[int] = mapped_column(Integer, default=256)
    max_open_files: Mapped[int] = mapped_column(Integer, default=1024)
    max_file_size_mb: Mapped[int] = mapped_column(Integer, default=1024)
    cpu_seconds: Mapped[int] = mapped_column(Integer, default=0)
    # Set while retired: no new machine (launches say so), machines handed out run until
    # they are released, the pool keeps no warm ones. NULL: in use.
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set while an admin limits it to the courses listed in `environment_courses` (only
    # they may pick it and start machines of it); unset: open to every course.
    limited_to_courses: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")

    @property
    def limits(self) -> Limits:
        return Limits(
            memory_mb=self.memory_mb,
            processes=self.max_processes,
            open_files=self.max_open_files,
            file_size_mb=self.max_file_size_mb,
            cpu_seconds=self.cpu_seconds,
        )


class EnvironmentCourse(Base):
    """A course that may use an environment limited to courses (`limited_to_courses`)."""

    __tablename__ = "environment_courses"
    __table_args__ = (Index("ix_environment_courses_course", "course_id"),)

    environment_id: Mapped[int] = mapped_column(
        ForeignKey("environments.id", ondelete="CASCADE"), primary_key=True
    )
    course_id: Mapped[int] = mapped_column(
        ForeignKey("courses.id", ondelete="CASCADE"), primary_key=True
    )


class ClassSession(Base):
    """A weekly class meeting of an activity: the pool is warm for the class from
    `lead_minutes` before `starts` until `ends`, in the teacher's time zone."""

    __tablename__ = "class_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    activity_id: Mapped[int] = mapped_column(
        ForeignKey("activities.id", ondelete="CASCADE"), index=True
    )
    weekday: Mapped[int] = mapped_column(Integer)  # 0 = Monday
    starts: Mapped[time] = mapped_column(Time)
    ends: Mapped[time] = mapped_column(Time)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    lead_minutes: Mapped[int] = mapped_column(Integer, default=10)


class Pool(Base):
    """The machines of one environment: how many to keep warm, how many at most, and why
    creation is held when it is (quota, a failing cloud, machines that keep failing)."""

    __tablename__ = "pools"

    id: Mapped[int] = mapped_column(primary_key=True)
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id"), unique=True)
    warm_target: Mapped[int] = mapped_column(Integer, default=0)
    max_size: Mapped[int] = mapped_column(Integer, default=50)
    paused: Mapped[bool] = mapped_column(default=False)  # an admin's or teacher's pause
    quota_note: Mapped[str | None] = mapped_column(Text)  # set while quota holds creation
    hold_note: Mapped[str | None] = mapped_column(Text)  # set while a backoff holds creation
    backoff_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_pass_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WarmBoost(Base):
    """A teacher's "warm now" for one activity: `target` warm machines until `until`.

    Kept per activity, not per pool: several courses may share one environment's pool, and
    one teacher's boost must not replace another's. The pool wants the largest unexpired
    boost of the activities using its environment."""

    __tablename__ = "warm_boosts"

    id: Mapped[int] = mapped_column(primary_key=True)
    activity_id: Mapped[int] = mapped_column(
        ForeignKey("activities.id", ondelete="CASCADE"), unique=True
    )
    target: Mapped[int] = mapped_column(Integer)
    until: Mapped[datetime] = mapped_column(UTCDateTime)


class Machine(Base):
    __tablename__ = "machines"
    __table_args__ = (
        # The database, not the code, guarantees that a student never holds two live
        # machines for one environment in one course.
        Index(
            "uq_machines_live_owner",
            "environment_id",
            "course_id",
            "owner_id",
            unique=True,
            postgresql_where=text(
                "owner_id IS NOT NULL AND state IN ('requested','starting','ready','assigned')"
            ),
            sqlite_where=text(
                "owner_id IS NOT NULL AND state IN ('requested','starting','ready','assigned')"
            ),
        ),
        Index("ix_machines_env_state", "environment_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id"))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    course_id: Mapped[int | None] = mapped_column(ForeignKey("courses.id", ondelete="SET NULL"))
    state: Mapped[MachineState] = mapped_column(
        Enum(MachineState, native_enum=False, length=16), default=MachineState.requested
    )
    backend: Mapped[str] = mapped_column(String(32))
    # What the backend needs to find its machine again (pid, port, server id, …).
    backend_ref: Mapped[dict | None] = mapped_column(JSON)
    address: Mapped[str | None] = mapped_column(String(255))  # host:port of the IDE
    ide_token: Mapped[str | None] = mapped_column(String(128))  # never logged or shown
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_activity_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def move_to(self, new: MachineState, *, error: str | None = None) -> None:
        """Change state, refusing transitions the state machine does not allow."""
        if new is not self.state and new not in ALLOWED[self.state]:
            raise IllegalTransition(self.id, self.state, new)
        now = utcnow()
        self.state = new
        self.state_changed_at = now
        if new is MachineState.assigned and self.assigned_at is None:
            self.assigned_at = now
        if error is not None:
            self.error = error

    def __repr__(self) -> str:  # no token here: reprs end up in logs
        return f"<Machine {self.id} {self.state.value} owner={self.owner_id}>"


class StudentVolume(Base):
    """A student's persistent storage in one course on the cloud: created on first need,
    attached to whichever machine they get, never deleted by the reconciler (only by an
    admin's `labpool volumes delete`)."""

    __tablename__ = "student_volumes"
    __table_args__ = (UniqueConstraint("owner_id", "course_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id", ondelete="CASCADE"))
    size_gb: Mapped[int] = mapped_column(Integer)
    volume_id: Mapped[str | None] = mapped_column(String(64))  # the cloud's id, once created
    # creating → available ⇄ in-use (attached to `machine_id`), or error
    status: Mapped[str] = mapped_column(String(16), default="creating")
    machine_id: Mapped[int | None] = mapped_column(ForeignKey("machines.id", ondelete="SET NULL"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class HomeView(Base):
    """A teacher looked at a student's files (read-only): the student's page says so."""

    __tablename__ = "home_views"
    __table_args__ = (Index("ix_home_views_student", "student_id", "course_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id", ondelete="CASCADE"))
    student_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    viewer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    path: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
