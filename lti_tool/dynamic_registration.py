"""LTI Dynamic Registration 1.0 (https://www.imsglobal.org/spec/lti-dr/v1p0), as Moodle 4.3
does it (docs/moodle.md, "Registration"), without Flask.

1. `labpool registration-link` makes a one-time link (`lti_tool/registration_links.py`).
2. Moodle opens the link with `openid_configuration` and `registration_token`. The link is
   claimed first (nothing is fetched for a stranger's link), then
   `fetch_platform_configuration` reads the platform's OpenID configuration (LTI-DR §3.4)
   with a timeout, a size limit and no redirects, and checks it: `issuer` has the
   configuration URL's origin (§3.5.1), https unless plain http is allowed (the tool itself
   on plain http: single-server trials), the endpoints Labpool needs, and the message types
   and algorithms it relies on.
3. `tool_registration` is the client registration (§3.5.2, with the LTI tool configuration
   of §3.6) and `post_registration` sends it with the registration token as Bearer (§3.5.2).
4. `complete_registration` stores what the platform answered (client id, deployment id)
   through `register_platform`, the service code of `labpool platform add`.

pylti1p3next's `DynamicRegistration` helper is not used: it fetches without timeouts or size
limits, follows redirects, does not check the issuer and reports problems with `assert`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy.orm import Session, sessionmaker

from config.db import transaction
from config.settings import Settings
from lti_tool.framing import origin_of
from lti_tool.registration_links import RegistrationLinks
from lti_tool.registrations import RegistrationError, register_platform

log = logging.getLogger(__name__)

FETCH_TIMEOUT = (5, 15)  # connect, read (seconds)
MAX_ANSWER_BYTES = 256 * 1024

PLATFORM_CONFIGURATION = "https://purl.imsglobal.org/spec/lti-platform-configuration"
TOOL_CONFIGURATION = "https://purl.imsglobal.org/spec/lti-tool-configuration"
SCOPE_NRPS = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"
SCOPE_LINEITEM = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem"
SCOPE_LINEITEM_READONLY = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem.readonly"
SCOPE_RESULT_READONLY = "https://purl.imsglobal.org/spec/lti-ags/scope/result.readonly"
SCOPE_SCORE = "https://purl.imsglobal.org/spec/lti-ags/scope/score"
# What the roster sync and the grade outbox use (Moodle wants lineitem.readonly asked for
# explicitly, even next to lineitem: docs/moodle.md, "Grades").
WANTED_SCOPES = (
    SCOPE_LINEITEM,
    SCOPE_LINEITEM_READONLY,
    SCOPE_RESULT_READONLY,
    SCOPE_SCORE,
    SCOPE_NRPS,
)
RESOURCE_LINK = "LtiResourceLinkRequest"
DEEP_LINKING = "LtiDeepLinkingRequest"
# Names and email are asked for, never required (docs/moodle.md, "Launch"): Moodle's privacy
# settings still decide what is shared.
CLAIMS = ["iss", "sub", "name", "given_name", "family_name", "email"]


class DynamicRegistrationError(Exception):
    """The registration cannot go on; the message says why, for the admin. Nothing was
    stored. `status` is the HTTP status the web edge answers with."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


# --------------------------------------------------------------------------- the platform


