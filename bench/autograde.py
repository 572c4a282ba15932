"""Autograding benchmark: small nbgrader submissions graded in the autograder's sandbox, the
same notebooks run without it and by plain `nbgrader autograde`, and a class graded by the
default number of grading workers.

    .venv/bin/python bench/autograde.py [--quick | --smoke] [--db sqlite|postgres]

Labpool's real code runs unchanged. The assignment is one nbgrader source notebook (5 cells:
the task, one answer cell, 3 graded test cells of 1 point, hidden tests in each), published
with nbgrader (`grading.publish.publish`) into the tool's data folder; each student's version
is a stored submission zip and its row, as `grading.submissions` stores them. Half the
students answer right (3/3), half get one test wrong (2/3); every score is checked.

Four passes (the first three interleaved, one submission of each in turn, so all see the same
load):
- **per submission**: `grading.autograde.grade_submission` on one owed version at a time, in
  this process (claim, read the zip, build the notebook, sandbox start + kernel + execution,
  score with nbgrader's rules, store cells and feedback, record the grade). The sandbox's own
  figures (its seconds, the resident memory of all its processes) are read from what
  `grader_sandbox.execute` returns (the benchmark keeps a reference to the real result);
- **unsandboxed**, alternating with the sandboxed runs so both see the same load: the same
  prepared notebook (`autograde_notebook.prepare`) sent to the same executor program on the
  same Python and kernel, run as a plain subprocess (no prlimit, no bwrap, no own uid, a
  temporary working folder), then scored the same way. `sandbox_overhead_ratio` = mean
  sandboxed execution ÷ mean unsandboxed execution (what the sandbox adds to running the
  notebook; the database work around it is in `per_job_s`, not in the ratio);
- **bare nbgrader** (issue 12's baseline): the same student notebook graded by plain
  `nbgrader autograde lab1 --student …` (the CLI, as a teacher runs it, no sandbox) in a scratch
  nbgrader course folder made with `nbgrader generate_assignment`; its score is read from that
  gradebook and checked; `bare_nbgrader_per_job_s` is the command's wall time;
- **class**: "grade all" (`request_autograde`) queues N versions and `GRADING_WORKERS` grading
  workers (the setting's default: one per CPU, as `labpool run` starts them; each a real
  `labpool worker --queue grading --burst` process, each with its own sandbox uid) grade them;
  `class_s` is the wall time from starting the workers to the last one's exit.
  `class_of_300_s` is that time for 300 (measured in the full run; in `--quick` and `--smoke`
  the workers' start plus the grading span, first claim to last result, scaled to 300, and
  then the line says `class_scaled=1`).

Ends with `RESULT per_job_s=… sandbox_overhead_ratio=… class_of_300_s=…
bare_nbgrader_per_job_s=… vs_bare_nbgrader=… peak_mb=… class_s=… n=… workers=…`
(`vs_bare_nbgrader` = `per_job_s` ÷ `bare_nbgrader_per_job_s`).
`--quick`: 4 submissions per pass and a class of 10; `--smoke`: 1 and 2, seconds; full: 20
and a class of 300. Needs root, bubblewrap and prlimit (the sandbox), and the IDE environment
(`.venv-ide` of the repository by default, made as the tests make it if missing). SQLite and an embedded Redis by
default; `--db postgres --postgres-url …` in a schema of its own.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.launch import (  # noqa: E402
    DEFAULT_POSTGRES,
    in_schema,
    percentile,
    postgres_reachable,
    reset_schema,
    size_mode,
    table,
)

SCHEMA = "labpool_bench_autograde"
SIZES = {"smoke": (1, 2), "quick": (4, 10), "full": (20, 300)}  # (per pass, class)
NOTEBOOK = "lab.ipynb"
RIGHT = "def square(x):\n    return x * x\n"
ONE_WRONG = "def square(x):\n    return x * x if x < 10 else 0\n"  # fails the third test


def source_notebook() -> bytes:
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    def meta(**kw):  # type: ignore[no-untyped-def]
        base = {"schema_version": 3, "locked": False, "solution": False, "grade": False}
        return {"nbgrader": {**base, "task": False, **kw}}

    def test(grade_id: str, visible: str, hidden: str):  # type: ignore[no-untyped-def]
        return new_code_cell(
            f"{visible}\n### BEGIN HIDDEN TESTS\n{hidden}\n### END HIDDEN TESTS",
            metadata=meta(grade_id=grade_id, grade=True, points=1, locked=True),
        )

    notebook = new_notebook(
        cells=[
            new_markdown_cell("# Squares\nWrite `square`.", metadata=meta(grade_id="intro")),
            new_code_cell(
                "def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n    ### END SOLUTION",
                metadata=meta(grade_id="square", solution=True),
            ),
            test("test_small", "assert square(2) == 4", "assert square(3) == 9"),
            test("test_negative", "assert square(-2) == 4", "assert square(-5) == 25"),
            test("test_large", "assert square(10) == 100", "assert square(12) == 144"),
        ]
    )
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nbformat.writes(notebook).encode()


def student_copy(release: bytes, answer: str) -> bytes:
    import nbformat

    notebook = nbformat.reads(release.decode(), as_version=4)
    notebook.cells[1].source = answer
    return nbformat.writes(notebook).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = parser.add_mutually_exclusive_group()
    size_group.add_argument("--quick", action="store_true", help="4 per pass, a class of 10")
    size_group.add_argument("--smoke", action="store_true", help="1 per pass, a class of 2 (CI)")
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES,
        help="database in which the benchmark owns the schema " + SCHEMA,
    )
    parser.add_argument("--ide-env", default=str(ROOT / ".venv-ide"))
    args = parser.parse_args(argv)
    per_pass, class_size = SIZES[size_mode(args)]

    from config.redis import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="labpool-autograde-") as tmp:
        data_dir = Path(tmp) / "data"
        if args.db == "postgres" and postgres_reachable(args.postgres_url):
            reset_schema(args.postgres_url, SCHEMA)
            db_url = in_schema(args.postgres_url, SCHEMA)
        else:
            db_url = f"sqlite:///{tmp}/labpool.db"
        embedded = EmbeddedRedis(Path(tmp) / "redis.sock").start()
        try:
            os.environ.update(
                {
                    "LABPOOL_DATA_DIR": str(data_dir),
                    "LABPOOL_DATABASE_URL": db_url,
                    "LABPOOL_REDIS_URL": embedded.url,
                    "LABPOOL_PUBLIC_URL": "http://127.0.0.1:9",
                    "LABPOOL_IDE_ENV": args.ide_env,
                }
            )
            return _run(per_pass, class_size, db_url)
        finally:
            embedded.stop()
            if db_url.startswith("postgresql"):
                reset_schema(args.postgres_url, SCHEMA, create=False)


def _run(per_pass: int, class_size: int, db_url: str) -> int:
    from sqlalchemy import select

    from config.db import transaction, utcnow
    from config.settings import load_settings
    from grading import autograde, grader_sandbox
    from grading.assignment_files import read_folder, write_folder
    from grading.models import Assignment, AutogradeResult, AutogradeState, Submission
    from grading.publish import publish
    from grading.submissions import submissions_root
    from lti_tool.models import Activity, Course, Enrolment, User
    from lti_tool.registrations import register_platform
    from lti_tool.startup import prepare
    from provisioning.ide_env import make_ide_env

    rt = prepare(load_settings())
    ide_python = make_ide_env(rt.settings.ide_env_dir)  # as the tests do: kept if current
    grader_sandbox.command(ide_python, autograde.DEFAULT_LIMITS)  # SandboxUnavailable early

    with transaction(rt.sessions) as session:
        platform = register_platform(
            session,
            rt.settings,
            issuer="https://moodle.bench.invalid",
            client_id="bench",
            deployment_ids=["1"],
            auth_url="https://moodle.bench.invalid/auth",
            token_url="https://moodle.bench.invalid/token",
            jwks_url="https://moodle.bench.invalid/jwks",
        )
        course = Course(platform_id=platform.id, context_id="2")
        session.add(course)
        session.flush()
        activity = Activity(course_id=course.id, resource_link_id="1")
        session.add(activity)
        session.flush()
        assignment = Assignment(activity_id=activity.id, name="lab1", max_score=3)
        session.add(assignment)
        session.flush()
        source = write_folder(
            rt.settings.data_dir / "assignments" / str(assignment.id),
            "source",
            {NOTEBOOK: source_notebook()},
        )
        assignment.source_path = str(source)
        assignment.release_path = str(publish(source.parent, source))  # real nbgrader
        assignment.published_at = utcnow()
        assignment_id = assignment.id
        release = read_folder(Path(assignment.release_path))[NOTEBOOK]
        users = [User(issuer=platform.issuer, sub=str(1000 + i)) for i in range(class_size)]
        session.add_all(users)
        session.flush()
        session.add_all(
            Enrolment(user_id=u.id, course_id=course.id, roles=["Learner"]) for u in users
        )
        user_ids = [u.id for u in users]

    root = submissions_root(rt.settings.data_dir)
    expected: dict[int, float] = {}  # submission id → its right score
    answers: dict[int, bytes] = {}
    version = {uid: 0 for uid in user_ids}

    def submit(user_id: int, index: int) -> int:
        """A new stored version of the student's folder, as grading.submissions keeps one."""
        right = index % 2 == 0
        notebook = student_copy(release, RIGHT if right else ONE_WRONG)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(NOTEBOOK, notebook)
        version[user_id] += 1
        relative = f"assignment-{assignment_id}/user-{user_id}/v{version[user_id]}-{index}.zip"
        (root / relative).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        (root / relative).write_bytes(buffer.getvalue())
        with transaction(rt.sessions) as session:
            row = Submission(
                assignment_id=assignment_id,
                user_id=user_id,
                version=version[user_id],
                submitted_at=utcnow(),
                checksum=f"{index:064x}",
                file_count=1,
                size_bytes=len(buffer.getvalue()),
                storage_path=relative,
                late=False,
                skipped_json="[]",
            )
            session.add(row)
            session.flush()
            expected[row.id] = 3.0 if right else 2.0
            answers[row.id] = notebook
            return row.id

    # -- per submission, sandboxed and not, alternating -------------------------------------
    course = _bare_nbgrader_course(rt.settings.data_dir.parent / "nbgrader-course")
    seen: list[grader_sandbox.Execution] = []
    real_execute = autograde.execute

    def observed(*args, **kwargs):  # type: ignore[no-untyped-def]
        ran = real_execute(*args, **kwargs)  # the real sandbox; only its result is kept
        seen.append(ran)
        return ran

    autograde.execute = observed
    sandboxed_s: list[float] = []
    sandbox_exec_s: list[float] = []
    bare_s: list[float] = []
    bare_exec_s: list[float] = []
    nbgrader_s: list[float] = []
    wrong: list[str] = []
    the_student = user_ids[-1]
    try:
        for index in range(per_pass + 1):  # the first of each is a warm-up, not counted
            submission_id = submit(the_student, index)
            with transaction(rt.sessions) as session:
                row_id = autograde.owe_autograde(
                    session, session.get_one(Submission, submission_id)
                ).id
            started = time.monotonic()
            state = autograde.grade_submission(rt, row_id)
            took = time.monotonic() - started
            with rt.sessions() as session:
                result = session.get_one(AutogradeResult, row_id)
                if state is not AutogradeState.done or result.score != expected[submission_id]:
                    wrong.append(f"sandboxed #{index}: {state} {result.score} {result.error}")
            total, executed = _bare(ide_python, source, release, answers[submission_id])
            if total != expected[submission_id]:
                wrong.append(f"unsandboxed #{index}: {total}")
            points, plain_s = _bare_nbgrader(course, f"s{index}", answers[submission_id])
            if points != expected[submission_id]:
                wrong.append(f"bare nbgrader #{index}: {points}")
            if index == 0:
                continue
            sandboxed_s.append(took)
            sandbox_exec_s.append(seen[-1].seconds)
            bare_s.append(executed[1])
            bare_exec_s.append(executed[0])
            nbgrader_s.append(plain_s)
    finally:
        autograde.execute = real_execute
    peak_mb = max(ran.peak_memory_mb for ran in seen)

    # -- a class, "grade all", the default number of grading workers ------------------------
    # The class: the other students' first versions and the measured student's next one.
    class_ids = [submit(uid, i) for i, uid in enumerate(user_ids[: class_size - 1])]
    class_ids.append(submit(the_student, per_pass + 1))
    queued = autograde.request_autograde(rt, assignment_id, None)
    workers = rt.settings.grading_workers  # LABPOOL_GRADING_WORKERS, default one per CPU
    started = time.monotonic()
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "lti_tool.cli", "worker", "--queue", "grading", "--burst"],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for worker in running:
        _, stderr = worker.communicate()
        if worker.returncode != 0:
            print(stderr[-3000:], file=sys.stderr)
            wrong.append(f"a grading worker exited with {worker.returncode}")
    class_s = time.monotonic() - started
    with rt.sessions() as session:
        done = {
            r.submission_id: r
            for r in session.scalars(
                select(AutogradeResult).where(AutogradeResult.submission_id.in_(class_ids))
            )
        }
    for submission_id in class_ids:
        row = done.get(submission_id)
        if row is None or row.state is not AutogradeState.done:
            wrong.append(f"class: submission {submission_id} not graded")
        elif row.score != expected[submission_id]:
            wrong.append(f"class: submission {submission_id} scored {row.score}")
    class_job_s = [r.seconds or 0.0 for r in done.values()]
    # The workers' start (imports, connections) is paid once; the grading itself scales with
    # the class: from the first job's claim to the last job's end. For 300 this is class_s.
    graded = [r for r in done.values() if r.started_at and r.finished_at]
    spread = (
        (max(r.finished_at for r in graded) - min(r.started_at for r in graded)).total_seconds()
        if graded
        else class_s
    )

    per_job = statistics.mean(sandboxed_s)
    ratio = statistics.mean(sandbox_exec_s) / statistics.mean(bare_exec_s)
    plain = statistics.mean(nbgrader_s)
    class_of_300 = class_s if class_size == 300 else class_s - spread + spread * 300 / class_size
    print(
        f"Autograde: a 5-cell nbgrader notebook with 3 tests, {per_pass} submissions per pass "
        f"(after one warm-up), a class of {class_size} ({queued} queued) by {workers} grading "
        f"worker(s), database {db_url.split(':')[0]}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    rows = [
        _row("sandboxed: grade_submission", sandboxed_s),
        _row("  of which sandbox execute", sandbox_exec_s),
        _row("unsandboxed: prepare+run+score", bare_s),
        _row("  of which executor run", bare_exec_s),
        _row("bare `nbgrader autograde` (CLI)", nbgrader_s),
        _row(f"class of {class_size}: sandbox per job", class_job_s),
    ]
    print(table(["pass", "runs", "mean s", "p50 s", "p95 s", "max s"], rows, text_columns=1))
    print(
        f"sandbox peak resident memory (all its processes) {peak_mb:.0f} MB; class of "
        f"{class_size} by {workers} worker(s): {class_s:.1f} s, "
        f"{class_size / class_s:.2f} submissions/s"
        + ("" if class_size == 300 else f" (300 would take {class_of_300:.0f} s at that rate)")
    )
    for problem in wrong:
        print("WRONG:", problem)
    print(
        f"RESULT per_job_s={per_job:.3f} sandbox_overhead_ratio={ratio:.3f} "
        f"class_of_300_s={class_of_300:.1f} bare_nbgrader_per_job_s={plain:.3f} "
        f"vs_bare_nbgrader={per_job / plain:.3f} peak_mb={peak_mb:.0f} class_s={class_s:.1f} "
        f"n={class_size} workers={workers}" + ("" if class_size == 300 else " class_scaled=1")
    )
    return 1 if wrong else 0


