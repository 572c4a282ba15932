"""The 1EdTech certification cases (guide §6) and our own: bad launches are refused with a
short page that says why, and write nothing; good ones with odd but legal claims pass."""

from __future__ import annotations

import secrets
import time

import pytest
import requests

from tests.conftest import count_rows
from tests.fakeplatform import (
    CONTEXT,
    DEPLOYMENT_ID,
    MESSAGE_TYPE,
    RESOURCE_LINK,
    ROLE_INSTRUCTOR,
    ROLE_LEARNER,
    ROLES,
    VERSION,
    FakePlatform,
    FakePlatformError,
    foreign_private_key,
)

NOTHING = {t: 0 for t in ("launches", "machines", "activities", "enrolments", "courses", "users")}


def assert_refused(response: requests.Response, rt, reason: str) -> None:  # type: ignore[no-untyped-def]
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert "This launch was refused" in response.text or "refused" in response.text.lower()
    shown = response.text.split('<p id="reason">')[1].split("</p>")[0]
    assert reason.lower() in shown.lower(), shown
    assert "Traceback" not in response.text
    assert count_rows(rt) == NOTHING


# --- rejected: certification guide -------------------------------------------------------


@pytest.mark.parametrize(
    "case, kwargs, reason",
    [
        ("no kid", {"header": {"kid": None}}, "no kid"),
        ("wrong kid", {"header": {"kid": "not-a-published-kid"}}, "no RS256 key"),
        ("wrong LTI version", {"mutate": lambda c: c.__setitem__(VERSION, "1.2.0")}, "version"),
        ("missing LTI version", {"drop": (VERSION,)}, "version"),
        ("not a JWT", {"raw_id_token": "not-a-jwt"}, "3 parts"),
        ("missing message type", {"drop": (MESSAGE_TYPE,)}, "message type"),
        ("missing roles", {"drop": (ROLES,)}, "roles"),
        ("missing deployment id", {"drop": (DEPLOYMENT_ID,)}, "deployment"),
        ("missing resource link id", {"drop": ((RESOURCE_LINK, "id"),)}, "resource link"),
        ("missing sub", {"drop": ("sub",)}, "sub"),
        (
            "expired",
            {"mutate": lambda c: c.update(iat=int(time.time()) - 600, exp=int(time.time()) - 540)},
            "expired",
        ),
        (
            "iat in the future",
            {"mutate": lambda c: c.update(iat=int(time.time()) + 600, exp=int(time.time()) + 660)},
            "iat",
        ),
        # --- ours ---
        ("missing exp", {"drop": ("exp",)}, "exp"),
        ("missing iat", {"drop": ("iat",)}, "iat"),
        ("alg confusion HS256 with the public key", {"alg": "HS256"}, "RS256"),
        ("alg none", {"alg": "none"}, "RS256"),
        (
            "signed by a key the platform does not own",
            {"sign_with": foreign_private_key()},
            "signature",
        ),
        (
            "audience is another tool",
            {"mutate": lambda c: c.update(aud="someone-else")},
            "registration not found",
        ),
        (
            "several audiences and no azp",
            {"mutate": lambda c: c.update(aud=[c["aud"], "other"])},
            "azp",
        ),
        (
            "azp is another tool",
            {"mutate": lambda c: c.update(aud=[c["aud"], "other"], azp="other")},
            "registration not found",
        ),
        (
            "unknown deployment",
            {"mutate": lambda c: c.__setitem__(DEPLOYMENT_ID, "999")},
            "not recognised",
        ),
        ("missing state cookie", {"without_state_cookie": True}, "cookie"),
        ("wrong state", {"state_override": "state-forged"}, "state"),
        ("garbage types in claims", {"mutate": lambda c: c.update(iss=12345)}, "registration"),
    ],
)
def test_bad_launch_is_refused_and_nothing_is_written(
    case, kwargs, reason, tool, platform, rt, browser
):
    result = platform.launch(browser, tool.url, platform.learner(), **kwargs)
    assert_refused(result.launch_response, rt, reason)


def test_replayed_id_token_is_refused_and_nothing_more_is_written(tool, platform, rt, browser):
    first = platform.launch(browser, tool.url, platform.learner())
    assert first.launch_response.status_code == 303
    before = count_rows(rt)
    again = platform.replay(browser, tool.url, first)
    assert again.status_code == 400
    assert "nonce" in again.text
    assert count_rows(rt) == before


def test_unknown_issuer_gets_a_clean_400_at_login(tool, rt, browser):
    with FakePlatform(tool_url=tool.url, key_namespace="stranger") as stranger:
        with pytest.raises(FakePlatformError) as refused:
            stranger.launch(browser, tool.url, stranger.learner())
    response = refused.value.response
    assert response.status_code == 400
    assert "registration" in response.text.lower()
    assert count_rows(rt) == NOTHING