@dataclass(frozen=True)
class PlatformConfiguration:
    """What Labpool takes from a platform's OpenID configuration (LTI-DR §3.4)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    registration_endpoint: str
    messages_supported: frozenset[str]
    scopes_supported: frozenset[str] | None  # None: the platform did not say
    product: str  # e.g. "moodle 4.3 (Build: 20231009)", for `platform list`


def _http_url(label: str, value: Any, allow_http: bool) -> str:
    schemes = ("https", "http") if allow_http else ("https",)
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:  # e.g. "https://[::1": an unclosed IPv6 address
        parts = None
    if parts is None or parts.scheme not in schemes or not parts.netloc or parts.fragment:
        need = "an http(s)" if allow_http else "an https"
        raise DynamicRegistrationError(f"The platform's {label} must be {need} URL, got {value!r}.")
    return value


def _get_json(http: requests.Session, method: str, url: str, what: str, **kwargs: Any) -> Any:
    """One request with the timeouts, no redirects, and a bounded answer. Returns (status,
    parsed JSON or None, text head)."""
    try:
        with http.request(
            method, url, timeout=FETCH_TIMEOUT, allow_redirects=False, stream=True, **kwargs
        ) as resp:
            body = b""
            for chunk in resp.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise DynamicRegistrationError(
                        f"The platform's {what} is larger than {MAX_ANSWER_BYTES // 1024} KB.",
                        502,
                    )
            status = resp.status_code
    except requests.RequestException as exc:
        raise DynamicRegistrationError(
            f"The platform's {what} could not be reached at {url} ({type(exc).__name__}).", 502
        ) from None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return status, parsed, body[:300].decode("utf-8", "replace")


def fetch_platform_configuration(
    http: requests.Session, url: str, *, allow_http: bool
) -> PlatformConfiguration:
    """GET the platform's OpenID configuration and check it (LTI-DR §3.4, §3.5.1)."""
    _http_url("OpenID configuration URL", url, allow_http)
    status, body, head = _get_json(http, "GET", url, "OpenID configuration")
    if status != 200 or not isinstance(body, dict):
        raise DynamicRegistrationError(
            f"The platform's OpenID configuration at {url} answered {status}, not a JSON "
            f"object: {head!r}",
            502,
        )
    issuer = _http_url("issuer", body.get("issuer"), allow_http)
    # §3.5.1: the issuer must be the configuration's own site. A configuration anyone could
    # serve must not name someone else's Moodle as its issuer.
    if origin_of(issuer) is None or origin_of(issuer) != origin_of(url):
        raise DynamicRegistrationError(
            f"The platform's issuer {issuer!r} is not on the site its OpenID configuration "
            f"came from ({origin_of(url)}); nothing was registered."
        )
    endpoints = {
        name: _http_url(name, body.get(name), allow_http)
        for name in (
            "authorization_endpoint",
            "token_endpoint",
            "jwks_uri",
            "registration_endpoint",
        )
    }
    _require_listed(body, "response_types_supported", "id_token")
    _require_listed(body, "id_token_signing_alg_values_supported", "RS256")
    _require_listed(body, "token_endpoint_auth_methods_supported", "private_key_jwt")
    lti = body.get(PLATFORM_CONFIGURATION)
    if not isinstance(lti, dict):
        raise DynamicRegistrationError(
            f"The platform's OpenID configuration has no {PLATFORM_CONFIGURATION} object: it is "
            "not an LTI platform configuration."
        )
    messages = lti.get("messages_supported")
    if not isinstance(messages, list):
        raise DynamicRegistrationError("The platform does not list the LTI messages it supports.")
    types = frozenset(
        m["type"] for m in messages if isinstance(m, dict) and isinstance(m.get("type"), str)
    )
    if RESOURCE_LINK not in types:
        raise DynamicRegistrationError(
            f"The platform does not support {RESOURCE_LINK} (it lists {sorted(types)}): students "
            "could not open the activity."
        )
    scopes = body.get("scopes_supported")
    product = " ".join(
        str(lti.get(k)) for k in ("product_family_code", "version") if isinstance(lti.get(k), str)
    )
    return PlatformConfiguration(
        issuer=issuer,
        **endpoints,
        messages_supported=types,
        scopes_supported=(
            frozenset(s for s in scopes if isinstance(s, str)) if isinstance(scopes, list) else None
        ),
        product=product[:200],
    )


def _require_listed(body: dict[str, Any], field: str, needed: str) -> None:
    """When the platform lists `field`, `needed` must be in it (absent: the spec's default)."""
    listed = body.get(field)
    if listed is None:
        return
    if not isinstance(listed, list) or needed not in listed:
        raise DynamicRegistrationError(
            f"The platform's {field} does not include {needed!r}, which Labpool needs."
        )


# --------------------------------------------------------------------------- the tool


def tool_registration(settings: Settings, platform: PlatformConfiguration) -> dict[str, Any]:
    """The client registration Labpool posts (LTI-DR §3.5.2, tool configuration §3.6)."""
    launch_url = settings.url("/lti/launch")
    scopes = [
        s
        for s in WANTED_SCOPES
        if platform.scopes_supported is None or s in platform.scopes_supported
    ]
    messages: list[dict[str, Any]] = [{"type": RESOURCE_LINK, "target_link_uri": launch_url}]
    if DEEP_LINKING in platform.messages_supported:
        # Moodle turns "Supports Deep Linking" on for this entry ("Select content").
        messages.append(
            {"type": DEEP_LINKING, "target_link_uri": launch_url, "label": "Labpool environment"}
        )
    return {
        "application_type": "web",
        "client_name": "Labpool",
        "grant_types": ["implicit", "client_credentials"],
        "response_types": ["id_token"],
        "initiate_login_uri": settings.url("/lti/login"),
        "redirect_uris": [launch_url],
        "jwks_uri": settings.url("/lti/jwks.json"),
        "token_endpoint_auth_method": "private_key_jwt",
        "scope": " ".join(scopes),
        TOOL_CONFIGURATION: {
            # Moodle requires the domain to be the host (and port) of target_link_uri.
            "domain": urlsplit(settings.public_url).netloc,
            "target_link_uri": launch_url,
            "description": "A machine with a browser IDE for every student",
            "claims": CLAIMS,
            "messages": messages,
            # The tool needs none for every launch: an activity's environment and assignment
            # arrive as the deep-linked content item's own custom parameters.
            "custom_parameters": {},
        },
    }


