"""Finding a student their machine, inside the launch's transaction and without waiting.

In order: the live machine they already hold in the activity's environment; else the live
machine this activity handed them before its teacher chose another environment (a machine
handed out stays until it is released: reset, stop or idle; the next one is in the new
environment); else a warm `ready` one claimed atomically
(one UPDATE whose subquery takes the row with FOR UPDATE SKIP LOCKED on PostgreSQL, so two
concurrent launches never get the same machine; SQLite serialises writers); else a new
`requested` machine, whose start is enqueued after the transaction commits.

It sits on every learner's launch, so it costs few round trips and little Python: the
statements are written once, as SQL (a statement built per call costs more CPU than its round
trip); the two lookups are one statement, and so are the claim and the request on PostgreSQL.

The partial unique index `uq_machines_live_owner` makes "a student never gets two" a fact of
the database: a concurrent launch of the same student that loses the race gets an
IntegrityError inside a savepoint and then finds the winner's machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Boolean, Integer, bindparam, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.db import UTCDateTime, utcnow
from provisioning.course_access import may_use
from provisioning.models import LIVE_STATES, Environment, Machine, MachineState


class EnvironmentUnavailable(Exception):
    """The environment starts no new machine here; the message says what to do. `status`:
    the HTTP answer the web edge gives."""

    status = 409


class EnvironmentRetired(EnvironmentUnavailable):
    """The environment takes no new machines; the message says what to do."""

    def __init__(self, name: str):
        super().__init__(
            f"The environment {name!r} has been retired by Labpool's administrator: it starts "
            "no new machines. Your teacher can pick another one on the activity's class page."
        )


class EnvironmentNotForCourse(EnvironmentUnavailable):
    """An admin limited the environment to other courses (provisioning.course_access)."""

    status = 403

    def __init__(self, name: str):
        super().__init__(
            f"The environment {name!r} is not open to this course: Labpool's administrator "
            "limited it to other courses, so it starts no new machine here. Ask your teacher "
            "to pick another environment on the activity's class page, or Labpool's "
            "administrator to open this one to the course."
        )


@dataclass(frozen=True)
class MachineChoice:
    machine: Machine
    how: str  # "reused" | "claimed" | "requested"


_LIVE = "(" + ", ".join(f"'{state.name}'" for state in LIVE_STATES) + ")"

# One round trip, the launch's hot path: the student's live machine in this environment, else
# the newest live machine a launch of `activity_id` handed them (a NULL activity finds none).
# COALESCE evaluates its second argument only when the first is NULL (PostgreSQL and SQLite
# alike), so a relaunch that finds its machine never reads the launches.
_EXISTING_MACHINE = select(Machine).from_statement(
    text(f"""
SELECT * FROM machines WHERE id = COALESCE(
  (SELECT id FROM machines
   WHERE environment_id = :environment_id AND course_id = :course_id
     AND owner_id = :owner_id AND state IN {_LIVE}
   LIMIT 1),
  (SELECT m.id FROM machines m JOIN launches l ON l.machine_id = m.id
   WHERE l.activity_id = :activity_id AND l.user_id = :owner_id
     AND m.owner_id = :owner_id AND m.course_id = :course_id AND m.state IN {_LIVE}
   ORDER BY m.id DESC
   LIMIT 1))
""").bindparams(bindparam("activity_id", type_=Integer))
)


def existing_machine(
    session: Session,
    environment_id: int,
    course_id: int,
    owner_id: int,
    activity_id: int | None = None,
) -> Machine | None:
    """The student's live machine for this environment and course, else the live machine a
    launch of `activity_id` gave them, whatever its environment (it stays theirs after the
    teacher picks another one)."""
    return session.scalars(
        _EXISTING_MACHINE,
        {
            "environment_id": environment_id,
            "course_id": course_id,
            "owner_id": owner_id,
            "activity_id": activity_id,
        },
    ).first()


# `FOR UPDATE SKIP LOCKED` (PostgreSQL): two concurrent launches never take the same warm
# machine, and neither waits for the other; SQLite has no row locks (it serialises writers).
_CLAIM_WARM = """
UPDATE machines SET owner_id = :owner_id, course_id = :course_id, state = 'assigned',
  state_changed_at = :now, assigned_at = :now, last_activity_at = :now
WHERE id = (SELECT id FROM machines
            WHERE environment_id = :environment_id AND state = 'ready' AND owner_id IS NULL
            ORDER BY id
            LIMIT 1{lock})
  AND state = 'ready' AND owner_id IS NULL
