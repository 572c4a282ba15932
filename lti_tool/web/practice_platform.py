"""A tiny built-in LTI 1.3 platform so Labpool can be tried without a Moodle.

``labpool demo`` starts the tool together with a ``PracticePlatform``: a web page describing one
course ("Practice course", one activity "Python lab") with links *Launch as student 1/2/3* and
*Launch as teacher*. A click runs the real LTI 1.3 exchange against the tool, in the browser:

1. ``GET /launch/<who>`` auto-POSTs the login initiation form to ``<tool>/lti/login``;
2. the tool 302-redirects the browser to this platform's OIDC auth endpoint ``/auth``;
3. ``/auth`` checks the request, signs an RS256 id_token (header ``kid``) for the chosen user and
   auto-POSTs ``id_token`` and ``state`` to the tool's ``/lti/launch``;
4. the tool verifies the token against this platform's ``/jwks``.

The tool must know the platform: ``PracticePlatform.registration()`` gives the values for its
registration (issuer, client id, deployment ids, auth/token/JWKS URLs).

**Not a security boundary.** This is a demo only: anybody who can reach it gets a validly signed
launch for whichever user they click, teacher included, with no login at all. Bind it to
loopback, never register it in a production tool, and never reuse its key for anything else.

The messages mirror the claim shapes of a real Moodle 4.3 captured in
``tests/fixtures/moodle-4.3/`` (``launch_learner.json``, ``launch_instructor.json``,
``login_initiation.json``): plain-string ``aud``, ``exp = iat + 60``, membership role URIs,
``context``/``resource_link``/``launch_presentation``/``lis``/``custom``/``ext`` claims, and the
NRPS and AGS claims — here pointing at this platform's own URLs.

It also plays Moodle 4.3's services, so the tool's roster sync and grades work in the demo
(the same rules as ``tests/fakeplatform``, which plays them in the tests):

* ``POST /token`` (``mod/lti/token.php``): OAuth2 client credentials with a ``private_key_jwt``
  client assertion. The assertion must be RS256 under a ``kid`` of the tool's JWKS
  (``<tool>/lti/jwks.json``, fetched with a timeout and cached for a minute; an unknown kid
  refetches it), with ``iss`` = ``sub`` = the client id, ``aud`` holding this token URL, ``exp``
  in the future and a ``jti`` never seen before. The answer grants the permitted subset of the
  requested scopes for an hour. Refusals are OAuth2 errors: 400 ``invalid_request``,
  ``unsupported_grant_type``, ``invalid_scope``; 401 ``invalid_client`` (no token issued).
* ``GET /nrps/<course>/memberships`` (``ltiservice_memberships``, NRPS 2.0): every user of this
  platform, Active, with names and emails; pages when ``limit`` is given (``Link: rel="next"``).
* ``/ags/<course>/lineitems`` (GET lists, filtered by ``resource_id`` / ``resource_link_id`` /
  ``tag``; POST creates from ``label`` + ``scoreMaximum``), ``…/lineitems/<item>/lineitem``
  (GET) and ``…/lineitem/scores`` (POST, ``gradebookservices``' rules: ``userId``,
  ``timestamp``, ``activityProgress`` and ``gradingProgress`` required, the user must be a
  student of the course, a timestamp not strictly newer than the stored grade's is a 409,
  ``scoreGiven`` counts only when ``FullyGraded`` and is rescaled to the item's maximum). The
  activity's own line item (``lineitems/lab-1/lineitem``, as the launch claims say) exists from
  the start. As in Moodle, reading line items needs the ``lineitem.readonly`` scope.
* A service call without a valid Bearer token is a 401, one whose token lacks the scope a 403;
  errors have the shape of Moodle's ``services.php`` (``{"status", "reason", "request"}``).

The home page shows the gradebook, so a grade a teacher gives in Labpool is seen arriving.
Everything is kept in memory, under one lock (the server is threaded), and lost at a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, abort, jsonify, render_template_string, request
from jwt.algorithms import RSAAlgorithm
from werkzeug.serving import BaseWSGIServer, make_server

__all__ = [
    "CLIENT_ID",
    "DEPLOYMENT_ID",
    "KEY_FILE",
    "USERS",
    "PracticePlatform",
    "PracticeUser",
]

CLIENT_ID = "labpool-practice"
DEPLOYMENT_ID = "1"
KEY_FILE = "practice_platform_key.pem"
ID_TOKEN_LIFETIME_S = 60  # like Moodle: exp = iat + 60
PRODUCT_FAMILY_CODE = "labpool-practice"

LTI = "https://purl.imsglobal.org/spec/lti/claim/"
NRPS_CLAIM = "https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice"
AGS_CLAIM = "https://purl.imsglobal.org/spec/lti-ags/claim/endpoint"
AGS_SCOPES = [
    "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem",
    "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem.readonly",
    "https://purl.imsglobal.org/spec/lti-ags/scope/result.readonly",
    "https://purl.imsglobal.org/spec/lti-ags/scope/score",
]
SCOPE_LINEITEM, SCOPE_LINEITEM_READONLY, SCOPE_RESULT_READONLY, SCOPE_SCORE = AGS_SCOPES
SCOPE_NRPS = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"
PERMITTED_SCOPES = (*AGS_SCOPES, SCOPE_NRPS)  # what the tool type may be granted
MEMBERSHIP_ROLE = "http://purl.imsglobal.org/vocab/lis/v2/membership#"
ROLE_LEARNER = MEMBERSHIP_ROLE + "Learner"
ROLE_INSTRUCTOR = MEMBERSHIP_ROLE + "Instructor"

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ACCESS_TOKEN_LIFETIME_S = 3600  # like Moodle's token.php
MAX_ASSERTION_LIFETIME_S = 3600  # a used jti is remembered until its exp: bound how long
TOOL_JWKS_PATH = "/lti/jwks.json"
TOOL_JWKS_TTL_S = 60  # the tool's JWKS is cached this long
TOOL_JWKS_REFETCH_S = 5  # an unknown kid refetches it, at most this often
TOOL_JWKS_TIMEOUT_S = (5, 10)  # connect, read
TOOL_JWKS_MAX_BYTES = 256 * 1024

NRPS_TYPE = "application/vnd.ims.lti-nrps.v2.membershipcontainer+json"
SCORE_TYPE = "application/vnd.ims.lis.v1.score+json"
LINEITEM_TYPE = "application/vnd.ims.lis.v2.lineitem+json"
LINEITEMS_TYPE = "application/vnd.ims.lis.v2.lineitemcontainer+json"
SCORE_REQUIRED = ("userId", "timestamp", "activityProgress", "gradingProgress")
ACTIVITY_PROGRESS = ("Initialized", "Started", "InProgress", "Submitted", "Completed")
GRADING_PROGRESS = ("FullyGraded", "Pending", "PendingManual", "Failed", "NotReady")

COURSE = {
    "id": "practice-1",
    "label": "PRACTICE",
    "title": "Practice course",
    "type": ["CourseSection"],
}
ACTIVITY = {
    "id": "lab-1",
    "title": "Python lab",
    "description": "A browser IDE on a machine of your own, provided by Labpool.",
}


@dataclass(frozen=True)
class PracticeUser:
    who: str  # the login_hint / lti_message_hint and the path in /launch/<who>
    sub: str
    given_name: str
    family_name: str
    email: str
    role: str
    label: str  # the link text on the home page

    @property
    def name(self) -> str:
        return f"{self.given_name} {self.family_name}"


USERS: dict[str, PracticeUser] = {
    u.who: u
    for u in (
        PracticeUser(
            "student1",
            "101",
            "Student",
            "One",
            "student1@example.com",
            ROLE_LEARNER,
            "Launch as student 1",
        ),
        PracticeUser(
            "student2",
            "102",
            "Student",
            "Two",
            "student2@example.com",
            ROLE_LEARNER,
            "Launch as student 2",
        ),
        PracticeUser(
            "student3",
            "103",
            "Student",
            "Three",
            "student3@example.com",
            ROLE_LEARNER,
            "Launch as student 3",
        ),
        PracticeUser(
            "teacher",
            "100",
            "Teacher",
            "Practice",
            "teacher@example.com",
            ROLE_INSTRUCTOR,
            "Launch as teacher",
        ),
    )
}


# --- the signing key -----------------------------------------------------------------------


def _load_or_create_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA 2048 key in ``path``; created (mode 0600, never overwriting) on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Write a private temp file, then hard-link it into place: the key file appears whole
        # and with mode 0600, and a concurrent first start keeps whichever key won.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise RuntimeError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"{path} holds a {type(key).__name__}, not an RSA key")
    return key


def _kid(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


# --- pages -----------------------------------------------------------------------------------

_STYLE = """
<style>
  body { font: 16px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 44rem;
         padding: 0 1rem; color: #1d2430; }
  h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; }
  .muted { color: #5b6575; }
  .card { border: 1px solid #e3e7ee; border-radius: .5rem; padding: 1rem 1.25rem; }
  ul.launch { list-style: none; padding: 0; }
  ul.launch li { margin: .4rem 0; }
  code { background: #f3f5f8; padding: 0 .25rem; }
  button { font: inherit; padding: .3rem .8rem; }
  table.grades { border-collapse: collapse; width: 100%; font-size: .95rem; }
  table.grades th, table.grades td { border-bottom: 1px solid #e3e7ee; padding: .3rem .5rem;
                                     text-align: left; vertical-align: top; }
</style>
"""

HOME_PAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Labpool practice platform</title>"""
    + _STYLE
    + """</head>
<body>
<h1>Labpool practice platform — a stand-in for Moodle</h1>
<p class="muted">This page plays the part of your learning platform, so you can try Labpool
without a Moodle. Pick who you want to be; the link runs a real LTI 1.3 launch into the tool
at <code>{{ tool_url }}</code>. It is a demo: nobody is asked for a password.</p>
<div class="card">
  <h2>{{ course.title }} <span class="muted">({{ course.label }})</span></h2>
  <p>Activity: <strong>{{ activity.title }}</strong> — {{ activity.description }}</p>
  <ul class="launch">
  {% for user in users %}
    <li><a href="{{ url_for('launch', who=user.who) }}">{{ user.label }}</a>
        <span class="muted">({{ user.name }})</span></li>
  {% endfor %}
  </ul>
</div>
<h2>Gradebook</h2>
<p class="muted">Grades the tool sends to this platform (LTI Assignment and Grade Services), as
Moodle's gradebook would show them. Reload the page after grading in Labpool.</p>
<table class="grades">
  <thead><tr><th>Grade item</th><th>Student</th><th>Score</th><th>Grade</th>
  <th>Feedback</th><th>When</th></tr></thead>
  <tbody>
  {% for item in gradebook %}
    {% for row in item.grades %}
    <tr><td>{{ item.label }}</td><td>{{ row.student }}</td><td>{{ row.score }}</td>
        <td>{{ row.grade }}</td><td>{{ row.comment }}</td><td>{{ row.when }}</td></tr>
    {% else %}
    <tr><td>{{ item.label }}</td><td colspan="5" class="muted">no grades yet
        (out of {{ item.maximum }})</td></tr>
    {% endfor %}
  {% endfor %}
  </tbody>
</table>
<p class="muted">The tool knows this platform as issuer <code>{{ issuer }}</code>,
client id <code>{{ client_id }}</code>, deployment <code>{{ deployment_id }}</code>.</p>
</body></html>
"""
)

AUTO_POST_PAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>"""
    + _STYLE
    + """</head>
<body>
<form id="ltiAutoForm" method="post" action="{{ action }}">
{% for name, value in fields.items() %}
  <input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}
  <p>{{ message }}</p>
  <button type="submit">Continue</button>
</form>
<script>document.getElementById("ltiAutoForm").submit();</script>
</body></html>
"""
)


# --- the services' plumbing -----------------------------------------------------------------


@dataclass(frozen=True)
class _AccessToken:
    scopes: frozenset[str]
    expires_at: float  # time.time()


class _Refused(Exception):
    """A refused request: an OAuth2 error (``/token``) or a services.php error (NRPS, AGS)."""

    def __init__(self, status: int, reason: str, error: str = "", www_authenticate: str = ""):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error
        self.www_authenticate = www_authenticate

    def oauth_response(self) -> Response:
        """RFC 6749 §5.2: ``{"error", "error_description"}``, never cached."""
        response = jsonify({"error": self.error, "error_description": self.reason})
        response.status_code = self.status
        response.headers["Cache-Control"] = "no-store"
        return response

    def service_response(self) -> Response:
        """Moodle's services.php error (``mod_lti\\local\\ltiservice\\response::send``)."""
        details = {"method": request.method, "url": request.full_path.rstrip("?")}
        if "Accept" in request.headers:
            details["accept"] = request.headers["Accept"]
        if request.mimetype:
            details["contentType"] = request.mimetype
        body = {"status": self.status, "reason": self.reason, "request": details}
        response = Response(
            json.dumps(body, indent=4), self.status, content_type="application/json; charset=utf-8"
        )
        if self.www_authenticate:
            response.headers["WWW-Authenticate"] = self.www_authenticate
        return response


def _json(body: Any, content_type: str, status: int = 200, **headers: str) -> Response:
    response = Response(json.dumps(body), status, content_type=f"{content_type}; charset=utf-8")
    response.headers.update(headers)
    return response


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _php_int(value: str | None) -> int:
    """PHP's ``(int)`` of a request parameter (Moodle's PARAM_INT): leading digits, else 0."""
    match = re.match(r"\s*([+-]?\d+)", value or "")
    return int(match.group(1)) if match else 0


def _number_text(value: float) -> str:
    return f"{value:g}"


def _member(user: PracticeUser) -> dict[str, Any]:
    """One member as Moodle's NRPS shows it (names and email shared)."""
    return {
        "status": "Active",
        "roles": [user.role],
        "user_id": user.sub,
        "lis_person_sourcedid": "",
        "name": user.name,
        "given_name": user.given_name,
        "family_name": user.family_name,
        "email": user.email,
    }


def _students() -> dict[str, PracticeUser]:
    """The users a grade may be given to (Moodle: gradable in the course), by ``sub``."""
    return {u.sub: u for u in USERS.values() if u.role == ROLE_LEARNER}


def _parse_score(body: Any) -> dict[str, Any]:
    """A score as gradebookservices' scores resource checks it (every failure is Moodle's
    "Incorrect score received", here with the reason); raises _Refused."""

    def refuse(why: str) -> _Refused:
        return _Refused(400, f"Incorrect score received: {why}")

    if not isinstance(body, dict):
        raise refuse("the score is not a JSON object")
    missing = [name for name in SCORE_REQUIRED if name not in body]
    if missing:
        raise refuse(f"missing {', '.join(missing)}")
    try:
        stamp = datetime.fromisoformat(str(body["timestamp"]).replace("Z", "+00:00"))
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        raise refuse("timestamp must be an ISO 8601 date and time with a time zone")
    if body["activityProgress"] not in ACTIVITY_PROGRESS:
        raise refuse(f"activityProgress must be one of {', '.join(ACTIVITY_PROGRESS)}")
    if body["gradingProgress"] not in GRADING_PROGRESS:
        raise refuse(f"gradingProgress must be one of {', '.join(GRADING_PROGRESS)}")
    given, maximum = body.get("scoreGiven"), body.get("scoreMaximum", 1)
    if given is not None and (not _is_number(given) or given < 0):
        raise refuse("scoreGiven must be a number, 0 or more")
    if given is not None and "scoreMaximum" not in body:
        raise refuse("scoreGiven needs scoreMaximum")
    if not _is_number(maximum) or maximum <= 0:
        raise refuse("scoreMaximum must be a number above 0")
    comment = body.get("comment", "")
    if not isinstance(comment, str):
        raise refuse("comment must be a text")
    user = body["userId"]
    if not isinstance(user, str) or user not in _students():
        raise refuse(f"user {user!r} is not a student of this course")
    return {
        "user_id": user,
        "timestamp": stamp,
        "activity_progress": body["activityProgress"],
        "grading_progress": body["gradingProgress"],
        "score_given": float(given) if given is not None else None,
        "score_maximum": float(maximum),
        "comment": comment,
    }


class PracticePlatform:
    """A demo LTI 1.3 platform served on ``host:port`` (``port=0``: a free port) by ``start()``.

    ``tool_url`` is the Labpool tool's base URL (its ``/lti/login`` and ``/lti/launch`` are
    used). The signing key lives in ``data_dir / "practice_platform_key.pem"``.
    """

    CLIENT_ID = CLIENT_ID
    DEPLOYMENT_ID = DEPLOYMENT_ID

    def __init__(self, data_dir: Path, tool_url: str, host: str = "127.0.0.1", port: int = 0):
        self.data_dir = Path(data_dir)
        self.tool_url = tool_url.rstrip("/")
        self.host = host
        self.port = port
        self.key_path = self.data_dir / KEY_FILE
        self._key = _load_or_create_key(self.key_path)
        self.kid = _kid(self._key)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        # The services' state, in memory, under one lock (the server is threaded).
        self._lock = threading.Lock()
        self._tokens: dict[str, _AccessToken] = {}
        self._used_jtis: dict[str, float] = {}  # jti → its exp: refused until then
        self._tool_jwks: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._next_item = 100
        #: (course, item id) → the line item as the AGS shows it (without ``id``).
        self._lineitems: dict[tuple[str, str], dict[str, Any]] = {
            (COURSE["id"], ACTIVITY["id"]): {
                "label": ACTIVITY["title"],
                "scoreMaximum": 100,  # Moodle's default maximum grade
                "resourceId": "",
                "tag": "",
                "resourceLinkId": ACTIVITY["id"],
            }
        }
        #: (course, item id, user id) → the stored grade.
        self._grades: dict[tuple[str, str, str], dict[str, Any]] = {}
        #: How many access tokens ``/token`` has issued.
        self.tokens_issued = 0
        self.app = self._make_app()

    # --- life cycle ---

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the practice platform is already running")
        server = make_server(self.host, self.port, self.app, threaded=True)
        self.port = server.server_port
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="labpool-practice-platform",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what the tool needs to know ---

    @property
    def url(self) -> str:
        """The issuer and base URL, without a trailing slash (known once started if port=0)."""
        if not self.port:
            raise RuntimeError("the practice platform has no port yet: call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def launch_url(self) -> str:
        return self.tool_url + "/lti/launch"

    @property
    def login_url(self) -> str:
        return self.tool_url + "/lti/login"

    def registration(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "client_id": CLIENT_ID,
            "deployment_ids": [DEPLOYMENT_ID],
            "auth_url": self.url + "/auth",
            "token_url": self.token_url,
            "jwks_url": self.url + "/jwks",
            "name": "Practice platform",
        }

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def tool_jwks_url(self) -> str:
        return self.tool_url + TOOL_JWKS_PATH

    def lineitem_url(self, item_id: str, course: str = COURSE["id"]) -> str:
        return f"{self.url}/ags/{course}/lineitems/{item_id}/lineitem"

    def jwks(self) -> dict[str, Any]:
        jwk = RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "alg": "RS256",
                    "use": "sig",
                    "kid": self.kid,
                    "n": jwk["n"],
                    "e": jwk["e"],
                }
            ]
        }

    # --- the id_token ---

    def claims(self, user: PracticeUser, nonce: str, now: int | None = None) -> dict[str, Any]:
        """The claims of a resource link launch of the one activity, shaped like Moodle 4.3's."""
        iat = int(time.time()) if now is None else now
        base = self.url
        memberships = f"{base}/nrps/{COURSE['id']}/memberships"
        lineitems = f"{base}/ags/{COURSE['id']}/lineitems"
        return {
            "iss": base,
            "aud": CLIENT_ID,
            "sub": user.sub,
            "iat": iat,
            "exp": iat + ID_TOKEN_LIFETIME_S,
            "nonce": nonce,
            "name": user.name,
            "given_name": user.given_name,
            "family_name": user.family_name,
            "email": user.email,
            LTI + "deployment_id": DEPLOYMENT_ID,
            LTI + "message_type": "LtiResourceLinkRequest",
            LTI + "version": "1.3.0",
            LTI + "target_link_uri": self.launch_url,
            LTI + "roles": [user.role],
            LTI + "context": dict(COURSE),
            LTI + "resource_link": dict(ACTIVITY),
            LTI + "launch_presentation": {
                "document_target": "window",
                "locale": "en",
                "return_url": base + "/",
            },
            LTI + "lis": {"course_section_sourcedid": "", "person_sourcedid": ""},
            LTI + "custom": {
                "context_memberships_url": memberships,
                "context_title": COURSE["title"],
            },
            LTI + "ext": {"lms": PRODUCT_FAMILY_CODE, "user_username": user.who},
            LTI + "tool_platform": {
                "description": "Labpool practice platform (a stand-in for Moodle)",
                "guid": hashlib.sha256(base.encode()).hexdigest()[:32],
                "name": "Practice platform",
                "product_family_code": PRODUCT_FAMILY_CODE,
                "version": "1",
            },
            NRPS_CLAIM: {
                "context_memberships_url": memberships,
                "service_versions": ["1.0", "2.0"],
            },
            AGS_CLAIM: {
                "lineitem": f"{lineitems}/{ACTIVITY['id']}/lineitem",
                "lineitems": lineitems,
                "scope": list(AGS_SCOPES),
            },
        }

    def id_token(self, user: PracticeUser, nonce: str) -> str:
        return jwt.encode(
            self.claims(user, nonce),
            self._key,
            algorithm="RS256",
            headers={"kid": self.kid, "typ": "JWT"},
        )

    # --- the services: token.php ---

    def _issue_token(self, req: Any) -> dict[str, Any]:
        """OAuth2 client credentials with a private_key_jwt assertion; raises _Refused."""
        if req.mimetype != "application/x-www-form-urlencoded":
            raise _Refused(
                400,
                "the token endpoint takes a POST of application/x-www-form-urlencoded",
                "invalid_request",
            )
        form = req.form
        fields = ("grant_type", "client_assertion_type", "client_assertion", "scope")
        missing = [name for name in fields if not form.get(name)]
        if missing:
            raise _Refused(400, f"missing parameter(s): {', '.join(missing)}", "invalid_request")
        if form["grant_type"] != "client_credentials":
            raise _Refused(400, "grant_type must be client_credentials", "unsupported_grant_type")
        if form["client_assertion_type"] != CLIENT_ASSERTION_TYPE:
            raise _Refused(
                400, f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}", "invalid_request"
            )
        problem = self._assertion_problem(form["client_assertion"])
        if problem is not None:
            raise _Refused(401, problem, "invalid_client")
        requested = form["scope"].split()
        granted = [scope for scope in dict.fromkeys(requested) if scope in PERMITTED_SCOPES]
        if not granted:
            raise _Refused(
                400, "none of the requested scopes is offered to this tool", "invalid_scope"
            )
        value = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
            self._tokens[value] = _AccessToken(frozenset(granted), now + ACCESS_TOKEN_LIFETIME_S)
            self.tokens_issued += 1
        return {
            "access_token": value,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_LIFETIME_S,
            "scope": " ".join(granted),
        }

    def _assertion_problem(self, assertion: str) -> str | None:
        """Why the tool's client assertion is refused, or None (its jti is then used up)."""
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.InvalidTokenError:
            return "client_assertion is not a JWT"
        if header.get("alg") != "RS256":
            return "client_assertion must be signed with RS256"
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            return "client_assertion names no kid"
        key, problem = self._tool_key(kid)
        if key is None:
            return problem
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=["RS256"],
                audience=self.token_url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            return "client_assertion has expired"
        except jwt.InvalidAudienceError:
            return f"client_assertion's aud must include the token URL {self.token_url}"
        except jwt.InvalidSignatureError:
            return f"client_assertion's signature does not verify with the tool's key {kid}"
        except jwt.InvalidTokenError as exc:
            return f"client_assertion is invalid: {exc}"
        if claims["iss"] != CLIENT_ID or claims["sub"] != CLIENT_ID:
            return f"client_assertion's iss and sub must both be the client id {CLIENT_ID}"
        exp, jti, now = claims["exp"], claims["jti"], time.time()
        if not _is_number(exp) or exp > now + MAX_ASSERTION_LIFETIME_S:
            return f"client_assertion's exp must be within {MAX_ASSERTION_LIFETIME_S} s"
        if not isinstance(jti, str) or not jti:
            return "client_assertion's jti must be a non-empty string"
        with self._lock:
            self._used_jtis = {j: e for j, e in self._used_jtis.items() if e > now}
            if jti in self._used_jtis:
                return "client_assertion's jti was already used"
            self._used_jtis[jti] = float(exp)
        return None

    def _tool_key(self, kid: str) -> tuple[Any, str]:
        """The tool's public key ``kid`` from its JWKS (cached; an unknown kid refetches it
        unless it was fetched moments ago): ``(key, "")`` or ``(None, why not)``."""
        now = time.monotonic()
        with self._lock:
            cached = self._tool_jwks
        keys = cached[1] if cached is not None else {}
        age = now - cached[0] if cached is not None else math.inf
        if age >= TOOL_JWKS_TTL_S or (kid not in keys and age >= TOOL_JWKS_REFETCH_S):
            fetched, problem = self._fetch_tool_jwks()
            if fetched is None:
                return None, problem
            keys = fetched
            with self._lock:
                self._tool_jwks = (time.monotonic(), keys)
        jwk = keys.get(kid)
        if jwk is None:
            return None, f"the tool's JWKS ({self.tool_jwks_url}) has no key {kid}"
        try:
            return jwt.PyJWK(jwk, algorithm="RS256").key, ""
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            return None, f"the tool's key {kid} is not a usable RSA key"

    def _fetch_tool_jwks(self) -> tuple[dict[str, dict[str, Any]] | None, str]:
        url = self.tool_jwks_url
        try:
            answer = requests.get(url, timeout=TOOL_JWKS_TIMEOUT_S, allow_redirects=False)
        except requests.RequestException as exc:
            return None, f"could not fetch the tool's JWKS {url}: {type(exc).__name__}"
        if answer.status_code != 200:
            return None, f"the tool's JWKS {url} answered HTTP {answer.status_code}"
        if len(answer.content) > TOOL_JWKS_MAX_BYTES:
            return None, f"the tool's JWKS {url} is larger than {TOOL_JWKS_MAX_BYTES} bytes"
        try:
            listed = answer.json()["keys"]
        except (ValueError, KeyError, TypeError):
            return None, f"the tool's JWKS {url} is not a JSON key set"
        if not isinstance(listed, list):
            return None, f"the tool's JWKS {url} is not a JSON key set"
        keys = {
            k["kid"]: k
            for k in listed
            if isinstance(k, dict) and isinstance(k.get("kid"), str) and k.get("kty") == "RSA"
        }
        return keys, ""

    # --- the services: NRPS and AGS ---

    def _require(self, scope: str) -> None:
        """Moodle's Bearer check, with the status RFC 6750 gives: 401 without a known,
        unexpired token; 403 when the token lacks the scope."""
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            raise _Refused(401, "Unauthorized: no Bearer access token", www_authenticate="Bearer")
        with self._lock:
            token = self._tokens.get(authorization[len("Bearer ") :].strip())
        if token is None or token.expires_at <= time.time():
            raise _Refused(
                401,
                "Unauthorized: unknown or expired access token",
                www_authenticate='Bearer error="invalid_token"',
            )
        if scope not in token.scopes:
            raise _Refused(
                403,
                f"Forbidden: the access token lacks the scope {scope}",
                www_authenticate=f'Bearer error="insufficient_scope", scope="{scope}"',
            )

    @staticmethod
    def _check_course(course: str) -> None:
        if course != COURSE["id"]:
            raise _Refused(404, f"Not Found: Course {course} doesn't exist")

    @staticmethod
    def _check_accept(*types: str) -> None:
        """services.php: a GET whose Accept names none of the resource's formats has no
        handler (400)."""
        accept = request.headers.get("Accept", "")
        if accept and "*/*" not in accept and not any(t in accept for t in types):
            raise _Refused(400, f"No handler found for {request.path} {accept}: accept {types[0]}")

    @staticmethod
    def _check_content_type(content_type: str) -> None:
        if request.mimetype != content_type:
            raise _Refused(
                400,
                f"No handler found for {request.path} {request.mimetype}: "
                f"send Content-Type {content_type}",
            )

    def _memberships(self, course: str) -> Response:
        self._check_accept(NRPS_TYPE)
        self._require(SCOPE_NRPS)
        self._check_course(course)
        members = [_member(u) for u in USERS.values()]
        role = request.args.get("role", "")
        if role:
            role = role if "://" in role else MEMBERSHIP_ROLE + role
            members = [m for m in members if role in m["roles"]]
        endpoint = f"{self.url}/nrps/{course}/memberships"
        limit = _php_int(request.args.get("limit"))
        headers: dict[str, str] = {}
        if limit > 0:
            start = max(_php_int(request.args.get("from")), 0)
            if len(members) > start + limit:
                headers["Link"] = f'<{endpoint}?limit={limit}&from={start + limit}>; rel="next"'
            members = members[start : start + limit]
        context = {"id": COURSE["id"], "label": COURSE["label"], "title": COURSE["title"]}
        body = {"id": endpoint, "context": context, "members": members}
        return _json(body, NRPS_TYPE, **headers)

    def _item_json(self, course: str, item_id: str, item: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.lineitem_url(item_id, course), **item}

    def _list_lineitems(self, course: str) -> Response:
        self._check_accept(LINEITEMS_TYPE)
        self._require(SCOPE_LINEITEM_READONLY)  # Moodle: `lineitem` alone does not read
        self._check_course(course)
        wanted = {
            "resourceId": request.args.get("resource_id"),
            "resourceLinkId": request.args.get("resource_link_id"),
            "tag": request.args.get("tag"),
        }
        with self._lock:
            items = [
                self._item_json(c, i, item)
                for (c, i), item in self._lineitems.items()
                if c == course and all(v is None or item[k] == v for k, v in wanted.items())
            ]
        return _json(items, LINEITEMS_TYPE)

    def _show_lineitem(self, course: str, item_id: str) -> Response:
        self._check_accept(LINEITEM_TYPE)
        self._require(SCOPE_LINEITEM_READONLY)
        self._check_course(course)
        with self._lock:
            item = self._lineitems.get((course, item_id))
            shown = None if item is None else self._item_json(course, item_id, item)
        if shown is None:
            raise _Refused(404, f"Not Found: no line item {item_id} in course {course}")
        return _json(shown, LINEITEM_TYPE)

    def _create_lineitem(self, course: str) -> Response:
        self._check_content_type(LINEITEM_TYPE)
        self._require(SCOPE_LINEITEM)
        self._check_course(course)
        try:
            body = json.loads(request.get_data(as_text=True))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _Refused(400, "Incorrect format: the line item is not a JSON object")
        label, maximum = body.get("label"), body.get("scoreMaximum")
        if not isinstance(label, str) or not label.strip() or len(label) > 255:
            raise _Refused(400, "Incorrect format: label must be a text of 1 to 255 characters")
        if not _is_number(maximum) or maximum <= 0:
            raise _Refused(400, "Incorrect format: scoreMaximum must be a number above 0")
        item: dict[str, Any] = {"label": label, "scoreMaximum": maximum}
        for name in ("resourceId", "tag", "resourceLinkId"):
            value = body.get(name, "")
            if not isinstance(value, str) or len(value) > 255:
                raise _Refused(400, f"Incorrect format: {name} must be a text")
            item[name] = value
        if item["resourceLinkId"] not in ("", ACTIVITY["id"]):
            raise _Refused(
                400,
                f"Incorrect format: resourceLinkId {item['resourceLinkId']} is not an activity "
                f"of course {course}",
            )
        with self._lock:
            self._next_item += 1
            item_id = str(self._next_item)
            self._lineitems[(course, item_id)] = item
            shown = self._item_json(course, item_id, item)
        return _json(shown, LINEITEM_TYPE, status=201)

    def _score(self, course: str, item_id: str) -> Response:
        self._check_content_type(SCORE_TYPE)
        self._require(SCOPE_SCORE)
        self._check_course(course)
        with self._lock:
            item = self._lineitems.get((course, item_id))
        if item is None:
            raise _Refused(404, f"Not Found: no line item {item_id} in course {course}")
        try:
            body = json.loads(request.get_data(as_text=True))
        except ValueError:
            body = None
        grade = _parse_score(body)
        user = grade["user_id"]
        graded = grade["grading_progress"] == "FullyGraded" and grade["score_given"] is not None
        if not graded:
            grade["score_given"] = None  # Moodle ignores it unless FullyGraded
        grade["grade"] = (
            grade["score_given"] / grade["score_maximum"] * item["scoreMaximum"] if graded else None
        )
        with self._lock:
            stored = self._grades.get((course, item_id, user))
            # Moodle compares whole seconds (timemodified is an integer).
            if stored is not None and int(stored["timestamp"].timestamp()) >= int(
                grade["timestamp"].timestamp()
            ):
                raise _Refused(
                    409,
                    f"Refusing score with an earlier timestamp for item {item_id} and user {user}",
                )
            self._grades[(course, item_id, user)] = grade
        return Response("", 200)

    # --- what the home page (and a test) reads ---

    def grade(
        self, user_sub: str, item_id: str = ACTIVITY["id"], course: str = COURSE["id"]
    ) -> dict[str, Any] | None:
        """The stored grade of a user on a line item (a copy), or None."""
        with self._lock:
            stored = self._grades.get((course, item_id, user_sub))
            return dict(stored) if stored is not None else None

    def lineitems(self, course: str = COURSE["id"]) -> list[dict[str, Any]]:
        """The course's line items as the AGS shows them."""
        with self._lock:
            return [
                self._item_json(c, i, item)
                for (c, i), item in self._lineitems.items()
                if c == course
            ]

    def gradebook(self) -> list[dict[str, Any]]:
        """Per line item: its label, maximum and the students' grades, ready to show."""
        students = _students()
        with self._lock:
            items = list(self._lineitems.items())
            grades = dict(self._grades)
        shown = []
        for (course, item_id), item in items:
            rows = []
            for sub, student in students.items():
                stored = grades.get((course, item_id, sub))
                if stored is None:
                    continue
                if stored["score_given"] is None:
                    score = f"{stored['grading_progress']} ({stored['activity_progress']})"
                    grade = "—"
                else:
                    score = (
                        f"{_number_text(stored['score_given'])} / "
                        f"{_number_text(stored['score_maximum'])}"
                    )
                    grade = (
                        f"{_number_text(round(stored['grade'], 2))} / "
                        f"{_number_text(item['scoreMaximum'])}"
                    )
                rows.append(
                    {
                        "student": student.name,
                        "score": score,
                        "grade": grade,
                        "comment": stored["comment"],
                        "when": stored["timestamp"].isoformat(),
                    }
                )
            shown.append(
                {
                    "label": item["label"],
                    "maximum": _number_text(item["scoreMaximum"]),
                    "grades": rows,
                }
            )
        return shown

    # --- the web app ---

    def _auth_problem(self, params: Any) -> str | None:
        """Why an OIDC authentication request is refused, or None if it is fine."""
        if params.get("client_id") != CLIENT_ID:
            return f"Unknown client_id {params.get('client_id')!r}: this platform only knows {CLIENT_ID!r}."
        if params.get("redirect_uri") != self.launch_url:
            return (
                f"redirect_uri {params.get('redirect_uri')!r} is not the tool's registered "
                f"launch URL {self.launch_url!r}."
            )
        if params.get("response_type") != "id_token":
            return "response_type must be 'id_token'."
        if "openid" not in (params.get("scope") or "").split():
            return "scope must be 'openid'."
        if params.get("response_mode", "form_post") != "form_post":
            return "response_mode must be 'form_post'."
        if not params.get("nonce"):
            return "The nonce is missing."
        if not params.get("state"):
            return "The state is missing."
        who = params.get("login_hint")
        if who not in USERS:
            return f"login_hint {who!r} is not one of this platform's users ({', '.join(USERS)})."
        if params.get("lti_message_hint") != who:
            return "lti_message_hint must equal login_hint (the launch was not started here)."
        return None

    def _make_app(self) -> Flask:
        app = Flask(__name__)
        platform = self

        @app.get("/")
        def home() -> str:
            return render_template_string(
                HOME_PAGE,
                tool_url=platform.tool_url,
                course=COURSE,
                activity=ACTIVITY,
                users=list(USERS.values()),
                issuer=platform.url,
                client_id=CLIENT_ID,
                deployment_id=DEPLOYMENT_ID,
                gradebook=platform.gradebook(),
            )

        @app.get("/launch/<who>")
        def launch(who: str) -> str:
            user = USERS.get(who)
            if user is None:
                abort(404)
            fields = {
                "iss": platform.url,
                "login_hint": user.who,
                "target_link_uri": platform.launch_url,
                "lti_message_hint": user.who,
                "client_id": CLIENT_ID,
                "lti_deployment_id": DEPLOYMENT_ID,
            }
            return render_template_string(
                AUTO_POST_PAGE,
                title="Launching Labpool…",
                action=platform.login_url,
                fields=fields,
                message=f"Opening {ACTIVITY['title']} as {user.name}…",
            )

        @app.route("/auth", methods=["GET", "POST"])
        def auth() -> Response | str:
            params = request.values
            problem = platform._auth_problem(params)
            if problem is not None:
                return Response(
                    "The practice platform refused this login request: " + problem + "\n",
                    status=400,
                    mimetype="text/plain",
                )
            user = USERS[params["login_hint"]]
            return render_template_string(
                AUTO_POST_PAGE,
                title="Signing you in…",
                action=params["redirect_uri"],
                fields={
                    "id_token": platform.id_token(user, params["nonce"]),
                    "state": params["state"],
                },
                message=f"Signing in to Labpool as {user.name}…",
            )

        @app.get("/jwks")
        def jwks() -> Response:
            response = jsonify(platform.jwks())
            response.headers["Cache-Control"] = "max-age=300"
            return response

        @app.post("/token")
        def token() -> Response:
            try:
                body = platform._issue_token(request)
            except _Refused as refused:
                return refused.oauth_response()
            response = jsonify(body)
            response.headers["Cache-Control"] = "no-store"
            return response

        @app.get("/nrps/<course>/memberships")
        def memberships(course: str) -> Response:
            try:
                return platform._memberships(course)
            except _Refused as refused:
                return refused.service_response()

        @app.route("/ags/<course>/lineitems", methods=["GET", "POST"])
        def lineitems(course: str) -> Response:
            try:
                if request.method == "POST":
                    return platform._create_lineitem(course)
                return platform._list_lineitems(course)
            except _Refused as refused:
                return refused.service_response()

        @app.get("/ags/<course>/lineitems/<item>/lineitem")
        def lineitem(course: str, item: str) -> Response:
            try:
                return platform._show_lineitem(course, item)
            except _Refused as refused:
                return refused.service_response()

        @app.post("/ags/<course>/lineitems/<item>/lineitem/scores")
        def scores(course: str, item: str) -> Response:
            try:
                return platform._score(course, item)
            except _Refused as refused:
                return refused.service_response()

        return app
