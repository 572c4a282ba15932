"""Roster benchmark: sync a 5,000-member course roster from a fake Moodle in pages of 100.

    .venv/bin/python bench/roster.py [--quick | --smoke] [--db postgres|sqlite]

The fake Moodle (tests/fakeplatform/) serves its token endpoint and the NRPS memberships
endpoint over HTTP, paging like Moodle (`limit`/`from`, `Link: rel="next"`); the tool's JWKS
(for the client assertion) is served by the tool's own app on loopback. Labpool's real code
runs unchanged: `lti_tool.services.nrps.sync_course` (pylti1p3's ServiceConnector and NRPS service,
the Redis-cached access token, batched upserts). Measured: a first sync (everyone new), a
second one (nothing changed), and a third after 10% left and 10% joined; wall time, pages,
and database statements (counted on the engine).

Target: ≤ 5 s for 5,000 members. Ends with `RESULT seconds=… queries=…` (the first sync).
`--quick`: 1,000 members; `--smoke` (what `.ci/run` runs): 250 members, three pages, the same
code path in a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import event, select  # noqa: E402

from bench.launch import (  # noqa: E402
    DEFAULT_POSTGRES,
    RedisCleaner,
    in_schema,
    postgres_reachable,
    reset_schema,
    size_mode,
    table,
)
from tests.fakeplatform import FakePlatform, ServedApp  # noqa: E402

SCHEMA = "labpool_bench_roster"
REDIS_URL = "redis://127.0.0.1:6379/14"
SIZES = {"smoke": 250, "quick": 1000, "full": 5000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_group = parser.add_mutually_exclusive_group()
    size_group.add_argument("--quick", action="store_true", help="1,000 members instead of 5,000")
    size_group.add_argument(
        "--smoke",
        action="store_true",
        help="250 members, a few seconds: does the benchmark still run (CI)",
    )
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES,
        help="database in which the benchmark owns the schema " + SCHEMA,
    )
    parser.add_argument(
        "--redis-url",
        default=REDIS_URL,
        help="db 14 is flushed at start and end; another loses only the benchmark's own keys",
    )
    args = parser.parse_args(argv)
    size = SIZES[size_mode(args)]

    with tempfile.TemporaryDirectory(prefix="labpool-roster-") as tmp:
        if args.db == "postgres" and postgres_reachable(args.postgres_url):
            reset_schema(args.postgres_url, SCHEMA)
            db_url = in_schema(args.postgres_url, SCHEMA)
        else:
            db_url = f"sqlite:///{tmp}/labpool.db"
        cleaner = RedisCleaner(args.redis_url)
        cleaner.clean()
        try:
            return _run(size, db_url, Path(tmp), args.redis_url)
        finally:
            cleaner.clean()
            if db_url.startswith("postgresql"):
                reset_schema(args.postgres_url, SCHEMA, create=False)


def _run(size: int, db_url: str, data_dir: Path, redis_url: str) -> int:
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
        from config.db import engine_for, transaction
        from config.settings import load_settings
        from lti_tool.models import Course, Enrolment
        from lti_tool.registrations import register_platform
        from lti_tool.services.nrps import sync_course
        from lti_tool.startup import prepare
        from lti_tool.web.app import create_app

        rt = prepare(load_settings())
        holder.app = create_app(rt.settings)
        with FakePlatform(tool_url=tool.url) as moodle:
            moodle.tool_jwks_url = f"{tool.url}/lti/jwks.json"
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
                course = Course(
                    platform_id=platform.id,
                    context_id="2",
                    memberships_url=moodle.memberships_url("2"),
                )
                session.add(course)
                session.flush()
                course_id = course.id

            statements = [0]
            engine = engine_for(rt.settings.database_url)
            event.listen(
                engine,
                "before_cursor_execute",
                lambda *a, **k: statements.__setitem__(0, statements[0] + 1),
            )

            def members(ids: range) -> list[dict]:
                return [
                    moodle.member(str(i), name=f"Student {i}", email=f"s{i}@example.edu")
                    for i in ids
                ]

            rows = []
            scenarios = [
                ("first sync (all new)", range(size)),
                ("same roster again", range(size)),
                ("10% left, 10% joined", range(size // 10, size + size // 10)),
            ]
            first = None
            for name, ids in scenarios:
                moodle.set_roster("2", members(ids))
                statements[0] = 0
                started = time.perf_counter()
                report = sync_course(rt, course_id)
                seconds = time.perf_counter() - started
                rows.append(
                    [
                        name,
                        str(report.members),
                        str(report.pages),
                        str(report.ended),
                        f"{seconds:.2f}",
                        str(statements[0]),
                    ]
                )
                first = first or (seconds, statements[0])

            with rt.sessions() as session:
                current = len(
                    session.scalars(
                        select(Enrolment.id).where(
                            Enrolment.course_id == course_id, Enrolment.ended_at.is_(None)
                        )
                    ).all()
                )
    expected = size
    if current != expected:
        print(f"ERROR: {current} current enrolments, expected {expected}", file=sys.stderr)
        return 1
    print(f"Roster sync: {size} members, pages of 100, database {db_url.split(':')[0]}")
    print(
        table(
            ["scenario", "members", "pages", "ended", "seconds", "db statements"],
            rows,
            text_columns=1,
        )
    )
    assert first is not None
    print(f"RESULT seconds={first[0]:.3f} queries={first[1]}")
    return 0


class _LateApp:
    app = None

    def __call__(self, environ, start_response):  # type: ignore[no-untyped-def]
        return self.app(environ, start_response)  # type: ignore[misc]


if __name__ == "__main__":
    sys.exit(main())
