"""The people and places a launch names, stored: the user, the course, their enrolment and
the activity, upserted inside the launch's transaction (lti_tool.launches.record_launch),
answering their ids and the activity's environment id (its own, else the default one).

PostgreSQL does it in one statement that locks the course and activity rows (a whole
class's) only when the launch changes them; SQLite, with no data-modifying CTEs and one
writer at a time, in four statements. Both keep the same rules (lti_tool.launches' docstring).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Integer, bindparam, text
from sqlalchemy.orm import Session

from config.db import UTCDateTime, upsert
from lti_tool.models import Activity, Course, Enrolment, User


def upsert_context(session: Session, params: dict[str, Any]) -> tuple[int, int, int, int]:
    """(user id, course id, activity id, environment id) for the launch's claims in `params`
    (record_launch builds them)."""
    if session.get_bind().dialect.name == "postgresql":
        return _upsert_context_pg(session, params)
    return _upsert_context(session, params)


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
    environment_id = session.execute(_ENVIRONMENT_ID, {"activity_id": activity_id}).scalar_one()
    return user_id, course_id, activity_id, environment_id


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


# The activity's environment, else the default one (as the PostgreSQL statement answers it).
_ENVIRONMENT_ID = text("""
SELECT COALESCE((SELECT environment_id FROM activities WHERE id = :activity_id),
                (SELECT id FROM environments WHERE name = 'default'))
""")
