"""Grades benchmark: 300 manual grades through the score outbox to a fake Moodle's gradebook.

    .venv/bin/python bench/grades.py [--quick | --smoke] [--db sqlite|postgres] [--workers N]

Labpool's real code runs unchanged: each grade is saved with its outbox row in one
transaction (`grading.grades.record_grade`), and N sender threads — standing in for RQ
workers — run `grading.outbox.send_score` on each row as its job would; the fake Moodle
(tests/fakeplatform/, AGS with Moodle's 400/409 rules) issues the token (the tool's JWKS is
served by the tool's own app on loopback) and keeps the gradebook. One student in ten is
regraded while sending goes on, and Moodle is down (503) for the first fifth of the grades,
so retries and the periodic due pass (`send_due_scores`) are on the path too.

Measured: grades per second (first grade saved → last score in the gradebook) and the p95
of each grade's own latency (saved → in the gradebook). Checked: every student's grade in the
gradebook is their newest one (`lost` counts those that are not), and no grade version was
taken twice (`duplicates`). Ends with `RESULT grades_per_s=… p95_s=… duplicates=0 lost=0`.
`--quick`: 100 grades; `--smoke`: 20, a few seconds. SQLite and an embedded Redis by
default; `--db postgres --postgres-url …` and `--redis-url …` for shared servers.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time
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
from tests.fakeplatform import FakePlatform, ServedApp  # noqa: E402

SCHEMA = "labpool_bench_grades"
SIZES = {"smoke": 20, "quick": 100, "full": 300}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = parser.add_mutually_exclusive_group()
    size_group.add_argument("--quick", action="store_true", help="100 grades instead of 300")
    size_group.add_argument("--smoke", action="store_true", help="20 grades, a few seconds (CI)")
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES,
        help="database in which the benchmark owns the schema " + SCHEMA,
    )
    parser.add_argument("--redis-url", default="", help="default: an embedded Redis")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    size = SIZES[size_mode(args)]

    from config.redis import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="labpool-grades-") as tmp:
        if args.db == "postgres" and postgres_reachable(args.postgres_url):
            reset_schema(args.postgres_url, SCHEMA)
            db_url = in_schema(args.postgres_url, SCHEMA)
        else:
            db_url = f"sqlite:///{tmp}/labpool.db"
        embedded = None if args.redis_url else EmbeddedRedis(Path(tmp) / "redis.sock").start()
        try:
            return _run(size, args.workers, db_url, Path(tmp), args.redis_url or embedded.url)  # type: ignore[union-attr]
        finally:
            if embedded is not None:
                embedded.stop()
            if db_url.startswith("postgresql"):
                reset_schema(args.postgres_url, SCHEMA, create=False)


def _run(size: int, workers: int, db_url: str, data_dir: Path, redis_url: str) -> int:
    holder = _LateApp()
    with ServedApp(holder) as tool:
        os.environ.update(
            {
                "LABPOOL_DATA_DIR": str(data_dir),
                "LABPOOL_DATABASE_URL": db_url,
                "LABPOOL_REDIS_URL": redis_url,
                "LABPOOL_PUBLIC_URL": tool.url,
            }
        )
        from sqlalchemy import update

        from config.db import transaction, utcnow
        from config.settings import load_settings
        from grading.grades import record_grade
        from grading.models import Assignment, ScoreOutbox, ScoreStatus
        from grading.outbox import send_due_scores, send_score
        from lti_tool.models import Activity, Course, User
        from lti_tool.registrations import register_platform
        from lti_tool.services.ags import LINEITEM_SCOPE, SCORE_SCOPE
        from lti_tool.startup import prepare
        from lti_tool.web.app import create_app

        rt = prepare(load_settings())
        holder.app = create_app(rt.settings)
        with FakePlatform(tool_url=tool.url) as moodle:
            moodle.tool_jwks_url = f"{tool.url}/lti/jwks.json"
            book = moodle.gradebook
            reg = moodle.platform_add_args()
            with transaction(rt.sessions) as session:
                platform = register_platform(
                    session,
                    rt.settings,
                    issuer=reg["issuer"],
                    client_id=reg["client_id"],
                    deployment_ids=[reg["deployment_id"]],
                    auth_url=reg["auth_url"],
                    token_url=reg["token_url"],
                    jwks_url=reg["jwks_url"],
                )
                course = Course(platform_id=platform.id, context_id="2")
                session.add(course)
                session.flush()
                activity = Activity(
                    course_id=course.id,
                    resource_link_id="1",
                    ags_scope=[SCORE_SCOPE, LINEITEM_SCOPE],
                    ags_lineitem=book.lineitem_url("2", "2"),
                )
                session.add(activity)
                session.flush()
                assignment = Assignment(activity_id=activity.id, name="lab1", max_score=10)
                session.add(assignment)
                students = [User(issuer=reg["issuer"], sub=str(1000 + i)) for i in range(size)]
                session.add_all(students)
                session.flush()
                assignment_id, student_ids = assignment.id, [(u.id, u.sub) for u in students]

            saved: dict[str, float] = {}  # comment (one per grade version) → when saved
            arrived: dict[str, float] = {}
            book.on_score = lambda body: arrived.setdefault(
                body.get("comment", ""), time.monotonic()
            )
            todo: queue.Queue[int | None] = queue.Queue()

            def sender() -> None:
                while (row_id := todo.get()) is not None:
                    send_score(rt, row_id)
                    todo.task_done()

            threads = [threading.Thread(target=sender) for _ in range(workers)]
            for t in threads:
                t.start()
            newest: dict[str, str] = {}
            regrade = set(range(0, size, 10))
            plan = [(i, 1) for i in range(size)] + [(i, 2) for i in sorted(regrade)]
            outage_until = max(size // 5, 1)
            book.down(503)
            started = time.monotonic()
            for n, (i, version) in enumerate(plan):
                if n == outage_until:
                    todo.join()  # the outage's grades were tried (and refused) first
                    book.up()
                user_id, sub = student_ids[i]
                comment = f"grade {version} of {sub}"
                with transaction(rt.sessions) as session:
                    row = record_grade(
                        session,
                        session.get_one(Assignment, assignment_id),
                        user_id,
                        float((i + version) % 11),
                        comment,
                    )
                    row_id = row.id
                saved[comment] = time.monotonic()
                newest[sub] = comment
                todo.put(row_id)
            for _ in threads:
                todo.put(None)
            for t in threads:
                t.join()
            # The periodic pass: what the outage left owed (rows backing off) comes due.
            passes = 0
            while passes < 20:
                with transaction(rt.sessions) as session:
                    session.execute(
                        update(ScoreOutbox)
                        .where(ScoreOutbox.status == ScoreStatus.pending)
                        .values(next_attempt_at=utcnow())
                    )
                if not send_due_scores(rt):
                    break
                passes += 1
            finished = max(arrived.values(), default=time.monotonic())

    final = {sub: (book.grade(sub) or {}).get("comment") for sub in newest}
    lost = sum(1 for sub, comment in newest.items() if final[sub] != comment)
    taken: dict[str, int] = {}
    for body in book.accepted:
        taken[body.get("comment", "")] = taken.get(body.get("comment", ""), 0) + 1
    duplicates = sum(n - 1 for n in taken.values() if n > 1)
    latencies = [arrived[c] - saved[c] for c in newest.values() if c in arrived]
    p95 = percentile(latencies, 95) if latencies else float("nan")
    rate = len(plan) / (finished - started)
    statuses: dict[int, int] = {}
    for status, _ in book.score_posts:
        statuses[status] = statuses.get(status, 0) + 1
    print(
        f"Grades: {len(plan)} grades ({len(regrade)} regrades) for {size} students, "
        f"{workers} senders, Moodle down for the first {outage_until}, database "
        f"{db_url.split(':')[0]}"
    )
    print(
        table(
            ["grades", "score POSTs", "by status", "due passes", "grades/s", "p95 s"],
            [
                [
                    str(len(plan)),
                    str(len(book.score_posts)),
                    " ".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
                    str(passes),
                    f"{rate:.1f}",
                    f"{p95:.2f}",
                ]
            ],
            text_columns=0,
        )
    )
    print(f"RESULT grades_per_s={rate:.1f} p95_s={p95:.2f} duplicates={duplicates} lost={lost}")
    return 0 if lost == 0 and duplicates == 0 else 1


class _LateApp:
    app = None

    def __call__(self, environ, start_response):  # type: ignore[no-untyped-def]
        return self.app(environ, start_response)  # type: ignore[misc]


if __name__ == "__main__":
    sys.exit(main())
