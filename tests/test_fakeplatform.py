"""Tests of the fake Moodle platform itself (tests/fakeplatform.py), not of the tool.

The driver is exercised against a tiny stand-in tool (a Flask app defined here) that answers
/lti/login with a 302 carrying state and nonce (and a state cookie) and echoes /lti/launch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
import pytest
import requests
from flask import Flask, jsonify, request

from tests.fakeplatform import (
    AGS,
    CLIENT_ASSERTION_TYPE,
    CONTEXT,
    CUSTOM,
    DEPLOYMENT_ID,
    DL_SETTINGS,
    MESSAGE_TYPE,
    NRPS,
    NRPS_MEDIA_TYPE,
    RESOURCE_LINK,
    ROLE_INSTRUCTOR,
    ROLE_LEARNER,
    ROLES,
    SCOPE_AGS_SCORE,
    SCOPE_NRPS,
    TARGET_LINK_URI,
    FakePlatform,
    FakePlatformError,
    ServedApp,
    SigningKey,
    foreign_private_key,
    jwk_thumbprint,
    load_fixture,
    parse_auto_submit_form,
    tool_public_jwk,
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


def test_platform_add_args(platform: FakePlatform) -> None:
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
    empty = requests.post(platform.token_url, timeout=5)
    assert (empty.status_code, empty.json()["error"]) == (400, "invalid_request")


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


# --------------------------------------------------------------------------- token.php


class ToolKeyset:
    """A tool's public keyset on loopback (what ``<tool>/lti/jwks.json`` would serve)."""

    def __init__(self) -> None:
        self.key = SigningKey.cached("test_fakeplatform_tool", 0).private_key
        self.kid = jwk_thumbprint(self.key)
        self.keys: list[dict[str, str]] = [tool_public_jwk(self.key)]
        app = Flask(__name__)

        @app.get("/lti/jwks.json")
        def jwks() -> Any:
            return jsonify(keys=self.keys)

        self.server = ServedApp(app)
        self.url = self.server.url + "/lti/jwks.json"


@pytest.fixture(scope="module")
def tool_keyset(platform: FakePlatform) -> Iterator[ToolKeyset]:
    keyset = ToolKeyset()
    with keyset.server:
        platform.tool_jwks_url = keyset.url
        yield keyset


@pytest.fixture()
def keyset(platform: FakePlatform, tool_keyset: ToolKeyset) -> Iterator[ToolKeyset]:
    tool_keyset.keys = [tool_public_jwk(tool_keyset.key)]
    platform.tool_jwks_url = tool_keyset.url
    platform.strict_client_assertion = True
    yield tool_keyset
    tool_keyset.keys = [tool_public_jwk(tool_keyset.key)]
    platform.strict_client_assertion = True


