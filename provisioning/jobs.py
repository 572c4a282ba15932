"""RQ jobs that drive machines through their states, idempotently.

Each job reads the machine's row, does only what its state still asks for, and writes what it
did before it does the next slow thing: running a start twice, or after a worker died halfway,
finds the process or server the first attempt left and carries on from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time

from redis.exceptions import LockError, RedisError
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.db import transaction
from config.runtime import Runtime, current_runtime
from lti_tool import metrics
from provisioning.backends import (
    MachineSpec,
    OnDemandBackend,
    Started,
    backend_for,
    backends_that,
    on_demand_backend_for,
)
from provisioning.errors import ProvisioningError
from provisioning.models import Environment, Machine, MachineState
from provisioning.proxy_table import withdraw_route
from provisioning.storage import volumes_released

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 0.2


def spec_of(machine: Machine, environment: Environment) -> MachineSpec:
    return MachineSpec(
        id=machine.id,
        ide_kind=environment.ide_kind.value,
        owner_id=machine.owner_id,
        course_id=machine.course_id,
        ref=dict(machine.backend_ref or {}),
        address=machine.address,
        ide_token=machine.ide_token,
        limits=environment.limits,
    )


def title_of(session: Session, machine: Machine) -> str:
    """What the IDE's page title names: the activity the student launched (their newest
    launch onto this machine), else the course."""
    from lti_tool.models import Activity, Course, Launch

    title = session.scalars(
        select(Activity.title)
        .join(Launch, Launch.activity_id == Activity.id)
        .where(Launch.machine_id == machine.id)
        .order_by(Launch.id.desc())
        .limit(1)
    ).first()
    if not title and machine.course_id is not None:
        course = session.get(Course, machine.course_id)
        title = course.title if course else ""
    return (title or "")[:80]


def _fail(rt: Runtime, machine_id: int, message: str) -> None:
    with transaction(rt.sessions) as session:
        machine = session.get(Machine, machine_id, with_for_update=True)
        if machine is not None and machine.state in (MachineState.requested, MachineState.starting):
            machine.move_to(MachineState.error, error=message)
    log.warning("machine %s failed: %s", machine_id, message)


@metrics.counted(metrics.MACHINE_STARTS, metrics.start_result)
def start_machine(machine_id: int) -> str:
    """requested → starting → (ready | assigned), or error with a message a person can read."""
    rt = current_runtime()
    with transaction(rt.sessions) as session:
        machine = session.get(Machine, machine_id, with_for_update=True)
        if machine is None:
            return "gone"
        if machine.state is MachineState.requested:
            machine.move_to(MachineState.starting)
        elif machine.state is not MachineState.starting:
            return f"nothing to do: {machine.state.value}"
        environment = session.get_one(Environment, machine.environment_id)
        spec = dataclasses.replace(spec_of(machine, environment), title=title_of(session, machine))
        started_at = machine.state_changed_at

    deadline = started_at.timestamp() + rt.settings.machine_start_timeout_s
    try:
        backend = on_demand_backend_for(machine.backend, rt.settings)
        if time.time() >= deadline:
            # A start that was cut off (worker killed) and found again too late.
            backend.stop(spec)
            _fail(
                rt,
                machine_id,
                f"the IDE did not answer within {rt.settings.machine_start_timeout_s} s",
            )
            return "error"
        if spec.ref and backend.poll(spec):
            log.info("machine %s: resuming a start that was interrupted", machine_id)
        else:
            with metrics.Timer() as took:
                spec = _start_and_record(rt, backend, spec)
            metrics.MACHINE_START_SECONDS.labels(machine.backend).observe(took.seconds)
            if spec is None:
                return "stopped while starting"
    except ProvisioningError as exc:
        _fail(rt, machine_id, str(exc))
        return "error"

    while time.time() < deadline:
        if backend.health(spec):
            metrics.MACHINE_READY_SECONDS.labels(machine.backend).observe(
                max(0.0, time.time() - started_at.timestamp())
            )
            return _mark_up(rt, machine_id)
        if not backend.poll(spec):
            _fail(rt, machine_id, "the IDE exited while starting")
            return "error"
        time.sleep(HEALTH_INTERVAL_S)
    backend.stop(spec)
    _fail(
        rt,
        machine_id,
        f"the IDE did not answer within {rt.settings.machine_start_timeout_s} s",
    )
    return "error"


def _start_and_record(
    rt: Runtime, backend: OnDemandBackend, spec: MachineSpec
) -> MachineSpec | None:
    """Start the machine and write where it is before anything else can go wrong."""
    started: Started = backend.start(spec)
    with transaction(rt.sessions) as session:
        machine = session.get(Machine, spec.id, with_for_update=True)
        keep = machine is not None and machine.state is MachineState.starting
        if keep:
            machine.backend_ref = started.ref
            machine.address = started.address
            machine.ide_token = started.ide_token
    recorded = MachineSpec(
        id=spec.id,
        ide_kind=spec.ide_kind,
        owner_id=spec.owner_id,
        course_id=spec.course_id,
        ref=started.ref,
        address=started.address,
        ide_token=started.ide_token,
        limits=spec.limits,
    )
    if not keep:
        backend.stop(recorded)
        return None
    return recorded


def _mark_up(rt: Runtime, machine_id: int) -> str:
    with transaction(rt.sessions) as session:
        machine = session.get(Machine, machine_id, with_for_update=True)
        if machine is None or machine.state is not MachineState.starting:
            return "changed meanwhile"
        machine.move_to(MachineState.assigned if machine.owner_id else MachineState.ready)
        return machine.state.value


def stop_machine(machine_id: int) -> str:
    """Any live state → stopping → stopped; the student's files stay."""
    return stop_machine_now(current_runtime(), machine_id)


