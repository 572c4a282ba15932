"""What the reconciler decides, as pure functions: machines and servers in, actions out.

No database, no cloud, no clock (the pass reads `now` once and passes it), so every rule of
a pass can be tested with a table of cases (`tests/test_reconcile_decisions.py`), and
`provisioning/reconciler.py` is left with the I/O: reading rows, listing the pool, making
the cloud calls these functions ask for, and writing the outcome.

The rules, in the order a pass applies them:

- `decide`: each machine against the servers that carry its tag. Lost (its server gone),
  ERROR, or stuck past the start timeout → `error` (their servers deleted, Nova's fault
  kept); a create that never reached the cloud → back to `requested`; booting with an
  ACTIVE server → ask its IDE; `stopping` → delete its server; two servers for one machine
  → keep the most advanced; servers no live machine owns → deleted after a grace period.
- `decide_roll`: after an admin changed the environment's image or flavor, warm machines
  (unowned, `starting` or `ready`) still on the old ones are stopped, so `decide_warm`
  replaces them in the same pass; assigned machines are left to their student (a released
  machine is stopped, never reused, so the next one boots the new image).
- `decide_warm`: top the warm pool up to its target within `max_size`, or stop the surplus.
- `decide_creates`: which `requested` machines get servers now (students' first), within the
  per-cloud cap on concurrent creates and the quota headroom.
- `create_outcome`: what a failed create means for its machine.
- `backoff_delay` and `after_pass`: how long a pool holds creation after the cloud failed or
  machines failed in a row, and when the hold ends.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from provisioning.backends import ServerView
from provisioning.errors import (
    BackendUnavailable,
    CloudConflict,
    CloudUnavailable,
    ProvisioningError,
    QuotaExceeded,
)
from provisioning.models import MachineState

S = MachineState
GONE_STATUSES = ("DELETED", "SOFT_DELETED")
# A machine `starting` without any server this long after its create was sent: the create
# never reached the cloud.
CREATE_GRACE = timedelta(seconds=60)
BACKOFF_CAP_S = 3600


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
    since: datetime  # when it entered its state


@dataclass
class Actions:
    """What one pass must do about its machines and servers."""

    failures: list[tuple[Row, str, list[ServerView]]] = field(default_factory=list)
    to_check: list[tuple[Row, str]] = field(default_factory=list)  # (machine, IDE address)
    to_stop: list[Row] = field(default_factory=list)
    to_requeue: list[int] = field(default_factory=list)
    extras: list[ServerView] = field(default_factory=list)  # a machine's second server
    orphans: list[ServerView] = field(default_factory=list)
    servers_by_machine: dict[int, list[ServerView]] = field(default_factory=dict)


def decide(
    rows: Sequence[Row],
    servers: Sequence[ServerView],
    now: datetime,
    *,
    start_timeout: timedelta,
    orphan_grace: timedelta,
) -> Actions:
    """Compare the pool's live machines (not stopped, not error) with its servers."""
    actions = Actions()
    by_machine: dict[int, list[ServerView]] = defaultdict(list)
    for server in servers:
        if server.machine_id is not None:
            by_machine[server.machine_id].append(server)
    actions.servers_by_machine = by_machine
    live_ids = set()
    for row in rows:
        live_ids.add(row.id)
        found = [s for s in by_machine.get(row.id, []) if s.status not in GONE_STATUSES]
        if len(found) > 1 and row.state is not S.stopping:
            # Two servers for one machine (a create retried after its answer was lost):
            # keep the most advanced, delete the others.
            found.sort(key=lambda s: (s.status != "ACTIVE", s.status == "ERROR", s.created or now))
            actions.extras.extend(found[1:])
            found = found[:1]
        if row.state is S.stopping:
            actions.to_stop.append(row)
        elif row.state is S.starting:
            broken = [s for s in found if s.status == "ERROR"]
            active = [s for s in found if s.status == "ACTIVE" and s.address]
            if broken:
                actions.failures.append((row, broken[0].fault or "the server went to ERROR", found))
            elif not found and row.ref.get("server_id"):
                actions.failures.append((row, "the cloud lost the machine's server", found))
            elif not found and now - row.since > CREATE_GRACE:
                # The create never happened (its answer was lost and no server has our tag):
                # back in the queue, same machine row.
                actions.to_requeue.append(row.id)
            elif now - row.since > start_timeout:
                actions.failures.append(
                    (row, f"the IDE did not answer within {start_timeout.seconds} s", found)
                )
            elif active:
                actions.to_check.append((row, active[0].address or ""))
        elif row.state in (S.ready, S.assigned):
            if not found:
                actions.failures.append((row, "the cloud lost the machine's server", found))
            elif all(s.status == "ERROR" for s in found):
                actions.failures.append((row, found[0].fault or "the server went to ERROR", found))
    # Servers no live machine owns (the database forgot them, or a machine was removed while
    # its server stayed), after a grace period for creates still in flight.
    actions.orphans = [
        s
        for s in servers
        if (s.machine_id is None or s.machine_id not in live_ids)
        and s.status not in GONE_STATUSES
        and (s.created is None or now - s.created > orphan_grace)
    ]
    return actions


def on_old_spec(ref: dict[str, Any], image_id: str | None, flavor_id: str | None) -> bool:
    """Was this machine's server booted from another image or flavor than the environment's
    now? (`ref` is its `backend_ref`: the reconciler records both at the create, and an
    admin's edit records them on older machines; a machine without the record is current.)"""
    if "image_id" not in ref and "flavor_id" not in ref:
        return False
    return ref.get("image_id") != image_id or ref.get("flavor_id") != flavor_id


