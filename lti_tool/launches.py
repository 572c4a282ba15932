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

from config.db import UTCDateTime, upsert, utcnow
from lti_tool.deep_linking import CUSTOM_ASSIGNMENT, CUSTOM_ENVIRONMENT, id_in_custom
from lti_tool.models import Activity, Course, Enrolment, Launch, User
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
    if session.get_bind().dialect.name == "postgresql":
        user_id, course_id, activity_id, environment_id = _upsert_context_pg(session, params)
    else:
        user_id, course_id, activity_id, environment_id = _upsert_context(session, params)

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


# On PostgreSQL the upserts of a launch are one statement (one round trip on the hot path).
# The course and the activity rows are a whole class's: the statement locks them only when
# the launch changes them. (`INSERT … ON CONFLICT DO UPDATE` locks the row it meets even when
# nothing changes, until the launch commits — PostgreSQL's INSERT page: "all rows will be
# locked when the ON CONFLICT DO UPDATE action is taken" — and a class clicking at once was
# served one student at a time.) Each of the two rows comes from one of three CTEs:
# - `*_new`: INSERT … ON CONFLICT DO NOTHING, tried only when the row is not in the
#   snapshot (so a launch neither waits on another's UPDATE of the row in the unique
#   index's check nor spends a sequence value);
# - `*_changed`: an UPDATE whose WHERE holds only when a stored value differs from what the
#   launch brings (the SET's own expressions, `IS DISTINCT FROM`), so only a real change
#   locks the row; its RETURNING gives the new values;
# - else a plain read of the row.
# All the CTEs share the statement's snapshot and do not see each other's writes: the guard
# on the INSERT and `NOT EXISTS (… *_changed)` on the read make at most one answer. None
# answers for a launch whose INSERT lost a race with another launch's first one (it waited for
# the winner's commit; the winner's row is not in its snapshot): the statement yields no row
# and `_upsert_context_pg` runs it again, on a fresh snapshot. Users and enrolments are one
# student's own rows: they keep ON CONFLICT DO UPDATE. Same effect as `_upsert_context`,
# which SQLite (no data-modifying CTEs) runs as four statements. `ags_scope` is a json
# column (no equality operator): it is compared as its text, as `upsert` wrote it. A
# parameter in an INSERT's SELECT list is typed text unless cast: the varchar ones are
# cast, as they are also compared with their columns.
_CONTEXT_UPSERT_PG = text("""
WITH u AS (
  INSERT INTO users (issuer, sub, name, email, created_at, last_seen_at)
  VALUES (:iss, :sub, :name, :email, :now, :now)
  ON CONFLICT (issuer, sub) DO UPDATE SET
    name = COALESCE(EXCLUDED.name, users.name),
    email = COALESCE(EXCLUDED.email, users.email),
    last_seen_at = EXCLUDED.last_seen_at
  RETURNING id),
c_new AS (
  INSERT INTO courses (platform_id, context_id, label, title, memberships_url)
  SELECT :platform_id, CAST(:context_id AS varchar), CAST(:label AS varchar), :title,
    :memberships_url
  WHERE NOT EXISTS (SELECT 1 FROM courses
                    WHERE platform_id = :platform_id AND context_id = :context_id)
  ON CONFLICT (platform_id, context_id) DO NOTHING
  RETURNING id),
c_changed AS (
  UPDATE courses SET label = :label, title = :title,
    memberships_url = COALESCE(:memberships_url, courses.memberships_url)
  WHERE platform_id = :platform_id AND context_id = :context_id
    AND (label IS DISTINCT FROM :label OR title IS DISTINCT FROM :title
         OR memberships_url IS DISTINCT FROM COALESCE(:memberships_url, memberships_url))
  RETURNING id),
c AS (
  SELECT id FROM c_new
  UNION ALL SELECT id FROM c_changed
  UNION ALL SELECT id FROM courses
    WHERE platform_id = :platform_id AND context_id = :context_id
      AND NOT EXISTS (SELECT 1 FROM c_changed)),
e AS (
  INSERT INTO enrolments (course_id, user_id, roles, started_at, ended_at, name, email)
  SELECT c.id, u.id, :roles, :now, NULL, :name, :email FROM c, u
  ON CONFLICT (course_id, user_id) DO UPDATE SET roles = EXCLUDED.roles, ended_at = NULL,
    name = EXCLUDED.name, email = EXCLUDED.email
  RETURNING id),
custom AS (
  SELECT c.id AS course_id,
    (SELECT id FROM environments WHERE id = :custom_environment) AS environment_id,
    (SELECT s.id FROM assignments s JOIN activities t ON t.id = s.activity_id
     WHERE s.id = :custom_assignment AND t.course_id = c.id) AS assignment_id
  FROM c),
a_new AS (
  INSERT INTO activities (course_id, resource_link_id, environment_id, assignment_id,
                          title, ags_scope, ags_lineitems, ags_lineitem)
  SELECT course_id, CAST(:resource_link_id AS varchar), environment_id, assignment_id,
    :link_title, :ags_scope, :ags_lineitems, :ags_lineitem FROM custom
  WHERE NOT EXISTS (SELECT 1 FROM activities t
                    WHERE t.course_id = custom.course_id
                      AND t.resource_link_id = :resource_link_id)
  ON CONFLICT (course_id, resource_link_id) DO NOTHING
  RETURNING id, environment_id),
a_changed AS (
  UPDATE activities t SET
    environment_id = COALESCE(t.environment_id, custom.environment_id),
    assignment_id = COALESCE(t.assignment_id, custom.assignment_id),
    title = :link_title,
    ags_scope = COALESCE(:ags_scope, t.ags_scope),
    ags_lineitems = COALESCE(:ags_lineitems, t.ags_lineitems),
    ags_lineitem = COALESCE(:ags_lineitem, t.ags_lineitem)
  FROM custom
  WHERE t.course_id = custom.course_id AND t.resource_link_id = :resource_link_id
    AND (t.environment_id IS DISTINCT FROM COALESCE(t.environment_id, custom.environment_id)
         OR t.assignment_id IS DISTINCT FROM COALESCE(t.assignment_id, custom.assignment_id)
         OR t.title IS DISTINCT FROM :link_title
         OR t.ags_scope::text IS DISTINCT FROM COALESCE(:ags_scope, t.ags_scope)::text
         OR t.ags_lineitems IS DISTINCT FROM COALESCE(:ags_lineitems, t.ags_lineitems)
         OR t.ags_lineitem IS DISTINCT FROM COALESCE(:ags_lineitem, t.ags_lineitem))
  RETURNING t.id, t.environment_id),
a AS (
  SELECT id, environment_id FROM a_new
  UNION ALL SELECT id, environment_id FROM a_changed
  UNION ALL SELECT t.id, t.environment_id FROM activities t, custom
    WHERE t.course_id = custom.course_id AND t.resource_link_id = :resource_link_id
      AND NOT EXISTS (SELECT 1 FROM a_changed))
SELECT u.id, c.id, a.id,
       COALESCE(a.environment_id, (SELECT id FROM environments WHERE name = 'default'))
FROM u, c, a, (SELECT count(*) FROM e) AS enrolled
""").bindparams(
    bindparam("roles", type_=JSON),
    bindparam("custom_environment", type_=Integer),
    bindparam("custom_assignment", type_=Integer),
    bindparam("ags_scope", type_=JSON(none_as_null=True)),
    bindparam("now", type_=UTCDateTime),
)

