"""What an accepted launch changes: one transaction upserts the user, the course, the
enrolment and the activity, records the launch, and finds a learner their machine.

Claims used (LTI Core 1.3 §5.3–5.4): `sub`, `roles`, `context`, `resource_link`, optional
`name`/`email` (Moodle sends them only if the admin shares them), the NRPS claim's
`context_memberships_url` (kept for roster sync) and the AGS claim's `scope`, `lineitems` and
`lineitem` (kept on the activity, so a worker can send grades; a launch without the claim
keeps what an earlier one brought).

A deep-linked activity's launches carry the `labpool_environment` (and `labpool_assignment`)
custom parameters (LTI Core §5.4.6; LTI Deep Linking 2.0 §3.1, lti_tool/deep_linking.py):
the activity takes them in the same statement when it has none yet (a teacher's later
choice on the class page wins); an id that names nothing, or another course's assignment,
is ignored and the default kept. An environment the course may not use (retired, or limited
to other courses: provisioning.course_access) is taken all the same, so the launch is refused
saying why (`machine_for_learner`) instead of quietly giving students another environment;
the class page tells the teacher to pick another.

Names are stored on the enrolment as this launch carries them (none clears them): what a
teacher sees follows what the course's own registration shares now, never what another
registration of the same issuer shared.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, bindparam, func, select, text
from sqlalchemy.orm import Session

from config.db import UTCDateTime, utcnow
from lti_tool.deep_linking import CUSTOM_ASSIGNMENT, CUSTOM_ENVIRONMENT, id_in_custom
from lti_tool.launch_context import upsert_context
from lti_tool.models import Activity, Enrolment, Launch
from lti_tool.roles import is_staff
from provisioning.claiming import machine_for_learner
from provisioning.models import Environment, Machine

CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
NRPS_CLAIM = "https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice"
AGS_CLAIM = "https://purl.imsglobal.org/spec/lti-ags/claim/endpoint"
NO_CONTEXT = ""  # launches without a context claim share one pseudo-course per platform


# A staff launch grants the class page for as long as the session it signs in lasts, whatever
# the roster says (Moodle's site admins launch as Administrator without being enrolled).
LAUNCH_SESSION_S = 8 * 3600


@dataclass(frozen=True)
class LaunchOutcome:
    user_id: int
    course_id: int
    activity_id: int
    staff: bool
    machine: Machine | None
    how: str | None  # reused | claimed | requested (learners only)
    release_owed: bool = False  # a learner's launch of an activity with published assignments


ID_MAX = 255  # the id columns' length (OIDC's `sub`, LTI's context and resource link ids)


class MalformedClaims(ValueError):
    """A validated launch whose claims cannot be recorded (a claim of the wrong JSON type, an
    id longer than its column): refused before anything is written."""


def claim_object(claims: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """An optional claim that must be a JSON object ({} when absent)."""
    value = claims.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedClaims(
            f"The launch's {name.rsplit('/', 1)[-1]} claim must be a JSON object, "
            f"not {type(value).__name__}."
        )
    return value


def claim_roles(claims: Mapping[str, Any]) -> list[str]:
    """The launch's roles (a JSON array; its strings)."""
    value = claims.get(CLAIM + "roles")
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedClaims(
            f"The launch's roles claim must be a JSON array, not {type(value).__name__}."
        )
    return [r for r in value if isinstance(r, str)]