def stop_machine_now(rt: Runtime, machine_id: int, only_if: MachineState | None = None) -> str:
    """Stop a machine in this process (`only_if`: only when it is still in that state)."""
    with transaction(rt.sessions) as session:
        machine = session.get(Machine, machine_id, with_for_update=True)
        if machine is None or machine.state is MachineState.stopped:
            return "nothing to do"
        if only_if is not None and machine.state is not only_if:
            return "changed meanwhile"
        if machine.state is not MachineState.stopping:
            machine.move_to(MachineState.stopping)
        environment = session.get_one(Environment, machine.environment_id)
        spec = spec_of(machine, environment)
        backend_name = machine.backend
    withdraw_route(rt.redis, machine_id)
    backend_for(backend_name, rt.settings, environment).stop(spec)
    with transaction(rt.sessions) as session:
        machine = session.get_one(Machine, machine_id, with_for_update=True)
        machine.move_to(MachineState.stopped)
        machine.address = None
        machine.ide_token = None
        volumes_released(session, [machine_id])
    return "stopped"


def stop_all_machines(rt: Runtime) -> int:
    """Stop every machine that runs on this host now, in this process (used when `labpool
    run` exits: its processes would outlive it; cloud machines stay)."""
    with rt.sessions() as session:
        ids = session.scalars(
            select(Machine.id).where(
                Machine.backend.in_(backends_that(lambda can: can.on_host)),
                Machine.state != MachineState.stopped,
            )
        ).all()
    for machine_id in ids:
        stop_machine_now(rt, machine_id)
    return len(ids)


RECONCILE_LOCK = "labpool:reconcile-lock:{}"
# The pool's lock lives this long unless the pass holding it renews it (every third of it):
# a worker killed mid-pass holds up its pool for at most this long, a slow pass keeps it.
RECONCILE_LOCK_TTL_S = 15


def reconcile_pool_job(pool_id: int) -> str:
    """One reconciler pass over a pool, unless another pass holds the pool's lock."""
    from provisioning.reconciler import reconcile_pool
    from provisioning.triggers import QUEUED_KEY

    rt = current_runtime()
    rt.redis.delete(QUEUED_KEY.format(pool_id))  # a change from now on queues a new pass
    lock = rt.redis.lock(
        RECONCILE_LOCK.format(pool_id), timeout=RECONCILE_LOCK_TTL_S, blocking=False
    )
    if not lock.acquire():
        return "another pass is running"
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RECONCILE_LOCK_TTL_S / 3):
            with contextlib.suppress(LockError, RedisError):
                lock.reacquire()

    renewer = threading.Thread(target=renew, name=f"reconcile-lock-{pool_id}", daemon=True)
    renewer.start()
    try:
        with metrics.Timer() as took:
            report = reconcile_pool(rt, pool_id)
        metrics.observe_reconcile(report, took.seconds)
        return str(report)
    finally:
        done.set()
        renewer.join()
        # The lock may have expired (Redis restarted, flushed): nothing to undo.
        with contextlib.suppress(LockError, RedisError):
            lock.release()


def reconcile_all() -> int:
    """The periodic trigger (run by `labpool cron`): a pass for every pool."""
    from provisioning.models import Pool
    from provisioning.triggers import reconcile_soon

    rt = current_runtime()
    with rt.sessions() as session:
        pool_ids = session.scalars(
            select(Pool.id)
            .join(Environment, Environment.id == Pool.environment_id)
            .where(Environment.backend.in_(backends_that(lambda can: can.pooled)))
        ).all()
    for pool_id in pool_ids:
        reconcile_soon(rt, pool_id)
    return len(pool_ids)
