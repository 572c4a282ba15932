"""The OpenStack fleet: pools kept warm by a level-triggered reconciler, against a fake cloud
that only openstacksdk talks to. Machines become ready only when their IDE answers (the fake
cloud runs a small IDE stand-in on a loopback address for each ACTIVE server)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import openstack
import psutil
import pytest
import requests
from sqlalchemy import func, select, update

from config.db import transaction
from config.runtime import Runtime
from lti_tool.models import Activity, Course, Platform, User
from provisioning.claiming import claim_warm_machine
from provisioning.environments import add_environment, add_secured_environment
from provisioning.jobs import reconcile_all
from provisioning.models import Environment, Machine, MachineState, Pool
from provisioning.reconciler import reconcile_pool
from tests.conftest import run_worker_burst

S = MachineState
PROXY = "127.0.0.1/32"  # where the proxy and the workers reach the fake's machines from
# `cloud` (conftest.py): the stubs answer only whom their server's security groups admit (see
# make_pool).
pytestmark = pytest.mark.fake_cloud(
    boot_time=0.2, max_instances=40, ide="stub", enforce_security_groups=True
)


@pytest.fixture
def crt(rt: Runtime, cloud) -> Runtime:  # type: ignore[no-untyped-def]
    """The runtime, pointed at the fake cloud, with short timeouts."""
    settings = dataclasses.replace(
        rt.settings,
        openstack_cloud="fake",
        cloud_start_timeout_s=20,
        orphan_grace_s=0,
        proxy_addresses=(PROXY,),
    )
    return Runtime(settings=settings, sessions=rt.sessions, redis=rt.redis)


def make_pool(rt: Runtime, warm: int = 0, max_size: int = 20) -> tuple[int, int]:
    """A cloud environment as `labpool env add` makes it: with its own security group,
    whose IDE port admits the proxy (and workers: this test process, at 127.0.0.1) alone."""
    name, _, _ = add_secured_environment(
        rt.sessions,
        rt.settings,
        name=f"cloud-{uuid.uuid4().hex[:6]}",
        backend="openstack",
        image_id="img-golden",
        flavor_id="m1.small",
        network_id="net-private",
        warm_target=warm,
        max_size=max_size,
    )
    with rt.sessions() as session:
        env_id = session.scalar(select(Environment.id).where(Environment.name == name))
        pool_id = session.scalar(select(Pool.id).where(Pool.environment_id == env_id))
        return env_id, pool_id


def states(rt: Runtime, env_id: int, owned: bool | None = None) -> dict[str, int]:
    query = select(Machine.state, func.count()).where(Machine.environment_id == env_id)
    if owned is not None:
        query = query.where(Machine.owner_id.is_not(None) if owned else Machine.owner_id.is_(None))
    with rt.sessions() as session:
        return {state.value: n for state, n in session.execute(query.group_by(Machine.state))}


def passes_until(rt: Runtime, pool_id: int, done, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reconcile_pool(rt, pool_id)
        if done():
            return
        time.sleep(0.1)
    raise AssertionError("the reconciler did not get there in time")


def live_servers(cloud) -> list[dict]:  # type: ignore[no-untyped-def]
    return [s for s in cloud.servers() if s["status"] not in ("DELETED",)]


def machines_per_server(cloud) -> dict[str, int]:  # type: ignore[no-untyped-def]
    counts: dict[str, int] = {}
    for server in live_servers(cloud):
        for tag in server["tags"]:
            if tag.startswith("machine-"):
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def use_environment(rt: Runtime, env_id: int) -> None:
    with transaction(rt.sessions) as session:
        session.execute(update(Activity).values(environment_id=env_id))


# ----------------------------------------------------------------------------------------


def test_launch_on_a_cloud_pool_ends_on_a_machine_whose_ide_answers(
    tool, platform, crt, cloud, browser
):
    env_id, pool_id = make_pool(crt)
    platform.launch(browser, tool.url, platform.instructor(sub="1"))  # creates the activity
    use_environment(crt, env_id)

    launched = platform.launch(browser, tool.url, platform.learner(sub="4")).launch_response
    machine_id = int(launched.headers["Location"].rsplit("/", 1)[1])
    assert states(crt, env_id) == {"requested": 1}
    assert not cloud.servers()  # the launch itself never calls the cloud

    # The launch queued a pass; a real RQ worker runs it (and the next ones).
    deadline = time.monotonic() + 30
    while browser.get(f"{tool.url}/machines/{machine_id}/state").json()["state"] != "assigned":
        assert time.monotonic() < deadline, states(crt, env_id)
        run_worker_burst(crt.settings)
        reconcile_all() if not crt.redis.llen(f"rq:queue:{crt.settings.queue_name}") else None
        time.sleep(0.2)

    with crt.sessions() as session:
        machine = session.get_one(Machine, machine_id)
        address, token = machine.address, machine.ide_token
    answer = requests.get(
        f"http://{address}/ide/{machine_id}/api/status",
        headers={"Authorization": f"token {token}"},
        timeout=5,
    )
    assert answer.status_code == 200
    assert machines_per_server(cloud) == {f"machine-{machine_id}": 1}


def test_a_machines_ide_refuses_another_machine_and_admits_the_proxy(crt, cloud):
    """Another student's machine, at its private address, cannot reach a machine's IDE even
    with its token: the environment's security group admits the proxy's address alone."""
    env_id, pool_id = make_pool(crt, warm=2)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 2)
    with crt.sessions() as session:
        (mine, other) = session.scalars(
            select(Machine).where(Machine.environment_id == env_id).order_by(Machine.id)
        ).all()
    host, port = mine.address.rsplit(":", 1)
    request = (
        f"GET /ide/{mine.id}/api/status HTTP/1.1\r\nHost: {mine.address}\r\n"
        f"Authorization: token {mine.ide_token}\r\nConnection: close\r\n\r\n"
    ).encode()

    def status_from(source: str) -> bytes:
        with socket.socket() as sock:
            sock.settimeout(2)
            sock.bind((source, 0))
            try:
                sock.connect((host, int(port)))
                sock.sendall(request)
                return sock.recv(100)
            except ConnectionError:
                return b"refused"

    assert status_from(other.address.rsplit(":", 1)[0]) in (b"", b"refused")
    assert status_from("127.0.0.1").startswith(b"HTTP/1.1 200")


def test_machines_are_ready_only_when_the_ide_answers(crt, cloud):
    env_id, pool_id = make_pool(crt, warm=1)
    reconcile_pool(crt, pool_id)
    (server,) = live_servers(cloud)
    cloud.ide_hang(server["id"])
    time.sleep(0.5)  # ACTIVE in the cloud by now
    reconcile_pool(crt, pool_id)
    assert states(crt, env_id) == {"starting": 1}


def test_warm_pool_is_filled_and_refilled_after_claims(crt, cloud, rt):
    env_id, pool_id = make_pool(crt, warm=3)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 3)

    with transaction(rt.sessions) as session:
        users = _users(session, 2)
        course_id = _course(session)
        claimed = [claim_warm_machine(session, env_id, course_id, uid) for uid in users]
    assert all(m is not None and m.state is S.assigned for m in claimed)

    passes_until(crt, pool_id, lambda: states(crt, env_id, owned=False).get("ready") == 3)
    assert states(crt, env_id) == {"ready": 3, "assigned": 2}
    assert len(live_servers(cloud)) == 5
    assert all(n == 1 for n in machines_per_server(cloud).values())


def test_surplus_warm_machines_are_stopped(crt, cloud, rt):
    env_id, pool_id = make_pool(crt, warm=3)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 3)
    with transaction(rt.sessions) as session:
        session.execute(update(Pool).where(Pool.id == pool_id).values(warm_target=1))
    passes_until(
        crt,
        pool_id,
        lambda: states(crt, env_id).get("ready") == 1 and len(live_servers(cloud)) == 1,
    )
    assert states(crt, env_id) == {"ready": 1, "stopped": 2}


def test_a_lost_create_answer_is_adopted_not_duplicated(crt, cloud):
    env_id, pool_id = make_pool(crt, warm=1)
    cloud.lose_next_create_response()
    reconcile_pool(crt, pool_id)  # the server exists, but we never heard its id
    assert len(live_servers(cloud)) == 1
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 1)
    assert len(live_servers(cloud)) == 1
    assert list(machines_per_server(cloud).values()) == [1]


def test_a_worker_killed_mid_create_leaves_no_orphan_and_no_duplicate(crt, cloud, monkeypatch):
    env_id, pool_id = make_pool(crt, warm=2)
    cloud.set_latency(1.0)  # every cloud call now takes a second
    reconcile_all_in(crt)  # the periodic trigger queues a pass
    worker = subprocess.Popen(
        [sys.executable, "-m", "lti_tool.cli", "worker", "--burst"],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while cloud.count("POST", "/compute/v2.1/servers") == 0:
            assert time.monotonic() < deadline, "the worker never tried to create"
            time.sleep(0.05)
        # Mid-create, before any answer came back: the worker and its work horse (RQ puts
        # the horse in a session of its own) die at once.
        for process in [
            *psutil.Process(worker.pid).children(recursive=True),
            psutil.Process(worker.pid),
        ]:
            process.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
    cloud.set_latency(0)
    crt.redis.delete(f"labpool:reconcile-lock:{pool_id}")  # the dead worker's lock
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 2, timeout=90)
    assert all(n == 1 for n in machines_per_server(cloud).values())
    assert len(live_servers(cloud)) == 2


def reconcile_all_in(rt: Runtime) -> None:
    """The cron trigger, as `labpool cron` runs it."""
    os.environ["LABPOOL_OPENSTACK_CLOUD"] = "fake"
    reconcile_all()


def test_flushing_redis_loses_nothing(crt, cloud):
    env_id, pool_id = make_pool(crt, warm=2)
    reconcile_all_in(crt)  # a pass is queued...
    crt.redis.flushdb()  # ...and lost, with every other key
    assert states(crt, env_id) == {}
    reconcile_all_in(crt)  # the next periodic tick
    run_worker_burst(crt.settings)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 2)


def test_quota_exhaustion_is_reported_and_recovers(crt, cloud):
    env_id, pool_id = make_pool(crt, warm=4)
    cloud.set_quota(2)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 2)
    reconcile_pool(crt, pool_id)
    with crt.sessions() as session:
        note = session.get_one(Pool, pool_id).quota_note
    assert note and "quota" in note.lower()
    assert states(crt, env_id) == {"ready": 2, "requested": 2}

    cloud.set_quota(10)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 4)
    with crt.sessions() as session:
        assert session.get_one(Pool, pool_id).quota_note is None


def test_error_machines_are_replaced_and_never_count_as_capacity(crt, cloud):
    env_id, pool_id = make_pool(crt, warm=2)
    cloud.error_next_create("No valid host was found. There are not enough hosts available.")
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 2)
    assert states(crt, env_id) == {"ready": 2, "error": 1}
    with crt.sessions() as session:
        errors = session.scalars(select(Machine.error).where(Machine.state == S.error)).all()
    assert errors == ["No valid host was found. There are not enough hosts available."]
    assert len(live_servers(cloud)) == 2  # the ERROR server was deleted


def test_machines_failing_in_a_row_make_the_pool_back_off(crt, cloud):
    settings = dataclasses.replace(crt.settings, max_consecutive_failures=2)
    rt2 = Runtime(settings=settings, sessions=crt.sessions, redis=crt.redis)
    env_id, pool_id = make_pool(rt2, warm=1)
    for _ in range(6):
        cloud.error_next_create("Image is corrupt")
    for _ in range(12):
        reconcile_pool(rt2, pool_id)
        time.sleep(0.3)
    with crt.sessions() as session:
        pool = session.get_one(Pool, pool_id)
    assert pool.hold_note and "failed in a row" in pool.hold_note
    assert states(crt, env_id).get("error", 0) <= 3  # stopped early, not a crash loop


def test_lost_and_stuck_servers_are_replaced(crt, cloud):
    env_id, pool_id = make_pool(crt, warm=1)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 1)
    (server,) = live_servers(cloud)
    cloud.vanish_server(server["id"])
    passes_until(
        crt,
        pool_id,
        lambda: states(crt, env_id).get("ready") == 1 and states(crt, env_id).get("error") == 1,
    )
    with crt.sessions() as session:
        assert (
            session.scalar(select(Machine.error).where(Machine.state == S.error))
            == "the cloud lost the machine's server"
        )


def test_servers_unknown_to_the_database_are_deleted_after_the_grace(crt, cloud):
    env_id, pool_id = make_pool(crt)
    conn = openstack.connect(cloud="fake")
    conn.compute.create_server(
        name="stray",
        image_id="img",
        flavor_id="flv",
        networks=[{"uuid": "net"}],
        tags=["labpool", f"pool-{pool_id}", "machine-999999"],
    )
    waiting = dataclasses.replace(crt.settings, orphan_grace_s=3600)
    reconcile_pool(Runtime(waiting, crt.sessions, crt.redis), pool_id)
    assert len(live_servers(cloud)) == 1  # still within the grace period
    reconcile_pool(crt, pool_id)
    assert live_servers(cloud) == []


def test_cloud_outage_backs_off_with_a_readable_note(crt, cloud):
    env_id, pool_id = make_pool(crt, warm=1)
    cloud.fail_next("GET", "/compute/v2.1/servers", 503, count=5)
    report = reconcile_pool(crt, pool_id)
    assert report.held
    with crt.sessions() as session:
        pool = session.get_one(Pool, pool_id)
    assert pool.hold_note and "not answering" in pool.hold_note
    assert pool.backoff_until is not None


def test_300_concurrent_claims_on_300_ready_machines_give_300_distinct_machines(rt):
    with transaction(rt.sessions) as session:
        env = add_environment(
            session,
            name="claims",
            backend="openstack",
            image_id="i",
            flavor_id="f",
            network_id="n",
            max_size=300,
        )
        env_id = env.id
        session.add_all(
            Machine(
                environment_id=env_id,
                backend="openstack",
                state=S.ready,
                address="10.0.0.1:8888",
                ide_token="t",
            )
            for _ in range(300)
        )
        users = _users(session, 300)
        course_id = _course(session)

    def claim(uid: int) -> int | None:
        with transaction(rt.sessions) as session:
            machine = claim_warm_machine(session, env_id, course_id, uid)
            return machine.id if machine else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(claim, users))
    assert None not in got
    assert len(set(got)) == 300
    assert states(rt, env_id) == {"assigned": 300}


def _users(session, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    rows = [User(issuer="https://moodle.test", sub=f"u{uuid.uuid4().hex}") for _ in range(n)]
    session.add_all(rows)
    session.flush()
    return [u.id for u in rows]


def _course(session) -> int:  # type: ignore[no-untyped-def]
    platform = session.scalar(select(Platform).limit(1))
    if platform is None:
        platform = Platform(
            issuer="https://moodle.test", client_id="c", auth_url="x", token_url="x", jwks_url="x"
        )
        session.add(platform)
        session.flush()
    course = Course(platform_id=platform.id, context_id=uuid.uuid4().hex)
    session.add(course)
    session.flush()
    return course.id


def test_teacher_picks_the_cloud_environment_and_sees_the_pool(tool, platform, crt, cloud, browser):
    env_id, pool_id = make_pool(crt, warm=3)
    cloud.set_quota(1)
    teacher = platform.launch(browser, tool.url, platform.instructor(sub="1")).launch_response
    class_url = tool.url + teacher.headers["Location"]
    page = browser.get(class_url).text
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    activity_id = class_url.split("/activities/")[1].split("/")[0]

    # A student cannot change it, nor see the pool.
    with requests.Session() as student:
        platform.launch(student, tool.url, platform.learner(sub="4"))
        refused = student.post(
            f"{tool.url}/activities/{activity_id}/environment",
            data={"environment_id": env_id, "csrf": csrf},
        )
        assert refused.status_code == 403
        assert student.get(class_url + ".json").status_code == 403

    chosen = browser.post(
        f"{tool.url}/activities/{activity_id}/environment",
        data={"environment_id": env_id, "csrf": csrf},
        allow_redirects=False,
    )
    assert chosen.status_code == 303
    with crt.sessions() as session:
        assert session.get_one(Activity, int(activity_id)).environment_id == env_id
    garbage = browser.post(
        f"{tool.url}/activities/{activity_id}/environment",
        data={"environment_id": "nope", "csrf": csrf},
    )
    assert garbage.status_code == 400

    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 1)
    reconcile_pool(crt, pool_id)
    pool = browser.get(class_url + ".json").json()["pool"]
    assert pool["ready_warm"] == 1 and pool["warm_target"] == 3
    assert any("quota" in note.lower() for note in pool["notes"])


def test_a_students_volume_follows_them_from_machine_to_machine(crt, cloud, rt):
    from provisioning.jobs import stop_machine_now
    from provisioning.models import StudentVolume

    env_id, pool_id = make_pool(crt, warm=1)
    passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready") == 1)
    with transaction(rt.sessions) as session:
        (user,) = _users(session, 1)
        course = _course(session)
        first = claim_warm_machine(session, env_id, course, user).id

    def volume() -> StudentVolume | None:
        with crt.sessions() as session:
            return session.scalars(select(StudentVolume)).first()

    passes_until(crt, pool_id, lambda: (v := volume()) is not None and v.status == "in-use")
    (cloud_volume,) = cloud.volumes()
    first_server = [s["id"] for s in live_servers(cloud) if f"machine-{first}" in s["tags"]][0]
    assert cloud_volume["attachments"][0]["server_id"] == first_server
    assert volume().machine_id == first

    stop_machine_now(crt, first)  # released: the server goes, the volume stays
    (cloud_volume,) = cloud.volumes()
    assert cloud_volume["status"] == "available"
    assert volume().status == "available"

    with transaction(rt.sessions) as session:
        second = claim_warm_machine(session, env_id, course, user)
        second_id = second.id if second else None
    if second_id is None:  # the refill may still be booting
        passes_until(crt, pool_id, lambda: states(crt, env_id).get("ready", 0) >= 1)
        with transaction(rt.sessions) as session:
            second_id = claim_warm_machine(session, env_id, course, user).id
    passes_until(
        crt, pool_id, lambda: volume().machine_id == second_id and volume().status == "in-use"
    )
    (cloud_volume,) = cloud.volumes()  # the same volume, never a second one
    second_server = [s["id"] for s in live_servers(cloud) if f"machine-{second_id}" in s["tags"]][0]
    assert cloud_volume["attachments"][0]["server_id"] == second_server
