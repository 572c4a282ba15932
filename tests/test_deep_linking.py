"""Deep linking (LTI Deep Linking 2.0) through the fake Moodle: a teacher's "Select content"
ends in a signed LtiDeepLinkingResponse posted to Moodle's contentitem_return.php, and the
activity it creates launches into the chosen environment (and assignment)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urljoin

import jwt
import pytest
import requests
from sqlalchemy import select, text

from config.db import transaction
from grading.models import Assignment
from jwks.models import KeyState, ToolKey
from lti_tool.models import Activity, Course
from provisioning.models import Environment, Machine
from tests.conftest import count_rows
from tests.fakeplatform import DL_SETTINGS, load_fixture, parse_auto_submit_form

DL = "https://purl.imsglobal.org/spec/lti-dl/claim/"
LTI = "https://purl.imsglobal.org/spec/lti/claim/"
NOTHING = {t: 0 for t in ("launches", "machines", "activities", "enrolments", "courses", "users")}


@pytest.fixture(autouse=True)
def _moodle_knows_the_tool_keys(platform, tool) -> None:  # type: ignore[no-untyped-def]
    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"


@pytest.fixture
def lab_environment(rt) -> Iterator[int]:  # type: ignore[no-untyped-def]
    with transaction(rt.sessions) as session:
        env = Environment(name="week-1-lab", backend="local", ide_kind="jupyterlab")
        session.add(env)
        session.flush()
        env_id = env.id
    yield env_id
    with transaction(rt.sessions) as session:  # before the shared clean-up drops activities
        session.execute(text("DELETE FROM assignments"))


def open_selection(platform, tool, browser, **overrides):  # type: ignore[no-untyped-def]
    """A teacher's "Select content": the deep-linking launch, then Labpool's page."""
    result = platform.launch(browser, tool.url, platform.deep_linking(**overrides))
    assert result.launch_response.status_code == 303, result.launch_response.text[:500]
    page_url = urljoin(tool.url, result.launch_response.headers["Location"])
    page = browser.get(page_url)
    assert page.status_code == 200, page.text[:500]
    return result, page_url, page


def csrf_of(page: requests.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def post_to_moodle(response: requests.Response) -> tuple[str, requests.Response]:
    """What the browser does with Labpool's answer: auto-submit the form to Moodle."""
    assert response.status_code == 200, response.text[:500]
    action, method, fields = parse_auto_submit_form(response.text)
    assert method == "post" and set(fields) == {"JWT"}
    return action, requests.post(action, data=fields, timeout=10)


def verified_with_tool_jwks(tool, platform, token: str) -> dict:  # type: ignore[no-untyped-def]
    keyset = requests.get(f"{tool.url}/lti/jwks.json", timeout=10).json()
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in keyset["keys"] if k["kid"] == kid)
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=platform.issuer,
        issuer=platform.client_id,
        options={"require": ["exp", "iat", "nonce"]},
    )


