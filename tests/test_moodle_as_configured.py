"""Labpool in a Moodle as admins actually configure it (issue 8): two tool types on one site,
site admins who are not enrolled, the activity inside Moodle's frame, privacy settings that
share no names, and pages no cache keeps."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
import requests
from flask import Flask
from sqlalchemy import delete, select, update

from config.db import transaction, utcnow
from config.runtime import Runtime
from lti_tool.framing import forget_platform_origins, frame_ancestors, origin_of
from lti_tool.models import Course, Enrolment, Launch, Platform, User
from lti_tool.names import short_labels
from lti_tool.services.nrps import RosterError, sync_course
from lti_tool.web.cookies import LabpoolCookieService
from provisioning.backends import backend_for
from provisioning.cloud_init import cloud_config
from provisioning.ide_config import jupyter_server_config
from provisioning.models import Environment
from provisioning.schedule import class_size
from tests.conftest import register_fake_platform
from tests.fakeplatform import (
    ROLE_INSTITUTION_ADMIN,
    ROLE_INSTRUCTOR,
    ROLE_SYSTEM_ADMIN,
    FakePlatform,
)
from tests.test_launch import machine_id_of

MOODLE_ADMIN_ROLES = [ROLE_SYSTEM_ADMIN, ROLE_INSTITUTION_ADMIN, ROLE_INSTRUCTOR]
LABEL = re.compile(r"(Student|Teacher) [0-9a-f]{4}([0-9a-f]{4})?")


@pytest.fixture
def second_tool_type(tool, platform: FakePlatform, rt: Runtime) -> Iterator[FakePlatform]:
    """The same Moodle site with Labpool configured a second time (own client id, type 2),
    registered in the tool; removed again afterwards (with its courses)."""
    other = platform.add_tool_type(deployment_id="2")
    register_fake_platform(rt, other)
    yield other
    with transaction(rt.sessions) as session:
        session.execute(delete(Platform).where(Platform.client_id == other.client_id))


def launch_to(platform: FakePlatform, tool, session: requests.Session, claims: dict) -> str:
    """Launch and return where the tool sent the browser (absolute URL)."""
    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    response = platform.launch(session, tool.url, claims).launch_response
    assert response.status_code == 303, response.text[:500]
    return tool.url + response.headers["Location"]


def course_id_of(rt: Runtime, platform: FakePlatform, context_id: str = "2") -> int:
    with rt.sessions() as session:
        return session.scalars(
            select(Course.id)
            .join(Platform, Platform.id == Course.platform_id)
            .where(Platform.client_id == platform.client_id, Course.context_id == context_id)
        ).one()


def forget_access_tokens(rt: Runtime) -> None:
    for key in rt.redis.scan_iter("labpool:access-token:*"):
        rt.redis.delete(key)


# --- 1. access tokens per (issuer, client id) -------------------------------------------


def test_a_token_of_another_tool_type_is_refused_by_the_fake_moodle(platform, second_tool_type):
    platform.set_roster("2", [platform.member("4")])
    token = platform.issue_token(
        ["https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"]
    )
    headers = {"Authorization": f"Bearer {token}"}
    assert (
        requests.get(platform.memberships_url("2"), headers=headers, timeout=5).status_code == 200
    )
    assert (
        requests.get(second_tool_type.memberships_url("2"), headers=headers, timeout=5).status_code
        == 401
    )


def test_two_client_ids_on_one_issuer_each_sync_with_their_own_token(
    tool, platform, second_tool_type, rt
):
    with requests.Session() as a, requests.Session() as b:
        launch_to(platform, tool, a, platform.instructor(sub="3"))
        launch_to(second_tool_type, tool, b, second_tool_type.instructor(sub="3"))
    first, second = course_id_of(rt, platform), course_id_of(rt, second_tool_type)
    assert first != second
    platform.set_roster("2", [platform.member("3", role="Instructor"), platform.member("40")])
    forget_access_tokens(rt)
    issued, calls = platform.tokens_issued, len(platform.service_calls)

    for _ in range(2):  # in turn, twice: the second round reuses each client's cached token
        assert sync_course(rt, first).members == 2
        assert sync_course(rt, second).members == 2

    assert platform.tokens_issued == issued + 2  # one per client id, each cached
    made = platform.service_calls[calls:]
    assert [c["status"] for c in made] == [200] * 4
    owner = {
        platform.deployment_id: platform.client_id,
        second_tool_type.deployment_id: second_tool_type.client_id,
    }
    assert all(c["token_client_id"] == owner[c["type_id"]] for c in made)
    assert {c["type_id"] for c in made} == set(owner)


# --- 2. platform-call failures where the teacher looks ------------------------------------


def test_a_failed_sync_is_shown_on_the_class_page_and_cleared_by_the_next_success(
    tool, platform, rt, browser
):
    class_url = launch_to(platform, tool, browser, platform.instructor(sub="3"))
    course_id = course_id_of(rt, platform)
    platform.set_roster("2", [platform.member("3", role="Instructor"), platform.member("41")])

    platform.fail_roster_page(1, status=503)
    with pytest.raises(RosterError):
        sync_course(rt, course_id)
    shown = browser.get(class_url + ".json").json()["platform"]
    assert "Roster sync failed" in shown["error"] and "HTTP 503" in shown["error"]
    assert "Sync roster now" in shown["error"]  # what to do
    assert shown["error_at"] and not shown["roster_synced_at"]
    page = browser.get(class_url).text
    assert "Problem talking to the platform" in page and "HTTP 503" in page

    sync_course(rt, course_id)
    shown = browser.get(class_url + ".json").json()["platform"]
    assert shown["error"] == "" and shown["error_at"] == ""
    assert shown["roster_synced_at"]
    assert "HTTP 503" not in browser.get(class_url).text


def test_a_refused_token_says_what_the_admin_should_check(tool, platform, rt, browser):
    class_url = launch_to(platform, tool, browser, platform.instructor(sub="3"))
    course_id = course_id_of(rt, platform)
    platform.set_roster("2", [platform.member("42")])
    forget_access_tokens(rt)
    saved, platform.permitted_scopes = platform.permitted_scopes, []
    try:
        with pytest.raises(RosterError):
            sync_course(rt, course_id)
    finally:
        platform.permitted_scopes = saved
    error = browser.get(class_url + ".json").json()["platform"]["error"]
    assert "access token" in error and "Public keyset" in error


# --- 3. staff access follows the launch ----------------------------------------------------


def test_an_admin_launch_not_on_the_roster_keeps_the_class_page_after_the_sync(
    tool, platform, rt, browser
):
    class_url = launch_to(
        platform, tool, browser, platform.instructor(sub="2", roles=MOODLE_ADMIN_ROLES)
    )
    assert browser.get(class_url).status_code == 200
    course_id = course_id_of(rt, platform)
    # NRPS lists enrolled users only: the site admin is not there.
    platform.set_roster(
        "2", [platform.member("3", role="Instructor"), platform.member("43"), platform.member("44")]
    )
    sync_course(rt, course_id)

    assert browser.get(class_url).status_code == 200
    rows = {r["lms_user_id"]: r for r in browser.get(class_url + ".json").json()["roster"]}
    assert rows["2"]["role"] == "teacher"
    with rt.sessions() as session:
        assert class_size(session, course_id) == 2  # the admin is no student

    # Even with the enrolment gone, the launch session keeps the page...
    with transaction(rt.sessions) as session:
        session.execute(
            update(Enrolment).where(Enrolment.course_id == course_id).values(ended_at=utcnow())
        )
    assert browser.get(class_url).status_code == 200
    # ...but only that session: a learner's session of the same course gets nothing.
    with requests.Session() as student:
        launch_to(platform, tool, student, platform.learner(sub="43"))
        assert student.get(class_url).status_code == 403


def test_the_sync_ends_an_admin_whose_launch_session_is_over(tool, platform, rt, browser):
    launch_to(platform, tool, browser, platform.instructor(sub="2", roles=MOODLE_ADMIN_ROLES))
    course_id = course_id_of(rt, platform)
    with transaction(rt.sessions) as session:
        session.execute(update(Launch).values(at=utcnow() - timedelta(hours=9)))
    platform.set_roster("2", [platform.member("45")])
    assert sync_course(rt, course_id).ended == 1
    with rt.sessions() as session:
        admin = session.scalars(select(User.id).where(User.sub == "2")).one()
        ended = session.scalars(
            select(Enrolment.ended_at).where(
                Enrolment.user_id == admin, Enrolment.course_id == course_id
            )
        ).one()
    assert ended is not None


# --- 4. who may frame the IDE and the tool's pages ----------------------------------------


def test_the_ide_csp_admits_the_tool_and_every_registered_platform(
    tool, platform, second_tool_type, rt
):
    ancestors = frame_ancestors(rt.settings)
    assert ancestors.split()[0] == "'self'"
    assert origin_of(tool.url) in ancestors.split() and platform.url in ancestors.split()
    assert ancestors.count(platform.url) == 1  # two registrations, one origin

    local = backend_for("local", rt.settings)
    assert local.frame_ancestors == ancestors
    config = jupyter_server_config(f"frame-ancestors {local.frame_ancestors}")
    assert f"frame-ancestors 'self' {origin_of(tool.url)}" in config and platform.url in config

    cloud_env = Environment(
        name="cloud",
        backend="openstack",
        ide_kind="jupyterlab",
        image_id="img",
        flavor_id="flv",
        network_id="net",
        ide_port=8888,
    )
    forget_platform_origins()
    with transaction(rt.sessions):  # as `labpool volumes delete` asks, holding SQLite's lock
        cloud = backend_for(cloud_env.backend, rt.settings, cloud_env)  # reads nothing yet
    assert cloud.frame_ancestors() == ancestors
    document = cloud_config(7, "jupyterlab", "t" * 32, frame_ancestors=cloud.frame_ancestors())
    assert f"frame-ancestors {ancestors}" in document
    with pytest.raises(ValueError):
        cloud_config(7, "jupyterlab", "t" * 32, frame_ancestors="'self'; script-src *")


def test_origins_that_a_csp_cannot_name_are_left_out():
    assert origin_of("https://moodle.example.edu/moodle") == "https://moodle.example.edu"
    assert origin_of("http://127.0.0.1:8081") == "http://127.0.0.1:8081"
    for bad in ("javascript:alert(1)", "https://a.example;script-src", "https://a b", ""):
        assert origin_of(bad) is None


def test_tool_pages_may_be_framed_by_the_platforms_and_are_never_cached(
    tool, platform, rt, browser
):
    with requests.Session() as student:
        status_url = (
            tool.url
            + f"/machines/{machine_id_of(platform.launch(student, tool.url, platform.learner(sub='46')).launch_response)}"
        )
        pages = [student.get(status_url), student.get(status_url + "/state")]
    class_url = launch_to(platform, tool, browser, platform.instructor(sub="3"))
    pages += [
        browser.get(class_url),
        browser.get(class_url + ".json"),
        browser.get(f"{tool.url}/machines/999999"),
    ]  # an error page
    for page in pages:
        assert page.headers["Cache-Control"] == "no-store", page.url
        csp = page.headers["Content-Security-Policy"]
        assert csp.startswith("frame-ancestors 'self'") and platform.url in csp, page.url
    assert pages[-1].status_code == 403
    jwks = browser.get(f"{tool.url}/lti/jwks.json")
    assert (
        "public" in jwks.headers["Cache-Control"] and "max-age=300" in jwks.headers["Cache-Control"]
    )
    assert "no-store" not in jwks.headers["Cache-Control"]


# --- 5. cookies inside the frame -----------------------------------------------------------


def test_state_cookies_carry_samesite_lax_on_plain_http(tool, platform, browser):
    form = platform.login_form(platform.learner(sub="47"), login_hint="47", lti_message_hint="{}")
    answer = platform.initiate_login(browser, tool.url, form)
    assert answer.status_code == 302
    cookies = answer.raw.headers.getlist("Set-Cookie")
    state = [c for c in cookies if c.startswith("lti1p3-state-")]
    assert state and all("SameSite=Lax" in c and "Secure" not in c for c in cookies)


def test_state_cookies_over_https_are_secure_samesite_none_and_partitioned():
    app = Flask(__name__)
    with app.test_request_context("/lti/login"):
        from flask import make_response
        from pylti1p3.contrib.flask import FlaskRequest

        service = LabpoolCookieService(FlaskRequest(), secure=True)
        service.set_cookie("state-x", "state-x", 300)
        response = make_response("")
        service.update_response(response)
    cookie = response.headers["Set-Cookie"]
    assert "Secure" in cookie and "SameSite=None" in cookie and "Partitioned" in cookie


def test_a_framed_login_checks_cookies_and_offers_one_new_tab_button(tool, platform, browser):
    form = platform.login_form(platform.learner(sub="48"), login_hint="48", lti_message_hint="{}")
    answer = browser.post(
        f"{tool.url}/lti/login",
        data=form,
        headers={"Sec-Fetch-Dest": "iframe"},
        allow_redirects=False,
    )
    assert answer.status_code == 200
    assert answer.text.count('id="lti1p3-new-tab-link"') == 1
    assert "Open the activity in a new tab" in answer.text
    assert "lti1p3_new_window" in answer.text  # the new tab goes straight on to the login


# --- 6. names as the registration allows ---------------------------------------------------


def test_a_registration_without_names_shows_a_short_label_never_another_registrations_names(
    tool, platform, second_tool_type, rt
):
    sharing, private = platform, second_tool_type
    with requests.Session() as s1, requests.Session() as s2:
        launch_to(
            sharing,
            tool,
            s1,
            sharing.learner(sub="50", name="Alice Example", email="alice@example.edu"),
        )
        launch_to(private, tool, s2, private.learner(sub="50", name=None, email=None))
    with requests.Session() as teacher_a, requests.Session() as teacher_b:
        class_a = launch_to(sharing, tool, teacher_a, sharing.instructor(sub="3"))
        class_b = launch_to(
            private, tool, teacher_b, private.instructor(sub="3", name=None, email=None)
        )
        # The private registration's roster carries no names either.
        sharing.set_roster("2", [sharing.member("3", role="Instructor"), sharing.member("50")])
        sync_course(rt, course_id_of(rt, private))

        row_b = {r["lms_user_id"]: r for r in teacher_b.get(class_b + ".json").json()["roster"]}[
            "50"
        ]
        assert LABEL.fullmatch(row_b["student"]) and row_b["student"].startswith("Student ")
        assert row_b["email"] == "" and row_b["named"] is False
        page_b = teacher_b.get(class_b).text
        assert "Alice" not in page_b and "alice@" not in page_b
        assert "LMS user id" in page_b  # shown on hover (the row's title)
        again = {r["lms_user_id"]: r for r in teacher_b.get(class_b + ".json").json()["roster"]}
        assert again["50"]["student"] == row_b["student"]  # stable
        expected = short_labels(rt.settings.secret_key, platform.issuer, ["50"])["50"]
        assert row_b["student"] == f"Student {expected}"  # a keyed hash, not "user 50"

        row_a = {r["lms_user_id"]: r for r in teacher_a.get(class_a + ".json").json()["roster"]}[
            "50"
        ]
        assert row_a["student"] == "Alice Example" and row_a["email"] == "alice@example.edu"


def test_a_registration_that_stops_sharing_names_stops_showing_them(tool, platform, rt, browser):
    with requests.Session() as student:
        launch_to(platform, tool, student, platform.learner(sub="51", name="Bob Example"))
    class_url = launch_to(platform, tool, browser, platform.instructor(sub="3"))
    rows = {r["lms_user_id"]: r for r in browser.get(class_url + ".json").json()["roster"]}
    assert rows["51"]["student"] == "Bob Example"
    platform.set_roster("2", [platform.member("3", role="Instructor"), platform.member("51")])
    sync_course(rt, course_id_of(rt, platform))  # the admin turned name sharing off
    rows = {r["lms_user_id"]: r for r in browser.get(class_url + ".json").json()["roster"]}
    assert LABEL.fullmatch(rows["51"]["student"])


def test_labels_of_one_class_never_collide():
    subs = [str(i) for i in range(3000)]  # enough for four hex digits to collide
    labels = short_labels("key", "https://moodle.example", subs)
    assert len(set(labels.values())) == len(subs)
    assert {len(v) for v in labels.values()} == {4, 8}
    assert short_labels("key", "https://moodle.example", ["7"])["7"] != "7"