def test_unknown_client_id_gets_a_clean_400_at_launch(tool, platform, rt, browser):
    """A login for our issuer but another client id is refused, and so is a launch."""
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    form["client_id"] = "not-registered"
    response = browser.post(f"{tool.url}/lti/login", data=form, allow_redirects=False)
    assert response.status_code == 400
    assert count_rows(rt) == NOTHING


def test_login_for_a_foreign_target_is_refused(tool, platform, browser):
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    form["target_link_uri"] = "https://evil.example/launch"
    response = browser.post(f"{tool.url}/lti/login", data=form, allow_redirects=False)
    assert response.status_code == 400
    assert "target_link_uri" in response.text


@pytest.mark.parametrize(
    "evil",
    [
        "{tool}.evil.example/lti/launch",  # the tool's URL as a string prefix of another host
        "{tool}0/lti/launch",  # another port
        "{tool}@evil.example/lti/launch",  # the tool's host:port as user info
        "https://{hostport}/lti/launch",  # another scheme
        "{tool}/lti/../../evil",
    ],
)
def test_login_for_a_target_that_only_looks_like_the_tool_is_refused(
    evil, tool, platform, rt, browser
):
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    form["target_link_uri"] = evil.format(tool=tool.url, hostport=tool.url.split("//")[1])
    before = set(rt.redis.keys("labpool:lti:*"))
    response = browser.post(f"{tool.url}/lti/login", data=form, allow_redirects=False)
    assert response.status_code == 400
    assert "target_link_uri" in response.text
    assert set(rt.redis.keys("labpool:lti:*")) == before  # no state, no nonce


def test_framed_login_gets_the_cookie_check_page(tool, platform, browser):
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    framed = browser.post(
        f"{tool.url}/lti/login",
        data=form,
        headers={"Sec-Fetch-Dest": "iframe"},
        allow_redirects=False,
    )
    assert framed.status_code == 200
    assert "lti1p3_new_window" in framed.text  # the page reopens the launch in a new window
    # The page's follow-up request (cookies work, or a new window) goes on to the platform.
    form["lti1p3_new_window"] = "1"
    follow = browser.get(
        f"{tool.url}/lti/login",
        params=form,
        headers={"Sec-Fetch-Dest": "iframe"},
        allow_redirects=False,
    )
    assert follow.status_code == 302
    assert follow.headers["Location"].startswith(platform.auth_url)


def test_state_cookie_is_secure_and_samesite_none_behind_an_https_proxy(rt, platform, tool):
    """Behind a TLS-terminating proxy (ProxyFix), the launch cookies can cross Moodle's iframe."""
    import dataclasses

    from lti_tool.web.app import create_app

    https = dataclasses.replace(rt.settings, proxy_count=1)
    client = create_app(https).test_client()
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    response = client.post(
        "/lti/login",
        data=form,
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": tool.url.split("//")[1]},
    )
    assert response.status_code == 302
    cookies = response.headers.getlist("Set-Cookie")
    state_cookies = [c for c in cookies if c.startswith("lti1p3-state-")]
    assert state_cookies
    for cookie in cookies:
        assert "Secure" in cookie and "SameSite=None" in cookie, cookie


# --- accepted: certification guide ------------------------------------------------------


@pytest.mark.parametrize(
    "case, overrides, staff",
    [
        (
            "student with several roles",
            {
                "roles": [
                    ROLE_LEARNER,
                    "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Student",
                ]
            },
            False,
        ),
        (
            "teacher with several roles",
            {
                "roles": [
                    ROLE_INSTRUCTOR,
                    "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Faculty",
                ]
            },
            True,
        ),
        ("short role", {"roles": ["Instructor"]}, True),
        ("unknown role", {"roles": ["http://example.com/roles#Wizard"]}, False),
        ("no role", {"roles": []}, False),
        ("email only", {"name": None}, False),
        ("names only", {"email": None}, False),
        ("no personal data", {"name": None, "email": None}, False),
        ("no context", {"context": None}, False),
    ],
)
def test_legal_launch_is_accepted(case, overrides, staff, tool, platform, rt, browser):
    result = platform.launch(browser, tool.url, platform.learner(sub="7", **overrides))
    response = result.launch_response
    assert response.status_code == 303, response.text[:400]
    expected = "/activities/" if staff else "/machines/"
    assert expected in response.headers["Location"]
    rows = count_rows(rt)
    assert rows["users"] == 1 and rows["launches"] == 1
    assert rows["machines"] == (0 if staff else 1)


def test_name_is_kept_when_a_later_launch_does_not_share_it(tool, platform, rt, browser):
    from lti_tool.models import User

    platform.launch(browser, tool.url, platform.learner(sub="8", name="Ada Lovelace"))
    platform.launch(browser, tool.url, platform.learner(sub="8", name=None, email=None))
    with rt.sessions() as session:
        user = session.query(User).one()
    assert user.name == "Ada Lovelace"


