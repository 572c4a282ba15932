"""Registering platforms and removing them: the service code of `labpool platform add|remove`
and of dynamic registration (lti_tool/dynamic_registration.py), which stores what the
platform answered through `register_platform` too."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from config.db import utcnow
from config.runtime import Runtime
from config.settings import Settings
from lti_tool.framing import forget_platform_origins
from lti_tool.models import Activity, Course, Deployment, Enrolment, Platform


class RegistrationError(Exception):
    """The registration's values are not acceptable; the message says which."""


def _check_url(label: str, url: str, allow_http: bool) -> None:
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.netloc:
        need = "an http(s)" if allow_http else "an https"
        raise RegistrationError(f"{label} must be {need} URL, got {url!r}")


def register_platform(
    session: Session,
    settings: Settings,
    *,
    issuer: str,
    client_id: str,
    deployment_ids: Iterable[str],
    auth_url: str,
    token_url: str,
    jwks_url: str,
    name: str = "",
) -> Platform:
    """Add a platform, or add deployments to an existing (issuer, client id)."""
    allow_http = not settings.is_production
    for label, url in (
        ("issuer", issuer),
        ("auth URL", auth_url),
        ("token URL", token_url),
        ("JWKS URL", jwks_url),
    ):
        _check_url(label, url, allow_http)
    if not client_id.strip():
        raise RegistrationError("client id must not be empty")
    deployment_ids = [d.strip() for d in deployment_ids if d.strip()]
    if not deployment_ids:
        raise RegistrationError("at least one deployment id is needed")

    platform = session.scalars(
        select(Platform).where(Platform.issuer == issuer, Platform.client_id == client_id)
    ).one_or_none()
    if platform is None:
        platform = Platform(issuer=issuer, client_id=client_id, name=name)
        session.add(platform)
    platform.auth_url, platform.token_url, platform.jwks_url = auth_url, token_url, jwks_url
    known = {d.deployment_id for d in platform.deployments}
    for deployment_id in deployment_ids:
        if deployment_id not in known:
            platform.deployments.append(Deployment(deployment_id=deployment_id))
    session.flush()
    forget_platform_origins()  # this process frames the new platform's pages at once
    return platform


class PlatformInUse(RegistrationError):
    """The platform's courses still have machines or cloud volumes; `force` removes anyway."""


def find_platform(session: Session, issuer: str, client_id: str | None = None) -> Platform:
    """The registration of `issuer` (and `client_id`: needed when the issuer has several)."""
    query = select(Platform).where(Platform.issuer == issuer)
    if client_id:
        query = query.where(Platform.client_id == client_id)
    found = session.scalars(query.order_by(Platform.id)).all()
    if not found:
        which = f" with client id {client_id}" if client_id else ""
        raise RegistrationError(f"no platform {issuer}{which} is registered (see `platform list`)")
    if len(found) > 1:
        clients = ", ".join(p.client_id for p in found)
        raise RegistrationError(
            f"{issuer} is registered {len(found)} times (client ids {clients}): say which "
            "with --client-id"
        )
    return found[0]


@dataclass
class PlatformRemoval:
    """What removing a registration takes with it (counted before, done in one transaction)."""

    issuer: str
    client_id: str
    deployment_ids: list[str]
    courses: int = 0
    activities: int = 0
    enrolments: int = 0
    assignments: int = 0
    submissions: int = 0
    grades: int = 0
    scores_unsent: int = 0  # grades the outbox still owed this platform: never sent
    volumes: int = 0  # students' cloud volumes: their rows go, the volumes stay in the cloud
    live_machines: list[int] = field(default_factory=list)  # asked to stop (force only)

    def summary(self) -> str:
        parts = [
            f"{self.courses} course(s)",
            f"{self.activities} activity(ies)",
            f"{self.enrolments} enrolment(s)",
            f"{self.assignments} assignment(s) with {self.submissions} submission(s) and "
            f"{self.grades} grade(s)",
            f"{self.scores_unsent} unsent score(s)",
        ]
        if self.volumes:
            parts.append(f"the records of {self.volumes} student volume(s)")
        if self.live_machines:
            parts.append(f"{len(self.live_machines)} live machine(s), now stopping")
        return ", ".join(parts)


