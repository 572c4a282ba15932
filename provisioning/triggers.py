"""What the web edge asks of the workers. Jobs are triggers only: each says "look at this
again", and the database says what is wanted, so a trigger lost with Redis is found again by
the next periodic pass."""

from __future__ import annotations

import redis
from sqlalchemy import select

from config.runtime import Runtime
from provisioning.backends import capabilities
from provisioning.models import Machine, MachineState, Pool
from provisioning.queue import RECONCILE_JOB, START_JOB, enqueue

QUEUED_KEY = "labpool:reconcile-queued:{}"


def reconcile_soon(rt: Runtime, pool_id: int) -> None:
    """Enqueue a pass over the pool unless one is already waiting in the queue."""
    try:
        fresh = rt.redis.set(QUEUED_KEY.format(pool_id), 1, nx=True, ex=60)
    except redis.RedisError:
        fresh = True  # the enqueue below will report the outage
    if fresh:
        enqueue(rt.redis, rt.settings.queue_name, RECONCILE_JOB, pool_id)


def pool_of(rt: Runtime, environment_id: int) -> int | None:
    with rt.sessions() as session:
        return session.scalar(select(Pool.id).where(Pool.environment_id == environment_id))


def machine_wanted(rt: Runtime, machine: Machine, how: str) -> None:
    """After a launch: start a requested on-demand machine; for a pool, a requested machine
    or a claimed warm one (to refill the pool) triggers a pass."""
    if how not in ("requested", "claimed"):
        return
    if not capabilities(machine.backend).pooled:
        if how == "requested":
            enqueue(rt.redis, rt.settings.queue_name, START_JOB, machine.id)
        return
    pool_id = pool_of(rt, machine.environment_id)
    if pool_id is not None:
        reconcile_soon(rt, pool_id)


def nudge(rt: Runtime, machine: Machine) -> None:
    """A machine that waits longer than it should: trigger whatever drives it again."""
    if not capabilities(machine.backend).pooled:
        enqueue(rt.redis, rt.settings.queue_name, START_JOB, machine.id)
    elif machine.state in (MachineState.requested, MachineState.starting):
        pool_id = pool_of(rt, machine.environment_id)
        if pool_id is not None:
            reconcile_soon(rt, pool_id)