def _row(name: str, values: list[float]) -> list[str]:
    if not values:
        return [name, "0", "-", "-", "-", "-"]
    return [
        name,
        str(len(values)),
        f"{statistics.mean(values):.3f}",
        f"{percentile(values, 50):.3f}",
        f"{percentile(values, 95):.3f}",
        f"{max(values):.3f}",
    ]


def _bare_nbgrader_course(root: Path) -> Path:
    """A scratch nbgrader course folder with the assignment generated by nbgrader itself."""
    # nbgrader's gradebook runs `alembic` from PATH: the tool's environment's
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    (root / "source" / "lab1").mkdir(parents=True)
    (root / "source" / "lab1" / NOTEBOOK).write_bytes(source_notebook())
    (root / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.root = {str(root)!r}\n"
        "c.CourseDirectory.course_id = 'bench'\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", "generate_assignment", "lab1", "--force"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"nbgrader generate_assignment failed:\n{done.stderr[-3000:]}")
    return root


def _bare_nbgrader(course: Path, student: str, notebook: bytes) -> tuple[float, float]:
    """Plain `nbgrader autograde` of one student's notebook (no sandbox): (points, seconds)."""
    from nbgrader.api import Gradebook

    folder = course / "submitted" / student / "lab1"
    folder.mkdir(parents=True)
    (folder / NOTEBOOK).write_bytes(notebook)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", "autograde", "lab1", "--student", student],
        cwd=course,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.monotonic() - started
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return -1.0, took
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        return float(gradebook.find_submission("lab1", student).score), took