def test_teacher_picks_an_environment_and_moodle_gets_a_signed_resource_link(
    tool, platform, rt, browser, lab_environment
):
    request_data = "moodle-opaque:42"
    result, page_url, page = open_selection(
        platform, tool, browser, dl_settings={"data": request_data}
    )
    assert "week-1-lab" in page.text

    answer = browser.post(
        page_url,
        data={
            "csrf": csrf_of(page),
            "environment_id": str(lab_environment),
            "title": "Week 1 lab",
            "text": "Pandas warm-up",
            "score_maximum": "20",
        },
    )
    action, moodle = post_to_moodle(answer)
    settings = result.claims[DL_SETTINGS]
    assert action == settings["deep_link_return_url"]
    assert moodle.status_code == 200, moodle.text
    assert moodle.json() == {"items": 1}
    posted = platform.deep_link_responses[-1]
    assert posted["problem"] is None

    token = parse_auto_submit_form(answer.text)[2]["JWT"]
    claims = verified_with_tool_jwks(tool, platform, token)
    with rt.sessions() as session:
        active = session.scalars(select(ToolKey.kid).where(ToolKey.state == KeyState.active)).one()
    assert jwt.get_unverified_header(token)["kid"] == active

    # The request's shape (the captured Moodle 4.3 request) turned around.
    fixture = load_fixture("launch_deep_linking.json")["claims"]
    assert claims["iss"] == result.claims["aud"] == platform.client_id
    assert claims["aud"] == [result.claims["iss"]] == [platform.issuer]
    assert claims[LTI + "deployment_id"] == result.claims[LTI + "deployment_id"]
    assert claims[LTI + "message_type"] == "LtiDeepLinkingResponse"
    assert claims[LTI + "version"] == fixture[LTI + "version"] == "1.3.0"
    assert claims[DL + "data"] == request_data
    assert claims["exp"] > claims["iat"] and claims["nonce"]
    [item] = claims[DL + "content_items"]
    assert item["type"] in fixture[DL_SETTINGS]["accept_types"]
    assert item == {
        "type": "ltiResourceLink",
        "title": "Week 1 lab",
        "text": "Pandas warm-up",
        "url": f"{tool.url}/lti/launch",
        "custom": {"labpool_environment": str(lab_environment)},
        "lineItem": {
            "scoreMaximum": 20,
            "label": "Week 1 lab",
            "resourceId": f"environment-{lab_environment}",
            "tag": "labpool",
        },
    }

    # One answer per request: the page is gone once answered.
    again = browser.post(
        page_url, data={"csrf": csrf_of(page), "environment_id": str(lab_environment)}
    )
    assert again.status_code == 410


def test_without_data_in_the_request_the_response_has_no_data_claim(
    tool, platform, rt, browser, lab_environment
):
    result, page_url, page = open_selection(platform, tool, browser)
    assert "data" not in result.claims[DL_SETTINGS]
    answer = browser.post(
        page_url, data={"csrf": csrf_of(page), "environment_id": str(lab_environment)}
    )
    claims = verified_with_tool_jwks(tool, platform, parse_auto_submit_form(answer.text)[2]["JWT"])
    assert DL + "data" not in claims
    [item] = claims[DL + "content_items"]
    # The page offers the platform's suggested title ("DL title" in the capture); left empty,
    # the item is named after the environment.
    suggested = load_fixture("launch_deep_linking.json")["claims"][DL_SETTINGS]["title"]
    assert f'value="{suggested}"' in page.text
    assert item["title"] == item["lineItem"]["label"] == "week-1-lab"
    assert item["lineItem"]["scoreMaximum"] == 100


def test_cancel_answers_no_content_items_and_still_echoes_data(tool, platform, rt, browser):
    _, page_url, page = open_selection(platform, tool, browser, dl_settings={"data": "xyz"})
    answer = browser.post(page_url + "/cancel", data={"csrf": csrf_of(page)})
    _, moodle = post_to_moodle(answer)
    assert moodle.status_code == 200 and moodle.json() == {"items": 0}
    claims = verified_with_tool_jwks(tool, platform, parse_auto_submit_form(answer.text)[2]["JWT"])
    assert claims[DL + "content_items"] == []
    assert claims[DL + "data"] == "xyz"
    assert claims[LTI + "message_type"] == "LtiDeepLinkingResponse"


def test_learner_cannot_select_content_and_nothing_is_written(tool, platform, rt, browser):
    result = platform.launch(
        browser,
        tool.url,
        platform.deep_linking(roles=["http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"]),
    )
    assert result.launch_response.status_code == 403
    assert "teachers" in result.launch_response.text
    assert count_rows(rt) == NOTHING
    assert not list(rt.redis.scan_iter("labpool:deep-link:*"))