def decide_roll(rows: Sequence[Row], *, image_id: str | None, flavor_id: str | None) -> list[int]:
    """Warm machines (no owner; `starting` or `ready`) on an earlier image or flavor: stop them
    now. Never one with an owner: a student's machine rolls when it is released."""
    return [
        row.id
        for row in rows
        if row.owner_id is None
        and row.state in (S.starting, S.ready)
        and on_old_spec(row.ref, image_id, flavor_id)
    ]


@dataclass(frozen=True)
class WarmChange:
    target: int  # what the pool should hold warm (before a pause)
    add: int  # new `requested` warm machines
    stop: int  # surplus `ready` machines to stop
    notes: tuple[str, ...] = ()


def decide_warm(
    *,
    floor: int,
    demand: int,
    in_session: bool,
    boost: int,
    paused: bool,
    max_size: int,
    warm: int,
    ready: int,
    total: int,
) -> WarmChange:
    """The warm target is the largest of the pool's floor, what the classes in session want
    (`demand`) and the teachers' unexpired "warm now" boosts; a paused pool wants none.
    `warm`: unowned machines requested, starting or ready (`ready` of them ready); `total`:
    every machine counting against `max_size` (those, and the assigned ones)."""
    target = max(floor, demand, boost)
    notes = [f"class in session: {demand} student(s) without a machine yet"] if in_session else []
    wanted = 0 if paused else target
    if warm < wanted:
        room = max(0, max_size - total)
        if wanted - warm > room:
            notes.append(f"max_size {max_size} caps the warm pool")
        return WarmChange(target, min(wanted - warm, room), 0, tuple(notes))
    return WarmChange(target, 0, max(0, min(warm - wanted, ready)), tuple(notes))


@dataclass(frozen=True)
class CreatePlan:
    chosen: list[int]  # machine ids to create now, in order
    quota_note: str | None  # shown on the pool while the quota is short
    held: str | None  # why nothing is created, when nothing is


def decide_creates(
    waiting: Sequence[tuple[int, int | None]],
    *,
    paused: bool,
    building: int,
    max_concurrent: int,
    headroom: int | None,
) -> CreatePlan:
    """`waiting`: (machine id, owner id) of the `requested` machines, students' first; a
    paused pool still creates students' machines. `building`: creates in flight on the
    cloud; `headroom`: what the quota allows (None: unlimited)."""
    if paused:
        waiting = [w for w in waiting if w[1] is not None]
    budget = max(0, max_concurrent - building)
    note = None
    if headroom is not None and headroom < len(waiting):
        note = f"The cloud's quota allows {headroom} more machine(s); {len(waiting)} are waiting."
    if headroom is not None:
        budget = min(budget, headroom)
    chosen = [machine_id for machine_id, _ in waiting[:budget]]
    held = "quota" if not chosen and headroom == 0 else None
    return CreatePlan(chosen, note, held)


CreateOutcome = Literal["created", "starting", "requeue", "error"]


def create_outcome(error: ProvisioningError | None) -> CreateOutcome:
    """What a create's answer means for its machine (already `starting`, token written)."""
    if error is None:
        return "created"
    if isinstance(error, CloudUnavailable):
        # The create may have happened anyway: it stays `starting`, so the next pass adopts
        # a server it finds by tag, or fails the machine at the timeout.
        return "starting"
    if isinstance(error, (QuotaExceeded, CloudConflict)):
        return "requeue"  # not created: back in the queue for a later pass
    return "error"


def creates_back_off(errors: Sequence[ProvisioningError | None]) -> bool:
    """The cloud failed or refused us outright: hold the pool's creates for a while."""
    return any(isinstance(e, (CloudUnavailable, BackendUnavailable)) for e in errors)


def backoff_delay(consecutive_failures: int) -> int:
    """Seconds to hold after the cloud failed (`consecutive_failures` counts this one)."""
    return min(15 * 2 ** min(consecutive_failures, 8), BACKOFF_CAP_S)


@dataclass(frozen=True)
class PoolHold:
    """The pool's memory of failures, as `Pool` stores it."""

    consecutive_failures: int
    backoff_until: datetime | None
    hold_note: str | None


def is_held(backoff_until: datetime | None, now: datetime) -> bool:
    return backoff_until is not None and backoff_until > now


def after_pass(
    hold: PoolHold, *, ready: int, failures: int, now: datetime, max_consecutive: int
) -> PoolHold:
    """A pass that brought machines up and lost none clears the count; machines failing in a
    row (a broken image, a bad flavor) hold creation, longer each time; an expired hold is
    lifted."""
    if ready and not failures:
        expired = hold.backoff_until is None or hold.backoff_until <= now
        return PoolHold(0, hold.backoff_until, None if expired else hold.hold_note)
    if failures:
        count = hold.consecutive_failures + failures
        if count < max_consecutive:
            return PoolHold(count, hold.backoff_until, hold.hold_note)
        delay = min(30 * 2 ** (count - max_consecutive), BACKOFF_CAP_S)
        return PoolHold(
            count,
            now + timedelta(seconds=delay),
            f"{count} machines failed in a row; creating more is paused for "
            f"{delay} s. Check the environment's image and flavor.",
        )
    if hold.backoff_until is not None and hold.backoff_until <= now:
        return PoolHold(hold.consecutive_failures, None, None)
    return hold
