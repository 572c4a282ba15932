"""LTI Dynamic Registration against a fake Moodle 4.3 speaking the captured shapes
(tests/fixtures/moodle-4.3/dynamic_registration.json), then a launch through the new
registration; and the admin's `labpool platform remove`."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import func, select

from config.db import transaction
from lti_tool.cli import main
from lti_tool.dynamic_registration import DynamicRegistrationError, fetch_platform_configuration
from lti_tool.models import Course, Deployment, Platform
from lti_tool.registration_links import RegistrationLinks, parse_duration
from lti_tool.registrations import remove_platform
from provisioning.models import Machine, MachineState
from tests.fakeplatform import FakePlatform
from tests.test_launch import machine_id_of

TOOL_CONFIGURATION = "https://purl.imsglobal.org/spec/lti-tool-configuration"
NRPS = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"
SCORE = "https://purl.imsglobal.org/spec/lti-ags/scope/score"
LINEITEM = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem"
LINEITEM_READONLY = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem.readonly"


def new_link(expires: str = "1h") -> str:
    """`labpool registration-link`, as the admin runs it: the URL is its first line."""
    result = CliRunner().invoke(main, ["registration-link", "--expires", expires])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()[0].strip()


def platforms_of(rt, issuer: str) -> list[tuple[str, list[str]]]:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return [
            (p.client_id, sorted(d.deployment_id for d in p.deployments))
            for p in session.scalars(select(Platform).where(Platform.issuer == issuer))
        ]


def platform_count(rt) -> int:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalar(select(func.count()).select_from(Platform))


@pytest.fixture
def moodle(rt):  # type: ignore[no-untyped-def]
    """A Moodle that has not heard of Labpool yet; whatever registered it is removed after."""
    with FakePlatform(key_namespace="dynreg-moodle") as fake:
        yield fake
    with transaction(rt.sessions) as session:
        for client_id, _ in platforms_of(rt, fake.issuer):
            remove_platform(session, issuer=fake.issuer, client_id=client_id, force=True)


def test_pasted_link_registers_labpool_and_a_launch_through_it_works(
    tool, rt, moodle, browser, caplog
):
    caplog.set_level(logging.INFO)  # the tool's LOG_LEVEL default
    link = new_link()
    assert link.startswith(f"{tool.url}/lti/register/")
    token = moodle.dynamic_registration.registration_token()

    page = browser.get(moodle.dynamic_registration.registration_url(link, token))

    assert page.status_code == 200, page.text[:500]
    assert 'postMessage({subject: "org.imsglobal.lti.close"}' in page.text
    assert "Manage tools" in page.text and "Activate" in page.text and "pending" in page.text
    # The page may be framed by the platform that asked (it is registered now).
    assert moodle.url in page.headers["Content-Security-Policy"]

    # What Moodle received: the shape its registration_helper checks, with Labpool's URLs.
    [posted] = moodle.dynamic_registration.requests
    assert posted["status"] == 200, posted
    assert posted["authorization"] == f"Bearer {token}"
    body = posted["body"]
    launch_url = f"{tool.url}/lti/launch"
    assert body["redirect_uris"] == [launch_url]
    assert body["initiate_login_uri"] == f"{tool.url}/lti/login"
    assert body["jwks_uri"] == f"{tool.url}/lti/jwks.json"
    assert body["token_endpoint_auth_method"] == "private_key_jwt"
    assert body["response_types"] == ["id_token"]
    assert set(body["grant_types"]) == {"implicit", "client_credentials"}
    assert {NRPS, SCORE, LINEITEM, LINEITEM_READONLY} <= set(body["scope"].split())
    config = body[TOOL_CONFIGURATION]
    assert config["domain"] == urlsplit(tool.url).netloc
    assert config["target_link_uri"] == launch_url
    assert {"iss", "sub"} <= set(config["claims"])
    assert {(m["type"], m["target_link_uri"]) for m in config["messages"]} == {
        ("LtiResourceLinkRequest", launch_url),
        ("LtiDeepLinkingRequest", launch_url),
    }
    assert config["custom_parameters"] == {}

    # What Labpool stored: the client id and deployment id Moodle answered, its endpoints.
    assert platforms_of(rt, moodle.issuer) == [(moodle.client_id, [moodle.deployment_id])]
    with rt.sessions() as session:
        stored = session.scalars(select(Platform).where(Platform.issuer == moodle.issuer)).one()
        assert (stored.auth_url, stored.token_url, stored.jwks_url) == (
            moodle.auth_url,
            moodle.token_url,
            moodle.jwks_url,
        )
        assert stored.name.startswith("moodle 4.3")

    # Pending in Moodle until the admin activates it; then a student's launch works.
    assert moodle.dynamic_registration.pending(moodle.client_id)
    moodle.dynamic_registration.activate()
    launched = moodle.launch(browser, tool.url, moodle.learner(sub="77"))
    machine_id = machine_id_of(launched.launch_response)
    with rt.sessions() as session:
        assert session.get(Machine, machine_id).state is MachineState.requested

    # The link served once: opening it again is refused, and nothing more is sent or stored.
    again = browser.get(moodle.dynamic_registration.registration_url(link))
    assert again.status_code == 410
    assert "already used" in again.text
    assert len(moodle.dynamic_registration.requests) == 1
    assert len(platforms_of(rt, moodle.issuer)) == 1

    # Neither the link nor Moodle's token reached the tool's logs (a label of the link did).
    link_token = link.rsplit("/", 1)[1]
    assert RegistrationLinks.label(link_token) in caplog.text
    assert link_token not in caplog.text and token not in caplog.text


def test_unknown_link_is_refused_and_the_platform_is_never_asked(tool, rt, moodle, browser):
    before = platform_count(rt)
    forged = f"{tool.url}/lti/register/{'x' * 43}"
    page = browser.get(moodle.dynamic_registration.registration_url(forged))
    assert page.status_code == 404
    assert "not known to Labpool" in page.text
    assert moodle.dynamic_registration.configuration_fetches == 0
    assert moodle.dynamic_registration.requests == []
    assert platform_count(rt) == before


def test_a_link_in_use_in_another_window_is_refused(tool, rt, moodle, browser):
    link = new_link()
    RegistrationLinks(rt.redis).claim(link.rsplit("/", 1)[1])  # the first window, still busy
    page = browser.get(moodle.dynamic_registration.registration_url(link))
    assert page.status_code == 409
    assert "being used right now" in page.text
    assert moodle.dynamic_registration.configuration_fetches == 0


def test_expired_link_is_refused_and_writes_nothing(tool, rt, moodle, browser):
    before = platform_count(rt)
    expired = RegistrationLinks(rt.redis).create(60, now=time.time() - 120)
    page = browser.get(
        moodle.dynamic_registration.registration_url(f"{tool.url}/lti/register/{expired.token}")
    )
    assert page.status_code == 410
    assert "expired" in page.text
    assert moodle.dynamic_registration.configuration_fetches == 0
    assert platform_count(rt) == before


def test_issuer_of_another_site_is_refused_and_nothing_is_stored(tool, rt, moodle, browser):
    """A configuration that names someone else's Moodle as its issuer registers nothing, and
    the link stays usable for a correct attempt."""
    before = platform_count(rt)
    link = new_link()
    moodle.dynamic_registration.configuration_overrides["issuer"] = "https://moodle.example.edu"
    page = browser.get(moodle.dynamic_registration.registration_url(link))
    assert page.status_code == 400
    assert "not on the site its OpenID configuration came from" in page.text
    assert moodle.dynamic_registration.requests == []  # never posted its registration
    assert platform_count(rt) == before
    assert platforms_of(rt, "https://moodle.example.edu") == []

    moodle.dynamic_registration.configuration_overrides.clear()
    retried = browser.get(moodle.dynamic_registration.registration_url(link))
    assert retried.status_code == 200, retried.text[:500]
    assert platforms_of(rt, moodle.issuer) == [(moodle.client_id, [moodle.deployment_id])]


@pytest.mark.parametrize("url", ["https://[::1", "ftp://moodle/x", "https://moodle#x"])
def test_a_configuration_url_that_is_no_url_is_refused_and_nothing_is_stored(
    tool, rt, browser, url
):  # type: ignore[no-untyped-def]
    """Found by the route fuzzing: "https://[::1" made urlsplit raise (a 500)."""
    before = platform_count(rt)
    link = new_link()
    page = browser.get(link, params={"openid_configuration": url, "registration_token": "t"})
    assert page.status_code == 400, page.text[:500]
    assert "must be an https URL" in page.text or "must be an http(s) URL" in page.text
    assert platform_count(rt) == before


def test_registration_endpoint_that_fails_stores_nothing(tool, rt, moodle, browser):
    before = platform_count(rt)
    link = new_link()
    moodle.dynamic_registration.fail_with = 503
    page = browser.get(moodle.dynamic_registration.registration_url(link))
    assert page.status_code == 502
    assert "refused the registration (503)" in page.text
    assert platform_count(rt) == before
    RegistrationLinks(rt.redis).check(link.rsplit("/", 1)[1])  # still usable


def test_a_platform_token_used_twice_is_refused_by_the_platform_and_stored_once(
    tool, rt, moodle, browser
):
    token = moodle.dynamic_registration.registration_token()
    first = browser.get(moodle.dynamic_registration.registration_url(new_link(), token))
    assert first.status_code == 200, first.text[:500]
    second = browser.get(moodle.dynamic_registration.registration_url(new_link(), token))
    assert second.status_code == 502
    assert "token_already_used" in second.text
    assert len(platforms_of(rt, moodle.issuer)) == 1


def test_platform_missing_what_labpool_needs_is_refused(tool, rt, moodle, browser):
    before = platform_count(rt)
    platform_conf = "https://purl.imsglobal.org/spec/lti-platform-configuration"
    moodle.dynamic_registration.configuration_overrides[platform_conf] = {
        "messages_supported": [{"type": "LtiDeepLinkingRequest"}]
    }
    page = browser.get(moodle.dynamic_registration.registration_url(new_link()))
    assert page.status_code == 400
    assert "does not support LtiResourceLinkRequest" in page.text
    assert moodle.dynamic_registration.requests == []
    assert platform_count(rt) == before


def test_an_oversized_configuration_is_refused(tool, rt, moodle, browser):
    before = platform_count(rt)
    moodle.dynamic_registration.configuration_overrides["padding"] = "x" * 400_000
    page = browser.get(moodle.dynamic_registration.registration_url(new_link()))
    assert page.status_code == 502
    assert "larger than 256 KB" in page.text
    assert platform_count(rt) == before


def test_link_opened_without_moodle_says_where_to_paste_it_and_stays_usable(tool, rt, browser):
    link = new_link()
    page = browser.get(link)
    assert page.status_code == 400
    assert "Manage tools" in page.text
    RegistrationLinks(rt.redis).check(link.rsplit("/", 1)[1])


def test_plain_http_platform_is_refused_when_labpool_runs_on_https(moodle):
    with requests.Session() as http, pytest.raises(DynamicRegistrationError, match="https"):
        fetch_platform_configuration(
            http, moodle.dynamic_registration.configuration_url, allow_http=False
        )
    assert moodle.dynamic_registration.configuration_fetches == 0


def test_registration_link_expiry_is_checked(rt):
    assert parse_duration("24h") == 86400 and parse_duration("30m") == 1800
    for bad in ("0s", "31d", "soon", "-1h"):
        result = CliRunner().invoke(main, ["registration-link", "--expires", bad])
        assert result.exit_code == 2, result.output
        assert "--expires" in result.output


# --------------------------------------------------------------------------- platform remove


def test_platform_remove_refuses_while_machines_live_then_force_stops_them(tool, rt, browser):
    runner = CliRunner()
    with FakePlatform(tool_url=tool.url, key_namespace="removed-moodle") as moodle:
        assert runner.invoke(main, moodle.platform_add_argv()).exit_code == 0
        launched = moodle.launch(browser, tool.url, moodle.learner(sub="5"))
        machine_id = machine_id_of(launched.launch_response)
        remove = ["platform", "remove", "--issuer", moodle.issuer]

        refused = runner.invoke(main, remove)
        assert refused.exit_code == 1
        assert "1 live machine(s)" in refused.output and "--force" in refused.output
        assert platforms_of(rt, moodle.issuer) == [(moodle.client_id, [moodle.deployment_id])]

        rt.redis.delete(f"rq:queue:{rt.settings.queue_name}")
        removed = runner.invoke(main, [*remove, "--force"])
        assert removed.exit_code == 0, removed.output
        assert "1 course(s)" in removed.output and "1 live machine(s), now stopping" in (
            removed.output
        )
        assert platforms_of(rt, moodle.issuer) == []
        with rt.sessions() as session:
            machine = session.get(Machine, machine_id)
            assert machine.state is MachineState.stopping and machine.course_id is None
            assert session.scalar(select(func.count()).select_from(Course)) == 0
            orphans = select(func.count()).select_from(Deployment)
            orphans = orphans.where(Deployment.platform_id.not_in(select(Platform.id)))
            assert session.scalar(orphans) == 0
        queued = rt.redis.lrange(f"rq:queue:{rt.settings.queue_name}", 0, -1)
        assert len(queued) == 1  # the machine's stop job

        again = runner.invoke(main, remove)
        assert again.exit_code == 1 and "no platform" in again.output


def test_platform_remove_needs_the_client_id_when_the_issuer_is_registered_twice(tool, rt):
    runner = CliRunner()
    with FakePlatform(tool_url=tool.url, key_namespace="twice-moodle") as moodle:
        other = moodle.add_tool_type()
        for fake in (moodle, other):
            assert runner.invoke(main, fake.platform_add_argv()).exit_code == 0
        ambiguous = runner.invoke(main, ["platform", "remove", "--issuer", moodle.issuer])
        assert ambiguous.exit_code == 1 and "--client-id" in ambiguous.output
        assert len(platforms_of(rt, moodle.issuer)) == 2
        one = runner.invoke(
            main,
            ["platform", "remove", "--issuer", moodle.issuer, "--client-id", other.client_id],
        )
        assert one.exit_code == 0, one.output
        assert platforms_of(rt, moodle.issuer) == [(moodle.client_id, [moodle.deployment_id])]
        with transaction(rt.sessions) as session:
            remove_platform(session, issuer=moodle.issuer)