def remove_platform(
    session: Session, *, issuer: str, client_id: str | None = None, force: bool = False
) -> PlatformRemoval:
    """Remove a registration: its deployments, and its courses with everything under them
    (enrolments, activities, launches, assignments, submissions' records, grades, unsent
    scores, class sessions). People (users, keyed by issuer and shared by the issuer's other
    registrations), machines' records (they lose their course), environments, and files on
    disk (homes, assignment files, submission zips) stay.

    Refused (PlatformInUse) while the courses have live machines or students' cloud volumes,
    unless `force`: then live machines are moved to `stopping` and their ids returned, for
    the caller to enqueue their stop once this transaction is committed. Cloud volumes are
    never deleted here (`labpool volumes delete` does that): with `force` only their records
    go. Web processes stop accepting the platform's launches within 30 s (their
    registration cache)."""
    from provisioning.models import MachineState

    platform = find_platform(session, issuer, client_id)
    removal, live = _count_removal(session, platform, lock=True)
    if (live or removal.volumes) and not force:
        raise PlatformInUse(
            f"{issuer} (client {platform.client_id}) still has {len(live)} live machine(s) "
            f"and {removal.volumes} student volume(s) in its courses. Stop the machines "
            "(they stop when idle, or from the class page) and delete the volumes "
            "(`labpool volumes delete`) first, or remove with --force: live machines are "
            "stopped, the volumes stay in the cloud without a record"
        )
    for machine in live:
        machine.move_to(MachineState.stopping)
        removal.live_machines.append(machine.id)
    session.flush()
    session.execute(delete(Platform).where(Platform.id == platform.id))
    session.expunge_all()  # what the cascade removed must not be flushed again
    forget_platform_origins()
    return removal


def _count_removal(
    session: Session, platform: Platform, *, lock: bool
) -> tuple[PlatformRemoval, list[Any]]:
    """What removing `platform` would take, and its courses' live machines (locked if
    `lock`, for the removal itself)."""
    from grading.models import Assignment, Grade, ScoreOutbox, ScoreStatus, Submission
    from provisioning.models import LIVE_STATES, Machine, StudentVolume

    removal = PlatformRemoval(
        platform.issuer, platform.client_id, [d.deployment_id for d in platform.deployments]
    )
    courses = select(Course.id).where(Course.platform_id == platform.id).scalar_subquery()
    activities = select(Activity.id).where(Activity.course_id.in_(courses)).scalar_subquery()
    assignments = (
        select(Assignment.id).where(Assignment.activity_id.in_(activities)).scalar_subquery()
    )

    def count(model: type, *where: object) -> int:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    removal.courses = count(Course, Course.platform_id == platform.id)
    removal.activities = count(Activity, Activity.course_id.in_(courses))
    removal.enrolments = count(Enrolment, Enrolment.course_id.in_(courses))
    removal.assignments = count(Assignment, Assignment.activity_id.in_(activities))
    removal.submissions = count(Submission, Submission.assignment_id.in_(assignments))
    removal.grades = count(Grade, Grade.assignment_id.in_(assignments))
    removal.scores_unsent = count(
        ScoreOutbox,
        ScoreOutbox.platform_id == platform.id,
        ScoreOutbox.status.in_([ScoreStatus.pending, ScoreStatus.failed]),
    )
    removal.volumes = count(StudentVolume, StudentVolume.course_id.in_(courses))
    query = select(Machine).where(Machine.course_id.in_(courses), Machine.state.in_(LIVE_STATES))
    live = list(session.scalars(query.with_for_update() if lock else query).all())
    return removal, live


def stop_removed_machines(rt: Runtime, removal: PlatformRemoval) -> None:
    """After a forced removal is committed: the proxy forgets its live machines and their
    stop is queued (the CLI and the admin page both end a removal here)."""
    from provisioning.proxy_table import withdraw_route
    from provisioning.queue import STOP_JOB, enqueue

    for machine_id in removal.live_machines:
        withdraw_route(rt.redis, machine_id)
        enqueue(rt.redis, rt.settings.queue_name, STOP_JOB, machine_id)


def removal_preview(
    session: Session, *, issuer: str, client_id: str | None = None
) -> tuple[PlatformRemoval, int]:
    """What `remove_platform` would take (counts only, nothing changed) and how many live
    machines its courses have (stopped by a forced removal): the admin page's confirmation."""
    removal, live = _count_removal(session, find_platform(session, issuer, client_id), lock=False)
    return removal, len(live)


def set_platform_disabled(
    session: Session, *, issuer: str, client_id: str | None = None, disabled: bool
) -> Platform:
    """Disable a registration (its logins and launches are refused with a message saying
    so; everything it has stays: courses, machines, grades, and scores still owed go out)
    or enable it again. Web processes see the change within 30 s (their registration
    cache)."""
    platform = find_platform(session, issuer, client_id)
    platform.disabled_at = (platform.disabled_at or utcnow()) if disabled else None
    return platform


def moodle_values(settings: Settings) -> list[tuple[str, str]]:
    return [
        ("Tool URL", settings.url("/lti/launch")),
        ("LTI version", "LTI 1.3"),
        ("Public key type", "Keyset URL"),
        ("Public keyset", settings.url("/lti/jwks.json")),
        ("Initiate login URL", settings.url("/lti/login")),
        ("Redirection URI(s)", settings.url("/lti/launch")),
        # With "Supports Deep Linking (Content-Item Message)" ticked: "Select content".
        ("Content Selection URL", settings.url("/lti/launch")),
    ]
