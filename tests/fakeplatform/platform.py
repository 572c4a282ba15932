"""``FakePlatform``: a Moodle 4.3 look-alike LTI 1.3 platform on loopback (its endpoints,
the launch driver a browser would be, tokens, rosters). The package docstring
(``tests/fakeplatform/__init__.py``) says what it mimics and how."""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import re
import secrets
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.wrappers import Request, Response

from .ags import FakeGradebook
from .claims import (
    _MEMBERSHIP_ROLE_PREFIX,
    ACCESS_TOKEN_LIFETIME,
    CLIENT_ASSERTION_TYPE,
    CONTEXT,
    DEPLOYMENT_ID,
    DL_CONTENT_ITEMS,
    LIS_MEMBERSHIP_MEDIA_TYPE,
    MESSAGE_TYPE,
    MOODLE_SCOPES,
    NRPS_MEDIA_TYPE,
    RESOURCE_LINK,
    SCOPE_NRPS,
    TARGET_LINK_URI,
    VERSION,
    DropPath,
    _drop_path,
    load_fixture,
    moodle_claims,
)
from .jwt import _HMAC_HASHES, SigningKey, SignKey, _b64url_decode, _check_jwt, encode_jwt
from .registration import CONFIGURATION_PATH, REGISTRATION_PATH, FakeDynamicRegistration
from .server import ServedApp


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[tuple[dict[str, str], dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append((attributes, {}))
        elif tag == "input" and self.forms and attributes.get("name"):
            self.forms[-1][1][attributes["name"]] = attributes.get("value", "")


def parse_auto_submit_form(page: str) -> tuple[str, str, dict[str, str]]:
    """``(action, method, fields)`` of the first form of an auto-submit page like auth.php's."""
    parser = _FormParser()
    parser.feed(page)
    parser.close()
    if not parser.forms:
        raise FakePlatformError(f"no <form> in the page: {page[:300]!r}")
    attributes, fields = parser.forms[0]
    return attributes.get("action", ""), attributes.get("method", "get").lower(), fields


# --------------------------------------------------------------------------- errors and results


class FakePlatformError(AssertionError):
    """The launch flow could not be completed; ``.response`` is the offending HTTP answer."""

    def __init__(self, message: str, response: requests.Response | None = None) -> None:
        super().__init__(message)
        self.response = response


@dataclass
class LaunchResult:
    """What happened during one ``FakePlatform.launch``."""

    login_response: requests.Response  #: the tool's answer to the login initiation (a 302)
    auth_request: dict[str, str]  #: the OIDC query the tool sent to auth.php
    auth_response: requests.Response  #: auth.php's auto-submit page
    launch_response: requests.Response  #: the tool's answer to the id_token POST
    launch_url: str  #: where the id_token was POSTed (the form's action = redirect_uri)
    id_token: str  #: the id_token as POSTed
    state: str  #: the state as POSTed
    claims: dict[str, Any]  #: the payload that was signed (after mutate/drop)
    header: dict[str, Any]  #: the JOSE header that was written
    login_form: dict[str, str] = field(default_factory=dict)  #: the login initiation form

    @property
    def nonce(self) -> str | None:
        """The nonce the tool asked for in its OIDC request."""
        return self.auth_request.get("nonce")


@dataclass
class _PendingLaunch:
    """A launch waiting for the tool's OIDC request (Moodle keeps it in $SESSION)."""

    launch_id: str
    login_hint: str
    claims: dict[str, Any]
    tool_launch_url: str
    header: Mapping[str, Any] | None
    mutate: Callable[[dict[str, Any]], Any] | None
    drop: tuple[DropPath, ...]
    sign_with: SignKey
    alg: str
    raw_id_token: str | None
    # Filled in by auth.php:
    final_claims: dict[str, Any] = field(default_factory=dict)
    final_header: dict[str, Any] = field(default_factory=dict)
    id_token: str = ""
    error: BaseException | None = None


@dataclass(frozen=True)
class IssuedToken:
    """An access token issued by token.php (Moodle's ``lti_access_tokens`` row)."""

    token: str
    scopes: tuple[str, ...]  #: the granted scopes, in the order requested
    type_id: str  #: the tool type (= deployment id) it is bound to
    issued_at: float
    expires_at: float
    client_id: str = ""  #: the client id that asked for it

    @property
    def expired(self) -> bool:
        return self.expires_at <= time.time()


def _moodle_client_id() -> str:
    """Moodle's client ids are ``random_string(15)``: 15 letters and digits."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(15))


# --------------------------------------------------------------------------- the platform


class FakePlatform:
    """A Moodle 4.3 look-alike LTI 1.3 platform on ``http://127.0.0.1:<port>``.

    The server socket is bound at construction (``.url`` is known at once); ``start()`` (or
    ``with``) serves it. Keys come from a per-process cache: platforms sharing a
    ``key_namespace`` share keys (and kids); give a platform its own namespace when a test
    needs two platforms with different keys.
    """

    LOGIN_PATH = "/lti/login"
    LAUNCH_PATH = "/lti/launch"
    SERVICES_PATH = "/mod/lti/services.php"
    CONTENT_ITEM_RETURN_PATH = "/mod/lti/contentitem_return.php"

    def __init__(
        self,
        *,
        client_id: str | None = None,
        deployment_id: str = "1",
        tool_url: str | None = None,
        redirect_uris: Iterable[str] | None = None,
        key_namespace: str = "platform",
    ) -> None:
        self.client_id: str = client_id or _moodle_client_id()
        self.deployment_id: str = deployment_id
        self._lock = threading.RLock()
        self._key_namespace = key_namespace
        self._keys: list[SigningKey] = [SigningKey.cached(key_namespace, 0)]
        self._signing_key: SigningKey = self._keys[0]
        self._published: list[str] = [self._signing_key.kid]
        self._pending: dict[str, _PendingLaunch] = {}
        self._cmid = 1
        #: Number of GETs of certs.php so far (reset it freely).
        self.jwks_fetches: int = 0
        #: ``(method, path)`` of every request the platform served, for debugging.
        self.requests_seen: list[tuple[str, str]] = []
        #: The redirection URIs registered for the tool (auth.php's whitelist).
        self.registered_redirect_uris: list[str] = list(redirect_uris or [])
        self.tool_url: str | None = None

        # token.php
        #: The tool's public keyset URL (Moodle: "Public keyset"); token.php fetches it.
        self.tool_jwks_url: str | None = None
        #: Number of GETs of ``tool_jwks_url`` so far (reset it freely).
        self.tool_jwks_fetches: int = 0
        #: Number of access tokens issued so far (reset it freely).
        self.tokens_issued: int = 0
        #: Scopes token.php may grant (the requested ones are intersected with these).
        self.permitted_scopes: list[str] = list(MOODLE_SCOPES)
        #: Lifetime of issued tokens (``expires_in``), like Moodle's 3600 s.
        self.token_lifetime: int = ACCESS_TOKEN_LIFETIME
        #: Also check what Moodle 4.3 does not (``iss`` and ``sub`` = client id, ``aud`` holds
        #: the token URL, ``exp`` present, ``jti`` present and never seen before). False checks
        #: exactly what Moodle checks: ``sub`` names the tool, signature under a ``kid`` of the
        #: tool's JWKS, and ``exp``/``nbf``/``iat`` when present.
        self.strict_client_assertion: bool = True
        #: The form fields of every token.php request, for debugging.
        self.token_requests: list[dict[str, str]] = []
        #: While set, token.php answers every request with this HTTP status (an outage).
        self.token_down: int | None = None
        self._tool_jwks_cache: Any = None
        self._tokens: dict[str, IssuedToken] = {}
        self._used_jtis: set[str] = set()
        # Other tool types of this site (client id → type id), shared with their views.
        self._other_tool_types: dict[str, str] = {}
        #: Every call of a service URL: ``{"type_id", "token_client_id", "status"}``, in order.
        self.service_calls: list[dict[str, Any]] = []
        # Pages a browser test asks the platform to serve (path → HTML): a course page that
        # frames the activity, Moodle's launch.php. Served from the platform's own address,
        # so Chromium sees them on the platform's origin (and on loopback, like the tool).
        self._pages: dict[str, str] = {}

        # contentitem_return.php (deep linking)
        #: Every deep linking response POSTed to contentitem_return.php, in order:
        #: ``{"query", "header", "claims", "problem"}`` (``problem`` None when Moodle would
        #: take it; claims as decoded even when refused).
        self.deep_link_responses: list[dict[str, Any]] = []

        # NRPS
        #: ``(path, query)`` of every request to a memberships URL, in order.
        self.roster_requests: list[tuple[str, dict[str, str]]] = []
        self._rosters: dict[str, dict[str, Any]] = {}
        self._roster_faults: dict[int, int] = {}

        # AGS: line items and scores (tests/fakeplatform/ags.py)
        #: The gradebook: line items, stored grades, every score taken; its outage switches.
        self.gradebook = FakeGradebook(self)

        # Dynamic registration (tests/fakeplatform/registration.py)
        #: Moodle's openid-configuration.php and openid-registration.php, its pending tools.
        self.dynamic_registration = FakeDynamicRegistration(self)

        self._server = ServedApp(self._wsgi_app)
        self.url: str = self._server.url  #: the issuer, e.g. ``http://127.0.0.1:PORT``
        self.issuer: str = self.url
        self.auth_url: str = self.url + "/mod/lti/auth.php"
        self.token_url: str = self.url + "/mod/lti/token.php"
        self.jwks_url: str = self.url + "/mod/lti/certs.php"
        if tool_url is not None:
            self.register_tool(tool_url, redirect_uris)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<FakePlatform {self.url} client_id={self.client_id!r} kid={self.kid!r}>"

    def add_tool_type(self, client_id: str | None = None, deployment_id: str = "2") -> FakePlatform:
        """A second tool type on this same site (same issuer, keys, rosters and server), with
        its own client id and type (= deployment) id: launches through the returned view carry
        its ``aud``/deployment and its service URLs; its tokens are bound to it.

        The view shares this platform's state (tokens, rosters, ``service_calls``); counters
        such as ``tokens_issued`` are kept on this (the original) platform."""
        view = copy.copy(self)
        view.client_id = client_id or _moodle_client_id()
        view.deployment_id = deployment_id
        with self._lock:
            self._other_tool_types[view.client_id] = deployment_id
        return view

    def serve_page(self, path: str, html_text: str) -> str:
        """Serve ``html_text`` at ``GET <platform>/<path>`` (query strings ignored); returns
        the page's URL."""
        with self._lock:
            self._pages[path] = html_text
        return self.url + path

    def _type_id_of(self, client_id: str) -> str | None:
        """The tool type a client id belongs to (None: no tool of this site has it)."""
        if client_id == self.client_id:
            return self.deployment_id
        with self._lock:
            return self._other_tool_types.get(client_id)

    def _type_ids(self) -> set[str]:
        with self._lock:
            return {self.deployment_id, *self._other_tool_types.values()}

    # ----------------------------------------------------------------- registration

    def register_tool(
        self,
        tool_url: str,
        redirect_uris: Iterable[str] | None = None,
        *,
        jwks_url: str | None = None,
    ) -> None:
        """Record the tool (its base URL), its redirection URIs (default: its launch URL) and,
        if given, its public keyset URL (``tool_jwks_url``, used by token.php)."""
        self.tool_url = tool_url.rstrip("/")
        self.registered_redirect_uris = (
            list(redirect_uris) if redirect_uris else [self.tool_url + self.LAUNCH_PATH]
        )
        if jwks_url is not None:
            self.tool_jwks_url = jwks_url

    @property
    def tool_launch_url(self) -> str | None:
        return None if self.tool_url is None else self.tool_url + self.LAUNCH_PATH

    def platform_add_args(self) -> dict[str, str]:
        """What the tool's registration of this platform needs (what Moodle shows the admin)."""
        return {
            "issuer": self.url,
            "client_id": self.client_id,
            "deployment_id": self.deployment_id,
            "auth_url": self.auth_url,
            "token_url": self.token_url,
            "jwks_url": self.jwks_url,
        }

    def platform_add_argv(self) -> list[str]:
        """`labpool platform add …` for this platform, as an admin would type it."""
        argv = ["platform", "add"]
        for name, value in self.platform_add_args().items():
            argv += [f"--{name.replace('_', '-')}", value]
        return argv

    # ----------------------------------------------------------------- keys

    @property
    def kid(self) -> str:
        """The kid of the current signing key."""
        return self._signing_key.kid

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        return self._signing_key.private_key

    @property
    def public_key_pem(self) -> bytes:
        return self._signing_key.public_pem

    @property
    def keys(self) -> list[SigningKey]:
        """Every key this platform ever had, oldest first."""
        with self._lock:
            return list(self._keys)

    @property
    def published_kids(self) -> list[str]:
        with self._lock:
            return list(self._published)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The keyset certs.php serves right now."""
        with self._lock:
            return {"keys": [k.public_jwk() for k in self._keys if k.kid in self._published]}

    def rotate_key(self, *, publish: bool = True, retire_old: bool = False) -> str:
        """Switch to a new signing key with a new kid and return that kid.

        ``publish=False`` keeps the new key out of the JWKS (until ``publish_keys``);
        ``retire_old=True`` removes the previous keys from it.
        """
        with self._lock:
            new_key = SigningKey.cached(self._key_namespace, len(self._keys))
            self._keys.append(new_key)
            self._signing_key = new_key
            if retire_old:
                self._published = []
            if publish:
                self._published.append(new_key.kid)
            return new_key.kid

    def publish_keys(self, kids: Iterable[str] | None = None) -> None:
        """Publish exactly ``kids`` in the JWKS; ``None`` publishes every key, ``[]`` none."""
        with self._lock:
            known = [k.kid for k in self._keys]
            if kids is None:
                self._published = known
                return
            wanted = list(kids)
            unknown = [kid for kid in wanted if kid not in known]
            if unknown:
                raise ValueError(f"unknown kid(s) {unknown}; known: {known}")
            self._published = [kid for kid in known if kid in wanted]

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        alg: str = "RS256",
        header: Mapping[str, Any] | None = None,
        sign_with: SignKey = None,
    ) -> tuple[str, dict[str, Any]]:
        """Sign ``claims`` as this platform (or as an attacker); returns ``(token, header)``.

        The header is ``{"typ": "JWT", "alg": alg, "kid": <current kid>}`` updated with
        ``header`` (a ``None`` value removes the entry, e.g. ``{"kid": None}``).
        ``alg="HS256"`` signs with HMAC keyed by the current public key's PEM (alg confusion;
        ``sign_with`` may give another RSA key or raw bytes as secret); ``alg="none"`` leaves the
        signature empty; ``sign_with`` replaces the RSA signing key (the kid stays the
        platform's, as a forger would do).
        """
        jose: dict[str, Any] = {"typ": "JWT", "alg": alg, "kid": self.kid}
        for name, value in (header or {}).items():
            if value is None:
                jose.pop(name, None)
            else:
                jose[name] = value
        key: SignKey
        if alg.lower() == "none":
            key = None
        elif alg in _HMAC_HASHES:
            if isinstance(sign_with, rsa.RSAPrivateKey):
                key = SigningKey("", sign_with).public_pem
            else:
                key = sign_with if sign_with is not None else self.public_key_pem
        else:
            if isinstance(sign_with, (bytes, bytearray)):
                loaded = serialization.load_pem_private_key(bytes(sign_with), password=None)
                if not isinstance(loaded, rsa.RSAPrivateKey):
                    raise TypeError("sign_with PEM is not an RSA private key")
                key = loaded
            else:
                key = sign_with if sign_with is not None else self.private_key
        return encode_jwt(claims, alg=alg, key=key, header=jose), jose

    # ----------------------------------------------------------------- claims

    def learner(self, sub: str = "4", **overrides: Any) -> dict[str, Any]:
        """A student's LtiResourceLinkRequest (from ``launch_learner.json``)."""
        return self._claims_from_fixture("launch_learner.json", sub, overrides)

    def instructor(self, sub: str = "3", **overrides: Any) -> dict[str, Any]:
        """A teacher's LtiResourceLinkRequest (from ``launch_instructor.json``)."""
        return self._claims_from_fixture("launch_instructor.json", sub, overrides)

    def deep_linking(self, sub: str = "3", **overrides: Any) -> dict[str, Any]:
        """A teacher's LtiDeepLinkingRequest (from ``launch_deep_linking.json``).

        Extra override: ``dl_settings={...}`` merged into the deep linking settings claim.
        """
        return self._claims_from_fixture("launch_deep_linking.json", sub, overrides)

    def _claims_from_fixture(
        self, fixture_name: str, sub: str, overrides: dict[str, Any]
    ) -> dict[str, Any]:
        """Moodle's captured claims re-targeted at this platform (``claims.moodle_claims``:
        the overrides it takes)."""
        return moodle_claims(
            fixture_name,
            sub,
            overrides,
            issuer=self.url,
            client_id=self.client_id,
            deployment_id=self.deployment_id,
            target_link_uri=self.tool_launch_url,
        )

    # ----------------------------------------------------------------- the launch driver

    def login_form(
        self, claims: Mapping[str, Any], *, login_hint: str, lti_message_hint: str
    ) -> dict[str, str]:
        """The login initiation form, with the fields of ``login_initiation.json``."""
        values = {
            "iss": self.url,
            "login_hint": login_hint,
            "target_link_uri": claims.get(TARGET_LINK_URI) or self.tool_launch_url or "",
            "lti_message_hint": lti_message_hint,
            "client_id": self.client_id,
            "lti_deployment_id": self.deployment_id,
        }
        shape = load_fixture("login_initiation.json")["form"]
        missing = set(shape) - set(values)
        if missing:
            raise RuntimeError(
                f"login_initiation.json has fields the fake does not fill: {missing}"
            )
        return {name: str(values[name]) for name in shape}

    def initiate_login(
        self,
        session: requests.Session,
        tool_url: str,
        form: Mapping[str, str],
        *,
        method: str = "POST",
    ) -> requests.Response:
        """Send a login initiation to ``<tool>/lti/login`` without following redirects."""
        url = tool_url.rstrip("/") + self.LOGIN_PATH
        if method.upper() == "GET":
            return session.get(url, params=dict(form), allow_redirects=False)
        return session.post(url, data=dict(form), allow_redirects=False)

    def _auth_location(self, response: requests.Response) -> str:
        """The tool's redirect to auth.php, or a clear failure."""
        if response.is_redirect and response.headers.get("Location"):
            location = urljoin(response.url, response.headers["Location"])
            if location.split("?", 1)[0] != self.auth_url:
                raise FakePlatformError(
                    f"the tool's login initiation redirected to {location}, not to the "
                    f"platform's auth URL {self.auth_url}",
                    response,
                )
            return location
        body = response.text
        if response.status_code == 200 and "html" in response.headers.get("Content-Type", ""):
            if "lti1p3_new_window" in body or "checkCookiesAllowed" in body:
                what = "pylti1p3's cookie check page (OIDCLogin.enable_check_cookies())"
            elif "location" in body.lower() and "<script" in body.lower():
                what = "a page that redirects with JavaScript (e.g. redirect(js_redirect=True))"
            else:
                what = "an HTML page"
            raise FakePlatformError(
                f"the tool answered the login initiation with 200 and {what} instead of a 302 "
                f"redirect to {self.auth_url}; the fake platform runs no JavaScript. Answer "
                "with a plain redirect in tests (disable the cookie check / JS redirect).",
                response,
            )
        raise FakePlatformError(
            f"the tool's login initiation failed: HTTP {response.status_code} "
            f"{response.headers.get('Content-Type', '')}: {body[:500]}",
            response,
        )

    def launch(
        self,
        session: requests.Session,
        tool_url: str,
        claims: Mapping[str, Any],
        *,
        header: Mapping[str, Any] | None = None,
        mutate: Callable[[dict[str, Any]], Any] | None = None,
        drop: Iterable[DropPath] = (),
        sign_with: SignKey = None,
        alg: str = "RS256",
        raw_id_token: str | None = None,
        state_override: str | None = None,
        without_state_cookie: bool = False,
        follow: bool = False,
        login_hint: str | None = None,
        login_method: str = "POST",
    ) -> LaunchResult:
        """Perform a full LTI 1.3 launch of ``claims`` against the tool at ``tool_url``.

        1. POST (or GET, ``login_method``) the login initiation to ``<tool_url>/lti/login``;
        2. take the tool's 302 and call this platform's auth.php with it, over HTTP;
        3. auth.php validates the request, fills in the tool's ``nonce`` (unless ``claims``
           has one) and ``target_link_uri``, applies ``mutate(claims)`` (may edit in place or
           return a new dict) and ``drop`` (claim names, or tuples for nested keys such as
           ``(RESOURCE_LINK, "id")``), signs (see ``sign``) and answers its auto-submit form;
        4. POST that form's ``id_token`` and ``state`` (or ``raw_id_token``/``state_override``)
           to its action, after clearing all cookies if ``without_state_cookie``.

        ``login_hint`` defaults to ``claims["sub"]``; another value makes auth.php answer
        ``access_denied`` (the hint is not the launching user), as Moodle does. If no tool was registered yet, the tool at
        ``tool_url`` is (redirect URI ``<tool_url>/lti/launch``). Raises ``FakePlatformError``
        when the tool's login or auth.php refuses; the launch response is returned whatever it
        is, for the test to judge.
        """
        if not self._server.running:
            raise FakePlatformError("the FakePlatform is not started (use start() or `with`)")
        base = tool_url.rstrip("/")
        if self.tool_url is None:
            self.tool_url = base
            if not self.registered_redirect_uris:
                self.registered_redirect_uris = [base + self.LAUNCH_PATH]
        claims = copy.deepcopy(dict(claims))
        if claims.get(TARGET_LINK_URI) is None:
            claims[TARGET_LINK_URI] = base + self.LAUNCH_PATH
        # Moodle's login_hint is the launching user's id, and auth.php insists it still is.
        user = str(claims.get("sub", "")) if claims.get("sub") is not None else None
        hint = str(login_hint) if login_hint is not None else (user or "")

        with self._lock:
            cmid = self._cmid = self._cmid + 1
        resource_link = claims.get(RESOURCE_LINK)
        instance = resource_link.get("id", "0") if isinstance(resource_link, dict) else "0"
        launch_id = f"ltilaunch{instance}_{secrets.randbelow(10**10)}"
        message_hint = json.dumps({"cmid": cmid, "launchid": launch_id}, separators=(",", ":"))
        pending = _PendingLaunch(
            launch_id=launch_id,
            login_hint=user if user is not None else hint,
            claims=claims,
            tool_launch_url=base + self.LAUNCH_PATH,
            header=header,
            mutate=mutate,
            drop=tuple(drop),
            sign_with=sign_with,
            alg=alg,
            raw_id_token=raw_id_token,
        )
        with self._lock:
            self._pending[launch_id] = pending
        try:
            form = self.login_form(claims, login_hint=hint, lti_message_hint=message_hint)
            login_response = self.initiate_login(session, base, form, method=login_method)
            location = self._auth_location(login_response)
            auth_response = session.get(location, allow_redirects=False)
        finally:
            with self._lock:
                self._pending.pop(launch_id, None)
        if pending.error is not None:
            raise pending.error
        auth_request = {
            name: values[0]
            for name, values in parse_qs(urlsplit(location).query, keep_blank_values=True).items()
        }
        if auth_response.status_code != 200:
            raise FakePlatformError(
                f"the platform's auth endpoint refused the tool's OIDC request: HTTP "
                f"{auth_response.status_code} {auth_response.text[:500]}",
                auth_response,
            )
        action, _, fields = parse_auto_submit_form(auth_response.text)
        launch_url = urljoin(auth_response.url, action)
        state = fields.get("state", "") if state_override is None else state_override
        id_token = fields.get("id_token", "")
        if without_state_cookie:
            session.cookies.clear()
        launch_response = session.post(
            launch_url, data={"id_token": id_token, "state": state}, allow_redirects=follow
        )
        return LaunchResult(
            login_response=login_response,
            auth_request=auth_request,
            auth_response=auth_response,
            launch_response=launch_response,
            launch_url=launch_url,
            id_token=id_token,
            state=state,
            claims=pending.final_claims,
            header=pending.final_header,
            login_form=form,
        )

    def launch_page(self, tool_url: str, claims: Mapping[str, Any]) -> tuple[str, str]:
        """What Moodle's mod/lti/launch.php answers a browser: the auto-submitting login
        initiation form for a launch auth.php now expects. Returns (launch id, HTML); a real
        browser drives the rest (`forget_launch` afterwards)."""
        base = tool_url.rstrip("/")
        claims = copy.deepcopy(dict(claims))
        if claims.get(TARGET_LINK_URI) is None:
            claims[TARGET_LINK_URI] = base + self.LAUNCH_PATH
        user = str(claims["sub"])
        with self._lock:
            cmid = self._cmid = self._cmid + 1
        launch_id = f"ltilaunch_browser_{secrets.token_hex(6)}"
        message_hint = json.dumps({"cmid": cmid, "launchid": launch_id}, separators=(",", ":"))
        pending = _PendingLaunch(
            launch_id=launch_id,
            login_hint=user,
            claims=claims,
            tool_launch_url=base + self.LAUNCH_PATH,
            header=None,
            mutate=None,
            drop=(),
            sign_with=None,
            alg="RS256",
            raw_id_token=None,
        )
        with self._lock:
            self._pending[launch_id] = pending
        form = self.login_form(claims, login_hint=user, lti_message_hint=message_hint)
        inputs = "\n".join(
            f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
            for name, value in form.items()
        )
        page = (
            "<!doctype html><html><head><title>Moodle</title></head><body>\n"
            f'<form action="{html.escape(base + self.LOGIN_PATH)}" name="ltiInitiateLoginForm"'
            ' id="ltiInitiateLoginForm" method="post" encType="application/x-www-form-urlencoded">\n'
            f"{inputs}\n</form>\n"
            "<script>document.ltiInitiateLoginForm.submit();</script>\n</body></html>"
        )
        return launch_id, page

    def forget_launch(self, launch_id: str) -> None:
        with self._lock:
            self._pending.pop(launch_id, None)

    def replay(
        self,
        session: requests.Session,
        tool_url: str,
        result: LaunchResult,
        *,
        follow: bool = False,
    ) -> requests.Response:
        """POST the same ``id_token`` and ``state`` again (a nonce replay)."""
        url = result.launch_url or tool_url.rstrip("/") + self.LAUNCH_PATH
        return session.post(
            url, data={"id_token": result.id_token, "state": result.state}, allow_redirects=follow
        )

    # ----------------------------------------------------------------- services: token.php

    def client_assertion(
        self,
        private_key: rsa.RSAPrivateKey,
        *,
        kid: str | None,
        alg: str = "RS256",
        header: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A client assertion as pylti1p3's ``ServiceConnector`` builds it, signed by the tool.

        Claims: ``iss`` = ``sub`` = client id, ``aud`` = token URL, ``iat = now - 5``,
        ``exp = now + 60``, a fresh ``jti``; keyword arguments override them (``None`` drops a
        claim). The header is ``{"typ": "JWT", "alg": alg, "kid": kid}`` updated with
        ``header`` (a ``None`` value, or ``kid=None``, removes the entry).
        """
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now - 5,
            "exp": now + 60,
            "jti": f"lti-service-token-{uuid.uuid4()}",
        }
        for name, value in claims.items():
            if value is None:
                payload.pop(name, None)
            else:
                payload[name] = value
        jose: dict[str, Any] = {"typ": "JWT", "alg": alg, "kid": kid}
        jose.update(header or {})
        jose = {name: value for name, value in jose.items() if value is not None}
        key: SignKey = None if alg.lower() == "none" else private_key
        return encode_jwt(payload, alg=alg, key=key, header=jose)

    def request_token(
        self,
        private_key: rsa.RSAPrivateKey,
        scopes: Iterable[str],
        *,
        kid: str | None,
        **claims: Any,
    ) -> requests.Response:
        """POST a client_credentials request with ``client_assertion(...)`` to token.php."""
        return requests.post(
            self.token_url,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": self.client_assertion(private_key, kid=kid, **claims),
                "scope": " ".join(scopes),
            },
            timeout=10,
        )

    @property
    def tokens(self) -> dict[str, IssuedToken]:
        """Every access token issued so far, by token value."""
        with self._lock:
            return dict(self._tokens)

    def issue_token(self, scopes: Iterable[str], *, lifetime: int | None = None) -> str:
        """Issue an access token directly (no token.php round trip), for service tests."""
        with self._lock:
            return self._new_token(list(scopes), lifetime).token

    def expire_tokens(self) -> None:
        """Make every issued token expired, so the services answer 401 to it."""
        with self._lock:
            now = time.time()
            self._tokens = {
                value: dataclasses.replace(t, expires_at=min(t.expires_at, now))
                for value, t in self._tokens.items()
            }

    def forget_tool_jwks(self) -> None:
        """Drop the cached tool JWKS (Moodle's ``mod_lti/keyset`` cache)."""
        with self._lock:
            self._tool_jwks_cache = None

    def _new_token(
        self,
        scopes: list[str],
        lifetime: int | None,
        *,
        type_id: str | None = None,
        client_id: str | None = None,
    ) -> IssuedToken:
        # Moodle: md5(uniqid(rand(), 1)), 32 hex characters.
        now = time.time()
        issued = IssuedToken(
            token=secrets.token_hex(16),
            scopes=tuple(scopes),
            type_id=type_id or self.deployment_id,
            issued_at=now,
            expires_at=now + (self.token_lifetime if lifetime is None else lifetime),
            client_id=client_id or self.client_id,
        )
        self._tokens[issued.token] = issued
        self.tokens_issued += 1
        return issued

    # ----------------------------------------------------------------- services: NRPS

    def memberships_url(self, course_id: str | int) -> str:
        """The NRPS context memberships URL of a course, as the launch claims carry it."""
        return (
            f"{self.url}/mod/lti/services.php/CourseSection/{course_id}"
            f"/bindings/{self.deployment_id}/memberships"
        )

    @staticmethod
    def member(
        sub: str | int,
        role: str | Sequence[str] = "Learner",
        name: str | None = None,
        email: str | None = None,
        *,
        given_name: str | None = None,
        family_name: str | None = None,
        sourcedid: str = "",
        status: str = "Active",
    ) -> dict[str, Any]:
        """One roster member shaped like Moodle's NRPS answer.

        ``role`` is one role or a list; short context roles (``"Learner"``, ``"Instructor"``)
        get the ``membership#`` prefix, full URIs stay. ``name`` also sets ``given_name`` and
        ``family_name`` (split at the first space); leave ``name``/``email`` out for a Moodle
        that does not share them. ``lis_person_sourcedid`` is always there (Moodle sends the
        user's idnumber, usually ``""``).
        """
        roles = [role] if isinstance(role, str) else list(role)
        member: dict[str, Any] = {
            "status": status,
            "roles": [r if "://" in r else _MEMBERSHIP_ROLE_PREFIX + r for r in roles],
            "user_id": str(sub),
            "lis_person_sourcedid": sourcedid,
        }
        if name is not None:
            first, _, rest = name.partition(" ")
            member["name"] = name
            member["given_name"] = first if given_name is None else given_name
            member["family_name"] = rest if family_name is None else family_name
        else:
            if given_name is not None:
                member["given_name"] = given_name
            if family_name is not None:
                member["family_name"] = family_name
        if email is not None:
            member["email"] = email
        return member

    def set_roster(
        self,
        course_id: str | int,
        members: Iterable[Mapping[str, Any]],
        *,
        label: str | None = None,
        title: str | None = None,
    ) -> None:
        """Set a course's roster (members in this order; see ``member``).

        ``label``/``title`` of the NRPS ``context`` default to the fixture course's (the ones the
        launch claims carry). A course without a roster is unknown: its memberships URL is 404.
        """
        context = load_fixture("launch_learner.json")["claims"][CONTEXT]
        with self._lock:
            self._rosters[str(course_id)] = {
                "label": context.get("label", "") if label is None else label,
                "title": context.get("title", "") if title is None else title,
                "members": [copy.deepcopy(dict(m)) for m in members],
            }

    def forget_rosters(self) -> None:
        """No course has a roster any more (the session-wide fake between two tests: one
        test's roster must never end another test's enrolments through a queued sync)."""
        with self._lock:
            self._rosters.clear()
            self._roster_faults.clear()
            self.roster_requests.clear()

    def roster(self, course_id: str | int) -> list[dict[str, Any]]:
        """A copy of the course's roster (KeyError if none was set)."""
        with self._lock:
            return copy.deepcopy(self._rosters[str(course_id)]["members"])

    def fail_roster_page(self, n: int, status: int = 500) -> None:
        """Make the ``n``-th memberships request from now on (1-based) fail once with
        ``status`` (before the token is even looked at). Calls add up."""
        if n < 1:
            raise ValueError("n counts from 1")
        with self._lock:
            self._roster_faults[len(self.roster_requests) + n] = status

    # ----------------------------------------------------------------- HTTP endpoints

    def _wsgi_app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request = Request(environ)
        with self._lock:
            self.requests_seen.append((request.method, request.path))
        routes: dict[str, Callable[[Request], Response]] = {
            "/mod/lti/certs.php": self._certs_endpoint,
            "/mod/lti/auth.php": self._auth_endpoint,
            "/mod/lti/token.php": self._token_endpoint,
            self.CONTENT_ITEM_RETURN_PATH: self._content_item_return_endpoint,
            CONFIGURATION_PATH: self.dynamic_registration.configuration_endpoint,
            REGISTRATION_PATH: self.dynamic_registration.registration_endpoint,
        }
        handler = routes.get(request.path)
        if handler is None and request.path.startswith(self.SERVICES_PATH + "/"):
            handler = self._services_endpoint
        with self._lock:
            page = self._pages.get(request.path) if request.method == "GET" else None
        if handler is None and page is not None:
            return Response(page, 200, mimetype="text/html")(environ, start_response)
        response = handler(request) if handler else _json_response({"error": "not_found"}, 404)
        return response(environ, start_response)

    def _certs_endpoint(self, request: Request) -> Response:
        if request.method != "GET":
            return _json_response({"error": "method_not_allowed"}, 405)
        with self._lock:
            self.jwks_fetches += 1
            keyset = self.jwks()
        return _json_response(keyset, 200)

    def _token_endpoint(self, request: Request) -> Response:
        """Moodle's mod/lti/token.php: client_credentials with a private_key_jwt assertion."""
        form = request.form if request.method == "POST" else request.args
        with self._lock:
            self.token_requests.append(form.to_dict())
            down = self.token_down
        if down is not None:
            return Response("Service Unavailable", down, content_type="text/html")
        if request.method != "POST" or request.mimetype != "application/x-www-form-urlencoded":
            return _token_error(
                "invalid_request", "token.php takes a POST of application/x-www-form-urlencoded"
            )
        fields = ("client_assertion", "client_assertion_type", "grant_type", "scope")
        missing = [name for name in fields if not form.get(name)]
        if missing:
            return _token_error("invalid_request", f"missing parameter(s): {', '.join(missing)}")
        if (
            form["client_assertion_type"] != CLIENT_ASSERTION_TYPE
            or form["grant_type"] != "client_credentials"
        ):
            return _token_error(
                "unsupported_grant_type",
                f"grant_type must be client_credentials and client_assertion_type "
                f"{CLIENT_ASSERTION_TYPE}",
            )
        assertion = form["client_assertion"]
        try:
            header_part, payload_part, _ = assertion.split(".")
            header = json.loads(_b64url_decode(header_part))
            claims = json.loads(_b64url_decode(payload_part))
            if not isinstance(header, dict) or not isinstance(claims, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            return _token_error("invalid_request", "client_assertion is not a JWT")
        if not claims.get("sub"):
            return _token_error("invalid_request", "client_assertion has no sub")
        type_id = self._type_id_of(str(claims["sub"]))
        if type_id is None:
            return _token_error("invalid_client", f"no tool has client id {claims['sub']!r}")
        problem = self._verify_with_tool_keyset(assertion, header, claims)
        if problem is None and self.strict_client_assertion:
            problem = self._strict_assertion_problem(claims, str(claims["sub"]))
        if problem is not None:
            return _token_error("invalid_client", problem)
        requested = form["scope"].split(" ")
        with self._lock:
            scopes = [s for s in dict.fromkeys(requested) if s in self.permitted_scopes]
            if not scopes:
                return _token_error(
                    "invalid_scope",
                    f"none of the requested scopes {requested} is permitted "
                    f"({self.permitted_scopes})",
                )
            issued = self._new_token(scopes, None, type_id=type_id, client_id=str(claims["sub"]))
        body = {
            "access_token": issued.token,
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "scope": " ".join(scopes),
        }
        # token.php sets no Content-Type, so PHP's default goes out.
        return Response(json.dumps(body), 200, content_type="text/html; charset=UTF-8")

    def _content_item_return_endpoint(self, request: Request) -> Response:
        """Moodle's mod/lti/contentitem_return.php (``lti_convert_from_jwt``): a POST of form
        field ``JWT``, the tool's LtiDeepLinkingResponse, for the tool type ``id`` of the
        query (with the teacher's ``sesskey``). Checked as Moodle does: signed under a kid of
        the tool's JWKS (``lti_verify_with_keyset``: cached keyset, one refetch), ``iss`` is
        that tool type's client id; and as the spec wants (LTI-DL 2.0 §4.2), which Moodle
        takes on trust: ``aud`` holds the issuer, ``deployment_id`` is the tool type's,
        message type and version, ``content_items`` a list. Answers 200 with the number of
        items, or 400 with the reason; either way the response is kept in
        ``deep_link_responses``."""
        if request.method != "POST":
            return _json_response({"error": "method_not_allowed"}, 405)
        query = request.args.to_dict()
        token = request.form.get("JWT", "")
        entry: dict[str, Any] = {"query": query, "header": None, "claims": None, "problem": None}
        with self._lock:
            self.deep_link_responses.append(entry)

        def refuse(problem: str) -> Response:
            entry["problem"] = problem
            return _json_response({"error": "invalid_response", "reason": problem}, 400)

        if not query.get("sesskey"):
            return refuse("no sesskey (require_sesskey)")
        try:
            header_part, payload_part, _ = token.split(".")
            header = json.loads(_b64url_decode(header_part))
            claims = json.loads(_b64url_decode(payload_part))
            if not isinstance(header, dict) or not isinstance(claims, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            return refuse("JWT is not a JWT")
        entry["header"], entry["claims"] = header, claims
        type_id = self._type_id_of(str(claims.get("iss", "")))
        if type_id is None or type_id != query.get("id"):
            return refuse(
                f"iss {claims.get('iss')!r} is not the client id of tool type {query.get('id')!r}"
            )
        problem = self._verify_with_tool_keyset(token, header, claims)
        if problem is not None:
            return refuse(problem)
        audience = claims.get("aud")
        if self.issuer not in (audience if isinstance(audience, list) else [audience]):
            return refuse(f"aud must hold the issuer {self.issuer!r}, got {audience!r}")
        expected = {
            MESSAGE_TYPE: "LtiDeepLinkingResponse",
            VERSION: "1.3.0",
            DEPLOYMENT_ID: type_id,
        }
        for claim, value in expected.items():
            if claims.get(claim) != value:
                return refuse(f"{claim} must be {value!r}, got {claims.get(claim)!r}")
        for name in ("iat", "exp", "nonce"):
            if name not in claims:
                return refuse(f"no {name}")
        items = claims.get(DL_CONTENT_ITEMS, [])
        if not isinstance(items, list):
            return refuse("content_items is not a list")
        return _json_response({"items": len(items)}, 200)

    def _strict_assertion_problem(
        self, claims: Mapping[str, Any], client_id: str | None = None
    ) -> str | None:
        """The RFC 7523 / LTI security checks Moodle 4.3 itself skips."""
        client_id = client_id or self.client_id
        if claims.get("iss") != client_id:
            return f"iss must be the client id {client_id!r}, got {claims.get('iss')!r}"
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.token_url not in audiences:
            return f"aud must include the token URL {self.token_url!r}, got {audience!r}"
        if not isinstance(claims.get("exp"), (int, float)):
            return "client_assertion has no exp"
        jti = claims.get("jti")
        if not jti or not isinstance(jti, str):
            return "client_assertion has no jti"
        with self._lock:
            if jti in self._used_jtis:
                return f"jti {jti!r} was already used"
            self._used_jtis.add(jti)
        return None

    def _verify_with_tool_keyset(
        self, assertion: str, header: Mapping[str, Any], claims: Mapping[str, Any]
    ) -> str | None:
        """Moodle's ``lti_verify_with_keyset``: try the cached keyset; on any failure fetch the
        tool's JWKS once, retry, and cache it only if that works. Returns the php-jwt style
        failure message, or None."""
        with self._lock:
            cached = self._tool_jwks_cache
        if cached is not None and _check_jwt(assertion, header, claims, cached) is None:
            return None
        keyset, problem = self._fetch_tool_jwks()
        if problem is not None:
            return problem
        problem = _check_jwt(assertion, header, claims, keyset)
        if problem is None:
            with self._lock:
                self._tool_jwks_cache = keyset
        return problem

    def _fetch_tool_jwks(self) -> tuple[Any, str | None]:
        url = self.tool_jwks_url
        if not url:
            return None, "No public keyset configured (set FakePlatform.tool_jwks_url)"
        with self._lock:
            self.tool_jwks_fetches += 1
        try:
            answer = requests.get(url, timeout=10)
        except requests.RequestException as error:
            return None, f"could not fetch the tool's JWKS {url}: {error}"
        if answer.status_code != 200:
            return None, f"the tool's JWKS {url} answered HTTP {answer.status_code}"
        try:
            return answer.json(), None
        except ValueError:
            return None, f"the tool's JWKS {url} is not JSON"

    def _services_endpoint(self, request: Request) -> Response:
        """Moodle's mod/lti/services.php: route by path and Accept, then run the resource."""
        path = request.path[len(self.SERVICES_PATH) :]
        if self.gradebook.handles(path):
            return self.gradebook.endpoint(request, path, _service_error, self._bearer_allows)
        match = re.fullmatch(r"/CourseSection/([^/]+)/bindings/([^/]+)/memberships", path)
        accept = request.headers.get("Accept", "")
        formats = (LIS_MEMBERSHIP_MEDIA_TYPE, NRPS_MEDIA_TYPE)
        # services.php compares the whole Accept header (GET) or Content-Type (other than
        # DELETE) with the resource's formats; no match means "no handler", a 400.
        if request.method == "GET":
            acceptable = not accept or "*/*" in accept or accept in formats
        elif request.method == "DELETE":
            acceptable = True
        else:
            acceptable = request.headers.get("Content-Type", "") in formats
        if match is None or not acceptable:
            return _service_error(request, 400, f"No handler found for {path} {accept}")
        if request.method != "GET":
            return _service_error(request, 405)
        return self._memberships_endpoint(request, match.group(1), match.group(2))

    def _memberships_endpoint(self, request: Request, course_id: str, type_id: str) -> Response:
        """ltiservice_memberships' contextmemberships resource, LTI 1.3 (NRPS v2) flavour."""
        query = request.args.to_dict()
        with self._lock:
            self.roster_requests.append((request.path, query))
            fault = self._roster_faults.pop(len(self.roster_requests), None)
            # set_roster replaces a roster whole, so a reference is a consistent snapshot;
            # only the page served is copied (a deep copy of 5,000 members per page would
            # make the fake, not the tool, the bottleneck of a roster benchmark).
            roster = self._rosters.get(course_id)
        if fault is not None:
            self._record_service_call(request, type_id, fault)
            return _service_error(request, fault, "injected by fail_roster_page")
        if not self._bearer_allows(request, type_id, SCOPE_NRPS):
            self._record_service_call(request, type_id, 401)
            return _service_error(request, 401)
        if roster is None:
            return _service_error(request, 404, f"Not Found: Course {course_id} doesn't exist")
        if type_id not in self._type_ids():
            return _service_error(request, 404)
        self._record_service_call(request, type_id, 200)
        if request.headers.get("Accept", "") == LIS_MEMBERSHIP_MEDIA_TYPE:
            return _service_error(
                request, 406, "FakePlatform does not serve the LTI 1.1 JSON-LD membership format"
            )

        members = roster["members"]
        role = query.get("role", "")
        if role:
            if not role.startswith(("http://", "https://")):
                role = _MEMBERSHIP_ROLE_PREFIX + role
            instructor = _MEMBERSHIP_ROLE_PREFIX + "Instructor"
            if role == instructor:
                members = [m for m in members if instructor in m.get("roles", [])]
            elif role == _MEMBERSHIP_ROLE_PREFIX + "Learner":
                members = [m for m in members if instructor not in m.get("roles", [])]
        limit = _php_int(query.get("limit"))
        start = _php_int(query.get("from")) if limit > 0 else 0
        endpoint = self.url + request.path
        headers: dict[str, str] = {}
        if limit > 0:
            page = members[max(start, 0) : max(start, 0) + limit]
            if len(members) > max(start, 0) + limit:
                next_url = f"{endpoint}?limit={limit}&from={start + limit}"
                if query.get("rlid"):
                    next_url += f"&rlid={query['rlid']}"
                headers["Link"] = f'<{next_url}>; rel="next"'
        else:
            page = members
        body = {
            "id": endpoint,
            "context": {"id": course_id, "label": roster["label"], "title": roster["title"]},
            "members": copy.deepcopy(page),
        }
        return Response(
            json.dumps(body),
            200,
            headers=headers,
            content_type=f"{NRPS_MEDIA_TYPE}; charset=utf-8",
        )

    def _record_service_call(self, request: Request, type_id: str, status: int) -> None:
        authorization = request.headers.get("Authorization", "")
        with self._lock:
            token = self._tokens.get(authorization[len("Bearer ") :].strip())
            self.service_calls.append(
                {
                    "type_id": type_id,
                    "status": status,
                    "token_client_id": token.client_id if token else None,
                }
            )

    def _bearer_allows(self, request: Request, type_id: str, scope: str) -> bool:
        """Moodle's ``get_oauth_key_from_headers``: a known, unexpired Bearer token of this tool
        type holding the scope. Any failure is a 401 in Moodle."""
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            return False
        with self._lock:
            token = self._tokens.get(authorization[len("Bearer ") :].strip())
        return (
            token is not None
            and token.type_id == type_id
            and not token.expired
            and scope in token.scopes
        )

    def _auth_endpoint(self, request: Request) -> Response:
        """Moodle's mod/lti/auth.php: check the OIDC request, answer the auto-submit form."""
        params = request.values
        required = (
            "scope",
            "response_type",
            "client_id",
            "redirect_uri",
            "login_hint",
            "nonce",
            "state",
            "lti_message_hint",
        )
        missing = [name for name in required if not params.get(name)]
        if missing:
            return _auth_error("invalid_request", f"missing parameter(s): {', '.join(missing)}")
        if params["scope"] != "openid":
            return _auth_error("invalid_scope", f"scope must be 'openid', got {params['scope']!r}")
        if params["response_type"] != "id_token":
            return _auth_error(
                "unsupported_response_type",
                f"response_type must be 'id_token', got {params['response_type']!r}",
            )
        if self._type_id_of(params["client_id"]) is None:
            return _auth_error("unauthorized_client", f"unknown client_id {params['client_id']!r}")
        if self.dynamic_registration.pending(params["client_id"]):
            # A dynamically registered tool type is pending until the admin activates it.
            return _auth_error("unauthorized_client", "the tool is pending: activate it first")
        redirect_uri = params["redirect_uri"]
        if redirect_uri not in self.registered_redirect_uris:
            return _auth_error(
                "invalid_request",
                f"redirect_uri {redirect_uri!r} is not a registered redirection URI "
                f"{self.registered_redirect_uris}",
            )
        if params.get("response_mode") != "form_post":
            return _auth_error("invalid_request", "Invalid response_mode (must be form_post)")
        if params.get("prompt") and params["prompt"] != "none":
            return _auth_error("invalid_request", "Invalid prompt")
        try:
            launch_id = str(json.loads(params["lti_message_hint"])["launchid"])
        except (ValueError, TypeError, KeyError):
            return _auth_error("invalid_request", "lti_message_hint is not the one Moodle sent")
        with self._lock:
            pending = self._pending.pop(launch_id, None)  # single-use, as in Moodle
        if pending is None:
            return _auth_error("invalid_request", "unknown or already used lti_message_hint")
        if params["login_hint"] != pending.login_hint:
            return _auth_error("access_denied", "login_hint is not the user of this launch")

        try:
            id_token = self._build_id_token(pending, nonce=params["nonce"])
        except Exception as error:  # noqa: BLE001 - re-raised by the driver in the test's thread
            pending.error = error
            return _json_response({"error": "server_error", "error_description": repr(error)}, 500)
        page = (
            f'<form action="{html.escape(redirect_uri)}" name="ltiAuthForm" id="ltiAuthForm" '
            'method="post" enctype="application/x-www-form-urlencoded">\n'
            f'  <input type="hidden" name="id_token" value="{html.escape(id_token)}"/>\n'
            f'  <input type="hidden" name="state" value="{html.escape(params["state"])}"/>\n'
            "</form>\n"
            '<script type="text/javascript">\n//<![CDATA[\n'
            "document.ltiAuthForm.submit();\n//]]>\n</script>\n"
        )
        return Response(page, 200, mimetype="text/html")

    def _build_id_token(self, pending: _PendingLaunch, *, nonce: str) -> str:
        claims = copy.deepcopy(pending.claims)
        if claims.get("nonce") is None:
            claims["nonce"] = nonce
        if claims.get(TARGET_LINK_URI) is None:
            claims[TARGET_LINK_URI] = pending.tool_launch_url
        if pending.mutate is not None:
            returned = pending.mutate(claims)
            if returned is not None:
                claims = dict(returned)
        for path in pending.drop:
            _drop_path(claims, path)
        token, jose = self.sign(
            claims, alg=pending.alg, header=pending.header, sign_with=pending.sign_with
        )
        pending.final_claims = claims
        pending.final_header = jose
        pending.id_token = token if pending.raw_id_token is None else pending.raw_id_token
        return pending.id_token


def _json_response(body: Any, status: int) -> Response:
    return Response(json.dumps(body), status, mimetype="application/json")


def _auth_error(error: str, description: str) -> Response:
    return _json_response({"error": error, "error_description": description}, 400)


def _token_error(error: str, description: str) -> Response:
    """token.php's refusal: 400 with ``error``. Real Moodle 4.3 has no ``error_description``
    and, when the signature check throws, puts php-jwt's message in ``error`` itself."""
    body = {"error": error, "error_description": description}
    return Response(json.dumps(body), 400, content_type="text/html; charset=UTF-8")


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    500: "Internal Server Error",
    501: "Not Implemented",
}


def _service_error(request: Request, status: int, reason: str | None = None) -> Response:
    """services.php's error answer (mod_lti\\local\\ltiservice\\response::send)."""
    reason = reason or _REASONS.get(status) or _REASONS.get(status // 100 * 100, "Error")
    details: dict[str, str] = {"method": request.method, "url": request.full_path.rstrip("?")}
    if "Accept" in request.headers:
        details["accept"] = request.headers["Accept"]
    if request.mimetype:
        details["contentType"] = request.mimetype
    body = {"status": status, "reason": reason, "request": details}
    return Response(
        json.dumps(body, indent=4), status, content_type="application/json; charset=utf-8"
    )


def _php_int(value: str | None) -> int:
    """PHP's ``(int)`` of a request parameter (Moodle's PARAM_INT): leading digits, else 0."""
    match = re.match(r"\s*([+-]?\d+)", value or "")
    return int(match.group(1)) if match else 0
