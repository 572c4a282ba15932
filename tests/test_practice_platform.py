"""The built-in practice platform of `labpool demo`: pages, OIDC auth endpoint, id_token, key;
and its services (token, NRPS, AGS) driven by the real tool's own service code: a teacher's
launch, the roster sync and a manual grade through the outbox, as `./dev demo` runs them."""

from __future__ import annotations

import stat
import time
import uuid
from datetime import UTC, datetime
from html.parser import HTMLParser
from urllib.parse import urlencode

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from config.db import transaction
from grading.models import Assignment
from grading.outbox import send_due_scores
from jwks.keys import active_signing_key
from lti_tool.models import Course, Enrolment, Platform, User
from lti_tool.registrations import register_platform
from lti_tool.services.ags import AgsClient, AgsError, Score
from lti_tool.services.connector import connector_for
from lti_tool.services.nrps import sync_course
from lti_tool.web.practice_platform import (
    AGS_SCOPES,
    CLIENT_ASSERTION_TYPE,
    CLIENT_ID,
    DEPLOYMENT_ID,
    LINEITEM_TYPE,
    NRPS_TYPE,
    SCOPE_LINEITEM,
    SCOPE_LINEITEM_READONLY,
    SCOPE_NRPS,
    SCOPE_SCORE,
    SCORE_TYPE,
    PracticePlatform,
)
from tests.test_grades import create_assignment, grade, user_id_of

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
    assert "Gradebook" in r.text and "no grades yet" in r.text


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


GOOD_FORM = {
    "grant_type": "client_credentials",
    "client_assertion_type": CLIENT_ASSERTION_TYPE,
    "client_assertion": "x.y.z",
    "scope": SCOPE_NRPS,
}


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"client_assertion": None, "scope": None}, "invalid_request"),
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({"client_assertion_type": "urn:example:other"}, "invalid_request"),
        ({"scope": ""}, "invalid_request"),
        ({}, "invalid_client"),  # "x.y.z" is no JWT
    ],
)
def test_token_endpoint_refuses_malformed_requests_with_oauth2_errors(practice, changes, error):
    data = {k: v for k, v in {**GOOD_FORM, **changes}.items() if v is not None}
    r = requests.post(practice.url + "/token", data=data, timeout=5)
    assert r.status_code == (401 if error == "invalid_client" else 400)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["error"] == error and r.json()["error_description"]
    assert "access_token" not in r.json() and practice.tokens_issued == 0
    as_json = requests.post(practice.url + "/token", json=data, timeout=5)
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    assert practice.tokens_issued == 0


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


# ------------------------------------------------------------------ with the real tool
#
# The practice platform in front of the tool under test, registered as `labpool demo` does it
# (`register_platform(**PracticePlatform.registration())`); the tool's own service code
# (connector, NRPS sync, AGS client, grading outbox) talks to it over HTTP.


@pytest.fixture
def live(tool, rt, tmp_path):
    with PracticePlatform(tmp_path / "practice", tool.url) as p:
        with transaction(rt.sessions) as session:
            register_platform(session, rt.settings, **p.registration())
        yield p


def launch_through(practice, tool, who: str) -> tuple[requests.Session, str]:
    """A browser clicking "Launch as …" on the practice home page: login initiation, the
    platform's auth endpoint, the id_token POST. Returns the browser and the tool's page."""
    browser = requests.Session()
    page = browser.get(f"{practice.url}/launch/{who}", timeout=10)
    (form,) = _Forms(page.text).forms
    login = browser.post(form["action"], data=form["fields"], allow_redirects=False, timeout=10)
    assert login.status_code == 302, login.text[:300]
    assert login.headers["Location"].startswith(practice.url + "/auth?")
    auth = browser.get(login.headers["Location"], timeout=10)
    assert auth.status_code == 200, auth.text[:300]
    (form,) = _Forms(auth.text).forms
    launched = browser.post(form["action"], data=form["fields"], allow_redirects=False, timeout=10)
    assert launched.status_code == 303, launched.text[:300]
    return browser, tool.url + launched.headers["Location"]


