"""Which courses may use an environment (issue 14's admin page): open to every course (the
default, and what existing environments become) or limited to courses an admin lists. A
limited environment is hidden from other courses' teachers and refused on a forged choice,
on the class page and in deep linking; a launch onto it from another course is refused and
says why (no machine), while a machine already handed out stays. The admin page's form writes
what `labpool env courses` writes; the default environment stays open to every course."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path

import requests
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import create_engine, func, inspect, select, text

import grading.models  # noqa: F401  (every package's tables in the metadata compared)
import jwks.models  # noqa: F401
from config.db import Base, transaction
from lti_tool.cli import main
from lti_tool.launches import _environments
from lti_tool.models import Activity, Course, Enrolment, Platform, User
from migrations import alembic_config, upgrade
from provisioning.course_access import set_environment_courses
from provisioning.environments import add_environment
from provisioning.models import ClassSession, Environment, EnvironmentCourse, Machine
from provisioning.schedule import scheduled_demand
from tests.test_admin import admin_browser
from tests.test_class_aware import course_of, csrf_of, teacher_launch
from tests.test_deep_linking import open_selection
from tests.test_launch import machine_id_of

LEARNER = ["http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"]


def machines(rt) -> int:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalar(select(func.count()).select_from(Machine)) or 0


def new_environment(rt, name: str = "lab") -> int:  # type: ignore[no-untyped-def]
    with transaction(rt.sessions) as session:
        return add_environment(session, name=name).id


def access(rt, name: str) -> tuple[bool, list[int]]:  # type: ignore[no-untyped-def]
    """(limited?, the courses listed), as stored."""
    with rt.sessions() as session:
        env = session.scalars(select(Environment).where(Environment.name == name)).one()
        listed = session.scalars(
            select(EnvironmentCourse.course_id)
            .where(EnvironmentCourse.environment_id == env.id)
            .order_by(EnvironmentCourse.course_id)
        ).all()
        return env.limited_to_courses, list(listed)


def limit(rt, name: str, course_ids: list[int] | None) -> None:  # type: ignore[no-untyped-def]
    with transaction(rt.sessions) as session:
        set_environment_courses(session, name, course_ids)
    _environments.clear()  # this process's 10 s cache; the tool's own expires likewise


def other_course(rt, platform, context_id: str = "other") -> int:  # type: ignore[no-untyped-def]
    """A second course of the registered platform (as a launch from it would make it)."""
    with transaction(rt.sessions) as session:
        platform_id = session.scalars(
            select(Platform.id).where(Platform.issuer == platform.issuer)
        ).first()
        course = Course(platform_id=platform_id, context_id=context_id, title="Other course")
        session.add(course)
        session.flush()
        return course.id


def activity_of(class_url: str) -> int:
    return int(class_url.split("/activities/")[1].split("/")[0])


def choose(browser, tool, class_url: str, env_id: int) -> requests.Response:  # type: ignore[no-untyped-def]
    return browser.post(
        f"{tool.url}/activities/{activity_of(class_url)}/environment",
        data={"csrf": csrf_of(browser, class_url), "environment_id": env_id},
        allow_redirects=False,
    )


def environment_id_of(rt, activity_id: int) -> int | None:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.get_one(Activity, activity_id).environment_id


# ---------------------------------------------------------------------- the teacher's picker


def test_a_limited_environment_is_hidden_from_other_courses_and_a_forged_choice_is_refused(
    tool, platform, rt
):
    lab = new_environment(rt)
    with requests.Session() as ours, requests.Session() as theirs:
        our_class = teacher_launch(platform, tool, ours, context_id="2")
        their_class = teacher_launch(platform, tool, theirs, context_id="7")
        assert ">lab (jupyterlab" in theirs.get(their_class).text  # open to all: offered
        limit(rt, "lab", [course_of(rt, "2")])

        page = theirs.get(their_class).text
        assert ">lab (jupyterlab" not in page and "default (jupyterlab" in page
        forged = choose(theirs, tool, their_class, lab)
        assert forged.status_code == 403 and "not open to this course" in forged.text
        assert environment_id_of(rt, activity_of(their_class)) is None  # nothing written

        assert ">lab (jupyterlab" in ours.get(our_class).text
        assert choose(ours, tool, our_class, lab).status_code == 303
        assert environment_id_of(rt, activity_of(our_class)) == lab


def test_the_deep_linking_picker_lists_and_signs_only_what_the_course_may_use(
    tool, platform, rt, browser
):
    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    lab = new_environment(rt)
    retired = new_environment(rt, "old-lab")
    with transaction(rt.sessions) as session:
        session.get_one(Environment, retired).retired_at = datetime.now(UTC)
    _, page_url, page = open_selection(platform, tool, browser)
    assert ">lab (jupyterlab" in page.text and "old-lab" not in page.text
    limit(rt, "lab", [other_course(rt, platform)])

    page = browser.get(page_url)
    assert ">lab (jupyterlab" not in page.text
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    for env_id, status, why in ((lab, 403, "not open to this course"), (retired, 400, "retired")):
        refused = browser.post(page_url, data={"csrf": csrf, "environment_id": str(env_id)})
        assert refused.status_code == status and why in refused.text
        assert "JWT" not in refused.text  # nothing signed

    with rt.sessions() as session:
        ours = session.scalars(select(Course.id).where(Course.context_id != "other")).one()
    limit(rt, "lab", [ours])
    assert ">lab (jupyterlab" in browser.get(page_url).text
    answer = browser.post(page_url, data={"csrf": csrf, "environment_id": str(lab)})
    assert answer.status_code == 200 and 'name="JWT"' in answer.text


# ---------------------------------------------------------------------- launches


def test_a_launch_onto_an_environment_limited_away_is_refused_and_a_handed_out_machine_stays(
    tool, platform, rt, browser
):
    lab = new_environment(rt)
    class_url = teacher_launch(platform, tool, browser)
    assert choose(browser, tool, class_url, lab).status_code == 303
    with requests.Session() as kept:
        held = machine_id_of(
            platform.launch(kept, tool.url, platform.learner(sub="4")).launch_response
        )
        elsewhere = other_course(rt, platform)
        limited = CliRunner().invoke(main, ["env", "courses", "lab", str(elsewhere)])
        assert limited.exit_code == 0, limited.output
        assert "1 activity(ies) of other courses use it" in limited.output
        _environments.clear()

        # The student holding a machine keeps it; a new one gets none, and is told why.
        again = platform.launch(kept, tool.url, platform.learner(sub="4")).launch_response
        assert machine_id_of(again) == held
    before = machines(rt)
    with requests.Session() as newcomer:
        refused = platform.launch(newcomer, tool.url, platform.learner(sub="5")).launch_response
    assert refused.status_code == 403
    assert "not open to this course" in refused.text and "Ask your teacher" in refused.text
    assert machines(rt) == before
    # The teacher's own machine neither; the class page says why and offers others.
    mine = browser.post(
        f"{tool.url}/activities/{activity_of(class_url)}/my-machine",
        data={"csrf": csrf_of(browser, class_url)},
        allow_redirects=False,
    )
    assert mine.status_code == 403 and machines(rt) == before
    assert 'id="environment-unusable"' in browser.get(class_url).text

    # Opened to every course again (the CLI's --all), the newcomer gets a machine.
    assert CliRunner().invoke(main, ["env", "courses", "lab", "--all"]).exit_code == 0
    _environments.clear()
    with requests.Session() as newcomer:
        back = platform.launch(newcomer, tool.url, platform.learner(sub="5")).launch_response
        assert machine_id_of(back) != held
    assert 'id="environment-unusable"' not in browser.get(class_url).text


def test_a_deep_link_custom_parameter_naming_a_disallowed_environment_is_refused_at_launch(
    tool, platform, rt, browser
):
    lab = new_environment(rt)
    limit(rt, "lab", [other_course(rt, platform)])
    launch = platform.launch(
        browser,
        tool.url,
        platform.learner(sub="4", resource_link_id="81", custom={"labpool_environment": str(lab)}),
    ).launch_response
    assert launch.status_code == 403, launch.text[:300]
    assert "not open to this course" in launch.text and "administrator" in launch.text
    assert machines(rt) == 0


def test_the_schedule_warms_no_machine_for_a_course_the_environment_is_not_open_to(
    tool, platform, rt
):
    lab = new_environment(rt)
    ours = other_course(rt, platform, "ours")
    now = datetime.now(UTC).replace(hour=12)  # a class from 00:00 to 23:59 is on
    with transaction(rt.sessions) as session:
        student = User(issuer=platform.issuer, sub="schedule-student")
        session.add(student)
        session.flush()
        session.add(Enrolment(course_id=ours, user_id=student.id, roles=LEARNER))
        activity = Activity(course_id=ours, resource_link_id="class", environment_id=lab)
        session.add(activity)
        session.flush()
        session.add(
            ClassSession(
                activity_id=activity.id,
                weekday=now.weekday(),
                starts=time(0, 0),
                ends=time(23, 59),
                timezone="UTC",
                lead_minutes=10,
            )
        )
    with rt.sessions() as session:
        assert scheduled_demand(session, lab, now) == (1, True)
    limit(rt, "lab", [other_course(rt, platform)])
    with rt.sessions() as session:
        assert scheduled_demand(session, lab, now) == (0, False)
    limit(rt, "lab", [ours])
    with rt.sessions() as session:
        assert scheduled_demand(session, lab, now) == (1, True)


# ---------------------------------------------------------------------- admin page and CLI


def test_the_admin_form_writes_what_env_courses_writes(tool, platform, rt):
    for name in ("web-lab", "cli-lab"):
        new_environment(rt, name)
    first, second = other_course(rt, platform, "c1"), other_course(rt, platform, "c2")
    with rt.sessions() as session:
        web_id = session.scalar(select(Environment.id).where(Environment.name == "web-lab"))
    admin = admin_browser(tool)
    form_url = f"{tool.url}/admin/environments/{web_id}"
    form = admin.get(form_url)
    assert f'name="course_id" value="{first}"' in form.text
    csrf = form.text.split('name="csrf" value="')[1].split('"')[0]
    assert access(rt, "web-lab") == access(rt, "cli-lab") == (False, [])  # open by default

    answer = admin.post(
        f"{form_url}/courses",
        data={"csrf": csrf, "access": "listed", "course_id": [str(first), str(second)]},
    )
    assert answer.status_code == 200 and "web-lab: only for course" in answer.text
    cli = CliRunner().invoke(main, ["env", "courses", "cli-lab", str(second), str(first)])
    assert cli.exit_code == 0, cli.output
    assert access(rt, "web-lab") == access(rt, "cli-lab") == (True, sorted([first, second]))

    page = admin.get(f"{tool.url}/admin").text
    row = page.split(f'id="environment-{web_id}"')[1].split("</tr>")[0]
    assert f'Other course <span class="muted">(#{first})' in row
    with rt.sessions() as session:
        default_id = session.scalar(select(Environment.id).where(Environment.name == "default"))
    assert "every course" in page.split(f'id="environment-{default_id}"')[1].split("</tr>")[0]
    assert f'value="{first}" checked' in admin.get(form_url).text
    shown = CliRunner().invoke(main, ["env", "courses", "cli-lab"])
    assert f"only for course {first} (Other course), course {second}" in shown.output
    assert f"(only courses {first}, {second})" in CliRunner().invoke(main, ["env", "list"]).output
    listed = CliRunner().invoke(main, ["courses", "list"])
    assert listed.exit_code == 0 and f"{first}  {platform.issuer}  context c1  Other course" in (
        listed.output
    )

    answer = admin.post(f"{form_url}/courses", data={"csrf": csrf, "access": "all"})
    assert answer.status_code == 200 and "web-lab: open to every course" in answer.text
    assert CliRunner().invoke(main, ["env", "courses", "cli-lab", "--all"]).exit_code == 0
    assert access(rt, "web-lab") == access(rt, "cli-lab") == (False, [])

    # Without the session's CSRF token: refused, nothing written.
    forged = admin.post(
        f"{form_url}/courses", data={"csrf": "forged", "access": "listed", "course_id": first}
    )
    assert forged.status_code == 403 and access(rt, "web-lab") == (False, [])


def test_teachers_and_learners_get_403_on_the_admin_route_and_nothing_is_written(
    tool, platform, rt
):
    lab = new_environment(rt)
    with requests.Session() as teacher, requests.Session() as learner:
        class_url = teacher_launch(platform, tool, teacher)
        csrf = csrf_of(teacher, class_url)
        platform.launch(learner, tool.url, platform.learner(sub="4"))
        course = course_of(rt)
        for who, browser in (("teacher", teacher), ("learner", learner)):
            answer = browser.post(
                f"{tool.url}/admin/environments/{lab}/courses",
                data={"csrf": csrf, "access": "listed", "course_id": str(course)},
                allow_redirects=False,
            )
            assert answer.status_code == 403, (who, answer.status_code)
            assert "administrators" in answer.text
    assert access(rt, "lab") == (False, [])


def test_the_default_environment_cannot_be_limited(tool, platform, rt):
    course = other_course(rt, platform)
    refused = CliRunner().invoke(main, ["env", "courses", "default", str(course)])
    assert refused.exit_code == 1 and "stays open to every course" in refused.output
    with rt.sessions() as session:
        default_id = session.scalar(select(Environment.id).where(Environment.name == "default"))
    admin = admin_browser(tool)
    form = admin.get(f"{tool.url}/admin/environments/{default_id}").text
    assert 'name="course_id"' not in form  # no form to limit it
    csrf = form.split('name="csrf" value="')[1].split('"')[0]
    answer = admin.post(
        f"{tool.url}/admin/environments/{default_id}/courses",
        data={"csrf": csrf, "access": "listed", "course_id": str(course)},
    )
    assert answer.status_code == 400 and "stays open to every course" in answer.text
    assert access(rt, "default") == (False, [])


def test_unknown_courses_and_bad_input_are_refused_and_change_nothing(tool, platform, rt):
    new_environment(rt)
    course = other_course(rt, platform)
    limit(rt, "lab", [course])
    runner = CliRunner()
    for args, why in (
        (["lab", str(course), "999999"], "no course with id 999999"),
        (["lab", "99999999999999"], "no course with id 99999999999999"),
        (["nowhere", str(course)], "no environment named 'nowhere'"),
    ):
        refused = runner.invoke(main, ["env", "courses", *args])
        assert refused.exit_code == 1 and why in refused.output, refused.output
    both = runner.invoke(main, ["env", "courses", "lab", "--all", str(course)])
    assert both.exit_code == 2 and "not both" in both.output
    assert access(rt, "lab") == (True, [course])

    with rt.sessions() as session:
        lab = session.scalar(select(Environment.id).where(Environment.name == "lab"))
    admin = admin_browser(tool)
    url = f"{tool.url}/admin/environments/{lab}/courses"
    csrf = admin.get(f"{tool.url}/admin").text.split('name="csrf" value="')[1].split('"')[0]
    for data, why in (
        ({"access": "listed", "course_id": [str(course), "999999"]}, "no course with id 999999"),
        ({"access": "listed", "course_id": "99999999999"}, "no course with id 99999999999"),
        ({"access": "listed", "course_id": "1 OR 1=1"}, "must be a course"),
        ({"access": "listed"}, "name at least one course"),
        ({"access": "some"}, "every course"),
    ):
        refused = admin.post(url, data={"csrf": csrf, **data})
        assert refused.status_code == 400 and why in refused.text, (data, refused.text[:300])
    assert access(rt, "lab") == (True, [course])


# ---------------------------------------------------------------------- the migration


def test_migration_0016_upgrades_downgrades_and_matches_the_models(tmp_path: Path):
    """On SQLite with foreign keys on (as config.db opens it), with rows that refer to the
    environment: existing environments become open to every course; the downgrade keeps
    every row. (CI runs the tests on PostgreSQL, where `prepare` runs the same upgrade.)"""
    url = f"sqlite:///{tmp_path / 'migrate.db'}"
    upgrade(url, "0015")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("PRAGMA foreign_keys=ON"))
        conn.execute(
            text(
                "INSERT INTO environments (name, ide_kind, backend, idle_timeout_s, created_at, "
                "security_groups, volume_size_gb, ide_port, max_session_s, memory_mb, "
                "max_processes, max_open_files, max_file_size_mb, cpu_seconds) VALUES ('lab', "
                "'jupyterlab', 'local', 3600, '2026-01-01', '[]', 10, 8888, 60, 2048, 256, "
                "1024, 1024, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO platforms (issuer, client_id, auth_url, token_url, jwks_url, name, "
                "created_at) VALUES ('https://m', 'c', 'a', 't', 'j', '', '2026-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO courses (platform_id, context_id, label, title) "
                "VALUES (1, 'x', '', 'T')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO activities (course_id, resource_link_id, title, "
                "environment_id) VALUES (1, 'r', '', 2)"
            )
        )
    config = alembic_config(url)
    command.upgrade(config, "head")
    with engine.begin() as conn:
        assert conn.execute(
            text("SELECT name, limited_to_courses FROM environments ORDER BY id")
        ).all() == [("default", 0), ("lab", 0)]
        conn.execute(text("INSERT INTO environment_courses VALUES (2, 1)"))
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    command.downgrade(config, "0015")
    assert "environment_courses" not in inspect(engine).get_table_names()
    assert "limited_to_courses" not in {
        c["name"] for c in inspect(engine).get_columns("environments")
    }
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM activities")).scalar_one() == 1
    command.upgrade(config, "head")
    engine.dispose()
