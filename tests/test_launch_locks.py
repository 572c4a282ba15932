"""Launches of one class do not queue behind each other on the course and activity rows.

On PostgreSQL a launch's course and activity come from one statement
(`lti_tool.launch_context._CONTEXT_UPSERT_PG`) that writes, and so locks until the launch commits,
a course or activity row only when the launch changes it: `INSERT … ON CONFLICT DO UPDATE`
locked both rows at every launch, and a class of 300 clicking at once was served one student
at a time. The tests that need two transactions at once run on PostgreSQL only (SQLite
serialises writers); the ones about what is stored run on both.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import OperationalError

from config.db import transaction
from grading.models import Assignment
from lti_tool import launch_context
from lti_tool.launches import AGS_CLAIM, LaunchOutcome, record_launch
from lti_tool.models import Activity, Course, Enrolment, Platform
from provisioning.models import Environment, Machine
from tests.conftest import count_rows

postgres_only = pytest.mark.skipif(
    not os.environ.get("LABPOOL_TEST_DATABASE_URL"),
    reason="needs PostgreSQL (LABPOOL_TEST_DATABASE_URL): SQLite serialises the launches",
)

CONTEXT = "locks-101"
LINK = "lab-1"
QUICK_S = 1.0  # a launch that waited for another's lock would take the full lock_timeout (2 s)


@pytest.fixture
def platform_id(rt, platform) -> int:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalars(
            select(Platform.id).where(
                Platform.issuer == platform.issuer, Platform.client_id == platform.client_id
            )
        ).one()


@pytest.fixture
def environments(rt) -> Iterator[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Two environments a deep link may name."""
    with transaction(rt.sessions) as session:
        envs = [
            Environment(name=f"locks-lab-{i}", backend="local", ide_kind="jupyterlab")
            for i in (1, 2)
        ]
        session.add_all(envs)
        session.flush()
        ids = (envs[0].id, envs[1].id)
    yield ids
    with transaction(rt.sessions) as session:  # before the shared clean-up drops activities
        session.execute(text("DELETE FROM assignments"))


def _launch(rt, platform_id: int, claims: dict[str, Any]) -> LaunchOutcome:  # type: ignore[no-untyped-def]
    with transaction(rt.sessions) as session:
        return record_launch(session, platform_id, claims)


def _course(rt) -> Course:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalars(select(Course).where(Course.context_id == CONTEXT)).one()


def _activity(rt, link: str = LINK) -> Activity:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalars(
            select(Activity)
            .join(Course, Course.id == Activity.course_id)
            .where(Course.context_id == CONTEXT, Activity.resource_link_id == link)
        ).one()


@postgres_only
def test_a_classmates_launch_does_not_wait_for_an_open_launch_of_the_same_activity(
    rt, platform, platform_id
):  # type: ignore[no-untyped-def]
    _launch(
        rt, platform_id, platform.instructor(sub="t", context_id=CONTEXT, resource_link_id=LINK)
    )

    with rt.sessions() as first, first.begin():
        a = record_launch(
            first, platform_id, platform.learner(sub="a", context_id=CONTEXT, resource_link_id=LINK)
        )  # student A's launch transaction stays open: it would hold its row locks
        started = time.monotonic()
        try:
            with rt.sessions() as second, second.begin():
                second.execute(text("SET LOCAL lock_timeout = '2s'"))
                b = record_launch(
                    second,
                    platform_id,
                    platform.learner(sub="b", context_id=CONTEXT, resource_link_id=LINK),
                )
        except OperationalError as exc:
            pytest.fail(f"student B's launch waited for student A's: {exc.orig}")
        took = time.monotonic() - started
        assert took < QUICK_S, f"student B's launch took {took:.2f} s"
    assert (b.course_id, b.activity_id) == (a.course_id, a.activity_id)
    assert a.user_id != b.user_id and a.machine and b.machine and a.machine.id != b.machine.id


@postgres_only
def test_a_first_launch_that_loses_the_race_reads_the_winners_course_and_activity(
    rt, platform, platform_id
):  # type: ignore[no-untyped-def]
    runs: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "c_new AS" in statement and threading.current_thread().name == "loser":
            runs.append(statement)

    engine = rt.sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", count)
    try:
        with rt.sessions() as winner, winner.begin():
            won = record_launch(
                winner,
                platform_id,
                platform.learner(sub="w", context_id=CONTEXT, resource_link_id=LINK),
            )
            lost: list[LaunchOutcome] = []
            loser = threading.Thread(
                name="loser",
                target=lambda: lost.append(
                    _launch(
                        rt,
                        platform_id,
                        platform.learner(sub="l", context_id=CONTEXT, resource_link_id=LINK),
                    )
                ),
            )
            loser.start()
            time.sleep(0.5)  # the loser's INSERT waits for the winner's course row
            assert loser.is_alive()
        loser.join(10)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert lost, "the losing launch failed"
    assert (lost[0].course_id, lost[0].activity_id) == (won.course_id, won.activity_id)
    assert len(runs) == 2  # its first run found no row (not in its snapshot): it ran again


def test_concurrent_first_launches_of_a_new_course_make_one_course_and_one_activity(
    rt, platform, platform_id
):  # type: ignore[no-untyped-def]
    students = 8
    start = threading.Barrier(students)

    def first_launch(i: int) -> LaunchOutcome:
        claims = platform.learner(sub=f"new-{i}", context_id=CONTEXT, resource_link_id=LINK)
        start.wait(10)
        return _launch(rt, platform_id, claims)

    with ThreadPoolExecutor(max_workers=students) as pool:
        outcomes = list(pool.map(first_launch, range(students)))
    assert len({(o.course_id, o.activity_id) for o in outcomes}) == 1
    assert len({o.machine.id for o in outcomes if o.machine}) == students
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Course)) == 1
        assert session.scalar(select(func.count()).select_from(Activity)) == 1
        assert session.scalar(select(func.count()).select_from(Enrolment)) == students