def test_token_endpoint_issues_tokens(platform: FakePlatform, keyset: ToolKeyset) -> None:
    platform.forget_tool_jwks()
    fetches, issued = platform.tool_jwks_fetches, platform.tokens_issued
    answer = platform.request_token(
        keyset.key,
        [SCOPE_NRPS, "https://example.com/unknown-scope", SCOPE_AGS_SCORE],
        kid=keyset.kid,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == f"{SCOPE_NRPS} {SCOPE_AGS_SCORE}"  # unknown scopes are dropped
    assert len(body["access_token"]) == 32
    assert answer.headers["Content-Type"].startswith("text/html")  # as Moodle's token.php
    token = platform.tokens[body["access_token"]]
    assert token.scopes == (SCOPE_NRPS, SCOPE_AGS_SCORE) and token.type_id == "1"
    assert 3590 < token.expires_at - token.issued_at <= 3600 and not token.expired
    assert platform.tokens_issued == issued + 1
    assert platform.tool_jwks_fetches == fetches + 1

    # The keyset is cached: a second request fetches nothing; a new kid refetches it once.
    assert platform.request_token(keyset.key, [SCOPE_NRPS], kid=keyset.kid).status_code == 200
    assert platform.tool_jwks_fetches == fetches + 1
    rotated = SigningKey.cached("test_fakeplatform_tool", 1).private_key
    keyset.keys.append(tool_public_jwk(rotated))
    assert (
        platform.request_token(rotated, [SCOPE_NRPS], kid=jwk_thumbprint(rotated)).status_code
        == 200
    )
    assert platform.tool_jwks_fetches == fetches + 2
    assert platform.tokens_issued == issued + 3


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("bad_signature", "invalid_client"),
        ("wrong_iss", "invalid_client"),
        ("wrong_sub", "invalid_client"),
        ("wrong_aud", "invalid_client"),
        ("expired", "invalid_client"),
        ("no_exp", "invalid_client"),
        ("no_jti", "invalid_client"),
        ("reused_jti", "invalid_client"),
        ("no_kid", "invalid_client"),
        ("unknown_kid", "invalid_client"),
        ("jwk_without_alg", "invalid_client"),
        ("no_keyset_url", "invalid_client"),
        ("unknown_scope", "invalid_scope"),
        ("wrong_grant_type", "unsupported_grant_type"),
        ("not_a_jwt", "invalid_request"),
        ("json_body", "invalid_request"),
    ],
)
def test_token_endpoint_refusals(
    platform: FakePlatform, keyset: ToolKeyset, case: str, error: str
) -> None:
    claims: dict[str, Any] = {}
    key, kid, scopes = keyset.key, keyset.kid, [SCOPE_NRPS]
    form_changes: dict[str, str] = {}
    if case == "bad_signature":
        key = foreign_private_key()
    elif case == "wrong_iss":
        claims["iss"] = "someone-else"
    elif case == "wrong_sub":
        claims["sub"] = "someoneElse0000"
    elif case == "wrong_aud":
        claims["aud"] = platform.url + "/elsewhere"
    elif case == "expired":
        claims.update(iat=1000, exp=1060)
    elif case == "no_exp":
        claims["exp"] = None
    elif case == "no_jti":
        claims["jti"] = None
    elif case == "reused_jti":
        claims["jti"] = "used-" + secrets.token_hex(4)
        first = platform.request_token(key, scopes, kid=kid, **claims)
        assert first.status_code == 200
    elif case == "no_kid":
        kid = None
    elif case == "unknown_kid":
        kid = "unknown"
    elif case == "jwk_without_alg":
        del keyset.keys[0]["alg"]
        platform.forget_tool_jwks()
    elif case == "no_keyset_url":
        platform.forget_tool_jwks()
        platform.tool_jwks_url = None
    elif case == "unknown_scope":
        scopes = ["https://example.com/unknown-scope"]
    elif case == "wrong_grant_type":
        form_changes["grant_type"] = "authorization_code"
    elif case == "not_a_jwt":
        form_changes["client_assertion"] = "not-a-jwt"

    issued = platform.tokens_issued
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": platform.client_assertion(key, kid=kid, **claims),
        "scope": " ".join(scopes),
        **form_changes,
    }
    if case == "json_body":
        answer = requests.post(platform.token_url, json=form, timeout=5)
    else:
        answer = requests.post(platform.token_url, data=form, timeout=5)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == error
    assert answer.json()["error_description"]
    assert platform.tokens_issued == issued


def test_token_endpoint_refetches_once_per_failure(
    platform: FakePlatform, keyset: ToolKeyset
) -> None:
    assert platform.request_token(keyset.key, [SCOPE_NRPS], kid=keyset.kid).status_code == 200
    fetches = platform.tool_jwks_fetches
    # Like Moodle's lti_verify_with_keyset: a failure with the cached keyset refetches once.
    bad = platform.request_token(foreign_private_key(), [SCOPE_NRPS], kid=keyset.kid)
    assert bad.json()["error_description"] == "Signature verification failed"
    assert platform.tool_jwks_fetches == fetches + 1
    unknown = platform.request_token(keyset.key, [SCOPE_NRPS], kid="nope")
    assert "kid" in unknown.json()["error_description"]
    assert platform.tool_jwks_fetches == fetches + 2


def test_lenient_mode_checks_only_what_moodle_checks(
    platform: FakePlatform, keyset: ToolKeyset
) -> None:
    platform.strict_client_assertion = False
    loose = {"iss": "whoever", "aud": "whatever", "exp": None, "jti": None}
    assert platform.request_token(keyset.key, [SCOPE_NRPS], kid=keyset.kid, **loose).ok
    assert platform.request_token(keyset.key, [SCOPE_NRPS], kid=keyset.kid, **loose).ok
    still = platform.request_token(foreign_private_key(), [SCOPE_NRPS], kid=keyset.kid)
    assert still.status_code == 400


