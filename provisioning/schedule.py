"""How many warm machines a pool wants now: the class schedule and the roster decide.

During a class session of any activity that uses the pool's environment (from `lead_minutes`
before it starts until it ends, in the session's time zone), the pool wants a machine for
every current learner of that course who does not hold one yet; a teacher's "warm now" asks
for a machine per learner of the class for two hours; the largest of these and the pool's own
`warm_target` (the floor) wins. The reconciler caps this by `max_size` and the cloud's quota,
and never takes away assigned machines.

Enrolments and activities belong to the LTI side; they are read here through lightweight
table constructs (no import of the web edge).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import JSON, column, func, select, table
from sqlalchemy.orm import Session

from lti_tool.roles import is_staff
from provisioning.models import (
    LIVE_STATES,
    ClassSession,
    Environment,
    EnvironmentCourse,
    Machine,
    WarmBoost,
)

activities = table("activities", column("id"), column("course_id"), column("environment_id"))
enrolments = table(
    "enrolments", column("course_id"), column("user_id"), column("roles", JSON), column("ended_at")
)


def session_is_on(meeting: ClassSession, now: datetime) -> bool:
    """Is `now` within [start − lead, end) of one of the meeting's weekly occurrences?"""
    try:
        zone = ZoneInfo(meeting.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = now.astimezone(zone)
    for day in _around(local.date()):
        if day.weekday() != meeting.weekday:
            continue
        start = datetime.combine(day, meeting.starts, zone) - timedelta(
            minutes=meeting.lead_minutes
        )
        end = datetime.combine(day, meeting.ends, zone)
        if start <= local < end:
            return True
    return False


def _around(today: date) -> Iterable[date]:
    # A lead time can reach back over midnight, so tomorrow's sessions count too.
    return (today - timedelta(days=1), today, today + timedelta(days=1))


def is_learner(roles: list[str] | None) -> bool:
    """Not staff, by the one rule the launch uses (`lti_tool.launches.is_staff`)."""
    return not is_staff([str(role) for role in roles or []])


def scheduled_demand(session: Session, environment_id: int, now: datetime) -> tuple[int, bool]:
    """(warm machines wanted by classes in session now, whether any class is in session)."""
    meetings = session.execute(
        select(ClassSession, activities.c.course_id)
        .join(activities, activities.c.id == ClassSession.activity_id)
        .where(activities.c.environment_id == environment_id)
    ).all()
    courses = {course_id for meeting, course_id in meetings if session_is_on(meeting, now)}
    if courses and session.get_one(Environment, environment_id).limited_to_courses:
        # Courses the environment is not open to start no machine of it: nothing to warm.
        courses &= set(
            session.scalars(
                select(EnvironmentCourse.course_id).where(
                    EnvironmentCourse.environment_id == environment_id
                )
            )
        )
    if not courses:
        return 0, False
    learners = {
        (course_id, user_id)
        for course_id, user_id, roles in session.execute(
            select(enrolments.c.course_id, enrolments.c.user_id, enrolments.c.roles).where(
                enrolments.c.course_id.in_(courses), enrolments.c.ended_at.is_(None)
            )
        )
        if is_learner(roles)
    }
    holding = {
        tuple(row)
        for row in session.execute(
            select(Machine.course_id, Machine.owner_id).where(
                Machine.environment_id == environment_id,
                Machine.course_id.in_(courses),
                Machine.owner_id.is_not(None),
                Machine.state.in_(LIVE_STATES),
            )
        )
    }
    return len(learners - holding), True


def boosted_target(session: Session, environment_id: int, now: datetime) -> int:
    """The largest unexpired "warm now" of the activities using this environment (0 if none):
    boosts of several courses sharing a pool do not add up, the biggest class decides."""
    return (
        session.scalar(
            select(func.max(WarmBoost.target))
            .join(activities, activities.c.id == WarmBoost.activity_id)
            .where(activities.c.environment_id == environment_id, WarmBoost.until > now)
        )
        or 0
    )


def class_size(session: Session, course_id: int) -> int:
    rows = session.execute(
        select(enrolments.c.roles).where(
            enrolments.c.course_id == course_id, enrolments.c.ended_at.is_(None)
        )
    ).scalars()
    return sum(1 for roles in rows if is_learner(roles))


__all__ = ["scheduled_demand", "session_is_on", "class_size", "boosted_target"]