def test_a_relaunch_stores_the_changed_course_and_link_titles(rt, platform, platform_id):  # type: ignore[no-untyped-def]
    def launch(sub: str, label: str, title: str, link_title: str) -> LaunchOutcome:
        return _launch(
            rt,
            platform_id,
            platform.learner(
                sub=sub,
                context_id=CONTEXT,
                context_label=label,
                context_title=title,
                resource_link_id=LINK,
                resource_link_title=link_title,
            ),
        )

    first = launch("a", "L101", "Locks 101", "Lab 1")
    again = launch("b", "L101", "Locks 101", "Lab 1")  # nothing changes
    renamed = launch("a", "L102", "Locks, second edition", "Lab one")
    assert first.activity_id == again.activity_id == renamed.activity_id
    course, activity = _course(rt), _activity(rt)
    assert (course.label, course.title) == ("L102", "Locks, second edition")
    assert activity.title == "Lab one"


def test_what_a_later_launch_does_not_bring_is_kept(rt, platform, platform_id):  # type: ignore[no-untyped-def]
    claims = platform.learner(sub="a", context_id=CONTEXT, resource_link_id=LINK)
    _launch(rt, platform_id, claims)
    course, activity = _course(rt), _activity(rt)
    assert course.memberships_url and activity.ags_lineitems and activity.ags_scope
    kept = (course.memberships_url, activity.ags_scope, activity.ags_lineitems)

    _launch(
        rt,
        platform_id,
        platform.learner(sub="b", context_id=CONTEXT, resource_link_id=LINK, nrps=False, ags=False),
    )
    course, activity = _course(rt), _activity(rt)
    assert (course.memberships_url, activity.ags_scope, activity.ags_lineitems) == kept

    # A scope the platform changes is stored (compared as the json column's text).
    claims = platform.learner(sub="c", context_id=CONTEXT, resource_link_id=LINK)
    claims[AGS_CLAIM]["scope"] = claims[AGS_CLAIM]["scope"][:1]
    _launch(rt, platform_id, claims)
    assert _activity(rt).ags_scope == claims[AGS_CLAIM]["scope"]


def test_a_deep_links_environment_fills_a_missing_one_and_never_replaces_one(
    rt, platform, platform_id, environments
):  # type: ignore[no-untyped-def]
    first_env, second_env = environments

    def launch(sub: str, custom: dict[str, str]) -> LaunchOutcome:
        claims = platform.learner(sub=sub, context_id=CONTEXT, resource_link_id=LINK, custom=custom)
        return _launch(rt, platform_id, claims)

    plain = launch("a", {})
    assert _activity(rt).environment_id is None
    with rt.sessions() as session:
        assert session.get_one(Machine, plain.machine.id).environment_id != first_env  # type: ignore[union-attr]

    linked = launch("b", {"labpool_environment": str(first_env)})
    assert _activity(rt).environment_id == first_env
    assert linked.machine and linked.machine.environment_id == first_env  # the new one, at once

    other = launch("c", {"labpool_environment": str(second_env)})
    assert _activity(rt).environment_id == first_env
    assert other.machine and other.machine.environment_id == first_env


def test_a_deep_links_assignment_is_taken_only_from_the_same_course(
    rt, platform, platform_id, environments
):  # type: ignore[no-untyped-def]
    _launch(
        rt, platform_id, platform.instructor(sub="t", context_id=CONTEXT, resource_link_id=LINK)
    )
    _launch(
        rt, platform_id, platform.instructor(sub="t", context_id="elsewhere", resource_link_id=LINK)
    )
    with transaction(rt.sessions) as session:
        ours_activity = _activity(rt)
        theirs_activity = session.scalars(
            select(Activity)
            .join(Course, Course.id == Activity.course_id)
            .where(Course.context_id == "elsewhere")
        ).one()
        ours = Assignment(activity_id=ours_activity.id, name="hw1", title="Homework 1")
        theirs = Assignment(activity_id=theirs_activity.id, name="hw9", title="Not yours")
        session.add_all([ours, theirs])
        session.flush()
        ours_id, theirs_id = ours.id, theirs.id

    def launch(link: str, assignment_id: int) -> None:
        _launch(
            rt,
            platform_id,
            platform.learner(
                sub="a",
                context_id=CONTEXT,
                resource_link_id=link,
                custom={"labpool_assignment": str(assignment_id)},
            ),
        )

    launch("lab-2", theirs_id)
    assert _activity(rt, "lab-2").assignment_id is None
    launch("lab-2", ours_id)  # a relaunch fills it in
    assert _activity(rt, "lab-2").assignment_id == ours_id
    launch("lab-3", ours_id)
    assert _activity(rt, "lab-3").assignment_id == ours_id


@postgres_only
def test_a_launch_whose_course_cannot_be_settled_is_told_to_try_again_and_writes_nothing(
    tool, platform, rt, browser, monkeypatch
):  # type: ignore[no-untyped-def]
    # As if every attempt had lost the race for a brand-new course to another first launch.
    monkeypatch.setattr(launch_context, "CONTEXT_ATTEMPTS", 0)
    before = count_rows(rt)
    answer = platform.launch(
        browser, tool.url, platform.learner(sub="late", context_id="brand-new")
    ).launch_response
    assert answer.status_code == 503, answer.text
    assert "for the first time at once" in answer.text
    assert count_rows(rt) == before
