"""Autograding (issue 12): real nbgrader rules, a real bubblewrap sandbox, the score through the
outbox into the fake Moodle's gradebook, and student code that tries to get out."""

from __future__ import annotations

import json

import nbformat
import pytest
from sqlalchemy import select

from grading.autograde import grade_submission, request_autograde, requeue_owed_autogrades
from grading.grader_sandbox import GradingLimits, grader_account
from grading.models import Assignment, AutogradeResult, AutogradeState, Grade, Submission
from grading.outbox import send_due_scores
from grading.submissions import submit_folder
from tests import test_grades
from tests.test_assignment_release import nbgrader_source, published
from tests.test_grades import launch_student, launch_teacher, user_id_of
from tests.test_submissions import course_of, home_of, write_folder

gradebook = test_grades.gradebook  # the fake Moodle's gradebook fixture
pytestmark = [pytest.mark.sandbox, pytest.mark.slow]
LIMITS = GradingLimits(timeout_s=20, cpu_seconds=15, memory_total_mb=1024)
CORRECT = "def square(x):\n    return x * x\n"
WRONG = "def square(x):\n    return 4 if x == 2 else 0\n"  # passes the visible test only


def student_notebook(
    answer: str, *, test_source: str | None = None, points: int | None = None
) -> bytes:
    """The student's copy: the released notebook with their answer (and, to cheat, an edited
    test cell)."""
    notebook = nbformat.reads(nbgrader_source().decode(), as_version=4)
    notebook.cells[1].source = answer
    test = notebook.cells[2]
    test.source = "assert square(2) == 4" if test_source is None else test_source
    if points is not None:
        test.metadata.nbgrader["points"] = points
    return nbformat.writes(notebook).encode()


@pytest.fixture
def lab(tool, platform, rt, browser, gradebook):  # type: ignore[no-untyped-def]
    """A published nbgrader assignment (2 points of tests, graded out of 10) and a submitter."""
    _, activity_id = launch_teacher(platform, tool, browser)
    assignment = published(
        tool, browser, rt, activity_id, "lab1", "square.ipynb", nbgrader_source()
    )
    course_id = course_of(rt, activity_id)

    def submit(sub: str, notebook: bytes, extra: dict[str, bytes] | None = None) -> int:
        launch_student(platform, tool, sub)
        user_id = user_id_of(rt, sub)
        home, account = home_of(rt, course_id, user_id)
        write_folder(home, account, {"square.ipynb": notebook, **(extra or {})})
        return submit_folder(rt, assignment.id, user_id).submission.id

    return assignment, activity_id, submit


def grade(rt, submission_id: int, limits: GradingLimits = LIMITS) -> AutogradeResult:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        submission = session.get_one(Submission, submission_id)
        user_id, assignment_id = submission.user_id, submission.assignment_id
    request_autograde(rt, assignment_id, user_id)
    with rt.sessions() as session:
        row_id = session.scalars(
            select(AutogradeResult.id).where(AutogradeResult.submission_id == submission_id)
        ).one()
    assert grade_submission(rt, row_id, limits) is AutogradeState.done
    with rt.sessions() as session:
        return session.get_one(AutogradeResult, row_id)


def test_correct_gets_full_marks_in_moodle_and_wrong_gets_part(rt, lab, gradebook):  # type: ignore[no-untyped-def]
    assignment, _, submit = lab
    good = grade(rt, submit("4", student_notebook(CORRECT)))
    assert good.score == 10 and good.cells[0]["grade_id"] == "test_square"
    assert good.cells[0]["passed"] and "hidden-check" not in good.feedback_html
    bad = grade(rt, submit("5", student_notebook(WRONG)))
    assert bad.score == 0 and "AssertionError" in bad.summary
    assert send_due_scores(rt) == {"sent": 2}
    assert gradebook.grade("4")["score_given"] == 10
    assert gradebook.grade("4")["comment"].startswith("Autograded: 2/2")
    assert gradebook.grade("5")["score_given"] == 0


def test_a_rerun_of_the_same_version_neither_counts_nor_sends_twice(rt, lab, gradebook):  # type: ignore[no-untyped-def]
    _, _, submit = lab
    submission_id = submit("4", student_notebook(CORRECT))
    grade(rt, submission_id)
    grade(rt, submission_id)
    with rt.sessions() as session:
        assert len(session.scalars(select(AutogradeResult)).all()) == 1
    assert send_due_scores(rt) == {"sent": 1}
    assert len(gradebook.accepted) == 1


