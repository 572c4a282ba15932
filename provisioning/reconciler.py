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
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from config.db import transaction, utcnow
from config.runtime import Runtime
from provisioning.backends import MachineSpec, openstack_backend_for
from provisioning.backends.openstack import OpenStackBackend, ServerView
from provisioning.errors import (
    BackendUnavailable,
    CloudConflict,
    CloudUnavailable,
    ProvisioningError,
    QuotaExceeded,
)
from provisioning.models import Environment, Machine, MachineState, Pool
from provisioning.routes import withdraw_route
from provisioning.schedule import boosted_target, scheduled_demand
from provisioning.storage import attach_student_volumes, volumes_released

log = logging.getLogger(__name__)
S = MachineState
CAPACITY_STATES = (S.requested, S.starting, S.ready)
PARALLEL_CLOUD_CALLS = 8
# A machine `starting` without any server this long after its create was sent: the create
# never reached the cloud.
CREATE_GRACE = timedelta(seconds=60)


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
    held: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    """A machine as the pass read it (no ORM objects held across cloud calls)."""

    id: int
    state: MachineState
    owner_id: int | None
    course_id: int | None
    ref: dict[str, Any]
    address: str | None
    ide_token: str | None
    since: datetime


def _spec(row: Row, env: Environment, pool_id: int, *, address: str | None = None,
          token: str | None = None) -> MachineSpec:
    return MachineSpec(
        id=row.id, ide_kind=env.ide_kind.value, owner_id=row.owner_id, course_id=row.course_id,
        ref={**row.ref, "pool_id": pool_id}, address=address or row.address,
        ide_token=token or row.ide_token,
    )


def reconcile_pool(
    rt: Runtime, pool_id: int, backend: OpenStackBackend | None = None,
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
            Row(m.id, m.state, m.owner_id, m.course_id, dict(m.backend_ref or {}), m.address,
                m.ide_token, m.state_changed_at)
            for m in session.execute(
                select(Machine.id, Machine.state, Machine.owner_id, Machine.course_id,
                       Machine.backend_ref, Machine.address, Machine.ide_token,
                       Machine.state_changed_at)
                .where(Machine.environment_id == env.id,
                       Machine.state.notin_([S.stopped, S.error]))
            )
        ]
    report.machines = len(rows)
    backing_off = pool.backoff_until is not None and pool.backoff_until > now

    cloud = backend or openstack_backend_for(env, rt.settings)
    try:
        servers = cloud.list_pool_servers(pool_id)
    except (CloudUnavailable, CloudConflict) as exc:
        _back_off(rt, pool_id, now, f"The cloud is not answering: {exc}")
        report.held = str(exc)
        return report
    report.servers = len(servers)
    by_machine: dict[int, list[ServerView]] = defaultdict(list)
    for server in servers:
        if server.machine_id is not None:
            by_machine[server.machine_id].append(server)

    timeout = timedelta(seconds=rt.settings.cloud_start_timeout_s)
    failures: list[tuple[Row, str, list[ServerView]]] = []
    to_check: list[tuple[Row, str]] = []
    to_stop: list[Row] = []
    to_requeue: list[int] = []
    extras: list[ServerView] = []
    live_ids = set()
    for row in rows:
        live_ids.add(row.id)
        found = [s for s in by_machine.get(row.id, []) if s.status not in ("DELETED", "SOFT_DELETED")]
        if len(found) > 1 and row.state is not S.stopping:
            # Two servers for one machine (a create retried after its answer was lost):
            # keep the most advanced, delete the others.
            found.sort(key=lambda s: (s.status != "ACTIVE", s.status == "ERROR", s.created or now))
            extras.extend(found[1:])
            found = found[:1]
        if row.state is S.stopping:
            to_stop.append(row)
        elif row.state is S.starting:
            broken = [s for s in found if s.status == "ERROR"]
            active = [s for s in found if s.status == "ACTIVE" and s.address]
            if broken:
                failures.append((row, broken[0].fault or "the server went to ERROR", found))
            elif not found and row.ref.get("server_id"):
                failures.append((row, "the cloud lost the machine's server", found))
            elif not found and now - row.since > CREATE_GRACE:
                # The create never happened (its answer was lost and no server has our tag):
                # back in the queue, same machine row.
                to_requeue.append(row.id)
            elif now - row.since > timeout:
                failures.append((row, f"the IDE did not answer within {timeout.seconds} s", found))
            elif active:
                to_check.append((row, active[0].address or ""))
        elif row.state in (S.ready, S.assigned):
            if not found:
                failures.append((row, "the cloud lost the machine's server", found))
            elif all(s.status == "ERROR" for s in found):
                failures.append((row, found[0].fault or "the server went to ERROR", found))

    # 1. failures, 2. health checks, 3. stops
    with ThreadPoolExecutor(PARALLEL_CLOUD_CALLS) as pool_exec:
        healthy = list(pool_exec.map(
            lambda item: cloud.health(_spec(item[0], env, pool_id, address=item[1])), to_check
        ))
        list(pool_exec.map(lambda f: _delete_servers(cloud, f[2]), failures))
        list(pool_exec.map(lambda row: cloud.stop(_spec(row, env, pool_id)), to_stop))
        list(pool_exec.map(lambda s: _delete_servers(cloud, [s]), extras))
    up = [(row, address) for (row, address), ok in zip(to_check, healthy, strict=True) if ok]
    report.ready = _mark_up(rt, up)
    report.volumes_attached = attach_student_volumes(rt, cloud, env, by_machine)
    report.failed = _mark_failed(rt, [(row, reason) for row, reason, _ in failures])
    report.stopped = _mark_stopped(rt, [row.id for row in to_stop])
    _requeue(rt, to_requeue)

    # 4. orphans: servers no live machine owns (the database forgot them, or a machine was
    # removed while its server stayed), after a grace period for creates still in flight.
    grace = timedelta(seconds=rt.settings.orphan_grace_s)
    orphans = [
        s for s in servers
        if (s.machine_id is None or s.machine_id not in live_ids)
        and s.status not in ("DELETED", "SOFT_DELETED")
        and (s.created is None or now - s.created > grace)
    ]
    if orphans:
        with ThreadPoolExecutor(PARALLEL_CLOUD_CALLS) as pool_exec:
            list(pool_exec.map(lambda s: _delete_servers(cloud, [s]), orphans))
        report.orphans_deleted = len(orphans)

    # 5. the warm target
    report.warm_requested = _top_up_warm(rt, pool, env, report, clock or now)

    # 6. create what is requested, unless the pool is backing off
    if backing_off:
        report.held = pool.hold_note
    else:
        report.created, report.held = _create_requested(rt, cloud, pool, env, now)
    _finish(rt, pool_id, now, report, failures=report.failed)
    log.info("pool %s pass: %s", pool_id, report)
    return report