@pytest.mark.parametrize(
    "dl_settings, reason",
    [
        (
            {"deep_link_return_url": "https://evil.example/mod/lti/contentitem_return.php"},
            "own site",
        ),
        ({"deep_link_return_url": "javascript:alert(1)"}, "not an http(s) URL"),
        ({"deep_link_return_url": None}, "not an http(s) URL"),
        # (pylti1p3's message check refuses this one before Labpool's does.)
        ({"accept_types": ["link", "html"]}, "resource link"),
    ],
)
def test_bad_deep_linking_settings_are_refused_with_400(
    tool, platform, rt, browser, dl_settings, reason
):
    result = platform.launch(browser, tool.url, platform.deep_linking(dl_settings=dl_settings))
    assert result.launch_response.status_code == 400
    assert reason in result.launch_response.text
    assert count_rows(rt) == NOTHING


def test_a_forged_choice_is_refused_and_nothing_is_signed(
    tool, platform, rt, browser, lab_environment
):
    _, page_url, page = open_selection(platform, tool, browser)
    csrf = csrf_of(page)
    for form, status in [
        ({"csrf": csrf, "environment_id": "999999"}, 400),
        ({"csrf": csrf, "environment_id": "1 OR 1=1"}, 400),
        ({"csrf": csrf, "environment_id": str(lab_environment), "assignment_id": "999999"}, 400),
        ({"csrf": csrf, "environment_id": str(lab_environment), "score_maximum": "-5"}, 400),
        ({"csrf": "stolen", "environment_id": str(lab_environment)}, 403),
    ]:
        refused = browser.post(page_url, data=form)
        assert refused.status_code == status, (form, refused.text[:300])
        assert "JWT" not in refused.text
    # Someone else's browser (no session of this teacher) cannot answer for them, nor can
    # another teacher of the course with a session of their own.
    with requests.Session() as stranger:
        assert (
            stranger.post(
                page_url, data={"csrf": csrf, "environment_id": str(lab_environment)}
            ).status_code
            == 403
        )
        other = platform.launch(stranger, tool.url, platform.instructor(sub="9"))
        class_page = stranger.get(urljoin(tool.url, other.launch_response.headers["Location"]))
        taken = stranger.post(
            page_url, data={"csrf": csrf_of(class_page), "environment_id": str(lab_environment)}
        )
        assert taken.status_code == 403 and "someone else" in taken.text
    # The selection is still open: the teacher can still choose.
    assert browser.get(page_url).status_code == 200


def test_a_launch_of_the_new_activity_lands_on_the_chosen_environment(
    tool, platform, rt, browser, lab_environment
):
    _, page_url, page = open_selection(platform, tool, browser)
    answer = browser.post(
        page_url, data={"csrf": csrf_of(page), "environment_id": str(lab_environment)}
    )
    token = parse_auto_submit_form(answer.text)[2]["JWT"]
    [item] = jwt.decode(token, options={"verify_signature": False})[DL + "content_items"]

    # Moodle now launches the activity it made, with the item's custom parameters.
    custom = {**platform.learner()[LTI + "custom"], **item["custom"]}
    launch = platform.launch(
        browser, tool.url, platform.learner(sub="4", resource_link_id="77", custom=custom)
    )
    assert launch.launch_response.status_code == 303, launch.launch_response.text[:300]
    with rt.sessions() as session:
        activity = session.scalars(select(Activity).where(Activity.resource_link_id == "77")).one()
        assert activity.environment_id == lab_environment
        machine = session.scalars(select(Machine).where(Machine.owner_id.is_not(None))).one()
        assert machine.environment_id == lab_environment


def test_the_teachers_later_choice_wins_over_the_custom_parameter(
    tool, platform, rt, browser, lab_environment
):
    custom = {"labpool_environment": str(lab_environment)}
    teacher = platform.launch(
        browser, tool.url, platform.instructor(resource_link_id="78", custom=custom)
    )
    class_url = urljoin(tool.url, teacher.launch_response.headers["Location"])
    with rt.sessions() as session:
        activity = session.scalars(select(Activity).where(Activity.resource_link_id == "78")).one()
        default_id = session.scalars(
            select(Environment.id).where(Environment.name == "default")
        ).one()
    assert activity.environment_id == lab_environment
    page = browser.get(class_url)
    chosen = browser.post(
        f"{tool.url}/activities/{activity.id}/environment",
        data={"csrf": csrf_of(page), "environment_id": str(default_id)},
        allow_redirects=False,
    )
    assert chosen.status_code == 303
    platform.launch(
        browser, tool.url, platform.learner(sub="4", resource_link_id="78", custom=custom)
    )
    with rt.sessions() as session:
        assert session.get_one(Activity, activity.id).environment_id == default_id


