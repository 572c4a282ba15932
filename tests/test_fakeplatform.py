"""Tests of the fake Moodle platform itself (tests/fakeplatform.py), not of the tool.

The driver is exercised against a tiny stand-in tool (a Flask app defined here) that answers
/lti/login with a 302 carrying state and nonce (and a state cookie) and echoes /lti/launch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import requests
from flask import Flask, jsonify, request

from tests.fakeplatform import (
    AGS,
    CONTEXT,
    CUSTOM,
    DEPLOYMENT_ID,
    DL_SETTINGS,
    MESSAGE_TYPE,
    NRPS,
    RESOURCE_LINK,
    ROLE_INSTRUCTOR,
    ROLES,
    TARGET_LINK_URI,
    FakePlatform,
    FakePlatformError,
    ServedApp,
    foreign_private_key,
    load_fixture,
    parse_auto_submit_form,
    without_email,
    without_name,
    without_personal_data,
)


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _header(token: str) -> dict[str, Any]:
    return json.loads(_b64decode(token.split(".")[0]))


def _payload(token: str) -> dict[str, Any]:
    return json.loads(_b64decode(token.split(".")[1]))


def _verify(platform: FakePlatform, token: str) -> dict[str, Any]:
    signing_key = jwt.PyJWKClient(platform.jwks_url, cache_keys=False).get_signing_key_from_jwt(
        token
    )
    return jwt.decode(
        token,
        signing_key.key,
        algorithms=["RS256"],
        audience=platform.client_id,
        issuer=platform.url,
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def platform() -> Iterator[FakePlatform]:
    with FakePlatform(key_namespace="test_fakeplatform") as fake:
        yield fake


class StandInTool:
    """Just enough of an LTI tool to drive the fake: not pylti1p3, no validation."""

    def __init__(self, platform: FakePlatform) -> None:
        self.platform = platform
        self.mode = "redirect"  # or "cookie_check", "wrong_redirect_uri", "error"
        self.logins: list[dict[str, str]] = []
        self.issued: dict[str, str] = {}  # state -> nonce
        app = Flask(__name__)

        @app.route("/lti/login", methods=["GET", "POST"])
        def login() -> Any:
            self.logins.append(request.values.to_dict())
            if self.mode == "cookie_check":
                page = (
                    "<html><script>var p = {'lti1p3_new_window': '1'};"
                    "function checkCookiesAllowed() {}</script></html>"
                )
                return page, 200, {"Content-Type": "text/html"}
            if self.mode == "error":
                return "Could not find registration details", 400
            state = "state-" + secrets.token_hex(8)
            nonce = secrets.token_hex(8)
            self.issued[state] = nonce
            redirect_uri = request.host_url.rstrip("/") + "/lti/launch"
            if self.mode == "wrong_redirect_uri":
                redirect_uri = request.host_url.rstrip("/") + "/elsewhere"
            query = {
                "scope": "openid",
                "response_type": "id_token",
                "response_mode": "form_post",
                "prompt": "none",
                "client_id": request.values["client_id"],
                "redirect_uri": redirect_uri,
                "login_hint": request.values["login_hint"],
                "lti_message_hint": request.values["lti_message_hint"],
                "state": state,
                "nonce": nonce,
            }
            response = app.redirect(self.platform.auth_url + "?" + urlencode(query), 302)
            response.set_cookie("lti1p3-" + state, state)
            return response

        @app.route("/lti/launch", methods=["POST"])
        def launch() -> Any:
            return jsonify(form=request.form.to_dict(), cookies=request.cookies.to_dict())

        self.server = ServedApp(app)
        self.url = self.server.url


@pytest.fixture(scope="module")
def tool(platform: FakePlatform) -> Iterator[StandInTool]:
    stand_in = StandInTool(platform)
    platform.register_tool(stand_in.url)
    with stand_in.server:
        yield stand_in


@pytest.fixture()
def browser(tool: StandInTool) -> Iterator[requests.Session]:
    tool.mode = "redirect"
    with requests.Session() as session:
        yield session


# --------------------------------------------------------------------------- endpoints


def test_jwks_has_moodle_shape_and_counts_fetches(platform: FakePlatform) -> None:
    before = platform.jwks_fetches
    answer = requests.get(platform.jwks_url, timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    keys = answer.json()["keys"]
    assert len(keys) == 1
    assert set(keys[0]) == {"kty", "alg", "use", "kid", "n", "e"}
    assert keys[0]["kty"] == "RSA" and keys[0]["alg"] == "RS256" and keys[0]["use"] == "sig"
    assert keys[0]["kid"] == platform.kid
    assert len(_b64decode(keys[0]["n"])) == 256  # 2048-bit modulus
    assert platform.jwks_fetches == before + 1


def test_platform_add_args_and_token_placeholder(platform: FakePlatform) -> None:
    args = platform.platform_add_args()
    assert args == {
        "issuer": platform.url,
        "client_id": platform.client_id,
        "deployment_id": "1",
        "auth_url": platform.url + "/mod/lti/auth.php",
        "token_url": platform.url + "/mod/lti/token.php",
        "jwks_url": platform.url + "/mod/lti/certs.php",
    }
    assert len(platform.client_id) == 15 and platform.client_id.isalnum()
    assert requests.post(platform.token_url, timeout=5).status_code == 501


def _auth_query(platform: FakePlatform, tool: StandInTool, **changes: str) -> dict[str, str]:
    query = {
        "scope": "openid",
        "response_type": "id_token",
        "response_mode": "form_post",
        "prompt": "none",
        "client_id": platform.client_id,
        "redirect_uri": tool.url + "/lti/launch",
        "login_hint": "4",
        "lti_message_hint": json.dumps({"cmid": 2, "launchid": "ltilaunch1_0"}),
        "state": "state-x",
        "nonce": "nonce-x",
    }
    query.update(changes)
    return {name: value for name, value in query.items() if value != ""}


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"client_id": "someoneElse0000"}, "unauthorized_client"),
        ({"redirect_uri": "http://127.0.0.1:1/lti/launch"}, "invalid_request"),
        ({"scope": "openid profile"}, "invalid_scope"),
        ({"response_type": "code"}, "unsupported_response_type"),
        ({"nonce": ""}, "invalid_request"),
        ({"state": ""}, "invalid_request"),
        ({"login_hint": ""}, "invalid_request"),
        ({"response_mode": "query"}, "invalid_request"),
        ({}, "invalid_request"),  # a well-formed request, but no such pending launch
    ],
)
def test_auth_endpoint_rejects_bad_requests(
    platform: FakePlatform, tool: StandInTool, changes: dict[str, str], error: str
) -> None:
    answer = requests.get(
        platform.auth_url, params=_auth_query(platform, tool, **changes), timeout=5
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == error
    assert answer.json()["error_description"]


# --------------------------------------------------------------------------- claims


def test_claims_follow_the_fixtures(platform: FakePlatform, tool: StandInTool) -> None:
    for claims, fixture in (
        (platform.learner(), "launch_learner.json"),
        (platform.instructor(), "launch_instructor.json"),
        (platform.deep_linking(), "launch_deep_linking.json"),
    ):
        captured = load_fixture(fixture)["claims"]
        assert set(claims) == set(captured) - {"nonce"}
        assert claims["iss"] == platform.url
        assert claims["aud"] == platform.client_id
        assert claims[DEPLOYMENT_ID] == platform.deployment_id
        assert claims[TARGET_LINK_URI] == tool.url + "/lti/launch"
        assert claims["exp"] == claims["iat"] + 60
        assert claims[MESSAGE_TYPE] == captured[MESSAGE_TYPE]
        if platform.url != captured["iss"]:
            assert captured["iss"] not in json.dumps(claims)
    assert platform.learner()["sub"] == "4"
    assert platform.instructor()[ROLES] == [ROLE_INSTRUCTOR]
    settings = platform.deep_linking()[DL_SETTINGS]
    assert settings["deep_link_return_url"].startswith(
        platform.url + "/mod/lti/contentitem_return.php?course=2&id=1&"
    )


def test_claim_overrides(platform: FakePlatform) -> None:
    claims = platform.learner(
        sub="17",
        context_id=5,
        resource_link_id="9",
        roles="Instructor",
        name="Ada Lovelace",
        email="ada@example.com",
        lineitem_id=None,
        azp="x",
    )
    assert claims["sub"] == "17"
    assert claims[CONTEXT]["id"] == "5" and claims[RESOURCE_LINK]["id"] == "9"
    assert claims[ROLES] == ["Instructor"]
    assert (claims["name"], claims["given_name"], claims["family_name"]) == (
        "Ada Lovelace",
        "Ada",
        "Lovelace",
    )
    assert claims["email"] == "ada@example.com"
    assert claims["azp"] == "x"
    memberships = f"{platform.url}/mod/lti/services.php/CourseSection/5/bindings/1/memberships"
    assert claims[NRPS]["context_memberships_url"] == memberships
    assert claims[CUSTOM]["context_memberships_url"] == memberships
    assert claims[AGS]["lineitems"] == f"{platform.url}/mod/lti/services.php/5/lineitems?type_id=1"
    assert "lineitem" not in claims[AGS]

    nameless = platform.learner(name=None, email=None, context=None, roles=[], ags=False)
    assert not {"name", "given_name", "family_name", "email", CONTEXT, AGS} & set(nameless)
    assert nameless[ROLES] == []
    late = platform.learner(iat=1000)
    assert (late["iat"], late["exp"]) == (1000, 1060)
    full = platform.learner()
    assert "name" not in without_name(full) and "email" in without_name(full)
    assert "email" not in without_email(full) and "name" in without_email(full)
    assert not {"name", "email", "given_name"} & set(without_personal_data(full))
    with pytest.raises(TypeError, match="contextid"):
        platform.learner(contextid="3")


# --------------------------------------------------------------------------- the driver


def test_learner_launch_round_trip(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    result = platform.launch(browser, tool.url, platform.learner())

    login = tool.logins[-1]
    assert list(login) == list(load_fixture("login_initiation.json")["form"])
    assert login["iss"] == platform.url and login["login_hint"] == "4"
    assert login["client_id"] == platform.client_id and login["lti_deployment_id"] == "1"
    assert login["target_link_uri"] == tool.url + "/lti/launch"
    assert set(json.loads(login["lti_message_hint"])) == {"cmid", "launchid"}
    assert result.login_response.status_code == 302

    action, method, fields = parse_auto_submit_form(result.auth_response.text)
    assert (action, method, set(fields)) == (
        tool.url + "/lti/launch",
        "post",
        {"id_token", "state"},
    )
    assert "document.ltiAuthForm.submit()" in result.auth_response.text

    echoed = result.launch_response.json()
    assert echoed["form"] == {"id_token": result.id_token, "state": result.state}
    assert echoed["cookies"]["lti1p3-" + result.state] == result.state
    assert tool.issued[result.state] == result.nonce

    decoded = _verify(platform, result.id_token)
    assert decoded == result.claims
    assert decoded["nonce"] == result.nonce
    assert decoded["exp"] == decoded["iat"] + 60
    assert decoded["aud"] == platform.client_id and isinstance(decoded["aud"], str)
    assert set(decoded) == set(load_fixture("launch_learner.json")["claims"])
    assert _header(result.id_token) == {"typ": "JWT", "alg": "RS256", "kid": platform.kid}


def test_get_login_and_deep_linking(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    result = platform.launch(browser, tool.url, platform.deep_linking(), login_method="GET")
    assert _verify(platform, result.id_token)[MESSAGE_TYPE] == "LtiDeepLinkingRequest"
    assert result.launch_response.status_code == 200


def test_alg_confusion_hs256_token(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    result = platform.launch(browser, tool.url, platform.learner(), alg="HS256")
    assert _header(result.id_token) == {"typ": "JWT", "alg": "HS256", "kid": platform.kid}
    signing_input, _, signature = result.id_token.rpartition(".")
    expected = hmac.new(platform.public_key_pem, signing_input.encode(), hashlib.sha256).digest()
    assert _b64decode(signature) == expected
    assert platform.public_key_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(jwt.exceptions.InvalidKeyError):  # pyjwt refuses PEMs as HMAC secrets
        jwt.decode(
            result.id_token,
            platform.public_key_pem,
            algorithms=["HS256"],
            audience=platform.client_id,
        )


def test_unsigned_none_token(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    result = platform.launch(browser, tool.url, platform.learner(), alg="none")
    assert _header(result.id_token) == {"typ": "JWT", "alg": "none", "kid": platform.kid}
    assert result.id_token.endswith(".")
    assert _payload(result.id_token) == result.claims


def test_header_drop_mutate_and_foreign_key_hooks(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    wrong_kid = platform.launch(browser, tool.url, platform.learner(), header={"kid": "wrong"})
    assert _header(wrong_kid.id_token)["kid"] == "wrong"
    no_kid = platform.launch(browser, tool.url, platform.learner(), header={"kid": None})
    assert "kid" not in _header(no_kid.id_token)

    def add_azp(claims: dict[str, Any]) -> None:
        claims["azp"] = "not-us"

    edited = platform.launch(
        browser, tool.url, platform.learner(), mutate=add_azp, drop=("exp", (RESOURCE_LINK, "id"))
    )
    payload = _payload(edited.id_token)
    assert payload["azp"] == "not-us" and "exp" not in payload
    assert "id" not in payload[RESOURCE_LINK]
    assert (
        platform.launch(
            browser, tool.url, platform.learner(), mutate=without_personal_data
        ).claims.get("name")
        is None
    )

    fixed_nonce = platform.launch(browser, tool.url, platform.learner(nonce="chosen"))
    assert _payload(fixed_nonce.id_token)["nonce"] == "chosen" != fixed_nonce.nonce

    forged = platform.launch(browser, tool.url, platform.learner(), sign_with=foreign_private_key())
    assert _header(forged.id_token)["kid"] == platform.kid
    with pytest.raises(jwt.exceptions.InvalidSignatureError):
        _verify(platform, forged.id_token)

    with pytest.raises(KeyError, match="no_such_claim"):
        platform.launch(browser, tool.url, platform.learner(), drop=("no_such_claim",))


def test_raw_token_wrong_state_missing_cookie_and_replay(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    raw = platform.launch(browser, tool.url, platform.learner(), raw_id_token="not a jwt")
    assert raw.launch_response.json()["form"]["id_token"] == "not a jwt"

    wrong_state = platform.launch(
        browser, tool.url, platform.learner(), state_override="state-forged"
    )
    assert wrong_state.launch_response.json()["form"]["state"] == "state-forged"

    cookieless = platform.launch(browser, tool.url, platform.learner(), without_state_cookie=True)
    assert cookieless.launch_response.json()["cookies"] == {}

    first = platform.launch(browser, tool.url, platform.learner())
    again = platform.replay(browser, tool.url, first)
    assert again.json()["form"] == {"id_token": first.id_token, "state": first.state}


def test_message_hint_is_single_use(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    result = platform.launch(browser, tool.url, platform.learner())
    replayed_auth = browser.get(result.login_response.headers["Location"])
    assert replayed_auth.status_code == 400
    assert "already used" in replayed_auth.json()["error_description"]


def test_driver_reports_login_and_auth_failures(
    platform: FakePlatform, tool: StandInTool, browser: requests.Session
) -> None:
    tool.mode = "cookie_check"
    with pytest.raises(FakePlatformError, match="cookie check page"):
        platform.launch(browser, tool.url, platform.learner())
    tool.mode = "error"
    with pytest.raises(FakePlatformError, match="HTTP 400"):
        platform.launch(browser, tool.url, platform.learner())
    tool.mode = "wrong_redirect_uri"
    with pytest.raises(FakePlatformError, match="not a registered redirection URI") as caught:
        platform.launch(browser, tool.url, platform.learner())
    assert caught.value.response is not None and caught.value.response.status_code == 400
    tool.mode = "redirect"
    with pytest.raises(FakePlatformError, match="access_denied"):
        platform.launch(browser, tool.url, platform.learner(), login_hint="99")


def test_key_rotation(tool: StandInTool) -> None:
    with (
        FakePlatform(key_namespace="test_fakeplatform_rotation") as platform,
        requests.Session() as browser,
    ):
        platform.register_tool(tool.url)
        tool.platform, original = platform, tool.platform
        try:
            old_kid = platform.kid
            new_kid = platform.rotate_key()
            assert new_kid != old_kid == platform.keys[0].kid
            assert [
                k["kid"] for k in requests.get(platform.jwks_url, timeout=5).json()["keys"]
            ] == [old_kid, new_kid]
            result = platform.launch(browser, tool.url, platform.learner())
            assert _header(result.id_token)["kid"] == new_kid
            assert _verify(platform, result.id_token)["sub"] == "4"

            unpublished = platform.rotate_key(publish=False)
            assert platform.published_kids == [old_kid, new_kid]
            platform.publish_keys()
            assert platform.published_kids == [old_kid, new_kid, unpublished]
            platform.rotate_key(retire_old=True)
            assert len(platform.jwks()["keys"]) == 1
            platform.publish_keys([])
            assert platform.jwks() == {"keys": []}
        finally:
            tool.platform = original