def test_a_manual_grade_after_the_autograde_wins(rt, lab, tool, browser):  # type: ignore[no-untyped-def]
    from config.db import transaction
    from grading.grades import record_grade

    assignment, _, submit = lab
    submission_id = submit("4", student_notebook(WRONG))
    grade(rt, submission_id)
    student = user_id_of(rt, "4")
    with transaction(rt.sessions) as session:
        record_grade(session, session.get_one(Assignment, assignment.id), student, 7, "ok")
    grade(rt, submission_id)  # regrade
    with rt.sessions() as session:
        kept = session.scalars(select(Grade)).one()
    assert kept.score == 7 and kept.source.value == "manual"


def test_a_lost_job_is_queued_again_by_the_periodic_pass(rt, lab):  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from config.db import utcnow

    _, _, submit = lab
    submission_id = submit("4", student_notebook(CORRECT))
    request_autograde(rt, lab[0].id, None)
    with rt.sessions() as session, session.begin():
        row = session.scalars(select(AutogradeResult)).one()
        row.state, row.started_at = AutogradeState.running, utcnow() - timedelta(hours=1)
    assert requeue_owed_autogrades(rt) == 1
    assert grade_submission(rt, row.id, LIMITS) is AutogradeState.done
    del submission_id


ESCAPES = {
    "read the source notebook, solutions, hidden tests": (
        # Every file the sandbox shows but the system and the kernel's Python (symlinks not
        # followed: /proc/self/root leads back to / for ever), every file's content where a
        # copy could be, and every process's cmdline, environ, memory and open files
        # (non-blocking: a pipe would wait for ever).
        "import os, stat, sys\n"
        "def walk(top, skip=()):\n"
        "  for root, dirs, files in os.walk(top):\n"
        "    dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]\n"
        "    yield from (os.path.join(root, f) for f in files)\n"
        "found=[p for p in walk('/', {'/proc', '/usr', sys.prefix}) if 'labpool' in p.lower() "
        "or p.endswith(('.db', '.sqlite', '.ipynb', '.zip'))]\n"
        "def peek(p):\n"
        "  fd=os.open(p, os.O_RDONLY | os.O_NONBLOCK)\n"
        "  try: return os.read(fd, 10**6)\n"
        "  finally: os.close(fd)\n"
        "hits=[]\nfor root in ['/home','/tmp','/proc/self/cwd','/dev/shm']:\n"
        "  for p in walk(root):\n"
        "    try:\n      t=peek(p) if stat.S_ISREG(os.stat(p).st_mode) else b''\n"
        "    except OSError: continue\n"
        "    if b'hidden-check' in t or b'secret-answer' in t: hits.append(p)\n"
        "for pid in os.listdir('/proc'):\n  if pid.isdigit():\n"
        "    for f in ['cmdline','environ','mem']:\n      try:\n"
        "        t=peek(f'/proc/{pid}/{f}')\n"
        "        if b'hidden-check' in t or b'LABPOOL' in t: hits.append(pid+f)\n"
        "      except OSError: pass\n"
        "    try:\n      for fd in os.listdir(f'/proc/{pid}/fd'):\n"
        "        try: t=peek(f'/proc/{pid}/fd/{fd}')\n"
        "        except OSError: continue\n"
        "        if b'hidden-check' in t: hits.append(pid+'fd')\n"
        "    except OSError: pass\n"
        "print('ESCAPED' if found or hits else 'BLOCKED', found[:3], hits[:3])\n",
        10,
    ),
    "reach the network (Redis, PostgreSQL, the tool, the internet)": (
        "import socket\nopen_=[]\nfor host,port in [('127.0.0.1',6379),('127.0.0.1',5432),"
        "('127.0.0.1',8080),('1.1.1.1',80)]:\n  s=socket.socket()\n  s.settimeout(1)\n"
        "  try:\n    s.connect((host,port)); open_.append(port)\n  except OSError: pass\n"
        "print('ESCAPED' if open_ else 'BLOCKED', open_)\n",
        10,
    ),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", 0),
    "memory bomb (8 GB)": ("x = bytearray(8 * 2**30)\nprint('ESCAPED')\n", 0),
    "memory total across processes": (
        "import os, time\nfor i in range(8):\n  if os.fork()==0:\n"
        "    b=bytearray(900*2**20); time.sleep(30)\n"
        "time.sleep(30)\n",
        0,
    ),
    "print 100 MB": ("import sys\nfor i in range(100):\n    print('x' * 2**20)\n", 10),
    "fill the disk (10 GB file)": (
        "import os\nfor path in ['big','/tmp/big','/dev/shm/big','/dev/big']:\n"
        "  try:\n    with open(path,'wb') as f:\n"
        "      for i in range(10*1024): f.write(b'0'*2**20)\n    print('ESCAPED', path)\n"
        "  except OSError as e: print('BLOCKED', path, e.errno)\n",
        10,
    ),
    "loop forever": ("while True:\n    pass\n", 0),
    "kill the worker's process group and every process": (
        "import os, signal\nfor pid in range(2, 400):\n  try: os.kill(pid, signal.SIGKILL)\n"
        "  except Exception: pass\nos.killpg(0, signal.SIGKILL)\n",
        0,
    ),
    "leave a background process": (
        "import subprocess\nsubprocess.Popen(['sleep','600'], start_new_session=True)\n"
        "print('BLOCKED')\n",
        10,
    ),
}


