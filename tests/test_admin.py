"""The admin page (issue 14 item 2): who may open it (an admin-role launch, an admin token;
a teacher or learner gets 403 on every route), CSRF on every POST, and every action writing
what its CLI twin writes (compared in the database after each)."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from itsdangerous import URLSafeSerializer
from sqlalchemy import func, select, update

from config.db import transaction
from config.runtime import Runtime
from grading.grades import record_grade
from grading.models import Assignment, ScoreOutbox, ScoreStatus
from jwks.models import ToolKey
from lti_tool.admin import TOKEN_SALT, make_admin_token
from lti_tool.cli import main
from lti_tool.models import Activity, Course, Launch, Platform, User
from provisioning.claiming import claim_warm_machine
from provisioning.environments import add_secured_environment
from provisioning.jobs import stop_machine_now
from provisioning.models import Environment, Machine, MachineState, Pool
from tests.fakeplatform import FakePlatform
from tests.test_fleet import crt  # noqa: F401  (the fixture: the runtime on the fake cloud)

S = MachineState
ADMIN_ROLES = [
    "http://purl.imsglobal.org/vocab/lis/v2/system/person#Administrator",
    "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator",
    "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor",
]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')

# Every admin route, GET and POST (ids filled in per test).
GET_ROUTES = ["/admin", "/admin/platforms/{p}/remove", "/admin/environments/{e}"]
POST_ROUTES = [
    "/admin/platforms/{p}/disable",
    "/admin/platforms/{p}/enable",
    "/admin/platforms/{p}/remove",
    "/admin/keys/rotate",
    "/admin/registration-link",
    "/admin/environments",
    "/admin/environments/{e}",
    "/admin/environments/{e}/courses",
    "/admin/scores/{s}/send",
]


def launch(platform: FakePlatform, tool, claims: dict) -> requests.Session:  # type: ignore[no-untyped-def]
    browser = requests.Session()
    response = platform.launch(browser, tool.url, claims).launch_response
    assert response.status_code == 303, response.text[:300]
    browser.last_location = tool.url + response.headers["Location"]  # type: ignore[attr-defined]
    return browser


def admin_browser(tool) -> requests.Session:  # type: ignore[no-untyped-def]
    """A browser that opened a fresh `labpool admin-token` link."""
    out = CliRunner().invoke(main, ["admin-token", "--expires", "10m"])
    assert out.exit_code == 0, out.output
    url = out.stdout.strip().splitlines()[0]
    browser = requests.Session()
    opened = browser.get(url, allow_redirects=False)
    assert opened.status_code == 303 and opened.headers["Location"].endswith("/admin")
    return browser


def csrf_of(browser: requests.Session, url: str) -> str:
    page = browser.get(url)
    assert page.status_code == 200, page.text[:300]
    found = CSRF.search(page.text)
    assert found
    return found.group(1)


def platform_row(rt: Runtime, issuer: str) -> Platform:
    with rt.sessions() as session:
        platform = session.scalars(select(Platform).where(Platform.issuer == issuer)).one()
        session.expunge(platform)
        return platform


def env_columns(rt: Runtime, name: str) -> dict[str, Any]:
    """An environment and its pool as stored, minus what differs by nature (ids, name)."""
    with rt.sessions() as session:
        env = session.scalars(select(Environment).where(Environment.name == name)).one()
        pool = session.scalars(select(Pool).where(Pool.environment_id == env.id)).first()
        columns = {
            c: getattr(env, c)
            for c in (col.key for col in Environment.__table__.columns)
            if c not in ("id", "name", "created_at", "security_groups")
        }
        if pool is not None:
            columns.update(warm_target=pool.warm_target, max_size=pool.max_size)
        return columns


def count(rt: Runtime, model: type, *where: Any) -> int:
    with rt.sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


# ----------------------------------------------------------------------------------------


def test_teachers_learners_and_strangers_get_403_on_every_admin_route(tool, platform, rt):
    teacher = launch(platform, tool, platform.instructor(sub="3"))
    learner = launch(platform, tool, platform.learner(sub="4"))
    teacher_csrf = csrf_of(teacher, teacher.last_location)  # type: ignore[attr-defined]
    stranger = requests.Session()
    p = platform_row(rt, platform.issuer)
    with rt.sessions() as session:
        e = session.scalar(select(Environment.id).where(Environment.name == "default"))
    ids = {"p": p.id, "e": e, "s": 1}
    keys_before = count(rt, ToolKey)
    for who, browser, csrf in (
        ("teacher", teacher, teacher_csrf),
        ("learner", learner, ""),
        ("stranger", stranger, ""),
    ):
        for route in GET_ROUTES:
            answer = browser.get(tool.url + route.format(**ids))
            assert answer.status_code == 403, (who, route, answer.status_code)
            assert "administrators" in answer.text
        for route in POST_ROUTES:
            answer = browser.post(
                tool.url + route.format(**ids),
                data={"csrf": csrf, "confirm": "remove", "name": "x", "idle_timeout_s": "600"},
                allow_redirects=False,
            )
            assert answer.status_code == 403, (who, route, answer.status_code)
    # Nothing changed: the platform is there and enabled, no key rotated, no environment.
    assert platform_row(rt, platform.issuer).disabled_at is None
    assert count(rt, ToolKey) == keys_before
    assert count(rt, Environment, Environment.name == "x") == 0
    assert env_columns(rt, "default")["idle_timeout_s"] != 600


def test_an_administrator_launch_opens_the_admin_page(tool, platform, rt):
    teacher = launch(platform, tool, platform.instructor(sub="3"))
    assert teacher.get(f"{tool.url}/admin").status_code == 403  # Instructor alone: no
    admin = launch(platform, tool, platform.instructor(sub="2", roles=ADMIN_ROLES))
    page = admin.get(f"{tool.url}/admin")
    assert page.status_code == 200
    assert platform.issuer in page.text and "Environments" in page.text
    # A later launch as a mere teacher in the same browser ends the admin session.
    again = launch(platform, tool, platform.instructor(sub="3"))
    assert again.get(f"{tool.url}/admin").status_code == 403


def test_the_admin_token_opens_once_and_expired_or_forged_ones_are_refused(tool, rt, caplog):
    caplog.set_level("INFO")
    admin = admin_browser(tool)
    assert admin.get(f"{tool.url}/admin").status_code == 200

    settings = rt.settings
    fresh = make_admin_token(settings, 600)
    assert requests.get(f"{tool.url}/admin/token/{fresh}", allow_redirects=False).status_code == 303
    used = requests.get(f"{tool.url}/admin/token/{fresh}", allow_redirects=False)
    assert used.status_code == 403 and "used already" in used.text

    expired = make_admin_token(settings, 60, now=time.time() - 120)
    answer = requests.get(f"{tool.url}/admin/token/{expired}", allow_redirects=False)
    assert answer.status_code == 403 and "expired" in answer.text

    forged = URLSafeSerializer("not-the-secret", salt=TOKEN_SALT).dumps(
        {"exp": int(time.time()) + 600, "n": "x"}
    )
    tampered = fresh[:-3] + ("AAA" if not fresh.endswith("AAA") else "BBB")
    for bad in (forged, tampered, "nonsense"):
        stranger = requests.Session()
        answer = stranger.get(f"{tool.url}/admin/token/{bad}", allow_redirects=False)
        assert answer.status_code == 403 and "not valid" in answer.text
        assert stranger.get(f"{tool.url}/admin").status_code == 403

    too_long = CliRunner().invoke(main, ["admin-token", "--expires", "30d"])
    assert too_long.exit_code != 0 and "7 days" in too_long.output
    # Refused links are logged by their route, never with the token (was: the refusal's line).
    assert "/admin/token/<token>" in caplog.text
    for token in (fresh, expired, forged, tampered):
        assert token not in caplog.text


def test_every_post_needs_the_sessions_csrf_token(tool, platform, rt):
    admin = admin_browser(tool)
    p = platform_row(rt, platform.issuer)
    url = f"{tool.url}/admin/platforms/{p.id}/disable"
    for data in ({}, {"csrf": "forged"}):
        answer = admin.post(url, data=data, allow_redirects=False)
        assert answer.status_code == 403 and "out of date" in answer.text
    assert platform_row(rt, platform.issuer).disabled_at is None
    keys = count(rt, ToolKey)
    assert admin.post(f"{tool.url}/admin/keys/rotate", data={}).status_code == 403
    assert count(rt, ToolKey) == keys


def test_disable_and_enable_write_what_the_cli_writes(tool, platform, rt):
    admin = admin_browser(tool)
    csrf = csrf_of(admin, f"{tool.url}/admin")
    runner = CliRunner()
    p = platform_row(rt, platform.issuer)
    try:
        done = admin.post(f"{tool.url}/admin/platforms/{p.id}/disable", data={"csrf": csrf})
        assert done.status_code == 200 and "disabled" in done.text
        by_web = platform_row(rt, platform.issuer).disabled_at
        assert by_web is not None
        assert (
            runner.invoke(main, ["platform", "enable", "--issuer", platform.issuer]).exit_code == 0
        )
        assert platform_row(rt, platform.issuer).disabled_at is None
        assert (
            runner.invoke(main, ["platform", "disable", "--issuer", platform.issuer]).exit_code == 0
        )
        assert platform_row(rt, platform.issuer).disabled_at is not None
        admin.post(f"{tool.url}/admin/platforms/{p.id}/enable", data={"csrf": csrf})
        assert platform_row(rt, platform.issuer).disabled_at is None  # as `platform enable`
    finally:
        runner.invoke(main, ["platform", "enable", "--issuer", platform.issuer])


def _launched_platform(tool, rt, namespace: str) -> FakePlatform:  # type: ignore[no-untyped-def]
    moodle = FakePlatform(tool_url=tool.url, key_namespace=namespace).start()
    assert CliRunner().invoke(main, moodle.platform_add_argv()).exit_code == 0
    launch(moodle, tool, moodle.instructor(sub="3"))
    with transaction(rt.sessions) as session:
        activity = session.scalars(
            select(Activity)
            .join(Course, Course.id == Activity.course_id)
            .join(Platform, Platform.id == Course.platform_id)
            .where(Platform.issuer == moodle.issuer)
        ).one()
        session.add(Assignment(activity_id=activity.id, name="lab1", title="Lab 1"))
    return moodle


def test_removal_shows_its_counts_then_removes_what_the_cli_removes(tool, rt):
    admin = admin_browser(tool)
    web_moodle = _launched_platform(tool, rt, "admin-web-remove")
    cli_moodle = _launched_platform(tool, rt, "admin-cli-remove")
    try:
        before = {"courses": count(rt, Course), "launches": count(rt, Launch)}
        before["assignments"] = count(rt, Assignment)
        p = platform_row(rt, web_moodle.issuer)
        confirm = admin.get(f"{tool.url}/admin/platforms/{p.id}/remove")
        assert confirm.status_code == 200
        counts = confirm.text.split('id="removal-counts"')[1].split("</ul>")[0]
        assert "1 course(s)" in counts and "1 assignment(s)" in counts
        assert count(rt, Course) == before["courses"]  # the confirmation changed nothing
        csrf = CSRF.search(confirm.text).group(1)  # type: ignore[union-attr]
        unticked = admin.post(f"{tool.url}/admin/platforms/{p.id}/remove", data={"csrf": csrf})
        assert unticked.status_code == 400 and count(rt, Platform, Platform.id == p.id) == 1

        removed = admin.post(
            f"{tool.url}/admin/platforms/{p.id}/remove", data={"csrf": csrf, "confirm": "remove"}
        )
        assert removed.status_code == 200 and "Removed" in removed.text
        after_web = {
            "courses": count(rt, Course),
            "launches": count(rt, Launch),
            "assignments": count(rt, Assignment),
        }
        cli = CliRunner().invoke(main, ["platform", "remove", "--issuer", cli_moodle.issuer])
        assert cli.exit_code == 0, cli.output
        after_cli = {
            "courses": count(rt, Course),
            "launches": count(rt, Launch),
            "assignments": count(rt, Assignment),
        }
        # Each removal took one platform's course, launch and assignment: the same rows.
        assert {k: before[k] - after_web[k] for k in before} == {k: 1 for k in before}
        assert {k: after_web[k] - after_cli[k] for k in before} == {k: 1 for k in before}
        assert count(rt, Platform, Platform.issuer.in_([web_moodle.issuer, cli_moodle.issuer])) == 0
    finally:
        web_moodle.stop()
        cli_moodle.stop()


def key_states(rt: Runtime) -> list[tuple[str, str, bool]]:
    with rt.sessions() as session:
        return [
            (k.kid, k.state.value, k.expires_at is not None)
            for k in session.scalars(select(ToolKey).order_by(ToolKey.id))
        ]


def test_rotating_the_key_writes_what_keys_rotate_writes(tool, rt):
    admin = admin_browser(tool)
    csrf = csrf_of(admin, f"{tool.url}/admin")

    def rotation(before: list, after: list) -> list[tuple[str, str]]:
        """The change of each key's state, and the new key's."""
        old = {kid: (state, exp) for kid, state, exp in before}
        return [
            (old.get(kid, ("new", False))[0] + "→" + state, str(exp))
            for kid, state, exp in after
            if old.get(kid) != (state, exp)
        ]

    before = key_states(rt)
    assert admin.post(f"{tool.url}/admin/keys/rotate", data={"csrf": csrf}).status_code == 200
    by_web = rotation(before, key_states(rt))
    middle = key_states(rt)
    assert CliRunner().invoke(main, ["keys", "rotate"]).exit_code == 0
    by_cli = rotation(middle, key_states(rt))
    assert by_web == by_cli
    assert sorted(by_web) == sorted(
        [("active→retired", "True"), ("next→active", "False"), ("new→next", "False")]
    )


def test_environment_add_and_edit_write_what_env_add_and_env_edit_write(tool, rt):
    admin = admin_browser(tool)
    csrf = csrf_of(admin, f"{tool.url}/admin")
    web_name, cli_name = f"web-{uuid.uuid4().hex[:6]}", f"cli-{uuid.uuid4().hex[:6]}"
    added = admin.post(
        f"{tool.url}/admin/environments",
        data={"csrf": csrf, "name": web_name, "backend": "local", "memory_mb": "1024"},
    )
    assert added.status_code == 200 and web_name in added.text
    cli = CliRunner().invoke(main, ["env", "add", cli_name, "--memory-mb", "1024"])
    assert cli.exit_code == 0, cli.output
    assert env_columns(rt, web_name) == env_columns(rt, cli_name)

    with rt.sessions() as session:
        web_id = session.scalar(select(Environment.id).where(Environment.name == web_name))
    form = admin.get(f"{tool.url}/admin/environments/{web_id}")
    assert form.status_code == 200 and 'name="image_id"' not in form.text  # local: no image
    edited = admin.post(
        f"{tool.url}/admin/environments/{web_id}",
        data={"csrf": csrf, "idle_timeout_s": "900", "max_processes": "128", "cpu_seconds": ""},
    )
    assert edited.status_code == 200 and "changed" in edited.text
    cli = CliRunner().invoke(
        main, ["env", "edit", cli_name, "--idle-timeout", "900", "--max-processes", "128"]
    )
    assert cli.exit_code == 0, cli.output
    assert env_columns(rt, web_name) == env_columns(rt, cli_name)
    assert env_columns(rt, web_name)["idle_timeout_s"] == 900

    # Bad input: a clear error, nothing changed (the web and the CLI say the same).
    kept = env_columns(rt, web_name)
    for data, says in (
        ({"idle_timeout_s": "5"}, "at least 60"),
        ({"memory_mb": "100"}, "memory-mb must be 0"),
        ({"warm_target": "2"}, "has no pool"),
        ({"image_id": "img"}, "boots no image"),
        ({"max_processes": "many"}, "whole number"),
    ):
        answer = admin.post(f"{tool.url}/admin/environments/{web_id}", data={"csrf": csrf, **data})
        assert answer.status_code == 400 and says in answer.text, (data, answer.text[:300])
    assert env_columns(rt, web_name) == kept
    refused = CliRunner().invoke(main, ["env", "edit", cli_name, "--idle-timeout", "5"])
    assert refused.exit_code != 0 and "at least 60" in refused.output
    unknown = CliRunner().invoke(main, ["env", "edit", "nowhere", "--idle-timeout", "600"])
    assert unknown.exit_code != 0 and "no environment named" in unknown.output


def _failed_score(rt: Runtime, activity_id: int, issuer: str, sub: str) -> int:
    with transaction(rt.sessions) as session:
        assignment = session.scalars(
            select(Assignment).where(Assignment.activity_id == activity_id)
        ).first()
        if assignment is None:
            assignment = Assignment(activity_id=activity_id, name="lab1", title="Lab 1")
            session.add(assignment)
            session.flush()
        student = User(issuer=issuer, sub=sub)
        session.add(student)
        session.flush()
        row = record_grade(session, assignment, student.id, 7, "well done")
        row.status, row.last_error, row.attempts = ScoreStatus.failed, "Moodle said no", 5
        session.flush()
        return row.id


def outbox_rows(rt: Runtime, user_id: int) -> list[tuple[str, float, str, int]]:
    with rt.sessions() as session:
        return [
            (r.status.value, r.score_given, r.comment, r.attempts)
            for r in session.scalars(
                select(ScoreOutbox).where(ScoreOutbox.user_id == user_id).order_by(ScoreOutbox.id)
            )
        ]


def test_send_again_writes_what_scores_send_again_writes_and_failures_are_listed(
    tool, platform, rt
):
    teacher = launch(platform, tool, platform.instructor(sub="3"))
    activity_id = int(teacher.last_location.split("/activities/")[1].split("/")[0])  # type: ignore[attr-defined]
    web_row = _failed_score(rt, activity_id, platform.issuer, "41")
    cli_row = _failed_score(rt, activity_id, platform.issuer, "42")
    with transaction(rt.sessions) as session:
        session.execute(
            update(Course).values(
                platform_error="roster: Moodle answered 500", platform_error_at=func.now()
            )
        )
    admin = admin_browser(tool)
    page = admin.get(f"{tool.url}/admin")
    assert "Moodle said no" in page.text and "roster: Moodle answered 500" in page.text
    csrf = CSRF.search(page.text).group(1)  # type: ignore[union-attr]

    sent = admin.post(f"{tool.url}/admin/scores/{web_row}/send", data={"csrf": csrf})
    assert sent.status_code == 200 and "owed again" in sent.text
    cli = CliRunner().invoke(main, ["scores", "send-again", str(cli_row)])
    assert cli.exit_code == 0, cli.output
    with rt.sessions() as session:
        web_user = session.get_one(ScoreOutbox, web_row).user_id
        cli_user = session.get_one(ScoreOutbox, cli_row).user_id
    assert outbox_rows(rt, web_user) == outbox_rows(rt, cli_user)
    assert outbox_rows(rt, web_user) == [
        ("superseded", 7.0, "well done", 5),
        ("pending", 7.0, "well done", 0),
    ]

    # Not a failed row any more: refused, nothing written.
    again = admin.post(f"{tool.url}/admin/scores/{web_row}/send", data={"csrf": csrf})
    assert again.status_code == 400 and "not a failed score" in again.text
    assert len(outbox_rows(rt, web_user)) == 2


def test_a_registration_link_from_the_admin_page_is_a_working_one_time_link(tool, rt):
    admin = admin_browser(tool)
    csrf = csrf_of(admin, f"{tool.url}/admin")
    page = admin.post(f"{tool.url}/admin/registration-link", data={"csrf": csrf})
    assert page.status_code == 200
    link = re.search(r"<code>(http[^<]+/lti/register/[^<]+)</code>", page.text)
    assert link is not None
    # Opened without Moodle's parameters it is refused as incomplete, not as unknown.
    answer = requests.get(link.group(1))
    assert answer.status_code != 404, answer.text[:300]


# ----------------------------------------------------------------------------------------
# Rolling a pool onto a new image: the real reconciler against the fake cloud.


def machines(rt: Runtime, env_id: int) -> list[tuple[int, str, int | None, str | None]]:
    with rt.sessions() as session:
        return [
            (m.id, m.state.value, m.owner_id, (m.backend_ref or {}).get("image_id"))
            for m in session.scalars(
                select(Machine).where(Machine.environment_id == env_id).order_by(Machine.id)
            )
        ]


def servers_by_image(cloud) -> dict[str, int]:  # type: ignore[no-untyped-def]
    found: dict[str, int] = {}
    for server in cloud.servers():
        if server["status"] != "DELETED":
            image = (server.get("image") or {}).get("id", "?")
            found[image] = found.get(image, 0) + 1
    return found


def passes_until(rt: Runtime, pool_id: int, done, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    from provisioning.reconciler import reconcile_pool

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reconcile_pool(rt, pool_id)
        if done():
            return
        time.sleep(0.1)
    raise AssertionError("the reconciler did not get there in time")


@pytest.mark.fake_cloud(boot_time=0.2, max_instances=20, ide="stub", enforce_security_groups=True)
def test_a_new_image_rolls_warm_machines_now_and_a_students_when_released(tool, crt, cloud):  # noqa: F811
    name, _, _ = add_secured_environment(
        crt.sessions,
        crt.settings,
        name=f"roll-{uuid.uuid4().hex[:6]}",
        backend="openstack",
        image_id="img-old",
        flavor_id="m1.small",
        network_id="net-private",
        warm_target=2,
        max_size=10,
    )
    with crt.sessions() as session:
        env_id = session.scalar(select(Environment.id).where(Environment.name == name))
        pool_id = session.scalar(select(Pool.id).where(Pool.environment_id == env_id))

    def ready_warm(image: str) -> bool:
        return (
            sum(
                1
                for _, s, o, i in machines(crt, env_id)
                if s == "ready" and o is None and i == image
            )
            == 2
        )

    passes_until(crt, pool_id, lambda: ready_warm("img-old"))
    with transaction(crt.sessions) as session:
        student = User(issuer="https://moodle.test", sub=uuid.uuid4().hex)
        platform = Platform(
            issuer=f"https://roll-{uuid.uuid4().hex[:6]}.test",
            client_id="c",
            auth_url="x",
            token_url="x",
            jwks_url="x",
        )
        session.add_all([student, platform])
        session.flush()
        course = Course(platform_id=platform.id, context_id="roll")
        session.add(course)
        session.flush()
        claimed = claim_warm_machine(session, env_id, course.id, student.id)
        assert claimed is not None
        students_machine = claimed.id
    passes_until(crt, pool_id, lambda: ready_warm("img-old"))

    admin = admin_browser(tool)
    csrf = csrf_of(admin, f"{tool.url}/admin")
    form = admin.get(f"{tool.url}/admin/environments/{env_id}")
    assert 'name="image_id"' in form.text and "img-old" in form.text
    edited = admin.post(
        f"{tool.url}/admin/environments/{env_id}", data={"csrf": csrf, "image_id": "img-new"}
    )
    assert edited.status_code == 200
    assert "2 warm machine(s) replaced now, 1 student machine(s) when released" in edited.text
    assert "Rolling: 3 machine(s)" in admin.get(f"{tool.url}/admin").text

    # Warm machines are replaced; the student's stays assigned, on the old image.
    passes_until(
        crt,
        pool_id,
        lambda: ready_warm("img-new") and servers_by_image(cloud) == {"img-new": 2, "img-old": 1},
    )
    assert (students_machine, "assigned") in [(m, s) for m, s, _, _ in machines(crt, env_id)]

    # Released, it is stopped (never reused): the pool is all on the new image.
    assert stop_machine_now(crt, students_machine, only_if=S.assigned) == "stopped"
    passes_until(crt, pool_id, lambda: servers_by_image(cloud) == {"img-new": 2})
    live = [m for m in machines(crt, env_id) if m[1] not in ("stopped", "error")]
    assert all(image == "img-new" for _, _, _, image in live) and len(live) == 2
    assert "Rolling" not in admin.get(f"{tool.url}/admin").text


def test_retire_and_restore_write_what_env_retire_and_env_restore_write(tool, rt):
    admin = admin_browser(tool)
    csrf = csrf_of(admin, f"{tool.url}/admin")
    web_name, cli_name = f"web-{uuid.uuid4().hex[:6]}", f"cli-{uuid.uuid4().hex[:6]}"
    for name in (web_name, cli_name):
        assert CliRunner().invoke(main, ["env", "add", name]).exit_code == 0
    with rt.sessions() as session:
        web_id = session.scalar(select(Environment.id).where(Environment.name == web_name))
        default_id = session.scalar(select(Environment.id).where(Environment.name == "default"))

    def retired(name: str) -> bool:
        with rt.sessions() as session:
            return (
                session.scalars(
                    select(Environment.retired_at).where(Environment.name == name)
                ).one()
                is not None
            )

    answer = admin.post(
        f"{tool.url}/admin/environments/{web_id}/retire", data={"csrf": csrf, "retired": "1"}
    )
    assert answer.status_code == 200 and "retired" in answer.text
    assert CliRunner().invoke(main, ["env", "retire", cli_name]).exit_code == 0
    assert retired(web_name) and retired(cli_name)
    admin.post(
        f"{tool.url}/admin/environments/{web_id}/retire", data={"csrf": csrf, "retired": "0"}
    )
    assert CliRunner().invoke(main, ["env", "restore", cli_name]).exit_code == 0
    assert not retired(web_name) and not retired(cli_name)
    refused = admin.post(
        f"{tool.url}/admin/environments/{default_id}/retire", data={"csrf": csrf, "retired": "1"}
    )
    assert refused.status_code == 400 and "cannot be retired" in refused.text
    assert not retired("default")