def course_of(rt, practice) -> Course:
    with rt.sessions() as session:
        return session.scalars(
            select(Course).where(
                Course.memberships_url == f"{practice.url}/nrps/practice-1/memberships"
            )
        ).one()


def platform_row(rt, practice) -> Platform:
    with rt.sessions() as session:
        return session.scalars(select(Platform).where(Platform.issuer == practice.url)).one()


def practice_connector(rt, practice):
    with rt.sessions() as session:
        return connector_for(session, rt, platform_row(rt, practice))


def gradebook_rows(page: str) -> list[list[str]]:
    """The practice home page's gradebook table, as rows of cell texts."""

    class Table(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: list[list[str]] = []
            self._in_table = self._in_cell = False

        def handle_starttag(self, tag, attrs):
            if tag == "table" and ("class", "grades") in attrs:
                self._in_table = True
            elif self._in_table and tag == "tr":
                self.rows.append([])
            elif self._in_table and tag == "td":
                self._in_cell = True
                self.rows[-1].append("")

        def handle_endtag(self, tag):
            if tag == "table":
                self._in_table = False
            elif tag == "td":
                self._in_cell = False

        def handle_data(self, data):
            if self._in_cell:
                self.rows[-1][-1] += " ".join(data.split())

    table = Table()
    table.feed(page)
    return [row for row in table.rows if row]


def test_teacher_launch_then_roster_sync_lists_the_three_students(live, tool, rt):
    launch_through(live, tool, "teacher")
    course = course_of(rt, live)
    assert course.platform_error is None

    report = sync_course(rt, course.id)

    assert report.members == 4 and report.pages == 1 and report.ended == 0
    with rt.sessions() as session:
        course = session.get_one(Course, course.id)
        assert course.platform_error is None and course.roster_synced_at is not None
        enrolled = session.execute(
            select(User.sub, Enrolment.name, Enrolment.email, Enrolment.roles)
            .join(Enrolment, Enrolment.user_id == User.id)
            .where(Enrolment.course_id == course.id, Enrolment.ended_at.is_(None))
        ).all()
    students = {sub: (name, email) for sub, name, email, roles in enrolled if LEARNER in roles}
    assert students == {
        "101": ("Student One", "student1@example.com"),
        "102": ("Student Two", "student2@example.com"),
        "103": ("Student Three", "student3@example.com"),
    }
    teachers = [sub for sub, *_, roles in enrolled if LEARNER not in roles]
    assert teachers == ["100"]
    assert live.tokens_issued == 1


def test_memberships_answer_moodles_shape_and_pages_when_asked(live, tool, rt):
    token = practice_connector(rt, live).get_access_token([SCOPE_NRPS])
    url = f"{live.url}/nrps/practice-1/memberships"
    headers = {"Authorization": f"Bearer {token}", "Accept": NRPS_TYPE}

    r = requests.get(url, headers=headers, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith(NRPS_TYPE)
    body = r.json()
    assert body["id"] == url
    assert body["context"] == {"id": "practice-1", "label": "PRACTICE", "title": "Practice course"}
    assert {m["user_id"] for m in body["members"]} == {"100", "101", "102", "103"}
    assert all(m["status"] == "Active" for m in body["members"])
    one = next(m for m in body["members"] if m["user_id"] == "102")
    assert one["roles"] == [LEARNER] and one["given_name"] == "Student"
    assert one["family_name"] == "Two" and one["email"] == "student2@example.com"

    page = requests.get(url + "?limit=3", headers=headers, timeout=5)
    assert len(page.json()["members"]) == 3
    assert page.headers["Link"] == f'<{url}?limit=3&from=3>; rel="next"'
    last = requests.get(url + "?limit=3&from=3", headers=headers, timeout=5)
    assert len(last.json()["members"]) == 1 and "Link" not in last.headers
    learners = requests.get(url + "?role=Learner", headers=headers, timeout=5).json()["members"]
    assert {m["user_id"] for m in learners} == {"101", "102", "103"}

    assert requests.get(url, headers={"Accept": NRPS_TYPE}, timeout=5).status_code == 401
    bad = {"Authorization": "Bearer not-a-token", "Accept": NRPS_TYPE}
    refused = requests.get(url, headers=bad, timeout=5)
    assert refused.status_code == 401 and refused.json()["status"] == 401
    wrong_accept = {**headers, "Accept": "application/vnd.ims.lis.v2.membershipcontainer+json"}
    assert requests.get(url, headers=wrong_accept, timeout=5).status_code == 400
    other = requests.get(f"{live.url}/nrps/other-course/memberships", headers=headers, timeout=5)
    assert other.status_code == 404
    scores_only = practice_connector(rt, live).get_access_token([SCOPE_SCORE])
    lacking = {"Authorization": f"Bearer {scores_only}", "Accept": NRPS_TYPE}
    forbidden = requests.get(url, headers=lacking, timeout=5)
    assert forbidden.status_code == 403 and SCOPE_NRPS in forbidden.json()["reason"]


def test_a_manual_grade_lands_in_the_practice_gradebook_and_on_its_home_page(live, tool, rt):
    browser, class_url = launch_through(live, tool, "teacher")
    activity_id = int(class_url.split("/activities/")[1].split("/")[0])
    sync_course(rt, course_of(rt, live).id)
    home = requests.get(live.url + "/", timeout=5).text
    assert gradebook_rows(home) == [["Python lab", "no grades yet (out of 100)"]]

    lab = create_assignment(tool, browser, activity_id, name="lab1", max_score="10")
    one = user_id_of(rt, "101")
    answer = grade(tool, browser, activity_id, lab, one, "7.5", "Good <b>work</b>")
    assert answer.status_code == 303
    assert send_due_scores(rt) == {"sent": 1}

    stored = live.grade("101")
    assert stored["score_given"] == 7.5 and stored["score_maximum"] == 10
    assert stored["grade"] == 75.0  # rescaled to the grade item's 100, as Moodle does
    assert stored["comment"] == "Good <b>work</b>" and stored["grading_progress"] == "FullyGraded"
    assert live.grade("102") is None
    home = requests.get(live.url + "/", timeout=5).text
    assert "<b>work</b>" not in home and "Good &lt;b&gt;work&lt;/b&gt;" in home
    ((item, student, score, graded, comment, when),) = gradebook_rows(home)
    assert (item, student, score, graded, comment) == (
        "Python lab",
        "Student One",
        "7.5 / 10",
        "75 / 100",
        "Good <b>work</b>",
    )
    assert datetime.fromisoformat(when) == stored["timestamp"]

    # A second assignment gets a grade item of its own, found or made in the container.
    create_assignment(tool, browser, activity_id, name="lab2", max_score="20")
    with rt.sessions() as session:
        lab2 = session.scalars(select(Assignment.id).where(Assignment.name == "lab2")).one()
    assert grade(tool, browser, activity_id, lab2, user_id_of(rt, "102"), "15").status_code == 303
    assert send_due_scores(rt) == {"sent": 1}
    (made,) = [i for i in live.lineitems() if i["label"] == "Lab lab2"]
    assert made["scoreMaximum"] == 20 and made["tag"] == "labpool"
    assert made["resourceLinkId"] == "lab-1" and made["resourceId"]
    item_id = made["id"].split("/lineitems/")[1].split("/")[0]
    assert live.grade("102", item_id)["grade"] == 15.0
    rows = gradebook_rows(requests.get(live.url + "/", timeout=5).text)
    assert rows[-1][:5] == ["Lab lab2", "Student Two", "15 / 20", "15 / 20", ""]


def _assertion(key_pem, kid: str, **claims) -> str:
    now = int(time.time())
    body = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": "",
        "iat": now - 5,
        "exp": now + 60,
        "jti": f"lti-service-token-{uuid.uuid4()}",
        **claims,
    }
    return jwt.encode(body, key_pem, algorithm="RS256", headers={"kid": kid})


def _ask(practice, assertion: str, scope: str = SCOPE_NRPS) -> requests.Response:
    return requests.post(
        practice.token_url,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion,
            "scope": scope,
        },
        timeout=10,
    )


