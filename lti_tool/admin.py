"""The admin page's core, no Flask (lti_tool/web/admin_routes.py is its web edge; the CLI
twins call the same service code): admin tokens, what the page shows, and "send again" of
a failed score.

An admin token (`labpool admin-token`) is signed with the tool's secret key (itsdangerous,
its own salt) and carries its expiry and a random nonce; nothing about it is stored until
it is used, when Redis keeps the nonce's hash until the expiry, so each token opens one
session only. Neither the token nor its nonce is ever logged."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import redis
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config.settings import Settings
from lti_tool.models import Activity, Course, Platform

TOKEN_SALT = "labpool-admin-token"
USED_PREFIX = "labpool:admin-token-used:"
MIN_TOKEN_S, MAX_TOKEN_S = 60, 7 * 24 * 3600
SHOWN_ROWS = 200  # per list on the page: the newest first


class AdminTokenRefused(Exception):
    """The admin token is forged, expired or used; the message says which."""


def _serializer(settings: Settings) -> URLSafeSerializer:
    return URLSafeSerializer(settings.secret_key, salt=TOKEN_SALT)


def make_admin_token(settings: Settings, lifetime_s: int, now: float | None = None) -> str:
    """A signed admin token valid for `lifetime_s` seconds (1 minute to 7 days)."""
    if not MIN_TOKEN_S <= lifetime_s <= MAX_TOKEN_S:
        raise ValueError("an admin token lives between 1 minute and 7 days")
    expires = int((now or time.time()) + lifetime_s)
    return _serializer(settings).dumps({"exp": expires, "n": secrets.token_urlsafe(16)})


def redeem_admin_token(
    settings: Settings, conn: redis.Redis, token: str, now: float | None = None
) -> None:
    """Accept the token once: forged, expired or used ones raise AdminTokenRefused."""
    try:
        payload = _serializer(settings).loads(token)
        expires, nonce = int(payload["exp"]), str(payload["n"])
    except (BadSignature, KeyError, TypeError, ValueError):
        raise AdminTokenRefused(
            "This admin link is not valid. Make a new one with `labpool admin-token`."
        ) from None
    now = now or time.time()
    if expires <= now:
        raise AdminTokenRefused(
            "This admin link has expired. Make a new one with `labpool admin-token`."
        )
    key = USED_PREFIX + hashlib.sha256(nonce.encode()).hexdigest()
    if not conn.set(key, "1", nx=True, ex=max(1, int(expires - now) + 60)):
        raise AdminTokenRefused(
            "This admin link was used already. Make a new one with `labpool admin-token`."
        )


@dataclass
class PlatformRow:
    id: int
    issuer: str
    client_id: str
    name: str
    deployment_ids: list[str]
    disabled_at: datetime | None
    courses: int


@dataclass
class CourseRow:
    """A course as the admin picks it (`labpool courses list`, the environment's form)."""

    id: int
    issuer: str
    context_id: str
    title: str  # its title, else its short name, else its context id


def course_rows(session: Session, ids: Iterable[int] | None = None) -> list[CourseRow]:
    """Every course Labpool has seen a launch from (or those of `ids`), by platform and
    title."""
    from provisioning.course_access import course_title

    query = (
        select(Course, Platform.issuer)
        .join(Platform, Platform.id == Course.platform_id)
        .order_by(Platform.issuer, Course.title, Course.id)
    )
    if ids is not None:
        query = query.where(Course.id.in_(list(ids)))
    return [
        CourseRow(c.id, issuer, c.context_id, course_title(c.title, c.label, c.context_id))
        for c, issuer in session.execute(query)
    ]


@dataclass
class EnvironmentRow:
    id: int
    name: str
    backend: str
    ide_kind: str
    idle_timeout_s: int
    image_id: str | None
    flavor_id: str | None
    memory_mb: int
    max_processes: int
    max_open_files: int
    max_file_size_mb: int
    cpu_seconds: int
    pooled: bool
    boots_image: bool
    retired: bool = False
    courses: list[CourseRow] | None = None  # the courses it is limited to; None: every course


@dataclass
class PoolRow:
    id: int
    environment: str
    warm_target: int
    max_size: int
    paused: bool
    quota_note: str | None
    hold_note: str | None
    backoff_until: datetime | None
    consecutive_failures: int
    last_pass_at: datetime | None
    counts: dict[str, int] = field(default_factory=dict)  # machine state → count
    courses: int = 0  # courses with a machine of this environment
    rolling: int = 0  # live machines on an earlier image or flavor


@dataclass
class ErrorMachine:
    id: int
    environment: str
    course: str | None
    owner_id: int | None
    error: str | None
    since: datetime


@dataclass
class FailedScore:
    id: int
    course: str
    assignment: str
    assignment_id: int
    user_id: int
    score: str
    attempts: int
    last_error: str | None
    created_at: datetime


@dataclass
class FailedSync:
    id: int
    title: str
    issuer: str
    error: str | None
    at: datetime | None


@dataclass
class Overview:
    platforms: list[PlatformRow]
    environments: list[EnvironmentRow]
    pools: list[PoolRow]
    error_machines: list[ErrorMachine]
    failed_scores: list[FailedScore]
    failed_syncs: list[FailedSync]


def overview(session: Session) -> Overview:
    """Everything the admin page shows, read in a handful of queries."""
    from grading.models import Assignment, ScoreOutbox, ScoreStatus
    from provisioning.backends import BACKENDS
    from provisioning.course_access import courses_of
    from provisioning.models import Environment, Machine, MachineState, Pool
    from provisioning.reconcile_decisions import on_old_spec

    course_counts = dict(
        session.execute(select(Course.platform_id, func.count()).group_by(Course.platform_id)).all()
    )
    platforms = [
        PlatformRow(
            p.id,
            p.issuer,
            p.client_id,
            p.name,
            sorted(d.deployment_id for d in p.deployments),
            p.disabled_at,
            course_counts.get(p.id, 0),
        )
        for p in session.scalars(select(Platform).order_by(Platform.issuer, Platform.id))
    ]
    environments = []
    listed = courses_of(session, session.scalars(select(Environment.id)))
    courses = {c.id: c for c in course_rows(session, {i for ids in listed.values() for i in ids})}
    for env in session.scalars(select(Environment).order_by(Environment.name)):
        can = BACKENDS[env.backend].capabilities if env.backend in BACKENDS else None
        environments.append(
            EnvironmentRow(
                env.id,
                env.name,
                env.backend,
                env.ide_kind.value,
                env.idle_timeout_s,
                env.image_id,
                env.flavor_id,
                env.memory_mb,
                env.max_processes,
                env.max_open_files,
                env.max_file_size_mb,
                env.cpu_seconds,
                bool(can and can.pooled),
                bool(can and can.needs),
                env.retired_at is not None,
                [courses[i] for i in listed.get(env.id, []) if i in courses]
                if env.limited_to_courses
                else None,
            )
        )
    pools = []
    for pool, env in session.execute(
        select(Pool, Environment)
        .join(Environment, Environment.id == Pool.environment_id)
        .order_by(Environment.name)
    ):
        row = PoolRow(
            pool.id,
            env.name,
            pool.warm_target,
            pool.max_size,
            pool.paused,
            pool.quota_note,
            pool.hold_note,
            pool.backoff_until,
            pool.consecutive_failures,
            pool.last_pass_at,
        )
        for state, count in session.execute(
            select(Machine.state, func.count())
            .where(Machine.environment_id == env.id)
            .group_by(Machine.state)
        ):
            row.counts[MachineState(state).value] = count
        row.courses = (
            session.scalar(
                select(func.count(func.distinct(Machine.course_id))).where(
                    Machine.environment_id == env.id,
                    Machine.state.notin_([MachineState.stopped, MachineState.error]),
                )
            )
            or 0
        )
        live = session.scalars(
            select(Machine.backend_ref).where(
                Machine.environment_id == env.id,
                Machine.state.in_(
                    [MachineState.starting, MachineState.ready, MachineState.assigned]
                ),
            )
        ).all()
        row.rolling = sum(on_old_spec(ref or {}, env.image_id, env.flavor_id) for ref in live)
        pools.append(row)
    error_machines = [
        ErrorMachine(m.id, env_name, title, m.owner_id, m.error, m.state_changed_at)
        for m, env_name, title in session.execute(
            select(Machine, Environment.name, Course.title)
            .join(Environment, Environment.id == Machine.environment_id)
            .outerjoin(Course, Course.id == Machine.course_id)
            .where(Machine.state == MachineState.error)
            .order_by(Machine.state_changed_at.desc())
            .limit(SHOWN_ROWS)
        )
    ]
    failed_scores = [
        FailedScore(
            row.id,
            course_title or "",
            assignment_title or "",
            row.assignment_id,
            row.user_id,
            f"{row.score_given:g} / {row.score_maximum:g}",
            row.attempts,
            row.last_error,
            row.created_at,
        )
        for row, assignment_title, course_title in session.execute(
            select(ScoreOutbox, Assignment.title, Course.title)
            .join(Assignment, Assignment.id == ScoreOutbox.assignment_id)
            .join(Activity, Activity.id == Assignment.activity_id)
            .join(Course, Course.id == Activity.course_id)
            .where(ScoreOutbox.status == ScoreStatus.failed)
            .order_by(ScoreOutbox.id.desc())
            .limit(SHOWN_ROWS)
        )
    ]
    failed_syncs = [
        FailedSync(c.id, c.title or c.context_id, issuer, c.platform_error, c.platform_error_at)
        for c, issuer in session.execute(
            select(Course, Platform.issuer)
            .join(Platform, Platform.id == Course.platform_id)
            .where(Course.platform_error.is_not(None))
            .order_by(Course.platform_error_at.desc())
            .limit(SHOWN_ROWS)
        )
    ]
    return Overview(platforms, environments, pools, error_machines, failed_scores, failed_syncs)


class ScoreNotResendable(ValueError):
    """The outbox row is not a failed score (sent, pending, superseded or unknown)."""


def send_failed_score_again(session: Session, row_id: int) -> int:
    """The admin's "send again" of a failed outbox row: the teacher's `send_again` (the
    student's current grade owed once more, a fresh row), returning the new row's id for the
    caller to enqueue once committed."""
    from grading.grades import GradeRejected, send_again
    from grading.models import Assignment, ScoreOutbox, ScoreStatus

    row = session.get(ScoreOutbox, row_id)
    if row is None or row.status is not ScoreStatus.failed:
        raise ScoreNotResendable(f"score {row_id} is not a failed score")
    try:
        return send_again(session, session.get_one(Assignment, row.assignment_id), row.user_id).id
    except GradeRejected as exc:
        raise ScoreNotResendable(str(exc)) from None
