"""A class day, compressed (issue 15 item 4): a timetable of three classes played against
the fake OpenStack and the fake Moodle, with the real tool, a real `labpool worker` and a
real `labpool cron` (subprocesses, passes every second), checking that nothing grows without
bound and that nothing is left over at the end of the day.

The day (sim time, lead 15 min): class 1 08:30–10:00, class 2 11:00–12:30, class 3
14:00–15:30, each its own course of `CLASS_SIZE` students (distinct users) with its own
teacher, activity and grade item, all on one cloud pool (warm floor 0, idle timeout 30 min).
For each class:

1. the clock jumps to 14 min before the class: the pool warms up to the class's size (the
   cron's reconciler passes, reading the schedule);
2. the students launch (the real LTI login + launch through the fake Moodle) and each gets a
   warm machine;
3. 40 minutes pass; half of them work (a request to their IDE): the idle check releases
   exactly the other half;
4. the teacher makes an assignment and grades every student on the assignment page; the
   outbox sends each grade (the worker) to the fake gradebook;
5. the class ends, 35 minutes pass: the idle check releases the rest; the pool shrinks to its
   floor, the cloud deletes every server.

The clock is never faked in our code: time jumps by rewriting the stored class sessions
(`ClassSession`: weekday, start, end in a fixed UTC offset) so that every process reading
the real clock sees the simulated moment, by passing `now` to the idle check, and by the
fake cloud's own clock (its IDEs report their last activity on it).

Sampled after each phase and printed as a table: open file descriptors and RSS of this
process (the tool, served in-process, with the fake cloud and platform), of the worker and
of the cron; Redis keys (all, and those without a TTL); the database's rows per table.
Asserted: fds and RSS stay within a bound of the first class's; keys without a TTL do not
grow with classes (every other key expires within 27 h: nonces, tokens; a done job's within a minute, the
cron's too: they were kept 500 s, and a failed one a year, before this test); machines grow per class by at most the class size and the half released mid-class
(the schedule warms a machine for each while the class runs), launches by exactly the
launches made. At the end: no live machine, no server in the cloud, every cloud
volume known to the database and detached, every grade in the gradebook exactly once, and
RQ's queue and registries empty (nothing failed, nothing stuck).

Default: 3 × 20 students (about 20 s here). `LABPOOL_SOAK_SCALE=5` plays the issue's
3 × 100 (the class size is 20 × the scale; about 1.5 minutes here). The table goes to
stdout: run with `-s` to see it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from rq import Queue
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from sqlalchemy import delete, func, inspect, select, update

from config.db import transaction
from lti_tool.models import Activity, Enrolment, User
from provisioning.idle import release_idle_machines
from provisioning.models import LIVE_STATES, ClassSession, Environment, Machine, StudentVolume
from tests.fakeplatform.ags import FakeGradebook
from tests.test_fleet import PROXY, crt, live_servers, make_pool  # noqa: F401  (crt: fixture)
from tests.test_grades import create_assignment, csrf_of

SCALE = float(os.environ.get("LABPOOL_SOAK_SCALE", "1"))
CLASS_SIZE = max(2, int(20 * SCALE))
LEAD = timedelta(minutes=15)
IDLE_TIMEOUT = timedelta(minutes=30)
DAY = datetime(2026, 11, 23, tzinfo=UTC)  # a Monday
TIMETABLE = [  # (sim start, sim end) of each class
    (DAY.replace(hour=8, minute=30), DAY.replace(hour=10)),
    (DAY.replace(hour=11), DAY.replace(hour=12, minute=30)),
    (DAY.replace(hour=14), DAY.replace(hour=15, minute=30)),
]
FD_SLACK = 40  # descriptors above the first class's, per process
RSS_SLACK_MB = 80  # and megabytes


class SimClock:
    """Simulated time = real time + `offset`. The stored class sessions are rewritten so that
    a process reading the real clock sees the simulated moment. `drift` is what passed since
    the current class's jump: the idle check's `now` and the fake cloud's clock run ahead of
    the real clock by it (a class's machines all live in one class)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.base = timedelta(0)
        self.playing = False
        now = datetime.now(UTC)
        hours = (12 - now.hour) % 24  # a fixed zone where the real clock reads about noon
        self.hours = hours - 24 if hours > 14 else hours
        self.zone = f"Etc/GMT{-self.hours:+d}"
        self.sessions: list[tuple[int, datetime, datetime]] = []  # (row id, sim start, end)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    @property
    def drift(self) -> timedelta:
        return self.offset - self.base

    def cloud_time(self) -> float:
        """The fake cloud's clock (its IDEs' last activity)."""
        return time.time() + self.drift.total_seconds()

    def frame_now(self) -> datetime:
        """`now` for the idle check: the real clock plus what passed in this class."""
        return datetime.now(UTC) + self.drift

    def jump_to(self, sim: datetime, rt: Any) -> None:
        assert not self.playing or sim >= self.now(), "the day's clock only goes forward"
        self.playing = True
        self.offset = self.base = sim - datetime.now(UTC)
        self.write_sessions(rt)

    def advance(self, by: timedelta, rt: Any) -> None:
        self.offset += by
        self.write_sessions(rt)

    def write_sessions(self, rt: Any) -> None:
        shift = timedelta(hours=self.hours)
        with transaction(rt.sessions) as session:
            for row_id, start, end in self.sessions:
                local_start = start - self.offset + shift
                local_end = end - self.offset + shift
                assert local_start.date() == local_end.date(), "a session over midnight"
                session.execute(
                    update(ClassSession)
                    .where(ClassSession.id == row_id)
                    .values(
                        weekday=local_start.weekday(),
                        starts=clock_time(local_start.hour, local_start.minute),
                        ends=clock_time(local_end.hour, local_end.minute),
                        timezone=self.zone,
                        lead_minutes=int(LEAD.total_seconds() // 60),
                    )
                )


CLOCK = SimClock()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.fake_cloud(
        boot_time=0.3,
        delete_time=0.1,
        max_instances=CLASS_SIZE + 10,
        ide="stub",
        enforce_security_groups=True,
        clock=CLOCK.cloud_time,
    ),
]


# --------------------------------------------------------------------------- processes


class Processes:
    """`labpool worker` and `labpool cron`, started and stopped by this test only."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.env = {
            **os.environ,
            "LABPOOL_PROXY_ADDRESSES": PROXY,
            "LABPOOL_RECONCILE_INTERVAL_S": "1",
            "LABPOOL_ORPHAN_GRACE_S": "5",
            "LABPOOL_CLOUD_START_TIMEOUT_S": "120",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "lti_tool.cli", name],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def tail(self, chars: int = 2500) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


def usage(pid: int) -> tuple[int, float]:
    """(open fds, RSS in MB) of a process and its children."""
    root = psutil.Process(pid)
    fds, rss = 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            fds += proc.num_fds()
            rss += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return fds, rss / 2**20


# --------------------------------------------------------------------------- the day


def wait_for(what: str, check: Any, timeout: float, procs: Processes, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{procs.tail()}")


def test_a_class_day_compressed(crt, tool, platform, cloud, tmp_path):  # type: ignore[no-untyped-def]  # noqa: F811
    rt = crt
    started = time.monotonic()
    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    platform.gradebook = gradebook = FakeGradebook(platform)
    env_id, pool_id = make_pool(rt, warm=0, max_size=CLASS_SIZE + 5)
    with transaction(rt.sessions) as session:
        session.execute(
            update(Environment)
            .where(Environment.id == env_id)
            .values(idle_timeout_s=int(IDLE_TIMEOUT.total_seconds()))
        )
    # Jobs earlier tests of this session left in Redis are theirs, not the day's.
    earlier_jobs = set(rt.redis.scan_iter(match="rq:job:*")) | set(
        rt.redis.scan_iter(match="rq:results:*")
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    procs.start("worker")
    procs.start("cron")
    queue = crt.settings.queue_name
    samples: list[dict[str, Any]] = []
    launches_made = 0
    expected_grades: dict[tuple[str, str], float] = {}  # (course, student sub) → score

    def live(owned: bool | None = None) -> Counter[str]:
        query = select(Machine.state, func.count()).where(
            Machine.environment_id == env_id, Machine.state.in_(LIVE_STATES)
        )
        if owned is not None:
            query = query.where(
                Machine.owner_id.is_not(None) if owned else Machine.owner_id.is_(None)
            )
        with rt.sessions() as session:
            return Counter({s.value: n for s, n in session.execute(query.group_by(Machine.state))})

    def sample(label: str) -> None:
        row: dict[str, Any] = {"phase": label, "sim": CLOCK.now().strftime("%H:%M")}
        for name, pid in [("tool", os.getpid())] + [(n, p.pid) for n, p in procs.procs.items()]:
            row[f"{name}_fds"], row[f"{name}_mb"] = usage(pid)
        keys = list(rt.redis.scan_iter(count=1000))
        row["redis_keys"] = len(keys)
        ttls = {k: rt.redis.ttl(k) for k in keys}
        lasting = [k for k, t in ttls.items() if t == -1 or t > 27 * 3600]
        row["redis_lasting"] = len(lasting)  # no TTL, or over a day (RQ's cron history: 1 y)
        row["redis_max_ttl_h"] = (
            max((t for k, t in ttls.items() if k not in lasting), default=0) / 3600
        )
        row["job_ttl_max"] = max(
            (
                t
                for k, t in ttls.items()
                if k.startswith((b"rq:job:", b"rq:results:")) and k not in earlier_jobs
            ),
            default=0,
        )
        row["redis_kinds"] = Counter(":".join(k.decode().split(":")[:2]) for k in keys)
        with rt.sessions() as session:
            bind = session.get_bind()
            for table in sorted(inspect(bind).get_table_names()):
                if table != "alembic_version":
                    row[table] = session.execute(
                        select(func.count()).select_from(Base_table(table))
                    ).scalar_one()
        row["servers"] = len(live_servers(cloud))
        samples.append(row)

    def play(number: int, start: datetime, end: datetime) -> None:
        nonlocal launches_made
        context = f"day-{number}"
        subs = [f"c{number}-s{i}" for i in range(CLASS_SIZE)]
        teacher = requests.Session()
        # The course, its roster in Moodle, its grade item; the teacher's first visit
        # makes the activity and syncs the roster (a job on the worker).
        platform.set_roster(
            context,
            [platform.member(f"c{number}-t", role="Instructor")]
            + [platform.member(sub) for sub in subs],
        )
        gradebook.add_lineitem(context, "2", label=f"Lab of class {number}")
        answer = platform.launch(
            teacher, tool.url, platform.instructor(sub=f"c{number}-t", context_id=context)
        ).launch_response
        assert answer.status_code == 303, answer.text[:300]
        launches_made += 1
        class_url = tool.url + answer.headers["Location"]
        activity_id = int(class_url.split("/activities/")[1].split("/")[0])
        with transaction(rt.sessions) as session:
            session.execute(
                update(Activity).where(Activity.id == activity_id).values(environment_id=env_id)
            )
            meeting = ClassSession(
                activity_id=activity_id,
                weekday=0,
                starts=clock_time(0, 0),
                ends=clock_time(0, 1),
                timezone="UTC",
                lead_minutes=15,
            )
            session.add(meeting)
            session.flush()
            CLOCK.sessions.append((meeting.id, start, end))
            course_id = session.get_one(Activity, activity_id).course_id

        def enrolled(course_id: int = course_id) -> bool:
            with rt.sessions() as session:
                return (
                    session.scalar(
                        select(func.count())
                        .select_from(Enrolment)
                        .where(Enrolment.course_id == course_id, Enrolment.ended_at.is_(None))
                    )
                    == CLASS_SIZE + 1
                )

        wait_for(f"class {number}: the roster synced", enrolled, 60, procs)

        # 1. 14 minutes before the class: the schedule warms the pool.
        CLOCK.jump_to(start - LEAD + timedelta(minutes=1), rt)
        wait_for(
            f"class {number}: the pool warmed",
            lambda: live(owned=False).get("ready", 0) == CLASS_SIZE,
            90,
            procs,
        )
        warm = set()
        with rt.sessions() as session:
            warm = set(
                session.scalars(
                    select(Machine.id).where(
                        Machine.environment_id == env_id, Machine.state.in_(LIVE_STATES)
                    )
                )
            )
        sample(f"{number} warm")

        # 2. The class starts: every student launches and gets a warm machine.
        CLOCK.advance(LEAD, rt)
        browsers = {sub: requests.Session() for sub in subs}

        def launch(sub: str) -> tuple[str, int]:
            response = platform.launch(
                browsers[sub], tool.url, platform.learner(sub=sub, context_id=context)
            ).launch_response
            assert response.status_code == 303, response.text[:300]
            return sub, int(response.headers["Location"].rsplit("/", 1)[1])

        with ThreadPoolExecutor(4) as pool:
            machine_of = dict(pool.map(launch, subs))
        launches_made += CLASS_SIZE
        assert len(set(machine_of.values())) == CLASS_SIZE, "a machine handed out twice"
        # Every student on a machine warmed before the class: none requested, and no pass
        # traded a ready one for a new one (tests/test_class_launch_race.py).
        cold = set(machine_of.values()) - warm
        assert not cold, f"{len(cold)} students got a machine not warmed for the class"
        wait_for(
            f"class {number}: every student on an assigned machine with a volume",
            lambda: (
                live(owned=True) == Counter({"assigned": CLASS_SIZE})
                and volumes_in_use(rt, course_id) == CLASS_SIZE
            ),
            90,
            procs,
        )
        for sub, machine_id in machine_of.items():
            state = browsers[sub].get(f"{tool.url}/machines/{machine_id}/state").json()
            assert state["state"] == "assigned", (sub, state)
        sample(f"{number} launched")

        # 3. 40 minutes in, half the class works; the idle check releases the others.
        CLOCK.advance(timedelta(minutes=40), rt)
        working = set(subs[::2])
        with rt.sessions() as session:
            rows = {
                m.id: (m.address, m.ide_token)
                for m in session.scalars(
                    select(Machine).where(Machine.id.in_(list(machine_of.values())))
                )
            }
        for sub in working:
            address, token = rows[machine_of[sub]]
            answer = requests.get(
                f"http://{address}/ide/{machine_of[sub]}/lab",
                headers={"Authorization": f"token {token}"},
                timeout=5,
            )
            assert answer.status_code == 200
        released = set(release_idle_machines(rt, now=CLOCK.frame_now()))
        assert released == {machine_of[s] for s in subs if s not in working}
        sample(f"{number} idle half")

        # 4. The teacher grades everyone; the outbox sends each grade to Moodle.
        assignment = create_assignment(tool, teacher, activity_id, name=f"lab{number}")
        page = f"{tool.url}/activities/{activity_id}/assignments/{assignment}"
        csrf = csrf_of(teacher, page)
        with rt.sessions() as session:
            user_ids = dict(
                session.execute(select(User.sub, User.id).where(User.sub.in_(subs))).all()
            )
        for i, sub in enumerate(subs):
            score = float(i % 11)
            graded = teacher.post(
                f"{page}/grades/{user_ids[sub]}",
                data={"csrf": csrf, "score": str(score), "comment": f"class {number}"},
                allow_redirects=False,
            )
            assert graded.status_code == 303, graded.text[:300]
            expected_grades[(context, sub)] = score
        wait_for(
            f"class {number}: every grade in Moodle",
            lambda: all(
                gradebook.grade(sub, course=context, item_id="2") is not None for sub in subs
            ),
            60,
            procs,
        )

        # 5. The class ends; 35 minutes later the idle check releases the rest, the
        # pool shrinks to its floor and the cloud deletes every server.
        CLOCK.advance(end - CLOCK.now() + timedelta(minutes=35), rt)
        released = set(release_idle_machines(rt, now=CLOCK.frame_now()))
        assert released == {machine_of[s] for s in working}
        wait_for(
            f"class {number}: nothing live after the class",
            lambda: not live() and not live_servers(cloud) and volumes_in_use(rt) == 0,
            90,
            procs,
        )
        for browser in [teacher, *browsers.values()]:
            browser.close()
        sample(f"{number} over")

    try:
        for number, (start, end) in enumerate(TIMETABLE, 1):
            play(number, start, end)

        # ------------------------------------------------------------------ the day's end
        procs.stop("cron")

        def rq_quiet() -> bool:
            return (
                rt.redis.llen(f"rq:queue:{queue}") == 0
                and StartedJobRegistry(queue, connection=rt.redis).count == 0
            )

        try:
            wait_for("RQ's queue drained", rq_quiet, 60, procs)
        except AssertionError as exc:
            started = StartedJobRegistry(queue, connection=rt.redis).get_job_ids()
            queued = rt.redis.lrange(f"rq:queue:{queue}", 0, 20)
            raise AssertionError(f"still queued {queued}, started {started}; {exc}") from None
        sample("day over")
    finally:
        procs.stop_all()
        with transaction(rt.sessions) as session:  # the schedule would warm the pool again
            session.execute(delete(ClassSession))
        took = time.monotonic() - started
        print_table(samples, took)
        if samples:
            print("redis keys at the end:", dict(samples[-1]["redis_kinds"]))

    # Bounded: each phase of a later class against the same phase of the first (this
    # process also serves the fake cloud's IDEs: a socket per live server).
    by_phase = {s["phase"]: s for s in samples}
    for row in samples:
        first = by_phase.get("1 " + row["phase"].split(" ", 1)[1], by_phase["1 over"])
        for name in ("tool", "worker", "cron"):
            if f"{name}_fds" not in row:
                continue
            assert row[f"{name}_fds"] <= first[f"{name}_fds"] + FD_SLACK, (name, row)
            assert row[f"{name}_mb"] <= first[f"{name}_mb"] + RSS_SLACK_MB, (name, row)
        assert row["redis_lasting"] <= first["redis_lasting"] + 5, row
        assert row["job_ttl_max"] <= 60, row  # a done job's key is gone within a minute
    for number in (1, 2, 3):
        over = next(s for s in samples if s["phase"] == f"{number} over")
        # A class's machines, and one more for each student released mid-class (the
        # schedule keeps a warm machine for every student without one while it runs).
        assert over["machines"] <= number * (CLASS_SIZE + CLASS_SIZE // 2 + 5), over
        assert over["users"] == number * (CLASS_SIZE + 1), over
        assert over["enrolments"] == number * (CLASS_SIZE + 1), over
        assert over["launches"] == number * (CLASS_SIZE + 1), over  # one row per launch made
        assert over["student_volumes"] == number * CLASS_SIZE, over
        assert over["score_outbox"] <= number * CLASS_SIZE, over
    assert samples[-1]["launches"] <= launches_made

    # Nothing left over.
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).where(Machine.state.in_(LIVE_STATES))) == 0
        volumes = session.execute(select(StudentVolume.volume_id, StudentVolume.status)).all()
    assert live_servers(cloud) == []
    known = {v.volume_id for v in volumes}
    for volume in cloud.volumes():
        assert volume["id"] in known, f"orphan volume {volume}"
        assert volume["status"] == "available", volume
    accepted = Counter((s["course"], s["userId"]) for s in gradebook.accepted)
    assert accepted == Counter({key: 1 for key in expected_grades}), "a grade not exactly once"
    for (context, sub), score in expected_grades.items():
        assert gradebook.grade(sub, course=context, item_id="2")["score_given"] == score
    for registry in (
        StartedJobRegistry,
        FailedJobRegistry,
        DeferredJobRegistry,
        ScheduledJobRegistry,
    ):
        held = registry(queue, connection=rt.redis).get_job_ids()
        assert held == [], f"{registry.__name__}: {held}"
    assert Queue(queue, connection=rt.redis).count == 0


def volumes_in_use(rt: Any, course_id: int | None = None) -> int:
    query = select(func.count()).where(StudentVolume.status == "in-use")
    if course_id is not None:
        query = query.where(StudentVolume.course_id == course_id)
    with rt.sessions() as session:
        return session.scalar(query) or 0


def Base_table(name: str) -> Any:  # noqa: N802
    from sqlalchemy import table

    return table(name)


def print_table(samples: list[dict[str, Any]], took: float) -> None:
    columns = [
        "phase",
        "sim",
        "tool_fds",
        "tool_mb",
        "worker_fds",
        "worker_mb",
        "cron_fds",
        "cron_mb",
        "redis_keys",
        "redis_lasting",
        "redis_max_ttl_h",
        "job_ttl_max",
        "servers",
        "machines",
        "launches",
        "users",
        "student_volumes",
        "grades",
        "score_outbox",
    ]
    print(f"\nclass day, {CLASS_SIZE} students a class, {took:.0f} s")
    print(" ".join(f"{c[:10]:>10}" for c in columns))
    for row in samples:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:>10.0f}" if isinstance(value, float) else f"{value!s:>10}")
        print(" ".join(cells))