def test_forged_client_assertions_get_401_and_no_token(live, tool, rt):
    with rt.sessions() as session:
        key = active_signing_key(session, rt.settings.secret_key)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    aud = live.token_url
    good = _assertion(key.private_pem, key.kid, aud=aud)
    first = _ask(live, good, scope=f"{SCOPE_NRPS} https://example.com/scope/unknown")
    assert first.status_code == 200, first.text
    assert first.json()["token_type"] == "Bearer" and first.json()["expires_in"] == 3600
    assert first.json()["scope"] == SCOPE_NRPS and first.json()["access_token"]
    assert live.tokens_issued == 1

    forged = {
        "replayed jti": (good, "already used"),
        "wrong key": (_assertion(stranger, key.kid, aud=aud), "signature"),
        "wrong aud": (_assertion(key.private_pem, key.kid, aud="http://elsewhere/token"), "aud"),
        "unknown kid": (_assertion(key.private_pem, "not-our-kid", aud=aud), "no key"),
        "expired": (
            _assertion(key.private_pem, key.kid, aud=aud, exp=int(time.time()) - 1),
            "expired",
        ),
        "other client": (
            _assertion(key.private_pem, key.kid, aud=aud, iss="x", sub="x"),
            "client id",
        ),
        "no jti": (_assertion(key.private_pem, key.kid, aud=aud, jti=None), "jti"),
    }
    for case, (assertion, reason) in forged.items():
        r = _ask(live, assertion)
        assert r.status_code == 401, (case, r.text)
        assert r.json()["error"] == "invalid_client", case
        assert reason in r.json()["error_description"], (case, r.json())
        assert "access_token" not in r.json(), case
    assert live.tokens_issued == 1

    unknown_scope = _ask(live, _assertion(key.private_pem, key.kid, aud=aud), scope="openid")
    assert unknown_scope.status_code == 400 and unknown_scope.json()["error"] == "invalid_scope"
    assert live.tokens_issued == 1


