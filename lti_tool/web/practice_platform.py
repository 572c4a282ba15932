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
NRPS and AGS claims — here pointing at this platform's own URLs. Those services and ``/token``
(client credentials) are not implemented yet and answer 501.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import jwt
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
ROLE_LEARNER = "http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"
ROLE_INSTRUCTOR = "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor"

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
            "token_url": self.url + "/token",
            "jwks_url": self.url + "/jwks",
            "name": "Practice platform",
        }

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

        def unsupported(what: str) -> tuple[Response, int]:
            return jsonify(
                {
                    "error": "unsupported",
                    "error_description": f"The practice platform does not implement {what} yet.",
                }
            ), 501

        @app.post("/token")
        def token() -> tuple[Response, int]:
            return unsupported("the OAuth2 token endpoint (client credentials)")

        @app.route("/nrps/<path:rest>", methods=["GET"])
        def nrps(rest: str) -> tuple[Response, int]:
            return unsupported("the names and roles service")

        @app.route("/ags/<path:rest>", methods=["GET", "POST", "PUT", "DELETE"])
        def ags(rest: str) -> tuple[Response, int]:
            return unsupported("the assignment and grade services")

        return app
