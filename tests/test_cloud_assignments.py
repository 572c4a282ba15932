"""Release and submission on cloud machines (issue 11, items 3 and 4): through JupyterLab's
contents API, from the worker. The machines are the fake cloud's servers (tests/fakecloud)
running a real JupyterLab each, reached with their token as the proxy reaches them; the
test reads and changes the student's files in that JupyterLab's root folder, as the
student would."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job
from sqlalchemy import select, update

from config.db import transaction, utcnow
from config.runtime import Runtime
from grading.collect_folder import LimitExceeded, Limits
from grading.contents_api import CloudHome, cloud_home
from grading.models import Assignment, AssignmentRelease, Submission
from grading.release_jobs import (
    RELEASE_ON_LAUNCH_JOB,
    RELEASE_TO_CLASS_JOB,
    enqueue_release,
    release_after_launch,
    release_on_launch,
    release_to_student,
)
from grading.submissions import (
    FolderError,
    MachineNotRunning,
    collect_class,
    collection_progress,
    stored_path,
    submissions_root,
    submit_folder,
)
from lti_tool.models import Activity, Course, Enrolment, Platform, User
from provisioning.claiming import claim_warm_machine
from provisioning.environments import add_environment
from provisioning.jobs import stop_machine_now
from provisioning.models import Machine, Pool, StudentVolume
from provisioning.reconciler import reconcile_pool
from tests.conftest import run_worker_burst
from tests.test_grades import csrf_of, launch_student, launch_teacher, user_id_of

pytestmark = pytest.mark.fake_cloud(boot_time=0.1, max_instances=10, ide="jupyterlab")

NOTEBOOK = json.dumps(
    {
        "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Lab 1"]}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
).encode()


@dataclass
class CloudStudent:
    rt: Runtime
    user_id: int
    course_id: int
    activity_id: int
    machine_id: int
    root: Path  # the JupyterLab's root folder: the student's home as the IDE shows it

    def home(self) -> CloudHome:
        with self.rt.sessions() as session:
            home = cloud_home(session, self.course_id, self.user_id)
        assert isinstance(home, CloudHome), home
        return home


@pytest.fixture
def crt(rt: Runtime, cloud) -> Runtime:  # type: ignore[no-untyped-def]
    settings = dataclasses.replace(
        rt.settings, openstack_cloud="fake", cloud_start_timeout_s=60, orphan_grace_s=0
    )
    return Runtime(settings=settings, sessions=rt.sessions, redis=rt.redis)


def _until(check, what: str, timeout: float = 60, pool_id: int | None = None, rt=None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pool_id is not None:
            reconcile_pool(rt, pool_id)
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def cloud_pool(session, cloud, warm: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    env = add_environment(
        session,
        name=f"cloud-{uuid.uuid4().hex[:6]}",
        backend="openstack",
        image_id="img",
        flavor_id="flv",
        network_id=cloud.config.network_id,
        warm_target=warm,
    )
    return env.id, session.scalar(select(Pool.id).where(Pool.environment_id == env.id))


def ready_home(crt: Runtime, cloud, pool_id: int, course_id: int, user_id: int) -> tuple[int, Path]:  # type: ignore[no-untyped-def]
    """Reconciler passes until the student's machine holds their volume and its JupyterLab
    answers; (machine id, the JupyterLab's root folder)."""

    def attached() -> CloudHome | None:
        with crt.sessions() as session:
            home = cloud_home(session, course_id, user_id)
        return home if isinstance(home, CloudHome) else None

    home = _until(attached, "the student's volume attached", pool_id=pool_id, rt=crt)
    _until(home.answers, "JupyterLab answering")
    (server,) = [s for s in cloud.servers() if f"machine-{home.machine_id}" in s["tags"]]
    return home.machine_id, cloud.ide_workdir(server["id"])


def cloud_student(crt: Runtime, cloud, sub: str | None = None) -> CloudStudent:  # type: ignore[no-untyped-def]
    """A learner of a course whose activity runs on a cloud pool, holding a machine there
    (claimed warm, volume attached, JupyterLab answering)."""
    with transaction(crt.sessions) as session:
        env_id, pool_id = cloud_pool(session, cloud, warm=1)
        platform = session.scalar(select(Platform).limit(1))
        if platform is None:
            platform = Platform(
                issuer="https://moodle.test",
                client_id="c",
                auth_url="x",
                token_url="x",
                jwks_url="x",
            )
            session.add(platform)
            session.flush()
        course = Course(platform_id=platform.id, context_id=uuid.uuid4().hex)
        user = User(issuer=platform.issuer, sub=sub or f"u{uuid.uuid4().hex}")
        session.add_all([course, user])
        session.flush()
        activity = Activity(
            course_id=course.id, resource_link_id=uuid.uuid4().hex, environment_id=env_id
        )
        session.add_all([activity, Enrolment(course_id=course.id, user_id=user.id, roles=[])])
        session.flush()
        course_id, user_id, activity_id = course.id, user.id, activity.id

    def claimed() -> int | None:
        with transaction(crt.sessions) as session:
            machine = claim_warm_machine(session, env_id, course_id, user_id)
            return machine.id if machine else None

    _until(claimed, "a warm machine to claim", pool_id=pool_id, rt=crt)
    machine_id, root = ready_home(crt, cloud, pool_id, course_id, user_id)
    return CloudStudent(crt, user_id, course_id, activity_id, machine_id, root)


def publish(rt: Runtime, activity_id: int, files: dict[str, bytes], folder: Path) -> int:
    """A published assignment `lab1` whose student version is `files` (release folder
    `folder`, whose name is the version)."""
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    with transaction(rt.sessions) as session:
        assignment = session.scalars(
            select(Assignment).where(Assignment.activity_id == activity_id)
        ).first()
        if assignment is None:
            assignment = Assignment(activity_id=activity_id, name="lab1", title="Lab 1")
            session.add(assignment)
        assignment.release_path = str(folder)
        assignment.published_at = utcnow()
        session.flush()
        return assignment.id


def release_record(rt: Runtime, assignment_id: int, user_id: int) -> AssignmentRelease | None:
    with rt.sessions() as session:
        return session.scalars(
            select(AssignmentRelease).where(
                AssignmentRelease.assignment_id == assignment_id,
                AssignmentRelease.user_id == user_id,
            )
        ).first()


def versions(rt: Runtime, assignment_id: int, user_id: int) -> list[Submission]:
    with rt.sessions() as session:
        return list(
            session.scalars(
                select(Submission)
                .where(Submission.assignment_id == assignment_id, Submission.user_id == user_id)
                .order_by(Submission.version)
            )
        )


def finished_results(rt: Runtime) -> list[object]:
    """What the worker's finished jobs returned (RQ keeps results for a minute)."""
    queue = Queue(rt.settings.queue_name, connection=rt.redis)
    jobs = [Job.fetch(i, connection=rt.redis) for i in queue.finished_job_registry.get_job_ids()]
    return [job.return_value() for job in jobs]


def volume_attached(rt: Runtime, student: CloudStudent, attached: bool) -> None:
    with transaction(rt.sessions) as session:
        session.execute(
            update(StudentVolume)
            .where(StudentVolume.owner_id == student.user_id)
            .values(status="in-use" if attached else "available")
        )


@pytest.fixture
def student(crt, cloud) -> Iterator[CloudStudent]:  # type: ignore[no-untyped-def]
    yield cloud_student(crt, cloud)


# --------------------------------------------------------------------------------- release


def test_a_launch_releases_into_the_cloud_machine_from_the_worker(student, tmp_path):
    rt = student.rt
    files = {"lab1.ipynb": NOTEBOOK, "data/points.csv": b"x,y\n1,2\n", "README.md": b"read me"}
    assignment_id = publish(rt, student.activity_id, files, tmp_path / "v1")
    assert release_after_launch(rt, student.activity_id, student.user_id)  # enqueued only
    assert not (student.root / "lab1").exists()

    run_worker_burst(rt.settings)  # a real worker, not the web process, places it

    folder = student.root / "lab1"
    assert (folder / "data/points.csv").read_bytes() == b"x,y\n1,2\n"
    assert (folder / "README.md").read_bytes() == b"read me"
    placed = json.loads((folder / "lab1.ipynb").read_bytes())  # through type: notebook
    assert "".join(placed["cells"][0]["source"]) == "# Lab 1"
    assert placed["cells"][0]["id"] == "labpool-0"  # ours, not a random one: stable bytes
    record = release_record(rt, assignment_id, student.user_id)
    assert record is not None and record.version == "v1"
    assert record.summary == "3 added"
    assert set(record.manifest) == set(files)
    # Nothing half-written or set aside is left next to the files.
    leftovers = [p.name for p in folder.rglob("labpool-*")]
    assert leftovers == []


def test_a_rerelease_updates_untouched_files_and_keeps_the_students_edits(student, tmp_path):
    rt = student.rt
    v1 = {"lab1.ipynb": NOTEBOOK, "notes.txt": b"first", "data.csv": b"1"}
    assignment_id = publish(rt, student.activity_id, v1, tmp_path / "v1")
    assert release_to_student(rt, assignment_id, student.user_id, student.home()) == "3 added"
    folder = student.root / "lab1"
    (folder / "notes.txt").write_bytes(b"the student's own notes")  # edited by the student

    # The same version again: nothing to do, the notebook included (Jupyter re-serialises
    # it, and the manifest holds what is on the machine's disk).
    summary = release_to_student(rt, assignment_id, student.user_id, student.home())
    assert summary == "2 unchanged, 1 kept as the student changed them"

    v2 = {"lab1.ipynb": NOTEBOOK, "notes.txt": b"second", "data.csv": b"2", "new.py": b"x = 1\n"}
    publish(rt, student.activity_id, v2, tmp_path / "v2")
    summary = release_to_student(rt, assignment_id, student.user_id, student.home())
    assert summary == "1 added, 1 updated, 1 unchanged, 1 kept as the student changed them"
    assert (folder / "notes.txt").read_bytes() == b"the student's own notes"
    assert (folder / "data.csv").read_bytes() == b"2"
    assert (folder / "new.py").read_bytes() == b"x = 1\n"
    assert release_record(rt, assignment_id, student.user_id).version == "v2"
    assert [p.name for p in folder.rglob("labpool-*")] == []


def test_a_folder_where_a_file_goes_and_a_file_where_a_folder_goes_are_refused(student, tmp_path):
    rt = student.rt
    folder = student.root / "lab1"
    (folder / "answer.py").mkdir(parents=True)  # a folder where our file goes
    (folder / "data").write_bytes(b"a file where our folder goes")
    files = {"answer.py": b"print(1)\n", "data/in.csv": b"1", "ok.txt": b"ok"}
    assignment_id = publish(rt, student.activity_id, files, tmp_path / "v1")
    summary = release_to_student(rt, assignment_id, student.user_id, student.home())
    assert summary == "1 added, 2 refused: a link or special file is in the way"
    assert (folder / "answer.py").is_dir() and list((folder / "answer.py").iterdir()) == []
    assert (folder / "data").read_bytes() == b"a file where our folder goes"
    assert set(release_record(rt, assignment_id, student.user_id).manifest) == {"ok.txt"}


def test_a_wrong_token_or_a_machine_gone_changes_nothing(student, tmp_path):
    rt = student.rt
    assignment_id = publish(rt, student.activity_id, {"a.txt": b"a"}, tmp_path / "v1")
    home = student.home()

    forged = CloudHome(home.machine_id, home.address, "not-the-machines-token-at-all")
    summary = release_to_student(rt, assignment_id, student.user_id, forged)
    assert summary.startswith("not placed: The machine refused Labpool's token")
    assert "not-the-machines-token" not in summary and home.token not in summary
    assert not (student.root / "lab1").exists()
    record = release_record(rt, assignment_id, student.user_id)
    assert record.manifest == {} and record.version == ""

    stop_machine_now(rt, student.machine_id)  # the server goes, with its JupyterLab
    summary = release_to_student(rt, assignment_id, student.user_id, home)
    assert summary.startswith("not placed: The machine's IDE did not answer")
    assert release_record(rt, assignment_id, student.user_id).manifest == {}
    # And the launch's release job finds no machine to wait for.
    assert release_after_launch(rt, student.activity_id, student.user_id)
    run_worker_burst(rt.settings)
    assert "not placed: no machine" in finished_results(rt)
    assert release_record(rt, assignment_id, student.user_id).manifest == {}


def test_a_release_waits_for_the_volume_from_the_end_of_the_queue_then_places(student, tmp_path):
    rt = student.rt
    publish(rt, student.activity_id, {"a.txt": b"a"}, tmp_path / "v1")
    volume_attached(rt, student, False)  # the reconciler has not attached it yet
    deadline = time.time() + 60
    waiting = release_on_launch(student.activity_id, student.user_id, deadline)
    assert waiting == "waiting: the student's volume is not attached yet"
    queue = Queue(rt.settings.queue_name, connection=rt.redis)
    (again,) = [j for j in queue.get_jobs() if j.func_name == RELEASE_ON_LAUNCH_JOB]
    assert again.args == (student.activity_id, student.user_id, deadline)
    assert not (student.root / "lab1").exists()

    volume_attached(rt, student, True)
    run_worker_burst(rt.settings)
    assert (student.root / "lab1" / "a.txt").read_bytes() == b"a"

    # Past its deadline a release stops waiting: the next launch releases.
    volume_attached(rt, student, False)
    gone = release_on_launch(student.activity_id, student.user_id, time.time() - 1)
    assert gone == "not placed: the student's volume is not attached yet"
    assert queue.count == 0


def test_release_to_class_reaches_running_cloud_machines_only(student, tmp_path):
    rt = student.rt
    assignment_id = publish(rt, student.activity_id, {"a.txt": b"a"}, tmp_path / "v1")
    assert enqueue_release(rt, RELEASE_TO_CLASS_JOB, assignment_id)
    run_worker_burst(rt.settings)
    assert "placed in 1 of 1 homes" in finished_results(rt)
    assert (student.root / "lab1" / "a.txt").read_bytes() == b"a"

    stop_machine_now(rt, student.machine_id)  # its home is now a detached volume
    publish(rt, student.activity_id, {"a.txt": b"b"}, tmp_path / "v2")
    assert enqueue_release(rt, RELEASE_TO_CLASS_JOB, assignment_id)
    run_worker_burst(rt.settings)
    assert "placed in 0 of 1 homes" in finished_results(rt)
    assert release_record(rt, assignment_id, student.user_id).version == "v1"


# ------------------------------------------------------------------------------ submission


def write_folder(root: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        (root / "lab1" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "lab1" / relative).write_bytes(data)


def zip_contents(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def incoming(rt: Runtime) -> list[Path]:
    folder = submissions_root(rt.settings.data_dir) / "incoming"
    return list(folder.iterdir()) if folder.exists() else []


def test_a_submission_from_a_cloud_machine_is_stored_like_a_local_one(student, tmp_path):
    rt = student.rt
    assignment_id = publish(rt, student.activity_id, {"a.txt": b"a"}, tmp_path / "v1")
    files = {"lab1.ipynb": NOTEBOOK, "work/answer.py": b"print(42)\n", "a.txt": b"edited"}
    write_folder(student.root, files)
    # Hidden, and in Jupyter's hide_globs: never listed, never in the archive.
    (student.root / "lab1" / ".ipynb_checkpoints").mkdir()
    (student.root / "lab1" / "__pycache__").mkdir()
    (student.root / "lab1" / "__pycache__" / "answer.pyc").write_bytes(b"\0")

    outcome = submit_folder(rt, assignment_id, student.user_id)

    (stored,) = versions(rt, assignment_id, student.user_id)
    assert outcome.submission.id == stored.id and not outcome.unchanged
    assert (stored.version, stored.file_count, stored.collected_by) == (1, 3, None)
    assert stored.size_bytes == sum(len(d) for d in files.values())
    path = stored_path(rt.settings.data_dir, stored)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == stored.checksum
    assert zip_contents(path) == files
    assert path.stat().st_mode & 0o777 == 0o600
    # The same folder again is the same archive: no new version.
    assert submit_folder(rt, assignment_id, student.user_id).unchanged
    assert len(versions(rt, assignment_id, student.user_id)) == 1
    assert incoming(rt) == []


@pytest.mark.parametrize(
    "limits, files, message",
    [
        (Limits(max_files=3), {f"f{i}.txt": b"x" for i in range(5)}, "more than 3 files"),
        (Limits(max_file_bytes=1000), {"big.bin": b"x" * 1001}, "big.bin is larger than 1000"),
        (
            Limits(max_total_bytes=1500),
            {"a.bin": b"x" * 800, "b.bin": b"y" * 800},
            "holds more than 1500 bytes",
        ),
        (Limits(max_depth=2), {"a/b/c/d.txt": b"deep"}, "nested more than 2 deep"),
    ],
)
def test_a_folder_over_a_limit_is_refused_clearly_and_nothing_is_stored(
    student, tmp_path, limits, files, message
):
    rt = student.rt
    assignment_id = publish(rt, student.activity_id, {"a.txt": b"a"}, tmp_path / "v1")
    write_folder(student.root, files)
    with pytest.raises(LimitExceeded, match=message) as refused:
        submit_folder(rt, assignment_id, student.user_id, limits=limits)
    assert "Nothing was submitted" in str(refused.value)
    assert versions(rt, assignment_id, student.user_id) == []
    assert incoming(rt) == []


def test_a_wrong_token_or_a_stopped_machine_stores_nothing_and_says_why(student, tmp_path):
    rt = student.rt
    assignment_id = publish(rt, student.activity_id, {"a.txt": b"a"}, tmp_path / "v1")
    write_folder(student.root, {"a.txt": b"mine"})
    with transaction(rt.sessions) as session:
        machine = session.get_one(Machine, student.machine_id)
        token, machine.ide_token = machine.ide_token, "not-the-machines-token-at-all"
    with pytest.raises(FolderError, match="refused Labpool's token") as refused:
        submit_folder(rt, assignment_id, student.user_id)
    assert token not in str(refused.value)
    with transaction(rt.sessions) as session:
        session.get_one(Machine, student.machine_id).ide_token = token

    stop_machine_now(rt, student.machine_id)
    with pytest.raises(MachineNotRunning, match="no machine of this student is running"):
        submit_folder(rt, assignment_id, student.user_id)
    progress = collect_class(rt, assignment_id, teacher_id=None)
    assert progress["outcomes"][str(student.user_id)]["kind"] == "not_running"
    assert (
        "attached only to a running machine" in progress["outcomes"][str(student.user_id)]["text"]
    )
    assert versions(rt, assignment_id, student.user_id) == []
    assert incoming(rt) == []


def test_collect_now_takes_a_running_cloud_machines_folder(student, tmp_path):
    rt = student.rt
    assignment_id = publish(rt, student.activity_id, {"a.txt": b"a"}, tmp_path / "v1")
    write_folder(student.root, {"a.txt": b"mine"})
    with transaction(rt.sessions) as session:
        teacher = User(issuer="https://moodle.test", sub=f"t{uuid.uuid4().hex}")
        session.add(teacher)
        session.flush()
        teacher_id = teacher.id
    progress = collect_class(rt, assignment_id, teacher_id=teacher_id)
    outcome = progress["outcomes"][str(student.user_id)]
    assert (outcome["kind"], outcome["text"]) == ("collected", "collected: version 1, 1 files")
    (stored,) = versions(rt, assignment_id, student.user_id)
    assert stored.collected_by == teacher_id
    assert zip_contents(stored_path(rt.settings.data_dir, stored)) == {"a.txt": b"mine"}


def test_a_students_submit_on_the_cloud_is_a_job_and_the_page_follows_it(
    tool, platform, crt, cloud, browser
):
    class_url, activity_id = launch_teacher(platform, tool, browser)
    with transaction(crt.sessions) as session:
        env_id, pool_id = cloud_pool(session, cloud, warm=0)
        session.execute(update(Activity).values(environment_id=env_id))
        course_id = session.get_one(Activity, activity_id).course_id
        assignment = Assignment(activity_id=activity_id, name="lab1", title="Lab 1")
        session.add(assignment)
        session.flush()
        assignment_id = assignment.id
    learner = launch_student(platform, tool, "4")  # requests a cloud machine
    user_id = user_id_of(crt, "4")
    _, root = ready_home(crt, cloud, pool_id, course_id, user_id)
    write_folder(root, {"answer.py": b"print(1)\n", "notes.md": b"done"})

    page = f"{tool.url}/courses/{course_id}/assignments/{assignment_id}/submission"
    response = learner.post(
        f"{tool.url}/courses/{course_id}/assignments/{assignment_id}/submit",
        data={"csrf": csrf_of(learner, page)},
        allow_redirects=False,
    )
    assert response.status_code == 303
    shown = learner.get(page).text
    assert 'data-state="collecting"' in shown and "Collecting your folder" in shown
    assert versions(crt, assignment_id, user_id) == []  # the web request read nothing

    run_worker_burst(crt.settings)

    (stored,) = versions(crt, assignment_id, user_id)
    shown = learner.get(page).text
    assert 'data-state="done"' in shown
    assert "Submitted at " in shown and "2 files (version 1)" in shown
    assert stored.file_count == 2 and stored.collected_by is None

    # A learner cannot collect the class (anyone's folder): 403, nothing queued.
    collect = f"{tool.url}/activities/{activity_id}/assignments/{assignment_id}/collect"
    before = collection_progress(crt, assignment_id)  # an earlier test's, in the same Redis
    queued = Queue(crt.settings.queue_name, connection=crt.redis).count
    refused = learner.post(collect, data={"csrf": csrf_of(learner, page)}, allow_redirects=False)
    assert refused.status_code == 403
    assert learner.get(collect).status_code == 403
    assert collection_progress(crt, assignment_id) == before
    assert Queue(crt.settings.queue_name, connection=crt.redis).count == queued
