"""Submissions (issue 11, item 4, and the submission half of item 6): a student's "Submit"
copies their assignment folder out of their real home (owned by their own OS user where the
host allows it) into an immutable, checksummed archive; planted symlinks are never followed,
FIFOs never block, limits refuse the whole folder; resubmission keeps every version; the late
policy refuses or marks; the teacher collects the class in an RQ job and downloads a copy; a
learner gets 403 for everything that is not their own."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from grading.collect_folder import LimitExceeded, Limits, collect_folder
from grading.models import Assignment, Submission
from lti_tool.models import Activity
from provisioning import sandbox
from provisioning.backends.base import MachineSpec
from provisioning.backends.local import LocalBackend
from tests.conftest import run_worker_burst
from tests.test_grades import csrf_of, launch_student, launch_teacher, user_id_of

NOTEBOOK = b'{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}'


# ------------------------------------------------------------------------------ helpers


def make_assignment(tool, browser, activity_id, name="lab1", due_at="", late_policy="mark_late"):  # type: ignore[no-untyped-def]
    class_url = f"{tool.url}/activities/{activity_id}/class"
    response = browser.post(
        f"{tool.url}/activities/{activity_id}/assignments",
        data={
            "csrf": csrf_of(browser, class_url),
            "name": name,
            "title": f"Lab {name}",
            "max_score": "10",
            "due_at": due_at,
            "late_policy": late_policy,
        },
        allow_redirects=False,
    )
    assert response.status_code == 303, response.text[:500]
    page = browser.get(class_url).text
    before = page.split(f"folder <code>{name}</code>")[0]
    return int(before.rsplit(f"/activities/{activity_id}/assignments/", 1)[1].split('"')[0])


def course_of(rt, activity_id: int) -> int:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.get_one(Activity, activity_id).course_id


def home_of(rt, course_id: int, user_id: int) -> tuple[Path, sandbox.Account | None]:  # type: ignore[no-untyped-def]
    """The student's real home, as the local backend makes it: their own OS user (root) or
    the tool's, 0700."""
    home = LocalBackend(rt.settings.data_dir, settings=rt.settings).home_folder(
        MachineSpec(id=0, ide_kind="jupyterlab", owner_id=user_id, course_id=course_id)
    )
    account = sandbox.student_account(str(user_id)) if os.geteuid() == 0 else None
    shutil.rmtree(home, ignore_errors=True)  # ids come back after the tables are cleared
    sandbox.prepare_home(home, account)
    return home, account


def as_student(home: Path, account: sandbox.Account | None) -> None:
    """What the student made is theirs (they work as their own user in the sandbox)."""
    if account is None:
        return
    for root, dirs, files in os.walk(home):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), account.uid, account.gid)


def write_folder(home: Path, account, files: dict[str, bytes], folder: str = "lab1") -> None:  # type: ignore[no-untyped-def]
    for relative, data in files.items():
        path = home / folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    as_student(home, account)


def submit(tool, browser, course_id, assignment_id, **extra):  # type: ignore[no-untyped-def]
    page = f"{tool.url}/courses/{course_id}/assignments/{assignment_id}/submission"
    return browser.post(
        f"{tool.url}/courses/{course_id}/assignments/{assignment_id}/submit",
        data={"csrf": csrf_of(browser, page), **extra},
        allow_redirects=False,
        timeout=60,
    )


def versions(rt, user_id: int, assignment_id: int) -> list[Submission]:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return list(
            session.scalars(
                select(Submission)
                .where(Submission.user_id == user_id, Submission.assignment_id == assignment_id)
                .order_by(Submission.version)
            )
        )


def stored(rt, submission: Submission) -> Path:  # type: ignore[no-untyped-def]
    return rt.settings.data_dir.resolve() / "submissions" / submission.storage_path