RETURNING {returning}
"""
_NOW = bindparam("now", type_=UTCDateTime)
_CLAIM_WARM_BY_DIALECT = {
    dialect: text(_CLAIM_WARM.format(lock=lock, returning="id")).bindparams(_NOW)
    for dialect, lock in (("postgresql", " FOR UPDATE SKIP LOCKED"), ("sqlite", ""))
}

# A new `requested` machine, as the ORM would insert it, loaded from its RETURNING row.
_REQUEST = select(Machine).from_statement(
    text("""
INSERT INTO machines (environment_id, owner_id, course_id, backend, state, created_at,
                      state_changed_at)
VALUES (:environment_id, :owner_id, :course_id, :backend, 'requested', :now, :now)
RETURNING *
""").bindparams(_NOW)
)

# PostgreSQL: claim a warm machine or, when there is none, request one, in one statement (a
# data-modifying CTE sees the other's RETURNING rows). A unique violation of the insert (a
# concurrent launch of the same student won) undoes the claim with it.
_CLAIM_OR_REQUEST_PG = (
    select(Machine)
    .from_statement(
        text(f"""
WITH claimed AS ({_CLAIM_WARM.format(lock=" FOR UPDATE SKIP LOCKED", returning="*")}),
requested AS (
  INSERT INTO machines (environment_id, owner_id, course_id, backend, state, created_at,
                        state_changed_at)
  SELECT :environment_id, :owner_id, :course_id, :backend, 'requested', :now, :now
  WHERE NOT EXISTS (SELECT 1 FROM claimed)
    AND (:last_try OR NOT EXISTS (
      SELECT 1 FROM machines
      WHERE environment_id = :environment_id AND state = 'ready' AND owner_id IS NULL))
  RETURNING *)
SELECT * FROM claimed UNION ALL SELECT * FROM requested
""").bindparams(_NOW, bindparam("last_try", type_=Boolean))
    )
    .execution_options(populate_existing=True)
)
# A try comes back empty when every ready machine it sees is locked by a concurrent
# transaction (SKIP LOCKED passes over it, NOT EXISTS still sees it ready): a launch about to
# take it, or one that may yet roll back. The next try looks again; the last try requests a
# machine whatever it sees. (A machine taken and committed since the statement's snapshot is
# no reason: PostgreSQL rechecks the row it locks, finds it assigned and takes the next one.)
CLAIM_TRIES = 5


def claim_warm_machine(
    session: Session, environment_id: int, course_id: int, owner_id: int
) -> Machine | None:
    """Atomically take one `ready`, unowned machine of the environment, or None."""
    claimed_id = session.execute(
        _CLAIM_WARM_BY_DIALECT[session.get_bind().dialect.name],
        {
            "environment_id": environment_id,
            "course_id": course_id,
            "owner_id": owner_id,
            "now": utcnow(),
        },
    ).scalar_one_or_none()
    if claimed_id is None:
        return None
    return session.get(Machine, claimed_id, populate_existing=True)


def claim_or_request(
    session: Session, environment: Environment, course_id: int, owner_id: int
) -> MachineChoice:
    """A warm machine claimed, else a new one requested (inside the caller's savepoint)."""
    params = {
        "environment_id": environment.id,
        "course_id": course_id,
        "owner_id": owner_id,
        "backend": environment.backend,
        "now": utcnow(),
    }
    if session.get_bind().dialect.name == "postgresql":
        for attempt in range(CLAIM_TRIES):
            machine = session.scalars(
                _CLAIM_OR_REQUEST_PG, {**params, "last_try": attempt == CLAIM_TRIES - 1}
            ).first()
            if machine is not None:
                how = "claimed" if machine.state is MachineState.assigned else "requested"
                return MachineChoice(machine, how)
        raise AssertionError("the last try always returns a machine")  # pragma: no cover
    claimed = claim_warm_machine(session, environment.id, course_id, owner_id)
    if claimed is not None:
        return MachineChoice(claimed, "claimed")
    return MachineChoice(session.scalars(_REQUEST, params).one(), "requested")


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
        existing = existing_machine(session, environment.id, course_id, owner_id, activity_id)
        if existing is not None:
            return MachineChoice(existing, "reused")
        if environment.retired_at is not None:
            raise EnvironmentRetired(environment.name)
        if environment.limited_to_courses and not may_use(session, environment, course_id):
            raise EnvironmentNotForCourse(environment.name)
        try:
            with session.begin_nested():
                return claim_or_request(session, environment, course_id, owner_id)
        except IntegrityError:
            # A concurrent launch of the same student won; take theirs on the next turn.
            continue
    raise RuntimeError(f"could not settle a machine for user {owner_id}")  # pragma: no cover