def test_scores_follow_moodles_rules_and_bad_ones_change_nothing(live, tool, rt):
    connector = practice_connector(rt, live)
    client = AgsClient(connector, list(AGS_SCOPES))
    lineitem = live.lineitem_url("lab-1")
    stamp = datetime.now(UTC).replace(microsecond=0)
    client.post_score(lineitem, Score("103", 4, 5, "ok", stamp))
    assert live.grade("103")["grade"] == 80.0

    with pytest.raises(AgsError) as conflict:
        client.post_score(lineitem, Score("103", 1, 5, "older", stamp))
    assert conflict.value.conflict
    assert "Refusing score with an earlier timestamp for item lab-1 and user 103" in str(
        conflict.value
    )
    assert live.grade("103")["comment"] == "ok"

    token = connector.get_access_token(client.scopes)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": SCORE_TYPE}
    later = (stamp.replace(year=stamp.year + 1)).isoformat()
    valid = {
        "userId": "103",
        "timestamp": later,
        "activityProgress": "Completed",
        "gradingProgress": "FullyGraded",
        "scoreGiven": 1,
        "scoreMaximum": 5,
    }
    bad_bodies = [
        {k: v for k, v in valid.items() if k != "userId"},
        {k: v for k, v in valid.items() if k != "timestamp"},
        {k: v for k, v in valid.items() if k != "activityProgress"},
        {k: v for k, v in valid.items() if k != "gradingProgress"},
        {**valid, "timestamp": "yesterday"},
        {**valid, "timestamp": "2030-01-01T00:00:00"},  # no time zone
        {**valid, "scoreGiven": "ten"},
        {**valid, "scoreGiven": -1},
        {**valid, "scoreMaximum": 0},
        {**valid, "userId": "100"},  # the teacher is not graded
        {**valid, "userId": "999"},
        {**valid, "gradingProgress": "Done"},
        ["not", "an", "object"],
    ]
    for body in bad_bodies:
        r = requests.post(lineitem + "/scores", json=body, headers=headers, timeout=5)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["reason"].startswith("Incorrect score received: "), r.text
    assert live.grade("103")["comment"] == "ok" and live.grade("100") is None

    posted = requests.post
    anonymous = {"Content-Type": SCORE_TYPE}
    assert posted(lineitem + "/scores", json=valid, headers=anonymous, timeout=5).status_code == 401
    no_type = {"Authorization": f"Bearer {token}"}
    assert posted(lineitem + "/scores", json=valid, headers=no_type, timeout=5).status_code == 400
    missing = live.lineitem_url("nope") + "/scores"
    assert posted(missing, json=valid, headers=headers, timeout=5).status_code == 404
    readonly = connector.get_access_token([SCOPE_LINEITEM_READONLY])
    lacking = {**headers, "Authorization": f"Bearer {readonly}"}
    assert posted(lineitem + "/scores", json=valid, headers=lacking, timeout=5).status_code == 403
    assert live.grade("103")["comment"] == "ok"

    pending = {**valid, "gradingProgress": "Pending", "activityProgress": "Submitted"}
    assert posted(lineitem + "/scores", json=pending, headers=headers, timeout=5).status_code == 200
    assert live.grade("103")["score_given"] is None  # Moodle ignores it unless FullyGraded


