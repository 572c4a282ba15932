"""The built-in practice platform of `labpool demo`: pages, OIDC auth endpoint, id_token, key."""

from __future__ import annotations

import stat
from html.parser import HTMLParser
from urllib.parse import urlencode

import jwt
import pytest
import requests

from lti_tool.web.practice_platform import CLIENT_ID, DEPLOYMENT_ID, PracticePlatform

TOOL_URL = "http://127.0.0.1:9"  # nothing listens there; the tool itself is not needed
LTI = "https://purl.imsglobal.org/spec/lti/claim/"
LEARNER = "http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"


class _Forms(HTMLParser):
    """Collects forms (action, method, named inputs) and links of an HTML page."""

    def __init__(self, page: str):
        super().__init__()
        self.forms: list[dict] = []
        self.links: dict[str, str] = {}
        self._href: str | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append(
                {"action": a.get("action"), "method": (a.get("method") or "").lower(), "fields": {}}
            )
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")
        elif tag == "a":
            self._href = a.get("href")

    def handle_data(self, data):
        if self._href is not None and data.strip():
            self.links[data.strip()] = self._href

    def handle_endtag(self, tag):
        if tag == "a":
            self._href = None


@pytest.fixture
def practice(tmp_path):
    """(Not named `platform`: tests/conftest.py has a `platform` fixture of its own.)"""
    with PracticePlatform(tmp_path, TOOL_URL) as p:
        yield p


def _auth_query(practice, **overrides):
    params = {
        "scope": "openid",
        "response_type": "id_token",
        "response_mode": "form_post",
        "prompt": "none",
        "client_id": CLIENT_ID,
        "redirect_uri": TOOL_URL + "/lti/launch",
        "login_hint": "student1",
        "lti_message_hint": "student1",
        "state": "state-abc",
        "nonce": "nonce-xyz",
    }
    params.update(overrides)
    return practice.url + "/auth?" + urlencode({k: v for k, v in params.items() if v is not None})


def test_home_page_links_the_four_launches(practice):
    r = requests.get(practice.url + "/", timeout=5)
    assert r.status_code == 200
    assert "Labpool practice platform — a stand-in for Moodle" in r.text
    assert "Practice course" in r.text and "Python lab" in r.text
    links = _Forms(r.text).links
    assert links["Launch as student 1"] == "/launch/student1"
    assert links["Launch as student 2"] == "/launch/student2"
    assert links["Launch as student 3"] == "/launch/student3"
    assert links["Launch as teacher"] == "/launch/teacher"


def test_launch_posts_login_initiation_to_the_tool(practice):
    r = requests.get(practice.url + "/launch/student1", timeout=5)
    assert r.status_code == 200
    (form,) = _Forms(r.text).forms
    assert form["action"] == "http://127.0.0.1:9/lti/login"
    assert form["method"] == "post"
    assert form["fields"] == {
        "iss": practice.url,
        "login_hint": "student1",
        "target_link_uri": "http://127.0.0.1:9/lti/launch",
        "lti_message_hint": "student1",
        "client_id": CLIENT_ID,
        "lti_deployment_id": DEPLOYMENT_ID,
    }
    assert "Continue" in r.text and ".submit()" in r.text
    assert requests.get(practice.url + "/launch/admin", timeout=5).status_code == 404


