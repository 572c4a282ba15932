"""Which assigned machines the idle job releases (`provisioning.idle.machines_to_release`):
a student who left the course, a session past the environment's `max_session_s`, nothing
seen for longer than `idle_timeout_s` — each at its boundary, on the real database and Redis
of conftest.py (machines without an address: the IDE is never asked, the database's signals
decide; the proxy's and the IDE's signals: tests/test_activity.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from config.db import transaction
from config.runtime import Runtime
from lti_tool.models import Course, Enrolment, Platform, User
from provisioning.environments import add_environment
from provisioning.idle import machines_to_release
from provisioning.models import Environment, Machine, MachineState

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
IDLE = timedelta(minutes=30)
MAX_SESSION = timedelta(hours=4)
LEFT = "the student is no longer enrolled"
TOO_LONG = "the maximum session length was reached"
IDLE_REASON = "no activity for 30 min"


@pytest.fixture
def lab(rt: Runtime) -> dict[str, Any]:
    """A course, its environment (30 min idle timeout, 4 h sessions at most)."""
    with transaction(rt.sessions) as session:
        env = add_environment(session, name=f"idle-{uuid.uuid4().hex[:6]}")
        session.execute(
            update(Environment)
            .where(Environment.id == env.id)
            .values(
                idle_timeout_s=int(IDLE.total_seconds()),
                max_session_s=int(MAX_SESSION.total_seconds()),
            )
        )
        platform = Platform(
            issuer=f"https://moodle-{uuid.uuid4().hex[:6]}.test",
            client_id="c",
            auth_url="x",
            token_url="x",
            jwks_url="x",
        )
        session.add(platform)
        session.flush()
        course = Course(platform_id=platform.id, context_id=uuid.uuid4().hex)
        session.add(course)
        session.flush()
        return {"env": env.id, "course": course.id, "issuer": platform.issuer}


def assigned(
    rt: Runtime,
    lab: dict[str, Any],
    *,
    assigned_ago: timedelta,
    active_ago: timedelta | None = None,
    left: bool = False,
) -> int:
    """A student's assigned machine, handed over `assigned_ago`, last used `active_ago`."""
    with transaction(rt.sessions) as session:
        student = User(issuer=lab["issuer"], sub=uuid.uuid4().hex)
        session.add(student)
        session.flush()
        session.add(
            Enrolment(
                course_id=lab["course"],
                user_id=student.id,
                roles=["http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"],
                ended_at=NOW - timedelta(minutes=1) if left else None,
            )
        )
        machine = Machine(
            environment_id=lab["env"],
            owner_id=student.id,
            course_id=lab["course"],
            state=MachineState.assigned,
            backend="local",
            state_changed_at=NOW - assigned_ago,
            assigned_at=NOW - assigned_ago,
            last_activity_at=None if active_ago is None else NOW - active_ago,
        )
        session.add(machine)
        session.flush()
        return machine.id


def released(rt: Runtime) -> dict[int, str]:
    return dict(machines_to_release(rt, NOW))


def test_a_machine_used_exactly_the_idle_timeout_ago_stays_and_a_second_later_goes(rt, lab):
    at_limit = assigned(rt, lab, assigned_ago=timedelta(hours=1), active_ago=IDLE)
    past = assigned(
        rt, lab, assigned_ago=timedelta(hours=1), active_ago=IDLE + timedelta(seconds=1)
    )
    assert released(rt) == {past: IDLE_REASON}
    assert at_limit not in released(rt)


def test_a_machine_never_used_counts_from_when_it_was_handed_over(rt, lab):
    fresh = assigned(rt, lab, assigned_ago=IDLE - timedelta(seconds=1))
    stale = assigned(rt, lab, assigned_ago=IDLE + timedelta(seconds=1))
    assert released(rt) == {stale: IDLE_REASON}
    assert fresh not in released(rt)


def test_the_latest_signal_wins_activity_after_the_hand_over_keeps_the_machine(rt, lab):
    busy = assigned(rt, lab, assigned_ago=timedelta(hours=2), active_ago=timedelta(minutes=5))
    assert busy not in released(rt)


def test_the_maximum_session_ends_even_a_busy_machine_at_its_boundary(rt, lab):
    at_limit = assigned(rt, lab, assigned_ago=MAX_SESSION, active_ago=timedelta(seconds=1))
    past = assigned(
        rt, lab, assigned_ago=MAX_SESSION + timedelta(seconds=1), active_ago=timedelta(seconds=1)
    )
    assert released(rt) == {past: TOO_LONG}
    assert at_limit not in released(rt)


def test_a_student_who_left_the_course_loses_the_machine_even_while_using_it(rt, lab):
    gone = assigned(rt, lab, assigned_ago=timedelta(minutes=10), active_ago=timedelta(0), left=True)
    stays = assigned(rt, lab, assigned_ago=timedelta(minutes=10), active_ago=timedelta(0))
    assert released(rt) == {gone: LEFT}
    assert stays not in released(rt)


def test_leaving_the_course_is_the_reason_given_before_the_session_length(rt, lab):
    both = assigned(rt, lab, assigned_ago=MAX_SESSION * 2, left=True)
    assert released(rt) == {both: LEFT}


def test_only_assigned_machines_are_considered(rt, lab):
    machine_id = assigned(rt, lab, assigned_ago=MAX_SESSION * 2)
    for state in (MachineState.ready, MachineState.starting, MachineState.stopped):
        with transaction(rt.sessions) as session:
            session.execute(update(Machine).where(Machine.id == machine_id).values(state=state))
        assert released(rt) == {}, state