# A first launch that lost a race needs one more run (two when it lost the course's and then
# the activity's); a few more cover launches of a brand-new course arriving in waves.
CONTEXT_ATTEMPTS = 5


class ContextNotSettled(RuntimeError):
    """The launch's course and activity could be neither written nor read: concurrent first
    launches kept winning the insert (not expected to happen: the launch fails)."""


def _upsert_context_pg(session: Session, params: dict[str, Any]) -> tuple[int, int, int, int]:
    for _ in range(CONTEXT_ATTEMPTS):
        row = session.execute(_CONTEXT_UPSERT_PG, params).one_or_none()
        if row is not None:  # else a first launch of the course or activity won: read again
            user_id, course_id, activity_id, environment_id = row
            return user_id, course_id, activity_id, environment_id
    raise ContextNotSettled(
        f"Could not record the launch's course and activity after {CONTEXT_ATTEMPTS} "
        "attempts: concurrent first launches of the same course kept winning."
    )


def _upsert_context(session: Session, p: dict[str, Any]) -> tuple[int, int, int, int]:
    user_id = upsert(
        session,
        User,
        keys={"issuer": p["iss"], "sub": p["sub"]},
        values={"name": p["name"], "email": p["email"], "last_seen_at": p["now"]},
        keep_if_null=("name", "email"),
    )
    course_id = upsert(
        session,
        Course,
        keys={"platform_id": p["platform_id"], "context_id": p["context_id"]},
        values={"label": p["label"], "title": p["title"], "memberships_url": p["memberships_url"]},
        keep_if_null=("memberships_url",),
    )
    upsert(
        session,
        Enrolment,
        keys={"course_id": course_id, "user_id": user_id},
        values={"roles": p["roles"], "ended_at": None, "name": p["name"], "email": p["email"]},
    )
    activity_id = upsert(
        session,
        Activity,
        keys={"course_id": course_id, "resource_link_id": p["resource_link_id"]},
        values={
            "title": p["link_title"],
            "ags_scope": p["ags_scope"],
            "ags_lineitems": p["ags_lineitems"],
            "ags_lineitem": p["ags_lineitem"],
        },
        keep_if_null=("ags_scope", "ags_lineitems", "ags_lineitem"),
    )
    if p["custom_environment"] is not None or p["custom_assignment"] is not None:
        session.execute(_CUSTOM_CHOICE, {**p, "course_id": course_id, "activity_id": activity_id})
    return user_id, course_id, activity_id, environment_of(session, activity_id).id


# What the PostgreSQL statement's activity upsert does with a deep-linked activity's custom
# parameters, for SQLite (run only when the launch carries one).
_CUSTOM_CHOICE = text("""
UPDATE activities SET
  environment_id = COALESCE(environment_id,
    (SELECT id FROM environments WHERE id = :custom_environment)),
  assignment_id = COALESCE(assignment_id,
    (SELECT s.id FROM assignments s JOIN activities t ON t.id = s.activity_id
     WHERE s.id = :custom_assignment AND t.course_id = :course_id))
WHERE id = :activity_id
""").bindparams(
    bindparam("custom_environment", type_=Integer), bindparam("custom_assignment", type_=Integer)
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