@pytest.mark.parametrize("value", ["999999", "abc", "", "12345678901234567890", "٣"])
def test_a_custom_parameter_naming_no_environment_is_ignored(tool, platform, rt, browser, value):
    launch = platform.launch(
        browser,
        tool.url,
        platform.learner(sub="4", resource_link_id="79", custom={"labpool_environment": value}),
    )
    assert launch.launch_response.status_code == 303, launch.launch_response.text[:300]
    with rt.sessions() as session:
        activity = session.scalars(select(Activity).where(Activity.resource_link_id == "79")).one()
        assert activity.environment_id is None
        machine = session.scalars(select(Machine).where(Machine.owner_id.is_not(None))).one()
        assert session.get_one(Environment, machine.environment_id).name == "default"


def test_teacher_picks_an_assignment_of_the_course(tool, platform, rt, browser, lab_environment):
    # The course already has an activity with an assignment (made on its class page).
    platform.launch(browser, tool.url, platform.instructor(resource_link_id="80"))
    with transaction(rt.sessions) as session:
        activity = session.scalars(select(Activity).where(Activity.resource_link_id == "80")).one()
        assignment = Assignment(
            activity_id=activity.id, name="hw1", title="Homework 1", max_score=12.5
        )
        other_course = Course(
            platform_id=session.get_one(Course, activity.course_id).platform_id,
            context_id="elsewhere",
        )
        session.add_all([assignment, other_course])
        session.flush()
        foreign = Activity(course_id=other_course.id, resource_link_id="x")
        session.add(foreign)
        session.flush()
        theirs = Assignment(activity_id=foreign.id, name="hw9", title="Not yours")
        session.add(theirs)
        session.flush()
        assignment_id, theirs_id = assignment.id, theirs.id

    _, page_url, page = open_selection(platform, tool, browser)
    assert "Homework 1" in page.text and "Not yours" not in page.text
    refused = browser.post(
        page_url,
        data={
            "csrf": csrf_of(page),
            "environment_id": str(lab_environment),
            "assignment_id": str(theirs_id),
        },
    )
    assert refused.status_code == 400
    answer = browser.post(
        page_url,
        data={
            "csrf": csrf_of(page),
            "environment_id": str(lab_environment),
            "assignment_id": str(assignment_id),
            "title": "",
        },
    )
    _, moodle = post_to_moodle(answer)
    assert moodle.status_code == 200
    claims = verified_with_tool_jwks(tool, platform, parse_auto_submit_form(answer.text)[2]["JWT"])
    [item] = claims[DL + "content_items"]
    assert item["custom"] == {
        "labpool_environment": str(lab_environment),
        "labpool_assignment": str(assignment_id),
    }
    assert item["title"] == "Homework 1"
    assert item["lineItem"] == {
        "scoreMaximum": 12.5,
        "label": "Homework 1",
        "resourceId": f"labpool-assignment-{assignment_id}",
        "tag": "labpool",
    }

    # The new activity's launch takes the assignment; another course's is never taken.
    platform.launch(
        browser, tool.url, platform.learner(sub="4", resource_link_id="81", custom=item["custom"])
    )
    platform.launch(
        browser,
        tool.url,
        platform.learner(
            sub="4", resource_link_id="82", custom={"labpool_assignment": str(theirs_id)}
        ),
    )
    with rt.sessions() as session:
        by_link = {a.resource_link_id: a for a in session.scalars(select(Activity))}
        assert by_link["81"].assignment_id == assignment_id
        assert by_link["81"].environment_id == lab_environment
        assert by_link["82"].assignment_id is None