@pytest.mark.parametrize("attack", list(ESCAPES), ids=list(ESCAPES))
def test_an_escape_from_the_autograder_fails_and_the_next_submission_is_graded(rt, lab, attack):  # type: ignore[no-untyped-def]
    _, _, submit = lab
    code, expected = ESCAPES[attack]
    limits = GradingLimits(timeout_s=8, cpu_seconds=6, memory_total_mb=1024)
    result = grade(rt, submit("4", student_notebook(code + "\n" + CORRECT)), limits)
    assert "<pre>ESCAPED" not in result.feedback_html  # an output saying it got out
    assert result.score == expected, result.summary
    assert len(result.feedback_html) < 2 * 2**20  # outputs bounded in bytes
    if attack == "leave a background process":
        import psutil

        assert not [
            p
            for p in psutil.process_iter(["username", "status"])
            if p.info["username"] == grader_account().name
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ]
    # the worker survives and grades the next submission correctly
    assert grade(rt, submit("5", student_notebook(CORRECT))).score == 10


def test_edited_test_cells_and_their_metadata_earn_nothing(rt, lab):  # type: ignore[no-untyped-def]
    _, _, submit = lab
    forged = student_notebook(WRONG, test_source="pass", points=100)
    nb = json.loads(forged)
    nb["cells"][2]["metadata"]["nbgrader"]["grade"] = False  # "not a test any more"
    nb["cells"].append(
        nbformat.v4.new_code_cell(
            "pass", metadata={"nbgrader": {"grade": True, "grade_id": "bonus", "points": 50}}
        )
    )
    result = grade(rt, submit("4", json.dumps(nb).encode()))
    assert result.score == 0 and [c["grade_id"] for c in result.cells] == ["test_square"]
    assert (
        "You changed the test cell" in result.summary or "not in the assignment" in result.summary
    )


def test_a_fake_grade_file_or_forged_timestamp_changes_nothing(rt, lab):  # type: ignore[no-untyped-def]
    _, _, submit = lab
    fake = nbgrader_source().replace(b"x * x", b"x * x")  # the source, claiming full marks
    submission_id = submit(
        "4",
        student_notebook(WRONG),
        {"timestamp.txt": b"2000-01-01 00:00:00", "grades.json": b'{"score": 10}', "x.ipynb": fake},
    )
    result = grade(rt, submission_id)
    assert result.score == 0
    with rt.sessions() as session:
        submission = session.get_one(Submission, submission_id)
        assert submission.submitted_at.year >= 2026


def test_the_feedback_is_for_the_student_and_the_teachers_only(rt, lab, tool, platform, browser):  # type: ignore[no-untyped-def]
    _, activity_id, submit = lab
    submission_id = submit("4", student_notebook("print('<script>alert(1)</script>')\n" + CORRECT))
    grade(rt, submission_id)
    url = f"{tool.url}/submissions/{submission_id}/feedback"
    own = launch_student(platform, tool, "4").get(url)
    assert own.status_code == 200 and "Autograded score: 2 / 2" in own.text
    assert "<script>" not in own.text and "&lt;script&gt;" in own.text
    assert "script-src 'none'" in own.headers["Content-Security-Policy"]
    assert "sandbox" in own.headers["Content-Security-Policy"]
    assert launch_student(platform, tool, "5").get(url).status_code == 403
    assert browser.get(url).status_code == 200  # the teacher