def test_line_items_list_filter_create_and_show(live, tool, rt):
    connector = practice_connector(rt, live)
    token = connector.get_access_token([SCOPE_LINEITEM, SCOPE_LINEITEM_READONLY])
    container = f"{live.url}/ags/practice-1/lineitems"
    auth = {"Authorization": f"Bearer {token}"}

    (own,) = requests.get(container, headers=auth, timeout=5).json()
    assert own == {
        "id": live.lineitem_url("lab-1"),
        "label": "Python lab",
        "scoreMaximum": 100,
        "resourceId": "",
        "tag": "",
        "resourceLinkId": "lab-1",
    }
    shown = requests.get(own["id"], headers={**auth, "Accept": LINEITEM_TYPE}, timeout=5)
    assert shown.status_code == 200 and shown.json() == own
    assert shown.headers["Content-Type"].startswith(LINEITEM_TYPE)

    create = {**auth, "Content-Type": LINEITEM_TYPE}
    new = {"label": "<script>alert(1)</script>", "scoreMaximum": 7, "resourceId": "r1", "tag": "t"}
    made = requests.post(container, json=new, headers=create, timeout=5)
    assert made.status_code == 201, made.text
    assert made.json()["id"].startswith(container + "/") and made.json()["label"] == new["label"]
    assert requests.get(made.json()["id"], headers=auth, timeout=5).json() == made.json()

    for bad in (
        {"scoreMaximum": 7},
        {"label": "x"},
        {"label": "x", "scoreMaximum": 0},
        {"label": "x", "scoreMaximum": 7, "resourceLinkId": "another-activity"},
    ):
        r = requests.post(container, json=bad, headers=create, timeout=5)
        assert r.status_code == 400 and r.json()["reason"].startswith("Incorrect format"), bad
    assert len(live.lineitems()) == 2

    found = requests.get(container + "?resource_id=r1", headers=auth, timeout=5).json()
    assert [i["id"] for i in found] == [made.json()["id"]]
    assert requests.get(container + "?tag=none", headers=auth, timeout=5).json() == []
    by_link = requests.get(container + "?resource_link_id=lab-1", headers=auth, timeout=5).json()
    assert [i["id"] for i in by_link] == [own["id"]]

    lineitem_only = connector.get_access_token([SCOPE_LINEITEM])  # Moodle: it does not read
    assert (
        requests.get(
            container, headers={"Authorization": f"Bearer {lineitem_only}"}, timeout=5
        ).status_code
        == 403
    )
    assert requests.get(container, timeout=5).status_code == 401
    other = requests.get(f"{live.url}/ags/other/lineitems", headers=auth, timeout=5)
    assert other.status_code == 404

    page = requests.get(live.url + "/", timeout=5).text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
