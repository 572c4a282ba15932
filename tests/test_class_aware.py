"""The pool knows the class: the roster from Moodle (NRPS), the schedule, idle release
that keeps files, and what only teachers may do."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, time, timedelta

import pytest
import requests
from sqlalchemy import func, select, update

from config.db import transaction
from config.runtime import Runtime
from lti_tool.models import Activity, Course, Enrolment, User
from lti_tool.services.nrps import RosterError, sync_course
from provisioning.environments import add_environment
from provisioning.idle import release_idle_machines
from provisioning.models import ClassSession, Machine, MachineState, Pool, WarmBoost
from provisioning.reconciler import reconcile_pool
from tests.conftest import run_worker_burst
from tests.test_launch import machine_id_of, wait_for_state

pytestmark = pytest.mark.fake_cloud(boot_time=0.1, max_instances=20, ide="stub")  # for `cloud`

S = MachineState


def teacher_launch(platform, tool, browser, context_id: str = "2"):  # type: ignore[no-untyped-def]
    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    response = platform.launch(
        browser, tool.url, platform.instructor(sub="3", context_id=context_id)
    ).launch_response
    assert response.status_code == 303
    return tool.url + response.headers["Location"]


def course_of(rt: Runtime, context_id: str = "2") -> int:
    with rt.sessions() as session:
        return session.scalars(select(Course.id).where(Course.context_id == context_id)).one()


def current_members(rt: Runtime, course_id: int) -> set[str]:
    with rt.sessions() as session:
        return set(
            session.scalars(
                select(User.sub)
                .join(Enrolment, Enrolment.user_id == User.id)
                .where(Enrolment.course_id == course_id, Enrolment.ended_at.is_(None))
            )
        )


def csrf_of(browser, class_url: str) -> str:  # type: ignore[no-untyped-def]
    return browser.get(class_url).text.split('name="csrf" value="')[1].split('"')[0]


# --- roster ------------------------------------------------------------------------------


def test_roster_sync_pages_through_moodle_and_ends_those_who_left(tool, platform, rt, browser):
    teacher_launch(platform, tool, browser)
    course_id = course_of(rt)
    platform.set_roster(
        "2",
        [platform.member("3", role="Instructor", name="Terry Teacher")]
        + [platform.member(str(i), name=f"Student {i}") for i in range(10, 15)],
    )
    report = sync_course(rt, course_id, page_size=2)
    assert report.pages == 3 and report.members == 6
    assert current_members(rt, course_id) == {"3", "10", "11", "12", "13", "14"}
    page_requests = [q for path, q in platform.roster_requests if "memberships" in path]
    assert all(q.get("limit") == "2" for q in page_requests[-3:])

    platform.set_roster(
        "2",
        [platform.member("3", role="Instructor")] + [platform.member(str(i)) for i in (10, 11, 12)],
    )
    assert sync_course(rt, course_id, page_size=2).ended == 2
    assert current_members(rt, course_id) == {"3", "10", "11", "12"}
    with rt.sessions() as session:
        names = {sub: name for sub, name in session.execute(select(User.sub, User.name))}
    assert names["10"] == "Student 10"  # kept though the later roster did not share names


def test_a_roster_sync_that_fails_midway_changes_nothing(tool, platform, rt, browser):
    teacher_launch(platform, tool, browser)
    course_id = course_of(rt)
    platform.set_roster("2", [platform.member(str(i)) for i in range(20, 25)])
    before = current_members(rt, course_id)
    platform.fail_roster_page(2)
    with pytest.raises(RosterError, match="page 2"):
        sync_course(rt, course_id, page_size=2)
    assert current_members(rt, course_id) == before


def test_the_access_token_is_fetched_once_and_shared(tool, platform, rt, browser):
    teacher_launch(platform, tool, browser)
    course_id = course_of(rt)
    platform.set_roster("2", [platform.member("30")])
    for key in rt.redis.scan_iter("labpool:access-token:*"):
        rt.redis.delete(key)
    issued = platform.tokens_issued
    sync_course(rt, course_id)
    sync_course(rt, course_id)
    assert platform.tokens_issued == issued + 1


def test_a_removed_student_loses_the_machine_at_the_next_idle_check(tool, platform, rt, browser):
    with requests.Session() as student:
        machine_id = machine_id_of(
            platform.launch(student, tool.url, platform.learner(sub="4")).launch_response
        )
    run_worker_burst(rt.settings)
    teacher_launch(platform, tool, browser)
    course_id = course_of(rt)
    platform.set_roster("2", [platform.member("3", role="Instructor")])  # student 4 has left
    sync_course(rt, course_id)
    assert release_idle_machines(rt) == [machine_id]
    with rt.sessions() as session:
        assert session.get_one(Machine, machine_id).state is S.stopped


# --- idle release -------------------------------------------------------------------------


def test_idle_release_keeps_the_students_files(tool, platform, rt, browser):
    first = machine_id_of(
        platform.launch(browser, tool.url, platform.learner(sub="4")).launch_response
    )
    run_worker_burst(rt.settings)
    wait_for_state(browser, tool, first, "assigned")
    with rt.sessions() as session:
        machine = session.get_one(Machine, first)
        address, token = machine.address, machine.ide_token
    written = requests.put(
        f"http://{address}/ide/{first}/api/contents/notes.txt",
        json={"type": "file", "format": "text", "content": "kept across machines"},
        params={"token": token},
        timeout=10,
    )
    assert written.status_code in (200, 201)

    assert release_idle_machines(rt) == []  # just used: not idle
    later = datetime.now(UTC) + timedelta(hours=2)
    assert release_idle_machines(rt, now=later) == [first]
    assert browser.get(f"{tool.url}/machines/{first}/state").json()["state"] == "stopped"

    second = machine_id_of(
        platform.launch(browser, tool.url, platform.learner(sub="4")).launch_response
    )
    assert second != first
    run_worker_burst(rt.settings)
    wait_for_state(browser, tool, second, "assigned")
    with rt.sessions() as session:
        machine = session.get_one(Machine, second)
    read = requests.get(
        f"http://{machine.address}/ide/{second}/api/contents/notes.txt",
        params={"token": machine.ide_token},
        timeout=10,
    )
    assert read.json()["content"] == "kept across machines"


# --- the schedule -------------------------------------------------------------------------


@pytest.fixture
def cloud_rt(rt, cloud):  # type: ignore[no-untyped-def]
    """The runtime pointed at `cloud` (conftest.py; configured by this module's mark)."""
    settings = dataclasses.replace(rt.settings, openstack_cloud="fake", orphan_grace_s=0)
    return Runtime(settings, rt.sessions, rt.redis), cloud


def test_the_schedule_warms_the_pool_for_the_class_and_shrinks_it_after(cloud_rt):
    rt, cloud = cloud_rt
    with transaction(rt.sessions) as session:
        env = add_environment(
            session,
            name=f"lab-{uuid.uuid4().hex[:6]}",
            backend="openstack",
            image_id="img",
            flavor_id="flv",
            network_id="net",
            warm_target=0,
        )
        pool_id = session.scalar(select(Pool.id).where(Pool.environment_id == env.id))
        course_id, activity_id = _course_with_learners(session, env.id, learners=3)
        # Mondays 10:00–11:00 in Paris, warm 15 minutes ahead.
        session.add(
            ClassSession(
                activity_id=activity_id,
                weekday=0,
                starts=time(10, 0),
                ends=time(11, 0),
                timezone="Europe/Paris",
                lead_minutes=15,
            )
        )
    paris_monday = datetime(2026, 11, 23, tzinfo=UTC)  # a Monday; Paris is UTC+1

    def warm_at(hh: int, mm: int) -> dict[str, int]:
        clock = paris_monday + timedelta(hours=hh - 1, minutes=mm)
        for _ in range(30):
            report = reconcile_pool(rt, pool_id, clock=clock)
            counts = _states(rt, env.id)
            if (
                counts.get("requested", 0) + counts.get("starting", 0) + counts.get("stopping", 0)
                == 0
            ):
                break
        return {k: v for k, v in counts.items() if k != "stopped"} | {"target": report.target}

    assert warm_at(9, 40) == {"target": 0}  # before the lead time: the floor
    assert warm_at(9, 50) == {"ready": 3, "target": 3}  # 15 minutes ahead: the class size
    assert warm_at(10, 30) == {"ready": 3, "target": 3}  # during class
    assert warm_at(11, 5) == {"target": 0}  # after: back to the floor
    assert [s for s in cloud.servers() if s["status"] != "DELETED"] == []


def _course_with_learners(session, env_id: int, learners: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    from lti_tool.models import Platform

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
    activity = Activity(course_id=course.id, resource_link_id="lab", environment_id=env_id)
    session.add(activity)
    teacher = User(issuer="https://moodle.test", sub=uuid.uuid4().hex)
    students = [User(issuer="https://moodle.test", sub=uuid.uuid4().hex) for _ in range(learners)]
    session.add_all([teacher, *students])
    session.flush()
    session.add(
        Enrolment(
            course_id=course.id,
            user_id=teacher.id,
            roles=["http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor"],
        )
    )
    session.add_all(
        Enrolment(
            course_id=course.id,
            user_id=s.id,
            roles=["http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"],
        )
        for s in students
    )
    session.flush()
    return course.id, activity.id


def _states(rt: Runtime, env_id: int) -> dict[str, int]:
    with rt.sessions() as session:
        return {
            state.value: n
            for state, n in session.execute(
                select(Machine.state, func.count())
                .where(Machine.environment_id == env_id)
                .group_by(Machine.state)
            )
        }


# --- teacher-only actions -------------------------------------------------------------------

ACTIONS = ("warm-now", "stop-idle", "roster-sync", "schedule", "my-machine", "environment")


def test_learners_get_403_for_every_teacher_action(tool, platform, rt, browser):
    class_url = teacher_launch(platform, tool, browser)
    activity_id = class_url.split("/activities/")[1].split("/")[0]
    with requests.Session() as student:
        machine_id = machine_id_of(
            platform.launch(student, tool.url, platform.learner(sub="4")).launch_response
        )
        student_csrf = student.cookies.get("labpool_session")  # whatever it holds, it is no teacher
        for action in ACTIONS:
            answer = student.post(
                f"{tool.url}/activities/{activity_id}/{action}", data={"csrf": student_csrf or ""}
            )
            assert answer.status_code == 403, action
        reset = student.post(f"{tool.url}/activities/{activity_id}/machines/{machine_id}/reset")
        assert reset.status_code == 403
        assert student.get(class_url + ".json").status_code == 403


def test_teacher_sets_the_schedule_and_bad_input_is_refused(tool, platform, rt, browser):
    class_url = teacher_launch(platform, tool, browser)
    activity_id = class_url.split("/activities/")[1].split("/")[0]
    csrf = csrf_of(browser, class_url)
    url = f"{tool.url}/activities/{activity_id}/schedule"
    ok = browser.post(
        url,
        data={
            "csrf": csrf,
            "weekday": "2",
            "starts": "09:00",
            "ends": "10:30",
            "timezone": "Europe/Paris",
            "lead_minutes": "15",
        },
        allow_redirects=False,
    )
    assert ok.status_code == 303
    for bad, why in [
        ({"weekday": "9", "starts": "09:00", "ends": "10:00"}, "day of the week"),
        ({"weekday": "1", "starts": "10:00", "ends": "09:00"}, "end after"),
        ({"weekday": "1", "starts": "nine", "ends": "10:00"}, "09:30"),
        (
            {"weekday": "1", "starts": "09:00", "ends": "10:00", "timezone": "Mars/Olympus"},
            "time zone",
        ),
    ]:
        answer = browser.post(url, data={"csrf": csrf, **bad})
        assert answer.status_code == 400 and why in answer.text, (bad, answer.text[:300])
    assert (
        browser.post(
            url, data={"csrf": "stale", "weekday": "1", "starts": "09:00", "ends": "10:00"}
        ).status_code
        == 403
    )
    schedule = browser.get(class_url + ".json").json()["schedule"]
    assert schedule == [
        {
            "id": schedule[0]["id"],
            "day": "Wednesday",
            "starts": "09:00",
            "ends": "10:30",
            "timezone": "Europe/Paris",
            "lead_minutes": 15,
        }
    ]


def test_teacher_resets_a_students_machine_keeping_the_files(tool, platform, rt, browser):
    with requests.Session() as student:
        old = machine_id_of(
            platform.launch(student, tool.url, platform.learner(sub="4")).launch_response
        )
    class_url = teacher_launch(platform, tool, browser)
    activity_id = class_url.split("/activities/")[1].split("/")[0]
    csrf = csrf_of(browser, class_url)
    answer = browser.post(
        f"{tool.url}/activities/{activity_id}/machines/{old}/reset",
        data={"csrf": csrf},
        allow_redirects=False,
    )
    assert answer.status_code == 303
    roster = browser.get(class_url + ".json").json()["roster"]
    (row,) = [r for r in roster if r["role"] == "student"]
    assert row["machine"] != old and row["state"] == "requested"
    with rt.sessions() as session:
        assert session.get_one(Machine, old).state in (S.stopping, S.stopped)
        owners = session.scalars(
            select(Machine.owner_id).where(Machine.id.in_([old, row["machine"]]))
        ).all()
    assert len(set(owners)) == 1


def test_a_new_environment_keeps_the_machines_handed_out_listed_and_reused(
    tool, platform, rt, browser
):
    """Issue 13: after the teacher picked another environment the class page showed "no
    machine" for students whose machines still ran, and a relaunch started a second one."""
    with requests.Session() as student:
        old = machine_id_of(
            platform.launch(student, tool.url, platform.learner(sub="4")).launch_response
        )
        class_url = teacher_launch(platform, tool, browser)
        activity_id = class_url.split("/activities/")[1].split("/")[0]
        with transaction(rt.sessions) as session:
            other = add_environment(session, name=f"other-{uuid.uuid4().hex[:6]}").id
        chosen = browser.post(
            f"{tool.url}/activities/{activity_id}/environment",
            data={"csrf": csrf_of(browser, class_url), "environment_id": other},
            allow_redirects=False,
        )
        assert chosen.status_code == 303
        (row,) = [
            r for r in browser.get(class_url + ".json").json()["roster"] if r["role"] == "student"
        ]
        assert row["machine"] == old and row["state"] == "requested"
        assert row["environment"] == "default"  # said on the page: kept from before

        again = platform.launch(student, tool.url, platform.learner(sub="4")).launch_response
        assert machine_id_of(again) == old  # reused, not a second machine
        # Another activity of the course, which always had the new environment, does not get
        # the machine activity 1 handed out: one in its own environment.
        with transaction(rt.sessions) as session:
            course_id = session.get_one(Activity, int(activity_id)).course_id
            session.add(
                Activity(course_id=course_id, resource_link_id="lab2", environment_id=other)
            )
        elsewhere = platform.launch(
            student, tool.url, platform.learner(sub="4", resource_link_id="lab2")
        ).launch_response
        with rt.sessions() as session:
            assert session.get_one(Machine, machine_id_of(elsewhere)).environment_id == other
            assert session.get_one(Machine, old).environment_id != other


# --- "warm now" -----------------------------------------------------------------------------


def test_warm_now_boosts_are_kept_per_activity_and_the_pool_takes_the_largest(
    cloud_rt, tool, platform, rt
):
    """Two courses share one pool: the small class's teacher pressing "warm now" after the
    big class's teacher does not cancel the big class's boost."""
    crt, _cloud = cloud_rt
    with transaction(rt.sessions) as session:
        env = add_environment(
            session,
            name=f"lab-{uuid.uuid4().hex[:6]}",
            backend="openstack",
            image_id="img",
            flavor_id="flv",
            network_id="net",
            warm_target=0,
            max_size=10,
        )
        env_id = env.id
        pool_id = session.scalar(select(Pool.id).where(Pool.environment_id == env.id))

    def teacher_warms(context_id: str, sub: str, learners: int) -> int:
        with requests.Session() as browser:
            platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
            response = platform.launch(
                browser, tool.url, platform.instructor(sub=sub, context_id=context_id)
            ).launch_response
            assert response.status_code == 303
            class_url = tool.url + response.headers["Location"]
            activity_id = int(class_url.split("/activities/")[1].split("/")[0])
            with transaction(rt.sessions) as session:
                course_id = session.get_one(Activity, activity_id).course_id
                students = [
                    User(issuer=platform.issuer, sub=uuid.uuid4().hex) for _ in range(learners)
                ]
                session.add_all(students)
                session.flush()
                session.add_all(
                    Enrolment(
                        course_id=course_id,
                        user_id=s.id,
                        roles=["http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"],
                    )
                    for s in students
                )
            csrf = csrf_of(browser, class_url)
            base = f"{tool.url}/activities/{activity_id}"
            chosen = browser.post(
                f"{base}/environment",
                data={"csrf": csrf, "environment_id": env_id},
                allow_redirects=False,
            )
            assert chosen.status_code == 303
            warmed = browser.post(f"{base}/warm-now", data={"csrf": csrf}, allow_redirects=False)
            assert warmed.status_code == 303
            return activity_id

    big = teacher_warms("big-class", sub="31", learners=4)
    assert reconcile_pool(crt, pool_id).target == 4
    small = teacher_warms("small-class", sub="32", learners=1)
    assert reconcile_pool(crt, pool_id).target == 4  # the largest boost, not the latest

    with transaction(rt.sessions) as session:
        boosts = {b.activity_id: b.target for b in session.scalars(select(WarmBoost))}
        assert boosts == {big: 4, small: 1}
        # The big class's boost runs out: the small one's still holds the pool up.
        session.execute(
            update(WarmBoost)
            .where(WarmBoost.activity_id == big)
            .values(until=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert reconcile_pool(crt, pool_id).target == 1


def test_upserted_ids_follow_the_rows_even_when_the_rows_already_exist(rt):
    """A roster sync pairs each member with the id upsert_many returns; on PostgreSQL the
    RETURNING order of conflicting rows is not the rows' order, which once gave a student
    the roles of the teacher listed before them."""
    from config.db import upsert_many, utcnow
    from lti_tool.models import User

    def upsert(subs: list[str]) -> list[int]:
        with transaction(rt.sessions) as session:
            return upsert_many(
                session,
                User,
                ("issuer", "sub"),
                [
                    {
                        "issuer": "https://order.example",
                        "sub": sub,
                        "name": None,
                        "email": None,
                        "last_seen_at": utcnow(),
                    }
                    for sub in subs
                ],
                update_columns=("name", "email"),
                keep_if_null=("name", "email"),
            )

    first = dict(zip(["50", "3", "7"], upsert(["50", "3", "7"]), strict=True))
    again = dict(zip(["7", "3", "50", "9"], upsert(["7", "3", "50", "9"]), strict=True))
    assert {sub: again[sub] for sub in first} == first
    with rt.sessions() as session:
        stored = dict(
            session.execute(
                select(User.sub, User.id).where(User.issuer == "https://order.example")
            ).all()
        )
    assert stored == again


# --- the class at a glance (issue 13) ---------------------------------------------------------


def test_machine_status_says_what_a_teacher_reads():
    from lti_tool.web.teacher_routes import machine_status

    now = datetime.now(UTC)

    def status(state, seen=None, error=None):  # type: ignore[no-untyped-def]
        return machine_status(Machine(state=state, error=error), seen, now)

    assert machine_status(None, None, now) == ("no machine", "no machine")
    assert status(S.requested) == ("starting", "waiting for a slot")
    assert status(S.starting) == ("starting", "starting")
    assert status(S.assigned) == ("ready", "ready, not opened yet")
    assert status(S.assigned, now - timedelta(minutes=2)) == ("working", "working")
    assert status(S.assigned, now - timedelta(minutes=30)) == ("idle", "idle")
    assert status(S.stopped) == ("stopped", "stopped — files kept")
    assert status(S.error, error="quota exceeded") == ("problem", "problem: quota exceeded")


def test_class_counts_students_apart_from_teachers(tool, platform, rt, browser):
    with requests.Session() as student:
        platform.launch(student, tool.url, platform.learner(sub="4"))
    class_url = teacher_launch(platform, tool, browser)
    view = browser.get(class_url + ".json").json()
    assert view["counts"]["starting"] == 1
    assert sum(view["counts"].values()) == 1  # the teacher is not counted among the class
    rows = {r["role"]: r for r in view["roster"]}
    assert rows["student"]["words"] == "waiting for a slot"
    assert rows["teacher"]["status"] == "no machine"
    page = browser.get(class_url).text
    assert 'data-count="starting">1<' in page and 'id="staff"' in page
    # Single-server mode says what runs on this host instead of a pool.
    assert view["pool"] is None
    assert view["host"]["starting"] == 1 and view["host"]["memory_mb"] > 0
    assert '<div id="host" >' in page or '<div id="host">' in page