def zip_names_and_data(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


@pytest.fixture
def course(tool, platform, rt, browser):  # type: ignore[no-untyped-def]
    """A teacher's activity with an assignment `lab1`, and two students (4 and 5) with homes."""
    alice = launch_student(platform, tool, "4")
    bob = launch_student(platform, tool, "5")
    _, activity_id = launch_teacher(platform, tool, browser)
    course_id = course_of(rt, activity_id)
    lab = make_assignment(tool, browser, activity_id)
    a, b = user_id_of(rt, "4"), user_id_of(rt, "5")
    yield {
        "activity": activity_id,
        "course": course_id,
        "lab": lab,
        "alice": alice,
        "bob": bob,
        "alice_id": a,
        "bob_id": b,
        "alice_home": home_of(rt, course_id, a),
        "bob_home": home_of(rt, course_id, b),
    }


# -------------------------------------------------------------------------------- tests


def test_submit_stores_an_immutable_copy_with_checksum_and_count(tool, rt, course):
    home, account = course["alice_home"]
    write_folder(home, account, {"lab1.ipynb": NOTEBOOK, "data/points.csv": b"1,2\n"})

    response = submit(tool, course["alice"], course["course"], course["lab"])
    assert response.status_code == 303, response.text[:500]
    page = course["alice"].get(tool.url + response.headers["Location"]).text
    assert "Submitted at " in page and ", 2 files (version 1)" in page

    [v1] = versions(rt, course["alice_id"], course["lab"])
    path = stored(rt, v1)
    assert v1.file_count == 2 and v1.size_bytes == len(NOTEBOOK) + 4 and not v1.late
    assert v1.collected_by is None
    assert hashlib.sha256(path.read_bytes()).hexdigest() == v1.checksum
    assert zip_names_and_data(path) == {"data/points.csv": b"1,2\n", "lab1.ipynb": NOTEBOOK}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.geteuid()  # the tool's, not the student's
    # The student's own pages say so.
    work = course["alice"].get(f"{tool.url}/courses/{course['course']}/my-work").text
    assert "submitted at " in work and "2 files" in work
    # The copy is the folder at that moment: later edits in the home do not touch it.
    (home / "lab1" / "lab1.ipynb").write_bytes(b"changed afterwards")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == v1.checksum


def test_planted_symlinks_are_not_followed(tool, rt, browser, course):
    home, account = course["alice_home"]
    bob_home, bob_account = course["bob_home"]
    write_folder(bob_home, bob_account, {"answers.ipynb": b"BOB'S ANSWERS"})
    write_folder(home, account, {"lab1.ipynb": NOTEBOOK})
    os.symlink(bob_home / "lab1" / "answers.ipynb", home / "lab1" / "answers.ipynb")
    os.symlink("/etc/shadow", home / "lab1" / "shadow")
    os.symlink("/etc", home / "lab1" / "etc")  # a folder link: never walked into
    as_student(home, account)

    response = submit(tool, course["alice"], course["course"], course["lab"])
    assert response.status_code == 303, response.text[:500]
    page = course["alice"].get(tool.url + response.headers["Location"]).text
    assert "Not included: answers.ipynb (a symbolic link (never followed)" in page
    assert "Not included: shadow" in page
    [v1] = versions(rt, course["alice_id"], course["lab"])
    assert v1.file_count == 1
    assert zip_names_and_data(stored(rt, v1)) == {"lab1.ipynb": NOTEBOOK}
    assert sorted(item["path"] for item in v1.skipped) == ["answers.ipynb", "etc", "shadow"]

    # The assignment folder itself a link to Bob's: refused, nothing stored for Alice.
    lab2 = make_assignment(tool, browser, course["activity"], name="lab2")
    os.symlink(bob_home / "lab1", home / "lab2")
    response = submit(tool, course["alice"], course["course"], lab2)
    assert response.status_code == 404 and "is not a folder" in response.text
    assert versions(rt, course["alice_id"], lab2) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file as someone else")
def test_a_file_that_is_not_the_students_own_is_left_out(rt, course, tmp_path):
    home, account = course["alice_home"]
    write_folder(home, account, {"lab1.ipynb": NOTEBOOK})
    (home / "lab1" / "hardlinked").write_bytes(b"root's")  # e.g. a hard link to a tool file
    os.chown(home / "lab1" / "hardlinked", 0, 0)
    collected = collect_folder(home, "lab1", tmp_path / "out.zip", Limits())
    assert collected.file_count == 1
    assert collected.skipped == [{"path": "hardlinked", "why": "not the student's own file"}]


def test_a_fifo_does_not_hang_the_worker(tool, rt, course):
    home, account = course["alice_home"]
    write_folder(home, account, {"lab1.ipynb": NOTEBOOK})
    os.mkfifo(home / "lab1" / "pipe")
    as_student(home, account)
    started = time.monotonic()
    response = submit(tool, course["alice"], course["course"], course["lab"])
    assert response.status_code == 303, response.text[:500]
    assert time.monotonic() - started < 20
    [v1] = versions(rt, course["alice_id"], course["lab"])
    assert v1.file_count == 1
    assert v1.skipped == [{"path": "pipe", "why": "a FIFO, not a regular file"}]


def test_limits_exceeded_are_refused_clearly_and_nothing_is_stored(tool, rt, course, tmp_path):
    home, account = course["alice_home"]
    write_folder(home, account, {"lab1.ipynb": NOTEBOOK})
    with open(home / "lab1" / "huge.bin", "wb") as sparse:  # 30 MB that take no disk
        sparse.truncate(30 * 1024 * 1024)
    as_student(home, account)

    root = rt.settings.data_dir / "submissions"
    before = sorted(root.rglob("*"))
    response = submit(tool, course["alice"], course["course"], course["lab"])
    assert response.status_code == 413
    assert "huge.bin is larger than 20 MB (the limit per file)" in response.text
    assert "Nothing was submitted" in response.text
    assert versions(rt, course["alice_id"], course["lab"]) == []
    assert sorted(root.rglob("*")) == before  # no archive left behind

    # File count and total size, on the same walk (limits passed in, nothing faked).
    (home / "lab1" / "huge.bin").unlink()
    write_folder(home, account, {f"f{i}.txt": b"x" * 600 for i in range(4)})
    out = tmp_path / "out.zip"
    with pytest.raises(LimitExceeded, match="more than 3 files and folders"):
        collect_folder(home, "lab1", out, Limits(max_files=3))
    with pytest.raises(LimitExceeded, match="holds more than 1000 bytes"):
        collect_folder(home, "lab1", out, Limits(max_total_bytes=1000))
    write_folder(home, account, {"a/b/c.txt": b"deep"})
    with pytest.raises(LimitExceeded, match="nested more than 1 deep"):
        collect_folder(home, "lab1", out, Limits(max_depth=1))
    assert not out.exists()


def test_resubmission_makes_version_2_and_keeps_version_1(tool, rt, course):
    home, account = course["alice_home"]
    write_folder(home, account, {"lab1.ipynb": NOTEBOOK})
    assert submit(tool, course["alice"], course["course"], course["lab"]).status_code == 303
    [v1] = versions(rt, course["alice_id"], course["lab"])
    first_bytes = stored(rt, v1).read_bytes()

    # A second click with nothing changed stores nothing new.
    response = submit(tool, course["alice"], course["course"], course["lab"])
    assert response.status_code == 303
    page = course["alice"].get(tool.url + response.headers["Location"]).text
    assert "Nothing changed since version 1" in page
    assert len(versions(rt, course["alice_id"], course["lab"])) == 1

    write_folder(home, account, {"lab1.ipynb": b"my answers", "extra.py": b"print(1)\n"})
    assert submit(tool, course["alice"], course["course"], course["lab"]).status_code == 303
    v1_again, v2 = versions(rt, course["alice_id"], course["lab"])
    assert (v1_again.version, v2.version) == (1, 2)
    assert v2.file_count == 2 and v2.checksum != v1.checksum
    assert stored(rt, v1_again).read_bytes() == first_bytes  # version 1 untouched
    assert zip_names_and_data(stored(rt, v2))["lab1.ipynb"] == b"my answers"
    page = (
        course["alice"]
        .get(f"{tool.url}/courses/{course['course']}/assignments/{course['lab']}/submission")
        .text
    )
    assert page.count('data-version="') == 2 and "2 (current)" in page


def test_double_clicks_store_one_version(tool, rt, course):
    home, account = course["alice_home"]
    write_folder(home, account, {f"f{i}.ipynb": os.urandom(200_000) for i in range(20)})
    page = f"{tool.url}/courses/{course['course']}/assignments/{course['lab']}/submission"
    token = csrf_of(course["alice"], page)
    url = f"{tool.url}/courses/{course['course']}/assignments/{course['lab']}/submit"
    codes: list[int] = []

    def click() -> None:
        codes.append(
            course["alice"]
            .post(url, data={"csrf": token}, allow_redirects=False, timeout=60)
            .status_code
        )

    clicks = [threading.Thread(target=click) for _ in range(3)]
    for t in clicks:
        t.start()
    for t in clicks:
        t.join()
    assert sorted(set(codes)) in ([303], [303, 409]), codes
    assert len(versions(rt, course["alice_id"], course["lab"])) == 1


@pytest.mark.parametrize("policy", ["refuse", "mark_late"])
def test_after_the_due_date_the_late_policy_decides(tool, rt, browser, course, policy):
    late = make_assignment(
        tool,
        browser,
        course["activity"],
        name="late1",
        due_at="2020-01-01T00:00",
        late_policy=policy,
    )
    home, account = course["alice_home"]
    write_folder(home, account, {"work.ipynb": NOTEBOOK}, folder="late1")
    response = submit(tool, course["alice"], course["course"], late)
    if policy == "refuse":
        assert response.status_code == 403
        assert "has passed and this assignment does not take late work" in response.text
        assert versions(rt, course["alice_id"], late) == []
    else:
        assert response.status_code == 303
        [v1] = versions(rt, course["alice_id"], late)
        assert v1.late
        page = course["alice"].get(tool.url + response.headers["Location"]).text
        assert "— late" in page
        teacher_page = browser.get(
            f"{tool.url}/activities/{course['activity']}/assignments/{late}"
        ).text
        assert "late</strong>" in teacher_page


def test_a_learner_cannot_act_for_or_see_another(tool, rt, browser, course):
    home, account = course["alice_home"]
    write_folder(home, account, {"lab1.ipynb": b"ALICE'S WORK"})
    bob_home, bob_account = course["bob_home"]
    write_folder(bob_home, bob_account, {"lab1.ipynb": b"BOB'S WORK"})
    assert submit(tool, course["alice"], course["course"], course["lab"]).status_code == 303
    [alice_v1] = versions(rt, course["alice_id"], course["lab"])
    bob = course["bob"]
    base = f"{tool.url}/activities/{course['activity']}/assignments/{course['lab']}"

    # Bob's submit with Alice's id in the form submits Bob's own folder, never Alice's.
    response = submit(tool, bob, course["course"], course["lab"], user_id=str(course["alice_id"]))
    assert response.status_code == 303
    [bob_v1] = versions(rt, course["bob_id"], course["lab"])
    assert zip_names_and_data(stored(rt, bob_v1)) == {"lab1.ipynb": b"BOB'S WORK"}
    assert len(versions(rt, course["alice_id"], course["lab"])) == 1

    # Bob's own page lists his version only.
    page = bob.get(
        f"{tool.url}/courses/{course['course']}/assignments/{course['lab']}/submission"
    ).text
    assert alice_v1.checksum[:12] not in page and bob_v1.checksum[:12] in page
    # Teacher routes: 403 for a learner, nothing started.
    assert bob.get(f"{base}/submissions/{alice_v1.id}.zip").status_code == 403
    assert bob.get(f"{base}/submissions").status_code == 403
    assert bob.get(f"{base}/collect").status_code == 403
    token = csrf_of(bob, f"{tool.url}/courses/{course['course']}/my-work")
    assert bob.post(f"{base}/collect", data={"csrf": token}).status_code == 403
    assert rt.redis.get(f"labpool:collect:{course['lab']}") is None
    # No CSRF token: refused, nothing stored.
    write_folder(bob_home, bob_account, {"lab1.ipynb": b"BOB'S NEW WORK"})
    response = bob.post(
        f"{tool.url}/courses/{course['course']}/assignments/{course['lab']}/submit",
        data={},
        allow_redirects=False,
    )
    assert response.status_code == 403
    assert len(versions(rt, course["bob_id"], course["lab"])) == 1
    # Someone with no session at all.
    anonymous = requests.Session()
    assert anonymous.get(f"{base}/submissions/{alice_v1.id}.zip").status_code == 401
    # An assignment id of no activity of this course: 404, not someone else's page.
    assert (
        bob.get(f"{tool.url}/courses/{course['course']}/assignments/999999/submission").status_code
        == 404
    )


def test_collect_now_collects_every_student_in_a_job(tool, rt, settings, browser, course):
    home, account = course["alice_home"]
    write_folder(home, account, {"lab1.ipynb": b"ALICE'S WORK"})
    # Bob has a home but no folder. The launches' machine jobs are not this test's business.
    rt.redis.delete(f"rq:queue:{rt.settings.queue_name}")
    base = f"{tool.url}/activities/{course['activity']}/assignments/{course['lab']}"
    token = csrf_of(browser, base)
    response = browser.post(f"{base}/collect", data={"csrf": token}, allow_redirects=False)
    assert response.status_code == 303
    assert browser.get(f"{base}/collect").json()["state"] == "queued"
    # A second press while it is queued starts nothing more.
    browser.post(f"{base}/collect", data={"csrf": token})
    assert rt.redis.llen(f"rq:queue:{rt.settings.queue_name}") == 1

    run_worker_burst(settings)
    progress = browser.get(f"{base}/collect").json()
    assert progress["state"] == "done" and progress["total"] == 2 and progress["done"] == 2
    outcomes = progress["outcomes"]
    assert outcomes[str(course["alice_id"])]["kind"] == "collected"
    assert outcomes[str(course["bob_id"])] == {"kind": "no_folder", "text": "no folder"}
    [v1] = versions(rt, course["alice_id"], course["lab"])
    teacher_id = user_id_of(rt, "3")
    assert v1.collected_by == teacher_id and not v1.late
    assert versions(rt, course["bob_id"], course["lab"]) == []

    # The teacher sees it and downloads the stored copy.
    page = browser.get(base).text
    assert "v1, collected" in page
    download = browser.get(f"{base}/submissions/{v1.id}.zip")
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "application/zip"
    assert hashlib.sha256(download.content).hexdigest() == v1.checksum
    with zipfile.ZipFile(io.BytesIO(download.content)) as zf:
        assert zf.read("lab1.ipynb") == b"ALICE'S WORK"
    listing = browser.get(f"{base}/submissions").text
    assert "1 (current)" in listing and "nothing submitted" in listing

    # Collecting again with nothing changed stores nothing new.
    browser.post(f"{base}/collect", data={"csrf": token})
    run_worker_burst(settings)
    assert (
        browser.get(f"{base}/collect").json()["outcomes"][str(course["alice_id"])]["kind"]
        == "unchanged"
    )
    assert len(versions(rt, course["alice_id"], course["lab"])) == 1
    with rt.sessions() as session:
        assert session.get_one(Assignment, course["lab"]).name == "lab1"