@dataclass(frozen=True)
class PlatformAnswer:
    client_id: str
    deployment_id: str
    scopes: tuple[str, ...]


def post_registration(
    http: requests.Session,
    platform: PlatformConfiguration,
    registration_token: str,
    body: dict[str, Any],
) -> PlatformAnswer:
    """POST the client registration with the registration token (LTI-DR §3.5.2) and read the
    answer (§3.6.2): `client_id`, and the deployment id inside the tool configuration."""
    status, answer, head = _get_json(
        http,
        "POST",
        platform.registration_endpoint,
        "registration endpoint",
        json=body,
        headers={"Authorization": f"Bearer {registration_token}", "Accept": "application/json"},
    )
    if status not in (200, 201) or not isinstance(answer, dict):
        # Moodle answers its refusals as a short reason in plain text (token_already_used,
        # missing_domain, …); never echo more than a bounded head of it.
        raise DynamicRegistrationError(
            f"The platform refused the registration ({status}): {head.strip()[:200]!r}. "
            "Nothing was stored; if the platform's window was open for long, its registration "
            "token may have expired: start the registration in the platform again.",
            502,
        )
    client_id = answer.get("client_id")
    config = answer.get(TOOL_CONFIGURATION)
    deployment_id = config.get("deployment_id") if isinstance(config, dict) else None
    if isinstance(deployment_id, int) and not isinstance(deployment_id, bool):
        deployment_id = str(deployment_id)
    if not isinstance(client_id, str) or not client_id.strip():
        raise DynamicRegistrationError("The platform's answer has no client_id.", 502)
    if not isinstance(deployment_id, str) or not deployment_id.strip():
        raise DynamicRegistrationError(
            "The platform's answer has no deployment_id in its tool configuration; register "
            "the deployment by hand with `labpool platform add`.",
            502,
        )
    scope = answer.get("scope")
    scopes = tuple(scope.split()) if isinstance(scope, str) else ()
    return PlatformAnswer(client_id.strip()[:255], deployment_id.strip()[:255], scopes)


# --------------------------------------------------------------------------- all of it


@dataclass(frozen=True)
class Registered:
    issuer: str
    client_id: str
    deployment_id: str
    product: str
    deep_linking: bool
    missing_scopes: tuple[str, ...]  # wanted, but not granted: roster or grades will not work


def complete_registration(
    *,
    links: RegistrationLinks,
    sessions: sessionmaker[Session],
    settings: Settings,
    http: requests.Session,
    link_token: str,
    openid_configuration: str,
    registration_token: str,
) -> Registered:
    """The whole exchange behind one registration link. LinkRefused (the link) or
    DynamicRegistrationError (the platform) says what went wrong; then nothing was stored,
    and a link refused for another reason than itself may be used again."""
    if not openid_configuration or not registration_token:
        links.check(link_token)
        raise DynamicRegistrationError(
            "This is Labpool's registration link: paste it into Moodle (Site administration → "
            'Plugins → Activity modules → External tool → Manage tools → Tool URL, then "Add '
            'LTI Advantage"). Opened by itself it does nothing.',
            400,
        )
    if len(registration_token) > 8192 or len(openid_configuration) > 2048:
        raise DynamicRegistrationError("The registration request's parameters are too long.")
    links.claim(link_token)
    label = links.label(link_token)
    try:
        allow_http = not settings.is_production
        platform = fetch_platform_configuration(http, openid_configuration, allow_http=allow_http)
        body = tool_registration(settings, platform)
        answer = post_registration(http, platform, registration_token, body)
        with transaction(sessions) as session:
            register_platform(
                session,
                settings,
                issuer=platform.issuer,
                client_id=answer.client_id,
                deployment_ids=[answer.deployment_id],
                auth_url=platform.authorization_endpoint,
                token_url=platform.token_endpoint,
                jwks_url=platform.jwks_uri,
                name=platform.product,
            )
    except RegistrationError as exc:
        links.release(link_token)
        raise DynamicRegistrationError(f"The platform's values were refused: {exc}") from None
    except BaseException:
        links.release(link_token)
        raise
    links.mark_used(link_token)
    asked = body["scope"].split()
    granted = set(answer.scopes) if answer.scopes else set(asked)
    log.info(
        "dynamic registration (link %s): %s client %s deployment %s",
        label,
        platform.issuer,
        answer.client_id,
        answer.deployment_id,
    )
    return Registered(
        issuer=platform.issuer,
        client_id=answer.client_id,
        deployment_id=answer.deployment_id,
        product=platform.product,
        deep_linking=DEEP_LINKING in platform.messages_supported,
        missing_scopes=tuple(s for s in WANTED_SCOPES if s not in granted),
    )