def _delete_servers(cloud: OpenStackBackend, servers: list[ServerView]) -> None:
    for server in servers:
        try:
            cloud.stop(MachineSpec(id=server.machine_id or 0, ide_kind="jupyterlab", owner_id=None,
                                   course_id=None, ref={"server_id": server.server_id}))
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
                .values(state=new_state, address=address, state_changed_at=now,
                        assigned_at=now if row.owner_id else None)
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
    want and the teachers' unexpired "warm now" boosts. Returns how many were requested."""
    with transaction(rt.sessions) as session:
        demand, in_session = scheduled_demand(session, env.id, clock)
        boost = boosted_target(session, env.id, clock)
        report.target = max(pool.warm_target, demand, boost)
        if in_session:
            report.notes.append(f"class in session: {demand} student(s) without a machine yet")
        counts = dict(session.execute(
            select(Machine.state, func.count())
            .where(Machine.environment_id == env.id, Machine.owner_id.is_(None),
                   Machine.state.in_(CAPACITY_STATES))
            .group_by(Machine.state)
        ).all())
        warm = sum(counts.values())
        total = session.scalar(
            select(func.count()).where(Machine.environment_id == env.id,
                                       Machine.state.in_(CAPACITY_STATES + (S.assigned,)))
        ) or 0
        target = 0 if pool.paused else report.target
        if warm < target:
            room = max(0, pool.max_size - total)
            add = min(target - warm, room)
            session.add_all(
                Machine(environment_id=env.id, backend="openstack", state=S.requested)
                for _ in range(add)
            )
            if target - warm > room:
                report.notes.append(f"max_size {pool.max_size} caps the warm pool")
            return add
        surplus = min(warm - target, counts.get(S.ready, 0))
        if surplus > 0:
            ids = session.scalars(
                select(Machine.id)
                .where(Machine.environment_id == env.id, Machine.state == S.ready,
                       Machine.owner_id.is_(None))
                .order_by(Machine.id.desc()).limit(surplus)
            ).all()
            # Conditional: a launch may claim one of them this very moment.
            session.execute(
                update(Machine)
                .where(Machine.id.in_(ids), Machine.state == S.ready, Machine.owner_id.is_(None))
                .values(state=S.stopping, state_changed_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        return 0


def _create_requested(
    rt: Runtime, cloud: OpenStackBackend, pool: Pool, env: Environment, now: datetime
) -> tuple[int, str | None]:
    """Give `requested` machines servers: students' first, then warm ones."""
    with rt.sessions() as session:
        waiting = session.execute(
            select(Machine.id, Machine.owner_id)
            .where(Machine.environment_id == env.id, Machine.state == S.requested)
            .order_by(Machine.owner_id.is_(None), Machine.id)
        ).all()
        building = session.scalar(
            select(func.count()).where(Machine.backend == "openstack",
                                       Machine.state == S.starting)
        ) or 0
    if not waiting:
        _set_quota_note(rt, pool.id, None)
        return 0, None
    if pool.paused:
        waiting = [w for w in waiting if w.owner_id is not None]
    budget = max(0, rt.settings.max_concurrent_creates - building)
    try:
        headroom = cloud.quota_headroom()
    except (CloudUnavailable, CloudConflict) as exc:
        _back_off(rt, pool.id, now, f"The cloud is not answering: {exc}")
        return 0, str(exc)
    if headroom is not None and headroom < len(waiting):
        _set_quota_note(rt, pool.id, f"The cloud's quota allows {headroom} more machine(s); "
                                     f"{len(waiting)} are waiting.")
    else:
        _set_quota_note(rt, pool.id, None)
    if headroom is not None:
        budget = min(budget, headroom)
    chosen = waiting[:budget]
    if not chosen:
        return 0, "quota" if headroom == 0 else None

    # requested → starting with a fresh IDE token, committed before any server exists.
    tokens = {w.id: secrets.token_urlsafe(32) for w in chosen}
    claimed: list[Row] = []
    with transaction(rt.sessions) as session:
        for machine_id, token in tokens.items():
            got = session.execute(
                update(Machine)
                .where(Machine.id == machine_id, Machine.state == S.requested)
                .values(state=S.starting, ide_token=token, state_changed_at=utcnow(),
                        backend_ref={"pool_id": pool.id})
                .returning(Machine.owner_id, Machine.course_id)
                .execution_options(synchronize_session=False)
            ).first()
            if got is not None:
                claimed.append(Row(machine_id, S.starting, got.owner_id, got.course_id,
                                   {"pool_id": pool.id}, None, token, now))

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
            if server_id is not None:
                created += 1
                session.execute(
                    update(Machine).where(Machine.id == row.id)
                    .values(backend_ref={"pool_id": pool.id, "server_id": server_id})
                    .execution_options(synchronize_session=False)
                )
                continue
            if isinstance(error, CloudUnavailable):
                # The create may have happened anyway: leave it `starting`, so the next
                # pass adopts a server it finds by tag, or fails the machine at the timeout.
                held = held or str(error)
                continue
            if isinstance(error, (QuotaExceeded, CloudConflict)):
                # Not created: back in the queue for a later pass.
                session.execute(
                    update(Machine).where(Machine.id == row.id, Machine.state == S.starting)
                    .values(state=S.requested, ide_token=None, backend_ref=None)
                    .execution_options(synchronize_session=False)
                )
                held = str(error)
            else:
                session.execute(
                    update(Machine).where(Machine.id == row.id, Machine.state == S.starting)
                    .values(state=S.error, error=str(error), state_changed_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
    for _, _, error in results:
        if isinstance(error, QuotaExceeded):
            _set_quota_note(rt, pool.id, str(error))
            break
    if any(isinstance(e, (CloudUnavailable, BackendUnavailable)) for _, _, e in results):
        _back_off(rt, pool.id, now, held or "the cloud refused to create machines")
    return created, held


def _set_quota_note(rt: Runtime, pool_id: int, note: str | None) -> None:
    with transaction(rt.sessions) as session:
        session.execute(update(Pool).where(Pool.id == pool_id, Pool.quota_note.is_distinct_from(note))
                        .values(quota_note=note))


def _back_off(rt: Runtime, pool_id: int, now: datetime, why: str) -> None:
    with transaction(rt.sessions) as session:
        pool = session.get_one(Pool, pool_id, with_for_update=True)
        pool.consecutive_failures += 1
        delay = min(15 * 2 ** min(pool.consecutive_failures, 8), 3600)
        pool.backoff_until = now + timedelta(seconds=delay)
        pool.hold_note = f"{why} (retrying in {delay} s)"


def _finish(rt: Runtime, pool_id: int, now: datetime, report: PassReport, failures: int | None) -> None:
    with transaction(rt.sessions) as session:
        pool = session.get_one(Pool, pool_id, with_for_update=True)
        pool.last_pass_at = now
        if failures is None:
            return
        if report.ready and not failures:
            pool.consecutive_failures = 0
            if pool.backoff_until is None or pool.backoff_until <= now:
                pool.hold_note = None
        elif failures:
            pool.consecutive_failures += failures
            if pool.consecutive_failures >= rt.settings.max_consecutive_failures:
                delay = min(30 * 2 ** (pool.consecutive_failures - rt.settings.max_consecutive_failures), 3600)
                pool.backoff_until = now + timedelta(seconds=delay)
                pool.hold_note = (
                    f"{pool.consecutive_failures} machines failed in a row; creating more is "
                    f"paused for {delay} s. Check the environment's image and flavor."
                )
        elif pool.backoff_until is not None and pool.backoff_until <= now:
            pool.hold_note = None
            pool.backoff_until = None
