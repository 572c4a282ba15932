"""What an accepted launch changes: one transaction upserts the user, the course, the
enrolment and the activity, records the launch, and finds a learner their machine.

Claims used (LTI Core 1.3 §5.3–5.4): `sub`, `roles`, `context`, `resource_link`, optional
`name`/`email` (Moodle sends them only if the admin shares them), and the NRPS claim's
`context_memberships_url` (kept for roster sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from config.db import upsert, utcnow
from lti_tool.models import Activity, Course, Enrolment, Launch, User
from provisioning.claims import machine_for_learner
from provisioning.models import Environment, Machine

CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
NRPS_CLAIM = "https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice"
STAFF_ROLES = (
    "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor",
    "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator",
    "http://purl.imsglobal.org/vocab/lis/v2/system/person#Administrator",
    "Instructor",  # LTI Core §A.2.3.1 allows the short form of context roles
)
NO_CONTEXT = ""  # launches without a context claim share one pseudo-course per platform


def is_staff(roles: list[str]) -> bool:
    return any(role in STAFF_ROLES for role in roles)


@dataclass(frozen=True)
class LaunchOutcome:
    user_id: int
    course_id: int
    activity_id: int
    staff: bool
    machine: Machine | None
    how: str | None  # reused | claimed | requested (learners only)


def _text(value: Any, limit: int = 255) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def default_environment(session: Session) -> Environment:
    """The environment of activities nobody configured (JupyterLab on the local backend,
    created by the first migration)."""
    return session.scalars(select(Environment).where(Environment.name == "default")).one()


def record_launch(session: Session, platform_id: int, claims: Mapping[str, Any]) -> LaunchOutcome:
    """Apply a validated resource-link launch to the database (inside the caller's
    transaction) and, for a learner, settle their machine."""
    now = utcnow()
    roles = [r for r in claims.get(CLAIM + "roles") or [] if isinstance(r, str)]
    staff = is_staff(roles)
    context = claims.get(CLAIM + "context") or {}
    link = claims[CLAIM + "resource_link"]
    nrps = claims.get(NRPS_CLAIM) or {}

    user_id = upsert(
        session, User,
        keys={"issuer": claims["iss"], "sub": str(claims["sub"])},
        values={"name": _text(claims.get("name")), "email": _text(claims.get("email")),
                "last_seen_at": now},
        keep_if_null=("name", "email"),
    )
    course_id = upsert(
        session, Course,
        keys={"platform_id": platform_id, "context_id": str(context.get("id", NO_CONTEXT))},
        values={"label": _text(context.get("label")) or "",
                "title": _text(context.get("title"), 1000) or "",
                "memberships_url": _text(nrps.get("context_memberships_url"), 2000)},
        keep_if_null=("memberships_url",),
    )
    upsert(
        session, Enrolment,
        keys={"course_id": course_id, "user_id": user_id},
        values={"roles": roles, "ended_at": None},
    )
    activity_id = upsert(
        session, Activity,
        keys={"course_id": course_id, "resource_link_id": str(link["id"])},
        values={"title": _text(link.get("title"), 1000) or ""},
    )

    choice = None
    if not staff:
        environment = environment_of(session, activity_id)
        choice = machine_for_learner(session, environment, course_id, user_id)
    session.execute(
        insert(Launch).values(
            user_id=user_id, activity_id=activity_id, roles=roles, at=now,
            machine_id=choice.machine.id if choice else None,
        )
    )
    return LaunchOutcome(
        user_id=user_id,
        course_id=course_id,
        activity_id=activity_id,
        staff=staff,
        machine=choice.machine if choice else None,
        how=choice.how if choice else None,
    )


def environment_of(session: Session, activity_id: int) -> Environment:
    """The activity's environment, or the default one (one query)."""
    chosen = select(Activity.environment_id).where(Activity.id == activity_id).scalar_subquery()
    default = select(Environment.id).where(Environment.name == "default").scalar_subquery()
    return session.scalars(
        select(Environment).where(Environment.id == func.coalesce(chosen, default))
    ).one()


def enrolment_roles(session: Session, user_id: int, course_id: int) -> list[str] | None:
    """The roles of a current enrolment, or None if the user is not (or no longer) enrolled."""
    return session.scalars(
        select(Enrolment.roles).where(
            Enrolment.user_id == user_id,
            Enrolment.course_id == course_id,
            Enrolment.ended_at.is_(None),
        )
    ).first()


