"""Finding a student their machine, inside the launch's transaction and without waiting.

In order: the live machine they already hold in the activity's environment; else the live
machine this activity handed them before its teacher chose another environment (a machine
handed out stays until it is released: reset, stop or idle; the next one is in the new
environment); else a warm `ready` one claimed atomically
(one UPDATE whose subquery takes the row with FOR UPDATE SKIP LOCKED on PostgreSQL, so two
concurrent launches never get the same machine; SQLite serialises writers); else a new
`requested` machine, whose start is enqueued after the transaction commits.

The partial unique index `uq_machines_live_owner` makes "a student never gets two" a fact of
the database: a concurrent launch of the same student that loses the race gets an
IntegrityError inside a savepoint and then finds the winner's machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.db import utcnow
from lti_tool.models import Launch
from provisioning.models import LIVE_STATES, Environment, Machine, MachineState


class EnvironmentRetired(Exception):
    """The environment takes no new machines; the message says what to do."""

    def __init__(self, name: str):
        super().__init__(
            f"The environment {name!r} has been retired by Labpool's administrator: it starts "
            "no new machines. Your teacher can pick another one on the activity's class page."
        )


@dataclass(frozen=True)
class MachineChoice:
    machine: Machine
    how: str  # "reused" | "claimed" | "requested"


def live_machine_of(
    session: Session, environment_id: int, course_id: int, owner_id: int
) -> Machine | None:
    return session.scalars(
        select(Machine)
        .where(
            Machine.environment_id == environment_id,
            Machine.course_id == course_id,
            Machine.owner_id == owner_id,
            Machine.state.in_(LIVE_STATES),
        )
        .limit(1)
    ).first()


def handed_out_machine(
    session: Session, activity_id: int, course_id: int, owner_id: int
) -> Machine | None:
    """The student's live machine that a launch of this activity gave them, whatever its
    environment (it stays theirs after the teacher picks another one)."""
    return session.scalars(
        select(Machine)
        .join(Launch, Launch.machine_id == Machine.id)
        .where(
            Launch.activity_id == activity_id,
            Launch.user_id == owner_id,
            Machine.owner_id == owner_id,
            Machine.course_id == course_id,
            Machine.state.in_(LIVE_STATES),
        )
        .order_by(Machine.id.desc())
        .limit(1)
    ).first()


def claim_warm_machine(
    session: Session, environment_id: int, course_id: int, owner_id: int
) -> Machine | None:
    """Atomically take one `ready`, unowned machine of the environment, or None."""
    now = utcnow()
    candidate = (
        select(Machine.id)
        .where(
            Machine.environment_id == environment_id,
            Machine.state == MachineState.ready,
            Machine.owner_id.is_(None),
        )
        .order_by(Machine.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claimed_id = session.execute(
        update(Machine)
        .where(
            Machine.id == candidate,
            Machine.state == MachineState.ready,
            Machine.owner_id.is_(None),
        )
        .values(
            owner_id=owner_id,
            course_id=course_id,
            state=MachineState.assigned,
            state_changed_at=now,
            assigned_at=now,
            last_activity_at=now,
        )
        .returning(Machine.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if claimed_id is None:
        return None
    return session.get(Machine, claimed_id, populate_existing=True)


def machine_for_learner(
    session: Session,
    environment: Environment,
    course_id: int,
    owner_id: int,
    activity_id: int | None = None,
) -> MachineChoice:
    """The student's machine for this environment and course (or the one `activity_id`
    handed them): reuse, claim, or request."""
    for _ in range(3):
        existing = live_machine_of(session, environment.id, course_id, owner_id)
        if existing is None and activity_id is not None:
            existing = handed_out_machine(session, activity_id, course_id, owner_id)
        if existing is not None:
            return MachineChoice(existing, "reused")
        if environment.retired_at is not None:
            raise EnvironmentRetired(environment.name)
        try:
            with session.begin_nested():
                claimed = claim_warm_machine(session, environment.id, course_id, owner_id)
                if claimed is not None:
                    return MachineChoice(claimed, "claimed")
                machine = Machine(
                    environment_id=environment.id,
                    owner_id=owner_id,
                    course_id=course_id,
                    backend=environment.backend,
                    state=MachineState.requested,
                )
                session.add(machine)
                session.flush()
                return MachineChoice(machine, "requested")
        except IntegrityError:
            # A concurrent launch of the same student won; take theirs on the next turn.
            continue
    raise RuntimeError(f"could not settle a machine for user {owner_id}")  # pragma: no cover