def assert_refused_without_writes(response: requests.Response, rt, before, reason: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert reason in response.text
    assert count_rows(rt) == before


def _forget_refetch_guards(rt) -> None:  # type: ignore[no-untyped-def]
    """An earlier test's refetch (within the guard interval) must not bar this test's."""
    for key in rt.redis.scan_iter("labpool:platform-jwks:*:refetched"):
        rt.redis.delete(key)


def test_platform_key_rotation_costs_one_jwks_refetch(tool, platform, rt, browser):
    platform.launch(browser, tool.url, platform.learner())  # JWKS now cached
    _forget_refetch_guards(rt)
    fetches = platform.jwks_fetches
    platform.launch(browser, tool.url, platform.learner())
    assert platform.jwks_fetches == fetches  # cached: no fetch per launch

    platform.rotate_key()
    try:
        rotated = platform.launch(browser, tool.url, platform.learner())
        assert rotated.launch_response.status_code == 303
        assert platform.jwks_fetches == fetches + 1
        # Unknown kids right after that refetch cost no fetch at all (one per URL per interval).
        for kid in ("bogus-1", "bogus-2"):
            bad = platform.launch(browser, tool.url, platform.learner(), header={"kid": kid})
            assert bad.launch_response.status_code == 400
        assert platform.jwks_fetches == fetches + 1
    finally:
        platform.publish_keys()


def test_random_kids_cost_at_most_one_jwks_fetch_per_interval(tool, platform, rt, browser):
    """Forged launches with a new kid each are refused without a fetch of certs.php each."""
    platform.launch(browser, tool.url, platform.learner())  # JWKS now cached
    _forget_refetch_guards(rt)
    fetches, before = platform.jwks_fetches, count_rows(rt)
    for _ in range(40):
        kid = secrets.token_hex(10)
        bad = platform.launch(browser, tool.url, platform.learner(), header={"kid": kid})
        assert_refused_without_writes(bad.launch_response, rt, before, "no RS256 key")
    assert platform.jwks_fetches - fetches <= 1


def test_a_key_the_platform_removed_is_refused_once_the_cached_key_set_is_gone(
    tool, platform, rt, browser
):
    """This process converted the old key to PEM; that must not outlive the key set."""
    old = platform.keys[-1]
    assert platform.launch(browser, tool.url, platform.learner()).launch_response.status_code == 303
    new_kid = platform.rotate_key(retire_old=True)  # certs.php now lists the new key only
    try:
        signed_with_old = {"sign_with": old.private_key, "header": {"kid": old.kid}}
        still_cached = platform.launch(browser, tool.url, platform.learner(), **signed_with_old)
        assert still_cached.launch_response.status_code == 303  # within the cache's lifetime

        for key in rt.redis.scan_iter("labpool:platform-jwks:*"):
            rt.redis.delete(key)  # the cached key set expires (or an admin clears it)
        before = count_rows(rt)
        refused = platform.launch(browser, tool.url, platform.learner(), **signed_with_old)
        assert_refused_without_writes(refused.launch_response, rt, before, "no RS256 key")
        accepted = platform.launch(browser, tool.url, platform.learner())
        assert accepted.header["kid"] == new_kid
        assert accepted.launch_response.status_code == 303
    finally:
        platform.publish_keys()


def test_a_key_set_refetched_for_a_new_kid_drops_the_removed_key(tool, platform, rt, browser):
    old = platform.keys[-1]
    assert platform.launch(browser, tool.url, platform.learner()).launch_response.status_code == 303
    _forget_refetch_guards(rt)
    platform.rotate_key(retire_old=True)
    try:
        # The new kid is not in the cached set: one refetch, which no longer lists the old key.
        assert (
            platform.launch(browser, tool.url, platform.learner()).launch_response.status_code
            == 303
        )
        before = count_rows(rt)
        refused = platform.launch(
            browser,
            tool.url,
            platform.learner(),
            sign_with=old.private_key,
            header={"kid": old.kid},
        )
        assert_refused_without_writes(refused.launch_response, rt, before, "no RS256 key")
    finally:
        platform.publish_keys()


def test_context_claim_shapes(platform):
    """Guard for the fixtures' shape the tests above rely on."""
    claims = platform.learner()
    assert claims[CONTEXT]["id"] and claims[RESOURCE_LINK]["id"]


def test_login_state_expires_with_the_login_and_no_launch_data_is_kept(tool, platform, rt, browser):
    """pylti1p3 would keep the whole id_token (name, email) in Redis for a day."""
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    assert (
        browser.post(f"{tool.url}/lti/login", data=form, allow_redirects=False).status_code == 302
    )
    keys = rt.redis.keys("labpool:lti:*")
    assert keys and all(0 < rt.redis.ttl(k) <= 600 for k in keys)

    result = platform.launch(browser, tool.url, platform.learner(sub="9", email="ada@example.com"))
    assert result.launch_response.status_code == 303
    for key in rt.redis.keys("labpool:lti:*"):
        assert b"ada@example.com" not in (rt.redis.get(key) or b"")