def _bare(
    ide_python: Path, source: Path, release: bytes, notebook: bytes
) -> tuple[float, tuple[float, float]]:
    """The same notebook without the sandbox: prepare, the executor as a plain subprocess,
    score. Returns (points, (executor seconds, whole seconds))."""
    import nbformat

    from grading import autograde_notebook, grader_sandbox

    started = time.monotonic()
    prepared = autograde_notebook.prepare((source / NOTEBOOK).read_bytes(), release, notebook)
    with tempfile.TemporaryDirectory(prefix="labpool-bare-") as workdir:
        payload = json.dumps(
            {
                "notebook": nbformat.writes(prepared.notebook),
                "files": {},
                "workdir": workdir,
                "timeout_s": 60,
                "max_cell_output_bytes": 256 * 1024,
            }
        ).encode()
        run_started = time.monotonic()
        done = subprocess.run(
            [str(ide_python), "-I", "-c", grader_sandbox.EXECUTOR.read_text()],
            input=payload,
            capture_output=True,
            cwd=workdir,
            env={
                key: value.replace("/tmp", workdir, 1) if value.startswith("/tmp/") else value
                for key, value in grader_sandbox.sandbox_env(ide_python).items()
            }
            | {"HOME": workdir},
            timeout=120,
            check=False,
        )
        ran = time.monotonic() - run_started
    scores = autograde_notebook.score(
        prepared, done.stdout.decode() if done.returncode == 0 else None, "failed"
    )
    return sum(s.score for s in scores), (ran, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