def test_auto_grade_on_submit_through_the_grading_workers_queue(rt, lab, tool, browser, gradebook):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    from tests.test_grades import csrf_of

    assignment, activity_id, submit = lab
    page = f"{tool.url}/activities/{activity_id}/assignments/{assignment.id}"
    response = browser.post(
        f"{page}/autograde-on-submit",
        data={"csrf": csrf_of(browser, page), "on": "1"},
        allow_redirects=False,
    )
    assert response.status_code == 303
    submission_id = submit("4", student_notebook(CORRECT))  # the hook queues it
    done = subprocess.run(
        [sys.executable, "-m", "lti_tool.cli", "worker", "--queue", "grading", "--burst"],
        env=dict(os.environ),
        timeout=180,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with rt.sessions() as session:
        result = session.scalars(
            select(AutogradeResult).where(AutogradeResult.submission_id == submission_id)
        ).one()
    assert result.state is AutogradeState.done and result.score == 10
    send_due_scores(rt)
    assert gradebook.grade("4")["score_given"] == 10


def test_the_teacher_sees_each_grade_cell_and_a_student_sees_no_one_elses(  # type: ignore[no-untyped-def]
    rt, lab, tool, platform, browser
):
    assignment, activity_id, submit = lab
    grade(rt, submit("4", student_notebook(CORRECT)))
    grade(rt, submit("5", student_notebook(WRONG)))
    page = f"{tool.url}/activities/{activity_id}/assignments/{assignment.id}"
    html = browser.get(page).text
    rows = {part.split('"', 1)[0]: part for part in html.split('<tr data-user="')[1:]}
    right, wrong = rows[str(user_id_of(rt, "4"))], rows[str(user_id_of(rt, "5"))]
    assert "Autograder: <strong>10 / 10</strong>" in right
    assert '<tr data-cell="test_square"><td><code>test_square</code></td><td>2 / 2</td>' in right
    assert "Autograded: 2/2" in right
    assert "Autograder: <strong>0 / 10</strong>" in wrong
    assert '<td><code>test_square</code></td><td>0 / 2 <span class="muted">AssertionError' in wrong
    # A student: not the teacher's page, not another student's feedback or cells.
    student = launch_student(platform, tool, "4")
    refused = student.get(page)
    assert refused.status_code == 403 and "test_square" not in refused.text
    with rt.sessions() as session:
        theirs = session.scalars(
            select(Submission.id).where(Submission.user_id == user_id_of(rt, "5"))
        ).one()
    other = student.get(f"{tool.url}/submissions/{theirs}/feedback")
    assert other.status_code == 403 and "AssertionError" not in other.text
    own_work = student.get(f"{tool.url}/courses/{course_of(rt, activity_id)}/my-work")
    assert own_work.status_code == 200 and "AssertionError" not in own_work.text


def test_each_grading_process_of_the_host_has_its_own_grader_uid(tmp_path):  # type: ignore[no-untyped-def]
    """RLIMIT_NPROC counts a uid's tasks host-wide: two grading workers must not share one."""
    import subprocess
    import sys

    from config.settings import SettingsError, load_settings

    mine = grader_account()
    theirs = subprocess.run(
        [
            sys.executable,
            "-c",
            "from grading import grader_sandbox as g; print(g.grader_account())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert mine.name.startswith("lp-grader") and f"'{mine.name}'" not in theirs
    assert "lp-grader-" in theirs or mine.name != "lp-grader"
    assert grader_account() == mine  # kept for the life of the process
    settings = load_settings(
        {"LABPOOL_PUBLIC_URL": "http://127.0.0.1:9", "LABPOOL_DATA_DIR": str(tmp_path)}
    )
    assert settings.grading_workers >= 1
    with pytest.raises(SettingsError, match="LABPOOL_GRADING_WORKERS"):
        load_settings(
            {
                "LABPOOL_PUBLIC_URL": "http://127.0.0.1:9",
                "LABPOOL_DATA_DIR": str(tmp_path),
                "LABPOOL_GRADING_WORKERS": "0",
            }
        )
