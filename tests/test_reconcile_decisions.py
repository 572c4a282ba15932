"""The reconciler's decisions, case by case, without a database, a cloud or a clock: the
pure functions of `provisioning/reconcile_decisions.py` (test_fleet.py drives the same
rules end to end against the fake cloud)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from provisioning.backends import ServerView
from provisioning.errors import (
    BackendUnavailable,
    CloudConflict,
    CloudUnavailable,
    ProvisioningError,
    QuotaExceeded,
)
from provisioning.models import MachineState
from provisioning.reconcile_decisions import (
    CREATE_GRACE,
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
    on_old_spec,
)

S = MachineState
NOW = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
START_TIMEOUT = timedelta(seconds=300)
ORPHAN_GRACE = timedelta(seconds=120)
NO_VALID_HOST = "No valid host was found."


def row(
    machine_id: int,
    state: MachineState,
    *,
    age_s: float = 5,
    server_id: str | None = None,
    owner: int | None = None,
) -> Row:
    ref = {"pool_id": 1, **({"server_id": server_id} if server_id else {})}
    return Row(
        machine_id,
        state,
        owner,
        10 if owner else None,
        ref,
        None,
        "tok",
        NOW - timedelta(seconds=age_s),
    )


def server(
    machine_id: int | None,
    status: str = "ACTIVE",
    *,
    sid: str | None = None,
    address: str | None = "10.0.0.9:8888",
    fault: str | None = None,
    age_s: float = 30,
) -> ServerView:
    return ServerView(
        sid or f"srv-{machine_id}-{status}",
        machine_id,
        status,
        address if status == "ACTIVE" else None,
        fault,
        NOW - timedelta(seconds=age_s),
    )


def actions_for(rows: list[Row], servers: list[ServerView]) -> dict[str, object]:
    """The decision, as machine ids (and reasons) per action: tables compare these."""
    done = decide(rows, servers, NOW, start_timeout=START_TIMEOUT, orphan_grace=ORPHAN_GRACE)
    return {
        "fail": sorted((r.id, why) for r, why, _ in done.failures),
        "check": sorted(r.id for r, _ in done.to_check),
        "stop": sorted(r.id for r in done.to_stop),
        "requeue": sorted(done.to_requeue),
        "extra": sorted(s.server_id for s in done.extras),
        "orphan": sorted(s.server_id for s in done.orphans),
    }


def only(**expected: object) -> dict[str, object]:
    return {
        "fail": [],
        "check": [],
        "stop": [],
        "requeue": [],
        "extra": [],
        "orphan": [],
        **expected,
    }


LOST = "the cloud lost the machine's server"
CASES = [
    # -- booting machines
    (
        "booting, server still BUILD: wait",
        [row(1, S.starting, server_id="s1")],
        [server(1, "BUILD", sid="s1")],
        only(),
    ),
    (
        "booting, server ACTIVE with an address: ask its IDE",
        [row(1, S.starting, server_id="s1")],
        [server(1, sid="s1")],
        only(check=[1]),
    ),
    (
        "booting, ACTIVE but no address yet: wait",
        [row(1, S.starting)],
        [server(1, address=None)],
        only(),
    ),
    (
        "ERROR while booting: fail with Nova's fault, delete the server",
        [row(1, S.starting, server_id="s1")],
        [server(1, "ERROR", sid="s1", fault=NO_VALID_HOST)],
        only(fail=[(1, NO_VALID_HOST)]),
    ),
    (
        "ERROR without a fault",
        [row(1, S.starting)],
        [server(1, "ERROR")],
        only(fail=[(1, "the server went to ERROR")]),
    ),
    (
        "lost create: no server, none recorded, past the grace: back to requested",
        [row(1, S.starting, age_s=CREATE_GRACE.total_seconds() + 1)],
        [],
        only(requeue=[1]),
    ),
    (
        "create in flight: no server yet, within the grace: wait",
        [row(1, S.starting, age_s=CREATE_GRACE.total_seconds() - 1)],
        [],
        only(),
    ),
    (
        "lost server: its recorded server is gone",
        [row(1, S.starting, server_id="s1")],
        [],
        only(fail=[(1, LOST)]),
    ),
    (
        "a DELETED server counts as gone",
        [row(1, S.starting, server_id="s1")],
        [server(1, "DELETED", sid="s1")],
        only(fail=[(1, LOST)]),
    ),
    (
        "stuck: booting past the start timeout",
        [row(1, S.starting, server_id="s1", age_s=301)],
        [server(1, "BUILD", sid="s1")],
        only(fail=[(1, "the IDE did not answer within 300 s")]),
    ),
    (
        "stuck even when ACTIVE: the IDE never answered in time",
        [row(1, S.starting, server_id="s1", age_s=301)],
        [server(1, sid="s1")],
        only(fail=[(1, "the IDE did not answer within 300 s")]),
    ),
    # -- machines in use
    (
        "ready and assigned with ACTIVE servers: nothing to do",
        [row(1, S.ready), row(2, S.assigned, owner=5)],
        [server(1), server(2)],
        only(),
    ),
    ("a ready machine whose server vanished", [row(1, S.ready)], [], only(fail=[(1, LOST)])),
    (
        "an assigned machine whose server went to ERROR",
        [row(2, S.assigned, owner=5)],
        [server(2, "ERROR", fault=NO_VALID_HOST)],
        only(fail=[(2, NO_VALID_HOST)]),
    ),
    ("requested machines are not the cloud's business yet", [row(1, S.requested)], [], only()),
    # -- stopping, duplicates, orphans
    ("stopping: delete its server", [row(1, S.stopping)], [server(1)], only(stop=[1])),
    (
        "two servers for one machine: keep the ACTIVE one",
        [row(1, S.starting)],
        [server(1, "BUILD", sid="b"), server(1, sid="a")],
        only(check=[1], extra=["b"]),
    ),
    (
        "two servers, one ERROR: the ERROR one goes, the machine lives",
        [row(1, S.ready)],
        [server(1, "ERROR", sid="e"), server(1, sid="a")],
        only(extra=["e"]),
    ),
    (
        "two BUILD servers: the older stays",
        [row(1, S.starting)],
        [server(1, "BUILD", sid="new", age_s=5), server(1, "BUILD", sid="old", age_s=50)],
        only(extra=["new"]),
    ),
    (
        "orphan: a server whose machine is not live, past the grace",
        [],
        [server(7, sid="o7", age_s=121)],
        only(orphan=["o7"]),
    ),
    (
        "orphan: a server without a machine tag",
        [],
        [server(None, sid="untagged", age_s=121)],
        only(orphan=["untagged"]),
    ),
    (
        "not yet an orphan: within the grace (a create in flight)",
        [],
        [server(7, age_s=119)],
        only(),
    ),
    ("a DELETED server is never an orphan", [], [server(7, "DELETED", age_s=500)], only()),
]


@pytest.mark.parametrize(
    "rows, servers, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide(rows: list[Row], servers: list[ServerView], expected: dict) -> None:
    assert actions_for(rows, servers) == expected


def test_decide_deletes_every_server_of_a_failed_machine_and_hands_over_the_pool_map() -> None:
    done = decide(
        [row(1, S.assigned, owner=5)],
        [server(1, "ERROR"), server(2)],
        NOW,
        start_timeout=START_TIMEOUT,
        orphan_grace=timedelta(days=1),
    )
    ((failed, _, servers),) = done.failures
    assert failed.id == 1 and [s.machine_id for s in servers] == [1]
    assert set(done.servers_by_machine) == {1, 2}  # what the volume step reads


WARM = [
    # (case, arguments, (target, add, stop), notes)
    (
        "top up to the floor",
        dict(floor=5, demand=0, boost=0, warm=2, ready=2, total=2),
        (5, 3, 0),
        (),
    ),
    (
        "at target: nothing",
        dict(floor=3, demand=0, boost=0, warm=3, ready=3, total=10),
        (3, 0, 0),
        (),
    ),
    (
        "surplus ready machines stop",
        dict(floor=1, demand=0, boost=0, warm=4, ready=4, total=4),
        (1, 0, 3),
        (),
    ),
    (
        "surplus still booting is not stopped",
        dict(floor=1, demand=0, boost=0, warm=4, ready=1, total=4),
        (1, 0, 1),
        (),
    ),
    (
        "a class in session wants more than the floor",
        dict(floor=2, demand=20, in_session=True, boost=0, warm=2, ready=2, total=2),
        (20, 18, 0),
        ("class in session: 20 student(s) without a machine yet",),
    ),
    (
        "a teacher's boost wins when it is the largest",
        dict(floor=2, demand=5, boost=30, warm=0, ready=0, total=0),
        (30, 30, 0),
        (),
    ),
    (
        "max_size caps the top-up",
        dict(floor=10, demand=0, boost=0, warm=0, ready=0, total=46, max_size=50),
        (10, 4, 0),
        ("max_size 50 caps the warm pool",),
    ),
    (
        "full pool: nothing can be added",
        dict(floor=10, demand=0, boost=0, warm=0, ready=0, total=60, max_size=50),
        (10, 0, 0),
        ("max_size 50 caps the warm pool",),
    ),
    (
        "paused: wants none, stops ready surplus",
        dict(floor=5, demand=0, boost=0, warm=3, ready=2, total=3, paused=True),
        (5, 0, 2),
        (),
    ),
]


@pytest.mark.parametrize(
    "arguments, numbers, notes", [c[1:] for c in WARM], ids=[c[0] for c in WARM]
)
def test_decide_warm(arguments: dict, numbers: tuple[int, int, int], notes: tuple) -> None:
    change = decide_warm(**{"in_session": False, "paused": False, "max_size": 50, **arguments})
    assert (change.target, change.add, change.stop) == numbers
    assert change.notes == notes


STUDENTS_FIRST = [(3, 30), (4, 40), (1, None), (2, None)]  # as the pass orders them
CREATES = [
    (
        "everything fits",
        dict(building=0, max_concurrent=10, headroom=None),
        [3, 4, 1, 2],
        None,
        None,
    ),
    (
        "the per-cloud cap counts creates in flight",
        dict(building=8, max_concurrent=10, headroom=None),
        [3, 4],
        None,
        None,
    ),
    ("cap already used up", dict(building=12, max_concurrent=10, headroom=None), [], None, None),
    (
        "quota short: students first, and a note",
        dict(building=0, max_concurrent=10, headroom=2),
        [3, 4],
        "The cloud's quota allows 2 more machine(s); 4 are waiting.",
        None,
    ),
    (
        "quota exhausted: held for quota",
        dict(building=0, max_concurrent=10, headroom=0),
        [],
        "The cloud's quota allows 0 more machine(s); 4 are waiting.",
        "quota",
    ),
    (
        "paused pool: students' machines only",
        dict(building=0, max_concurrent=10, headroom=None, paused=True),
        [3, 4],
        None,
        None,
    ),
    (
        "paused, quota enough for the students: no note",
        dict(building=0, max_concurrent=10, headroom=2, paused=True),
        [3, 4],
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    "arguments, chosen, note, held", [c[1:] for c in CREATES], ids=[c[0] for c in CREATES]
)
def test_decide_creates(
    arguments: dict, chosen: list[int], note: str | None, held: str | None
) -> None:
    plan = decide_creates(STUDENTS_FIRST, **{"paused": False, **arguments})
    assert (plan.chosen, plan.quota_note, plan.held) == (chosen, note, held)


@pytest.mark.parametrize(
    "error, outcome, backs_off",
    [
        (None, "created", False),
        (CloudUnavailable("502"), "starting", True),  # it may exist: adopted next pass
        (QuotaExceeded("quota"), "requeue", False),
        (CloudConflict("409"), "requeue", False),
        (BackendUnavailable("bad image"), "error", True),
        (ProvisioningError("refused"), "error", False),
    ],
)
def test_create_outcomes(error: ProvisioningError | None, outcome: str, backs_off: bool) -> None:
    assert create_outcome(error) == outcome
    assert creates_back_off([None, error]) is backs_off


@pytest.mark.parametrize(
    "failures, seconds", [(1, 30), (2, 60), (3, 120), (7, 1920), (8, 3600), (20, 3600)]
)
def test_backoff_doubles_up_to_an_hour(failures: int, seconds: int) -> None:
    assert backoff_delay(failures) == seconds


LATER = NOW + timedelta(minutes=5)
EARLIER = NOW - timedelta(minutes=5)
HOLDS = [
    (
        "a good pass clears the count and an expired note",
        PoolHold(2, EARLIER, "old"),
        dict(ready=1, failures=0),
        PoolHold(0, EARLIER, None),
    ),
    (
        "a good pass keeps a hold that has not expired",
        PoolHold(2, LATER, "cloud down"),
        dict(ready=1, failures=0),
        PoolHold(0, LATER, "cloud down"),
    ),
    (
        "failures below the limit are counted",
        PoolHold(1, None, None),
        dict(ready=0, failures=1),
        PoolHold(2, None, None),
    ),
    (
        "failures reaching the limit hold creation",
        PoolHold(2, None, None),
        dict(ready=1, failures=1),
        PoolHold(
            3,
            NOW + timedelta(seconds=30),
            "3 machines failed in a row; creating more is "
            "paused for 30 s. Check the environment's image and flavor.",
        ),
    ),
    (
        "each further failure doubles the hold",
        PoolHold(4, None, None),
        dict(ready=0, failures=1),
        PoolHold(
            5,
            NOW + timedelta(seconds=120),
            "5 machines failed in a row; creating more is "
            "paused for 120 s. Check the environment's image and flavor.",
        ),
    ),
    (
        "a quiet pass lifts an expired hold",
        PoolHold(3, EARLIER, "paused"),
        dict(ready=0, failures=0),
        PoolHold(3, None, None),
    ),
    (
        "a quiet pass keeps a running hold",
        PoolHold(3, LATER, "paused"),
        dict(ready=0, failures=0),
        PoolHold(3, LATER, "paused"),
    ),
]


@pytest.mark.parametrize(
    "hold, passed, expected", [c[1:] for c in HOLDS], ids=[c[0] for c in HOLDS]
)
def test_after_pass(hold: PoolHold, passed: dict, expected: PoolHold) -> None:
    assert after_pass(hold, now=NOW, max_consecutive=3, **passed) == expected


def test_a_pool_is_held_until_its_backoff_ends() -> None:
    assert is_held(LATER, NOW) and not is_held(NOW, NOW) and not is_held(None, NOW)


# --- rolling a pool onto a new image or flavor (decide_roll) ---------------------------

OLD = {"image_id": "img-1", "flavor_id": "m1.small", "server_id": "s"}
NEW_IMAGE = {"image_id": "img-2", "flavor_id": "m1.small", "server_id": "s"}


def roll_row(machine_id: int, state: MachineState, owner: int | None, ref: dict) -> Row:
    return Row(machine_id, state, owner, 1 if owner else None, ref, None, None, NOW)


@pytest.mark.parametrize(
    "state, owner, ref, rolled",
    [
        (S.ready, None, OLD, True),  # warm on the old image: replaced now
        (S.starting, None, OLD, True),  # warm, still booting the old image
        (S.assigned, 7, OLD, False),  # a student's: never under them
        (S.starting, 7, OLD, False),  # a student waiting for this one: kept
        (S.ready, None, NEW_IMAGE, False),  # already on the new image
        (S.ready, None, {"server_id": "s"}, False),  # no record: booted as the env is
        (S.requested, None, {}, False),  # not created yet: it boots the new image
        (S.stopping, None, OLD, False),  # going anyway
    ],
)
def test_warm_machines_on_an_old_image_roll_students_machines_do_not(state, owner, ref, rolled):
    rows = [roll_row(1, state, owner, ref)]
    assert decide_roll(rows, image_id="img-2", flavor_id="m1.small") == ([1] if rolled else [])


def test_a_new_flavor_alone_rolls_the_pool_too():
    assert on_old_spec(OLD, "img-1", "m1.large")
    assert not on_old_spec(OLD, "img-1", "m1.small")
    assert decide_roll(
        [roll_row(1, S.ready, None, OLD), roll_row(2, S.assigned, 3, OLD)],
        image_id="img-1",
        flavor_id="m1.large",
    ) == [1]