# --------------------------------------------------------------------------- NRPS


def _course_members(platform: FakePlatform) -> list[dict[str, Any]]:
    return [
        platform.member("3", "Instructor", name="Ada Lovelace", email="ada@example.com"),
        platform.member("4", name="Alan Turing", email="alan@example.com"),
        platform.member("5"),  # a Moodle that shares no personal data
        platform.member("6", name="Grace Hopper"),
        platform.member(
            "7", ["Learner", "http://purl.imsglobal.org/vocab/lis/v2/membership#Mentor"]
        ),
    ]


@pytest.fixture()
def roster(platform: FakePlatform) -> list[dict[str, Any]]:
    members = _course_members(platform)
    platform.set_roster("2", members)
    return members


def _nrps_get(
    url: str, token: str | None, accept: str = NRPS_MEDIA_TYPE, **params: Any
) -> requests.Response:
    headers = {"Accept": accept}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(url, params=params or None, headers=headers, timeout=5)


def test_member_helper_and_launch_claims(platform: FakePlatform) -> None:
    assert platform.member("4", name="Alan Turing", email="a@example.com") == {
        "status": "Active",
        "roles": [ROLE_LEARNER],
        "user_id": "4",
        "lis_person_sourcedid": "",
        "name": "Alan Turing",
        "given_name": "Alan",
        "family_name": "Turing",
        "email": "a@example.com",
    }
    assert platform.member(3, "Instructor")["roles"] == [ROLE_INSTRUCTOR]
    claims = platform.learner(context_id=7)
    assert claims[NRPS]["context_memberships_url"] == platform.memberships_url(7)
    assert claims[CUSTOM]["context_memberships_url"] == platform.memberships_url(7)


def test_nrps_pages_with_limit(platform: FakePlatform, roster: list[dict[str, Any]]) -> None:
    token = platform.issue_token([SCOPE_NRPS])
    url = platform.memberships_url("2")
    before = len(platform.roster_requests)
    pages, next_url = [], url + "?limit=2"
    while next_url:
        answer = _nrps_get(next_url, token)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"].startswith(NRPS_MEDIA_TYPE)
        pages.append(answer.json())
        if "Link" in answer.headers:
            assert re.fullmatch(r'<[^>]+\?limit=2&from=\d>; rel="next"', answer.headers["Link"])
        next_url = answer.links.get("next", {}).get("url")
    assert [len(page["members"]) for page in pages] == [2, 2, 1]
    assert [m for page in pages for m in page["members"]] == roster
    assert pages[0]["id"] == url
    assert pages[0]["context"] == {"id": "2", "label": "LTI101", "title": "LTI 1.3 Test Course"}
    requests_made = platform.roster_requests[before:]
    assert [query for _, query in requests_made] == [
        {"limit": "2"},
        {"limit": "2", "from": "2"},
        {"limit": "2", "from": "4"},
    ]
    assert {path for path, _ in requests_made} == {urlsplit(url).path}


def test_nrps_without_limit_and_role_filter(
    platform: FakePlatform, roster: list[dict[str, Any]]
) -> None:
    token = platform.issue_token([SCOPE_NRPS])
    answer = _nrps_get(platform.memberships_url(2), token)
    assert answer.status_code == 200 and "Link" not in answer.headers
    assert answer.json()["members"] == roster
    everything = _nrps_get(platform.memberships_url(2), token, accept="*/*")
    assert everything.json()["members"] == roster
    teachers = _nrps_get(platform.memberships_url(2), token, role="Instructor").json()
    assert [m["user_id"] for m in teachers["members"]] == ["3"]
    learners = _nrps_get(platform.memberships_url(2), token, role=ROLE_LEARNER).json()
    assert [m["user_id"] for m in learners["members"]] == ["4", "5", "6", "7"]