def test_auth_answers_a_signed_id_token_that_verifies_against_the_jwks(practice):
    r = requests.get(_auth_query(practice), timeout=5)
    assert r.status_code == 200, r.text
    (form,) = _Forms(r.text).forms
    assert form["action"] == TOOL_URL + "/lti/launch" and form["method"] == "post"
    assert form["fields"]["state"] == "state-abc"
    token = form["fields"]["id_token"]

    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["kid"] == practice.kid
    signing_key = jwt.PyJWKClient(practice.url + "/jwks").get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        signing_key.key,
        algorithms=["RS256"],
        audience=CLIENT_ID,
        issuer=practice.url,
        options={"require": ["exp", "iat", "nonce"]},
    )
    assert claims["aud"] == CLIENT_ID
    assert claims["exp"] == claims["iat"] + 60
    assert claims["sub"] == "101" and claims["name"] == "Student One"
    assert claims["nonce"] == "nonce-xyz"
    assert claims[LTI + "roles"] == [LEARNER]
    assert claims[LTI + "deployment_id"] == DEPLOYMENT_ID
    assert claims[LTI + "message_type"] == "LtiResourceLinkRequest"
    assert claims[LTI + "version"] == "1.3.0"
    assert claims[LTI + "resource_link"]["id"] == "lab-1"
    assert claims[LTI + "context"]["id"] == "practice-1"
    assert claims[LTI + "target_link_uri"] == TOOL_URL + "/lti/launch"
    assert claims[LTI + "launch_presentation"]["return_url"] == practice.url + "/"
    assert claims[LTI + "tool_platform"]["product_family_code"] == "labpool-practice"
    nrps = claims["https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice"]
    assert nrps["context_memberships_url"].startswith(practice.url + "/")

    jwks = requests.get(practice.url + "/jwks", timeout=5).json()
    (key,) = jwks["keys"]
    assert {k: key[k] for k in ("kty", "alg", "use", "kid")} == {
        "kty": "RSA",
        "alg": "RS256",
        "use": "sig",
        "kid": practice.kid,
    }


def test_teacher_gets_the_instructor_role(practice):
    r = requests.post(
        practice.url + "/auth",
        data={
            "scope": "openid",
            "response_type": "id_token",
            "client_id": CLIENT_ID,
            "redirect_uri": TOOL_URL + "/lti/launch",
            "login_hint": "teacher",
            "lti_message_hint": "teacher",
            "state": "s",
            "nonce": "n",
        },
        timeout=5,
    )
    assert r.status_code == 200, r.text
    token = _Forms(r.text).forms[0]["fields"]["id_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "100"
    assert claims[LTI + "roles"] == ["http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"redirect_uri": "http://evil.example/lti/launch"},
        {"client_id": "someone-else"},
        {"response_type": "code"},
        {"scope": "profile"},
        {"nonce": None},
        {"state": None},
        {"login_hint": "mallory", "lti_message_hint": "mallory"},
        {"lti_message_hint": "student2"},
    ],
)
def test_auth_refuses_bad_requests_with_400(practice, overrides):
    r = requests.get(_auth_query(practice, **overrides), timeout=5)
    assert r.status_code == 400
    assert r.headers["Content-Type"].startswith("text/plain")
    assert "id_token" not in r.text or "response_type" in r.text


def test_token_endpoint_is_not_implemented_yet(practice):
    r = requests.post(practice.url + "/token", data={"grant_type": "client_credentials"}, timeout=5)
    assert r.status_code == 501 and r.json()["error"] == "unsupported"


def test_registration_values(practice):
    reg = practice.registration()
    assert reg == {
        "issuer": practice.url,
        "client_id": CLIENT_ID,
        "deployment_ids": [DEPLOYMENT_ID],
        "auth_url": practice.url + "/auth",
        "token_url": practice.url + "/token",
        "jwks_url": practice.url + "/jwks",
        "name": "Practice platform",
    }
    assert not practice.url.endswith("/")


def test_key_file_is_private_and_reused(tmp_path):
    first = PracticePlatform(tmp_path, TOOL_URL)
    key_file = tmp_path / "practice_platform_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    pem = key_file.read_bytes()
    second = PracticePlatform(tmp_path, TOOL_URL)
    assert second.kid == first.kid and len(first.kid) == 16
    assert key_file.read_bytes() == pem


def test_pages_escape_what_they_show(tmp_path):
    p = PracticePlatform(tmp_path, 'http://127.0.0.1:9/"><script>alert(1)</script>', port=8)
    page = p.app.test_client().get("/").get_data(as_text=True)
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page
    page = p.app.test_client().get("/launch/student1").get_data(as_text=True)
    assert '"><script>' not in page