def claim_id(value: Any, what: str) -> str:
    """An id as stored: its text, at most ID_MAX characters."""
    if value is None:
        raise MalformedClaims(f"The launch has no {what}.")
    text = str(value)
    if len(text) > ID_MAX:
        raise MalformedClaims(f"The launch's {what} is longer than {ID_MAX} characters.")
    return text


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
    roles = claim_roles(claims)
    staff = is_staff(roles)
    context = claim_object(claims, CLAIM + "context")
    link = claim_object(claims, CLAIM + "resource_link")
    nrps = claim_object(claims, NRPS_CLAIM)
    ags = claims.get(AGS_CLAIM)
    ags = ags if isinstance(ags, dict) else {}
    scope = ags.get("scope")

    params = {
        "iss": claims["iss"],
        "sub": claim_id(claims.get("sub"), "user id (sub)"),
        "name": _text(claims.get("name")),
        "email": _text(claims.get("email")),
        "platform_id": platform_id,
        "context_id": claim_id(context.get("id", NO_CONTEXT), "context id"),
        "label": _text(context.get("label")) or "",
        "title": _text(context.get("title"), 1000) or "",
        "memberships_url": _text(nrps.get("context_memberships_url"), 2000),
        "roles": roles,
        "resource_link_id": claim_id(link.get("id"), "resource link id"),
        "link_title": _text(link.get("title"), 1000) or "",
        "now": now,
        "custom_environment": id_in_custom(claims, CUSTOM_ENVIRONMENT),
        "custom_assignment": id_in_custom(claims, CUSTOM_ASSIGNMENT),
        "ags_scope": [s for s in scope if isinstance(s, str)][:20]
        if isinstance(scope, list)
        else None,
        "ags_lineitems": _text(ags.get("lineitems"), 2000),
        "ags_lineitem": _text(ags.get("lineitem"), 2000),
    }
    user_id, course_id, activity_id, environment_id = upsert_context(session, params)

    choice = None
    if not staff:
        environment = cached_environment(session, environment_id)
        choice = machine_for_learner(session, environment, course_id, user_id, activity_id)
    owed = session.execute(
        _INSERT_LAUNCH,
        {
            "user_id": user_id,
            "activity_id": activity_id,
            "roles": roles,
            "at": now,
            "machine_id": choice.machine.id if choice else None,
        },
    ).scalar_one()
    return LaunchOutcome(
        user_id=user_id,
        course_id=course_id,
        activity_id=activity_id,
        staff=staff,
        machine=choice.machine if choice else None,
        how=choice.how if choice else None,
        release_owed=bool(owed) and not staff,
    )


# Does a launch of the activity owe its student a release (grading.release_jobs)? Its published
# assignments and the one a deep link attached to it (`delivered_assignments`'s rule), as one
# EXISTS: asked by the launch row's INSERT (no round trip of its own) and by `release_owed`.
RELEASE_OWED_SQL = """EXISTS (
  SELECT 1 FROM assignments s
  WHERE (s.activity_id = :activity_id
         OR s.id = (SELECT assignment_id FROM activities WHERE id = :activity_id))
    AND s.published_at IS NOT NULL AND s.release_path IS NOT NULL)"""

# Written once as SQL: a Core statement, even built once, is cache-keyed at every execution.
_INSERT_LAUNCH = text(f"""
INSERT INTO launches (user_id, activity_id, roles, at, machine_id)
VALUES (:user_id, :activity_id, :roles, :at, :machine_id)
RETURNING {RELEASE_OWED_SQL}
""").bindparams(
    bindparam("roles", type_=JSON),
    bindparam("at", type_=UTCDateTime),
    bindparam("machine_id", type_=Integer),
)


_environments: dict[int, tuple[float, Environment]] = {}
ENVIRONMENT_TTL_S = 10.0


def cached_environment(session: Session, environment_id: int) -> Environment:
    """An environment, from this process's short-lived cache when it can (environments
    change rarely; a launch needs one every time)."""
    hit = _environments.get(environment_id)
    if hit is not None and hit[0] > time.monotonic():
        return session.merge(hit[1], load=False)
    environment = session.get_one(Environment, environment_id)
    session.expunge(environment)
    _environments[environment_id] = (time.monotonic() + ENVIRONMENT_TTL_S, environment)
    return session.merge(environment, load=False)


_ENVIRONMENT_OF = select(Environment).where(
    Environment.id
    == func.coalesce(
        select(Activity.environment_id)
        .where(Activity.id == bindparam("activity_id"))
        .scalar_subquery(),
        select(Environment.id).where(Environment.name == "default").scalar_subquery(),
    )
)


def environment_of(session: Session, activity_id: int) -> Environment:
    """The activity's environment, or the default one (one query)."""
    return session.scalars(_ENVIRONMENT_OF, {"activity_id": activity_id}).one()


def staff_launches(session: Session, course_id: int, since: datetime) -> dict[int, list[str]]:
    """The users whose newest launch into this course since `since` carried a staff role, with
    that launch's roles: their launch session grants the class page whatever the roster says."""
    newest: dict[int, list[str]] = {}
    for user_id, roles in session.execute(
        select(Launch.user_id, Launch.roles)
        .join(Activity, Activity.id == Launch.activity_id)
        .where(Activity.course_id == course_id, Launch.at >= since)
        .order_by(Launch.at, Launch.id)
    ):
        newest[user_id] = roles or []  # the last one wins
    return {uid: roles for uid, roles in newest.items() if is_staff(roles)}


def enrolment_roles(session: Session, user_id: int, course_id: int) -> list[str] | None:
    """The roles of a current enrolment, or None if the user is not (or no longer) enrolled."""
    return session.scalars(
        select(Enrolment.roles).where(
            Enrolment.user_id == user_id,
            Enrolment.course_id == course_id,
            Enrolment.ended_at.is_(None),
        )
    ).first()