def test_nrps_refusals(platform: FakePlatform, roster: list[dict[str, Any]]) -> None:
    url = platform.memberships_url(2)
    assert _nrps_get(url, None).status_code == 401
    assert _nrps_get(url, "not-a-token").status_code == 401
    wrong_scope = platform.issue_token([SCOPE_AGS_SCORE])
    assert _nrps_get(url, wrong_scope).status_code == 401  # Moodle: any token failure is 401
    expired = platform.issue_token([SCOPE_NRPS], lifetime=0)
    assert _nrps_get(url, expired).status_code == 401
    refused = _nrps_get(url, None)
    assert refused.json()["status"] == 401 and refused.json()["reason"] == "Unauthorized"

    token = platform.issue_token([SCOPE_NRPS])
    assert _nrps_get(platform.memberships_url(999), token).status_code == 404
    other_type = url.replace("/bindings/1/", "/bindings/9/")
    assert _nrps_get(other_type, token).status_code == 401  # the token is bound to type 1
    assert _nrps_get(url, token, accept="application/json").status_code == 400
    bearer = {"Authorization": f"Bearer {token}"}
    assert requests.post(url, headers=bearer, timeout=5).status_code == 400  # no handler
    posted = requests.post(url, headers={**bearer, "Content-Type": NRPS_MEDIA_TYPE}, timeout=5)
    assert posted.status_code == 405
    platform.expire_tokens()
    assert _nrps_get(url, token).status_code == 401


def test_fail_roster_page(platform: FakePlatform, roster: list[dict[str, Any]]) -> None:
    token = platform.issue_token([SCOPE_NRPS])
    url = platform.memberships_url(2)
    platform.fail_roster_page(2)
    platform.fail_roster_page(3, status=503)
    first = _nrps_get(url, token, limit=2)
    assert first.status_code == 200
    second = _nrps_get(first.links["next"]["url"], token)
    assert second.status_code == 500 and second.json()["status"] == 500
    third = _nrps_get(first.links["next"]["url"], token)
    assert third.status_code == 503
    again = _nrps_get(first.links["next"]["url"], token)  # each fault fires once
    assert again.status_code == 200
    assert [m["user_id"] for m in again.json()["members"]] == ["5", "6"]
    with pytest.raises(ValueError):
        platform.fail_roster_page(0)


# --------------------------------------------------------------------------- with pylti1p3


def test_pylti1p3_service_connector_reads_the_whole_roster(
    platform: FakePlatform, keyset: ToolKeyset, roster: list[dict[str, Any]]
) -> None:
    from cryptography.hazmat.primitives import serialization
    from pylti1p3.exception import LtiServiceException
    from pylti1p3.names_roles import NamesRolesProvisioningService
    from pylti1p3.registration import Registration
    from pylti1p3.service_connector import ServiceConnector

    class CachingConnector(ServiceConnector):  # the base class leaves the cache abstract
        def __init__(self, registration: Registration) -> None:
            super().__init__(registration)
            self.cache: dict[str, str] = {}

        def _get_cached_access_token(self, scope_key: str) -> str | None:
            return self.cache.get(scope_key)

        def _cache_access_token(self, scope_key: str, access_token: str, expires_in: float):
            self.cache[scope_key] = access_token

    private_pem = keyset.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        keyset.key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    registration = (
        Registration()
        .set_issuer(platform.issuer)
        .set_client_id(platform.client_id)
        .set_auth_token_url(platform.token_url)
        .set_tool_private_key(private_pem)
    )
    # Without the public key pylti1p3 sends no kid, and Moodle cannot pick a key.
    with pytest.raises(LtiServiceException):
        NamesRolesProvisioningService(
            CachingConnector(registration),
            {"context_memberships_url": platform.memberships_url(2)},
        ).get_members()

    registration.set_tool_public_key(public_pem)
    assert registration.get_kid() == keyset.kid == jwk_thumbprint(keyset.key)
    assert registration.get_jwks() == [tool_public_jwk(keyset.key)]

    issued, before = platform.tokens_issued, len(platform.roster_requests)
    service = NamesRolesProvisioningService(
        CachingConnector(registration),
        {"context_memberships_url": platform.memberships_url(2) + "?limit=2"},
    )
    assert service.get_members() == roster
    assert len(platform.roster_requests) - before == 3
    assert platform.tokens_issued == issued + 1  # one token, reused across the pages
    assert service.get_context() == {"id": "2", "label": "LTI101", "title": "LTI 1.3 Test Course"}
