"""The level-triggered reconciler: one pass compares a pool's machines in the database with
the servers the cloud reports (one paged list by tag) and repairs the difference.

The database is the truth and jobs are only triggers: a pass needs no memory of earlier
passes, so a lost job, a worker killed mid-call or a flushed Redis loses nothing; the next
pass finds the work again. One pass, in order:

1. Machines whose server is gone, in ERROR, or stuck past the start timeout become `error`
   (their server is deleted, Nova's fault message kept); they never count as capacity.
2. Booting machines whose server is ACTIVE are health-checked; `ready` (or `assigned`, if a
   student already owns it) only when the IDE answers.
3. `stopping` machines lose their server and become `stopped`.
4. Servers with our tags that no live machine owns are deleted after a grace period.
5. The warm target is topped up with new `requested` rows (never beyond `max_size`), and
   surplus warm machines are stopped.
6. Assigned machines get their student's volume (created on first need; never deleted here).
7. `requested` machines get servers, students' first, within the quota headroom and the
   per-cloud cap on concurrent creates. Each machine moves requested → starting (with its
   IDE token) in the database *before* its server is created, so a crashed create is found
   by tag and adopted, never duplicated.

Cloud errors become what a teacher can read on the pool: quota (403) holds creation until
headroom returns; 409 is retried next pass; 5xx and timeouts back off exponentially; machines
failing in a row back off too, so a broken image cannot crash-loop.

Every decision above is a pure function in `provisioning/reconcile_decisions.py`; this module
reads the rows, lists the pool, makes the cloud calls those functions ask for and writes the
outcome.
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from config.db import transaction, utcnow
from config.runtime import Runtime
from provisioning.backends import MachineSpec, PooledBackend, ServerView, pooled_backend_for
from provisioning.errors import CloudConflict, CloudUnavailable, ProvisioningError, QuotaExceeded
from provisioning.models import Environment, Machine, MachineState, Pool
from provisioning.proxy_table import withdraw_route
from provisioning.reconcile_decisions import (
    PoolHold,
    Row,
    after_pass,
    backoff_delay,
    create_outcome,
    creates_back_off,
    decide,
    decide_creates,
    decide_roll,
    decide_warm,
    is_held,
)
from provisioning.schedule import boosted_target, scheduled_demand
from provisioning.storage import attach_student_volumes, volumes_released

log = logging.getLogger(__name__)
S = MachineState
CAPACITY_STATES = (S.requested, S.starting, S.ready)
PARALLEL_CLOUD_CALLS = 8


@dataclass
class PassReport:
    """What one pass saw and did (logged, returned to tests and benchmarks)."""

    pool_id: int
    servers: int = 0
    machines: int = 0
    created: int = 0
    ready: int = 0
    failed: int = 0
    stopped: int = 0
    orphans_deleted: int = 0
    warm_requested: int = 0
    target: int = 0
    volumes_attached: int = 0
    rolled: int = 0  # warm machines stopped because the image or flavor changed
    held: str | None = None
    notes: list[str] = field(default_factory=list)


def _spec(
    row: Row,
    env: Environment,
    pool_id: int,
    *,
    address: str | None = None,
    token: str | None = None,
) -> MachineSpec:
    return MachineSpec(
        id=row.id,
        ide_kind=env.ide_kind.value,
        owner_id=row.owner_id,
        course_id=row.course_id,
        ref={**row.ref, "pool_id": pool_id},
        address=address or row.address,
        ide_token=token or row.ide_token,
    )


def reconcile_pool(
    rt: Runtime,
    pool_id: int,
    backend: PooledBackend | None = None,
    clock: datetime | None = None,
) -> PassReport:
    """One pass over one pool. Safe to run concurrently with launches; run at most one pass
    per pool at a time (`reconcile_pool_job` takes a Redis lock for that). `clock` is the
    time the class schedule is read at (tests move it)."""
    now = utcnow()
    report = PassReport(pool_id)
    with rt.sessions() as session:
        pool = session.get_one(Pool, pool_id)
        env = session.get_one(Environment, pool.environment_id)
        rows = [
            Row(
                m.id,
                m.state,
                m.owner_id,
                m.course_id,
                dict(m.backend_ref or {}),
                m.address,
                m.ide_token,
                m.state_changed_at,
            )
            for m in session.execute(
                select(
                    Machine.id,
                    Machine.state,
                    Machine.owner_id,
                    Machine.course_id,
                    Machine.backend_ref,
                    Machine.address,
                    Machine.ide_token,
                    Machine.state_changed_at,
                ).where(
                    Machine.environment_id == env.id, Machine.state.notin_([S.stopped, S.error])
                )
            )
        ]
    report.machines = len(rows)
    backing_off = is_held(pool.backoff_until, now)

    cloud = backend or pooled_backend_for(env, rt.settings)
    try:
        servers = cloud.list_pool_servers(pool_id)
    except (CloudUnavailable, CloudConflict) as exc:
        _back_off(rt, pool_id, now, f"The cloud is not answering: {exc}")
        report.held = str(exc)
        return report
    report.servers = len(servers)
    actions = decide(
        rows,
        servers,
        now,
        start_timeout=timedelta(seconds=rt.settings.cloud_start_timeout_s),
        orphan_grace=timedelta(seconds=rt.settings.orphan_grace_s),
    )
    failures, to_check, to_stop = actions.failures, actions.to_check, actions.to_stop

    # 1. failures, 2. health checks, 3. stops
    with ThreadPoolExecutor(PARALLEL_CLOUD_CALLS) as pool_exec:
        healthy = list(
            pool_exec.map(
                lambda item: cloud.health(_spec(item[0], env, pool_id, address=item[1])), to_check
            )
        )
        list(pool_exec.map(lambda f: _delete_servers(cloud, f[2]), failures))
        list(pool_exec.map(lambda row: cloud.stop(_spec(row, env, pool_id)), to_stop))
        list(pool_exec.map(lambda s: _delete_servers(cloud, [s]), actions.extras))
    up = [(row, address) for (row, address), ok in zip(to_check, healthy, strict=True) if ok]
    report.ready = _mark_up(rt, up)
    report.volumes_attached = attach_student_volumes(rt, cloud, env, actions.servers_by_machine)
    report.failed = _mark_failed(rt, [(row, reason) for row, reason, _ in failures])
    report.stopped = _mark_stopped(rt, [row.id for row in to_stop])
    _requeue(rt, actions.to_requeue)

    # 4. orphans
    orphans = actions.orphans
    if orphans:
        with ThreadPoolExecutor(PARALLEL_CLOUD_CALLS) as pool_exec:
            list(pool_exec.map(lambda s: _delete_servers(cloud, [s]), orphans))
        report.orphans_deleted = len(orphans)

    # 5. the pool rolls: warm machines on an earlier image or flavor go (decide_warm below
    # replaces them); assigned ones roll when released
    report.rolled = _roll_warm(
        rt, decide_roll(rows, image_id=env.image_id, flavor_id=env.flavor_id)
    )

    # 6. the warm target
    report.warm_requested = _top_up_warm(rt, pool, env, report, clock or now)

    # 7. create what is requested, unless the pool is backing off
    if backing_off:
        report.held = pool.hold_note
    else:
        report.created, report.held = _create_requested(rt, cloud, pool, env, now)
    _finish(rt, pool_id, now, report)
    log.info("pool %s pass: %s", pool_id, report)
    return report


def _delete_servers(cloud: PooledBackend, servers: list[ServerView]) -> None:
    for server in servers:
        try:
            cloud.stop(
                MachineSpec(
                    id=server.machine_id or 0,
                    ide_kind="jupyterlab",
                    owner_id=None,
                    course_id=None,
                    ref={"server_id": server.server_id},
                )
            )
        except ProvisioningError as exc:  # retried by the next pass
            log.warning("could not delete server %s: %s", server.server_id, exc)


def _mark_up(rt: Runtime, up: list[tuple[Row, str]]) -> int:
    if not up:
        return 0
    now = utcnow()
    done = 0
    with transaction(rt.sessions) as session:
        for row, address in up:
            new_state = S.assigned if row.owner_id else S.ready
            result = session.execute(
                update(Machine)
                .where(Machine.id == row.id, Machine.state == S.starting)
                .values(
                    state=new_state,
                    address=address,
                    state_changed_at=now,
                    assigned_at=now if row.owner_id else None,
                )
                .execution_options(synchronize_session=False)
            )
            done += result.rowcount
    return done


def _mark_failed(rt: Runtime, failed: list[tuple[Row, str]]) -> int:
    now = utcnow()
    done = 0
    with transaction(rt.sessions) as session:
        for row, reason in failed:
            result = session.execute(
                update(Machine)
                .where(Machine.id == row.id, Machine.state == row.state)
                .values(state=S.error, error=reason, state_changed_at=now)
                .execution_options(synchronize_session=False)
            )
            done += result.rowcount
            withdraw_route(rt.redis, row.id)
            log.warning("machine %s failed: %s", row.id, reason)
        volumes_released(session, [row.id for row, _ in failed])
    return done


def _requeue(rt: Runtime, ids: list[int]) -> None:
    if not ids:
        return
    with transaction(rt.sessions) as session:
        session.execute(
            update(Machine)
            .where(Machine.id.in_(ids), Machine.state == S.starting)
            .values(state=S.requested, ide_token=None, backend_ref=None, state_changed_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def _mark_stopped(rt: Runtime, ids: list[int]) -> int:
    if not ids:
        return 0
    for machine_id in ids:
        withdraw_route(rt.redis, machine_id)
    with transaction(rt.sessions) as session:
        result = session.execute(
            update(Machine)
            .where(Machine.id.in_(ids), Machine.state == S.stopping)
            .values(state=S.stopped, address=None, ide_token=None, state_changed_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        volumes_released(session, ids)
        return result.rowcount


def _top_up_warm(
    rt: Runtime, pool: Pool, env: Environment, report: PassReport, clock: datetime
) -> int:
    """Add `requested` warm machines up to the target (within max_size), or stop surplus
    ready ones. The target is the largest of the pool's floor, what the classes in session
    want and the teachers' unexpired "warm now" boosts. Returns how many were requested.

    The students still waiting and the warm machines are read in one snapshot: each read on
    its own snapshot (READ COMMITTED) counted a student whose launch committed in between as
    waiting and their machine as taken, requested one machine too many, and the next pass
    stopped a ready one as surplus while the class was still launching. The writes follow in
    a transaction of their own, conditional on what a launch may have claimed meanwhile."""
    with transaction(rt.sessions) as session:
        _one_snapshot(session)
        demand, in_session = scheduled_demand(session, env.id, clock)
        boost = boosted_target(session, env.id, clock)
        counts = dict(
            session.execute(
                select(Machine.state, func.count())
                .where(
                    Machine.environment_id == env.id,
                    Machine.owner_id.is_(None),
                    Machine.state.in_(CAPACITY_STATES),
                )
                .group_by(Machine.state)
            ).all()
        )
        warm = sum(counts.values())
        total = (
            session.scalar(
                select(func.count()).where(
                    Machine.environment_id == env.id,
                    Machine.state.in_(CAPACITY_STATES + (S.assigned,)),
                )
            )
            or 0
        )
        change = decide_warm(
            floor=pool.warm_target,
            demand=demand,
            in_session=in_session,
            boost=boost,
            paused=pool.paused or env.retired_at is not None,  # retired: no warm machines
            max_size=pool.max_size,
            warm=warm,
            ready=counts.get(S.ready, 0),
            total=total,
        )
        surplus = (
            session.scalars(
                select(Machine.id)
                .where(
                    Machine.environment_id == env.id,
                    Machine.state == S.ready,
                    Machine.owner_id.is_(None),
                )
                .order_by(Machine.id.desc())
                .limit(change.stop)
            ).all()
            if change.stop > 0
            else []
        )
    report.target = change.target
    report.notes.extend(change.notes)
    if change.add or surplus:
        with transaction(rt.sessions) as session:
            session.add_all(
                Machine(environment_id=env.id, backend=env.backend, state=S.requested)
                for _ in range(change.add)
            )
            if surplus:
                # Conditional: a launch may claim one of them this very moment.
                session.execute(
                    update(Machine)
                    .where(
                        Machine.id.in_(surplus),
                        Machine.state == S.ready,
                        Machine.owner_id.is_(None),
                    )
                    .values(state=S.stopping, state_changed_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
    return change.add


def _one_snapshot(session: Session) -> None:
    """Let every read of the session's transaction see one snapshot: REPEATABLE READ on
    PostgreSQL (its writes would fail on a row changed since, instead of skipping it: keep
    them to a later transaction). SQLite's BEGIN IMMEDIATE already lets no one commit
    meanwhile. Call it before the transaction's first statement."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def _create_requested(
    rt: Runtime, cloud: PooledBackend, pool: Pool, env: Environment, now: datetime
) -> tuple[int, str | None]:
    """Give `requested` machines servers: students' first, then warm ones."""
    with rt.sessions() as session:
        waiting = session.execute(
            select(Machine.id, Machine.owner_id)
            .where(Machine.environment_id == env.id, Machine.state == S.requested)
            .order_by(Machine.owner_id.is_(None), Machine.id)
        ).all()
        building = (
            session.scalar(
                # The cap is per cloud: every pool of this backend counts.
                select(func.count()).where(
                    Machine.backend == env.backend, Machine.state == S.starting
                )
            )
            or 0
        )
    if not waiting:
        _set_quota_note(rt, pool.id, None)
        return 0, None
    try:
        headroom = cloud.quota_headroom()
    except (CloudUnavailable, CloudConflict) as exc:
        _back_off(rt, pool.id, now, f"The cloud is not answering: {exc}")
        return 0, str(exc)
    plan = decide_creates(
        [(w.id, w.owner_id) for w in waiting],
        paused=pool.paused,
        building=building,
        max_concurrent=rt.settings.max_concurrent_creates,
        headroom=headroom,
    )
    _set_quota_note(rt, pool.id, plan.quota_note)
    if not plan.chosen:
        return 0, plan.held

    # requested → starting with a fresh IDE token, committed before any server exists.
    tokens = {machine_id: secrets.token_urlsafe(32) for machine_id in plan.chosen}
    # What the server boots from, recorded so that a later change of either rolls it.
    booted = {"image_id": env.image_id, "flavor_id": env.flavor_id}
    claimed: list[Row] = []
    with transaction(rt.sessions) as session:
        for machine_id, token in tokens.items():
            got = session.execute(
                update(Machine)
                .where(Machine.id == machine_id, Machine.state == S.requested)
                .values(
                    state=S.starting,
                    ide_token=token,
                    state_changed_at=utcnow(),
                    backend_ref={"pool_id": pool.id, **booted},
                )
                .returning(Machine.owner_id, Machine.course_id)
                .execution_options(synchronize_session=False)
            ).first()
            if got is not None:
                claimed.append(
                    Row(
                        machine_id,
                        S.starting,
                        got.owner_id,
                        got.course_id,
                        {"pool_id": pool.id, **booted},
                        None,
                        token,
                        now,
                    )
                )

    def create(row: Row) -> tuple[Row, str | None, ProvisioningError | None]:
        try:
            return row, cloud.create(_spec(row, env, pool.id)), None
        except ProvisioningError as exc:
            return row, None, exc

    with ThreadPoolExecutor(PARALLEL_CLOUD_CALLS) as pool_exec:
        results = list(pool_exec.map(create, claimed))

    created = 0
    held: str | None = None
    with transaction(rt.sessions) as session:
        for row, server_id, error in results:
            outcome = create_outcome(error)
            if outcome == "created":
                created += 1
                session.execute(
                    update(Machine)
                    .where(Machine.id == row.id)
                    .values(backend_ref={"pool_id": pool.id, "server_id": server_id, **booted})
                    .execution_options(synchronize_session=False)
                )
            elif outcome == "starting":
                held = held or str(error)
            elif outcome == "requeue":
                session.execute(
                    update(Machine)
                    .where(Machine.id == row.id, Machine.state == S.starting)
                    .values(state=S.requested, ide_token=None, backend_ref=None)
                    .execution_options(synchronize_session=False)
                )
                held = str(error)
            else:
                session.execute(
                    update(Machine)
                    .where(Machine.id == row.id, Machine.state == S.starting)
                    .values(state=S.error, error=str(error), state_changed_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
    for _, _, error in results:
        if isinstance(error, QuotaExceeded):
            _set_quota_note(rt, pool.id, str(error))
            break
    if creates_back_off([e for _, _, e in results]):
        _back_off(rt, pool.id, now, held or "the cloud refused to create machines")
    return created, held


def _roll_warm(rt: Runtime, ids: list[int]) -> int:
    """Stop warm machines on an old image or flavor, unless a student claimed one meanwhile
    (the owner check is in the statement, so a claim racing this pass wins)."""
    if not ids:
        return 0
    with transaction(rt.sessions) as session:
        result = session.execute(
            update(Machine)
            .where(
                Machine.id.in_(ids),
                Machine.owner_id.is_(None),
                Machine.state.in_([S.starting, S.ready]),
            )
            .values(state=S.stopping, state_changed_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        rolled = result.rowcount or 0  # type: ignore[attr-defined]
    if rolled:
        log.info("rolling %s warm machine(s) onto the environment's new image or flavor", rolled)
    return rolled


def _set_quota_note(rt: Runtime, pool_id: int, note: str | None) -> None:
    with transaction(rt.sessions) as session:
        session.execute(
            update(Pool)
            .where(Pool.id == pool_id, Pool.quota_note.is_distinct_from(note))
            .values(quota_note=note)
        )


def _back_off(rt: Runtime, pool_id: int, now: datetime, why: str) -> None:
    with transaction(rt.sessions) as session:
        pool = session.get_one(Pool, pool_id, with_for_update=True)
        pool.consecutive_failures += 1
        delay = backoff_delay(pool.consecutive_failures)
        pool.backoff_until = now + timedelta(seconds=delay)
        pool.hold_note = f"{why} (retrying in {delay} s)"


def _finish(rt: Runtime, pool_id: int, now: datetime, report: PassReport) -> None:
    with transaction(rt.sessions) as session:
        pool = session.get_one(Pool, pool_id, with_for_update=True)
        pool.last_pass_at = now
        hold = after_pass(
            PoolHold(pool.consecutive_failures, pool.backoff_until, pool.hold_note),
            ready=report.ready,
            failures=report.failed,
            now=now,
            max_consecutive=rt.settings.max_consecutive_failures,
        )
        pool.consecutive_failures = hold.consecutive_failures
        pool.backoff_until, pool.hold_note = hold.backoff_until, hold.hold_note
