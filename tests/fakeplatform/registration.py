"""Moodle's side of LTI Dynamic Registration for the fake platform (docs/moodle.md,
"Registration"; the exchange captured from Moodle 4.3 is
``tests/fixtures/moodle-4.3/dynamic_registration.json``).

* ``registration_url(tool_link)`` is what Moodle opens when the admin pastes the tool's
  registration link as *Tool URL* and clicks "Add LTI Advantage"
  (``mod/lti/startltiadvregistration.php``): the link plus ``openid_configuration`` and a
  ``registration_token`` (a JWT signed with the platform's key, ``scope: reg``, living 1 h,
  whose ``sub`` is the client id the new tool will get);
* ``GET /mod/lti/openid-configuration.php`` answers the captured configuration with this
  platform's URLs (``configuration_overrides`` changes or, with ``None``, drops a field; an
  ``issuer`` of another site is the mismatch case);
* ``POST /mod/lti/openid-registration.php`` checks as Moodle's ``openid-registration.php``
  and ``registration_helper`` do: a Bearer token it issued, not expired, not used (else 401
  ``token_already_used``: Moodle finds a tool type with the token's client id); the body's
  required fields (400 ``missing_<name>``), ``domain`` = the host of ``target_link_uri``
  (``domain_targetlinkuri_mismatch``), ``response_types`` ∋ ``id_token``, ``redirect_uris``
  a list, ``private_key_jwt``, ``application_type`` web; refusals are a plain-text reason, as
  Moodle echoes its ``registration_exception``. Accepted, it adds a **pending** tool type
  (the platform's ``client_id`` / ``deployment_id`` become the new ones, its redirection
  URIs and keyset URL the tool's) and answers Moodle's shape with ``client_id`` and, in the
  tool configuration, ``deployment_id``. ``activate()`` is the admin's click on *Activate*:
  until then auth.php refuses the tool's logins. ``fail_with`` makes the endpoint answer that
  status (an outage).
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from werkzeug.wrappers import Request, Response

from .claims import load_fixture

if TYPE_CHECKING:
    from .platform import FakePlatform

CONFIGURATION_PATH = "/mod/lti/openid-configuration.php"
REGISTRATION_PATH = "/mod/lti/openid-registration.php"
TOOL_CONFIGURATION = "https://purl.imsglobal.org/spec/lti-tool-configuration"
REGISTRATION_TOKEN_LIFETIME = 3600
FIXTURE_SITE = "http://127.0.0.1:8081"
SCOPE_AGS_SCORE = "https://purl.imsglobal.org/spec/lti-ags/scope/score"
SCOPE_AGS_LINEITEM = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem"
SCOPE_NRPS = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"


class RegistrationRefused(Exception):
    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


class FakeDynamicRegistration:
    def __init__(self, platform: FakePlatform) -> None:
        self._platform = platform
        self._lock = threading.RLock()
        self._fixture = load_fixture("dynamic_registration.json")
        #: Fields of the OpenID configuration to replace (``None``: drop the field).
        self.configuration_overrides: dict[str, Any] = {}
        #: Answer every registration POST with this status (and a reason), when set.
        self.fail_with: int | None = None
        #: Every registration POST: ``{"body", "authorization", "status", "reason"}``.
        self.requests: list[dict[str, Any]] = []
        #: Number of GETs of the OpenID configuration.
        self.configuration_fetches = 0
        #: client id → the registration Moodle stored (``"state"``: pending / configured).
        self.tools: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, dict[str, Any]] = {}
        self._next_type_id = 10

    # ----------------------------------------------------------------- the admin's side

    @property
    def configuration_url(self) -> str:
        return self._platform.url + CONFIGURATION_PATH

    def registration_token(self, lifetime: int = REGISTRATION_TOKEN_LIFETIME) -> str:
        """A registration token as startltiadvregistration.php makes it."""
        from .platform import _moodle_client_id

        now = int(time.time())
        claims = {"sub": _moodle_client_id(), "scope": "reg", "iat": now, "exp": now + lifetime}
        token, _ = self._platform.sign(claims)
        with self._lock:
            self._tokens[token] = claims
        return token

    def registration_url(self, tool_link: str, token: str | None = None) -> str:
        """The URL Moodle opens for the pasted link (moodle_url keeps its own query)."""
        params = {
            "openid_configuration": self.configuration_url,
            "registration_token": token or self.registration_token(),
        }
        sep = "&" if urlsplit(tool_link).query else "?"
        return f"{tool_link}{sep}{urlencode(params)}"

    def activate(self, client_id: str | None = None) -> None:
        """The admin's *Activate* on the pending tool (the last registered by default)."""
        with self._lock:
            client_id = client_id or list(self.tools)[-1]
            self.tools[client_id]["state"] = "configured"

    def pending(self, client_id: str) -> bool:
        with self._lock:
            tool = self.tools.get(client_id)
            return tool is not None and tool["state"] == "pending"

    # ----------------------------------------------------------------- endpoints

    def configuration_endpoint(self, request: Request) -> Response:
        """mod/lti/openid-configuration.php: the captured configuration, this site's URLs."""
        if request.method != "GET":
            return Response("method_not_allowed", 405)
        text = json.dumps(self._fixture["openid_configuration"])
        body = json.loads(text.replace(FIXTURE_SITE, self._platform.url))
        with self._lock:
            self.configuration_fetches += 1
            for name, value in self.configuration_overrides.items():
                if value is None:
                    body.pop(name, None)
                else:
                    body[name] = value
        return Response(json.dumps(body), 200, content_type="application/json; charset=utf-8")

    def registration_endpoint(self, request: Request) -> Response:
        """mod/lti/openid-registration.php."""
        auth = request.headers.get("Authorization", "")
        record: dict[str, Any] = {"authorization": auth, "body": None}
        try:
            record["body"] = body = json.loads(request.get_data() or b"null")
            if self.fail_with is not None:
                raise RegistrationRefused("platform_unavailable", self.fail_with)
            if request.method != "POST":
                raise RegistrationRefused("method_not_allowed", 405)
            if not auth.startswith("Bearer "):
                raise RegistrationRefused("missing_registration_token", 401)
            client_id = self._validate_token(auth[len("Bearer ") :].strip())
            if not isinstance(body, dict):
                raise RegistrationRefused("invalid_registration_request")
            answer = self._register(body, client_id)
        except RegistrationRefused as refused:
            record.update(status=refused.status, reason=refused.reason)
            with self._lock:
                self.requests.append(record)
            return Response(refused.reason, refused.status, content_type="text/html; charset=utf-8")
        except ValueError:
            record.update(status=400, reason="invalid_json")
            with self._lock:
                self.requests.append(record)
            return Response("invalid_json", 400, content_type="text/html; charset=utf-8")
        record.update(status=200, reason=None)
        with self._lock:
            self.requests.append(record)
        return Response(json.dumps(answer), 200, content_type="application/json; charset=utf-8")

    def _validate_token(self, token: str) -> str:
        """registration_helper::validate_registration_token: a JWT of this platform, scope
        reg, not expired, its client id not yet a tool type."""
        with self._lock:
            claims = self._tokens.get(token)
            if claims is None:
                raise RegistrationRefused("invalid_registration_token", 401)
            if claims["exp"] <= time.time():
                raise RegistrationRefused("expired_registration_token", 401)
            if claims["sub"] in self.tools:
                raise RegistrationRefused("token_already_used", 401)
            return str(claims["sub"])

    @staticmethod
    def _parameter(payload: dict[str, Any], name: str, required: bool) -> Any:
        value = payload.get(name)
        if required and (value is None or value == "" or value == []):
            raise RegistrationRefused(f"missing_{name}")
        return value

    def _register(self, payload: dict[str, Any], client_id: str) -> dict[str, Any]:
        """registration_helper::registration_to_config, then lti_add_type (pending) and
        config_to_registration."""
        p = self._parameter
        response_types = p(payload, "response_types", True)
        p(payload, "initiate_login_uri", True)
        redirect_uris = p(payload, "redirect_uris", True)
        p(payload, "client_name", True)
        jwks_uri = p(payload, "jwks_uri", True)
        auth_method = p(payload, "token_endpoint_auth_method", True)
        application_type = p(payload, "application_type", False)
        tool = p(payload, TOOL_CONFIGURATION, True)
        if not isinstance(tool, dict):
            raise RegistrationRefused(f"missing_{TOOL_CONFIGURATION}")
        domain = tool.get("domain")
        if not domain:
            raise RegistrationRefused("missing_domain")
        target = tool.get("target_link_uri") or f"https://{domain}"
        if _domain(domain) != _domain(target):
            raise RegistrationRefused("domain_targetlinkuri_mismatch")
        if not isinstance(response_types, list) or "id_token" not in response_types:
            raise RegistrationRefused("invalid_response_types")
        if not isinstance(redirect_uris, list):
            raise RegistrationRefused("invalid_redirect_uris")
        if auth_method != "private_key_jwt":
            raise RegistrationRefused("invalid_token_endpoint_auth_method")
        if application_type and application_type != "web":
            raise RegistrationRefused("invalid_application_type")
        custom = tool.get("custom_parameters")
        if custom is not None and (
            not isinstance(custom, dict) or not all(isinstance(v, str) for v in custom.values())
        ):
            raise RegistrationRefused("invalid_custom_parameters")
        messages = tool.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RegistrationRefused("invalid_messages")
        scope = payload.get("scope") or ""
        if not isinstance(scope, str):
            raise RegistrationRefused("invalid_scope")
        with self._lock:
            type_id = str(self._next_type_id)
            self._next_type_id += 1
            deep_linking = any(m.get("type") == "LtiDeepLinkingRequest" for m in messages)
            self.tools[client_id] = {
                "state": "pending",
                "type_id": type_id,
                "payload": payload,
                "deep_linking": deep_linking,
            }
        # The platform now knows this tool: launches go out with its ids (after activate()).
        platform = self._platform
        platform.client_id, platform.deployment_id = client_id, type_id
        tool_url = str(target)
        if tool_url.endswith(platform.LAUNCH_PATH):
            tool_url = tool_url[: -len(platform.LAUNCH_PATH)]
        platform.register_tool(tool_url, redirect_uris, jwks_url=jwks_uri)
        # config_to_registration: what Moodle stored, scopes it grants among those it knows.
        known = set(self._fixture["openid_configuration"]["scopes_supported"])
        granted = [s for s in scope.split() if s in known]
        if SCOPE_AGS_LINEITEM in granted or SCOPE_AGS_SCORE in granted:
            granted.append("https://purl.imsglobal.org/spec/lti-ags/scope/result.readonly")
        answer = dict(self._fixture["registration_response"])
        answer.update(
            client_id=client_id,
            client_name=payload["client_name"],
            initiate_login_uri=payload["initiate_login_uri"],
            jwks_uri=jwks_uri,
            redirect_uris=redirect_uris,
            scope=" ".join(dict.fromkeys(granted)),
        )
        answer[TOOL_CONFIGURATION] = {
            **{k: v for k, v in tool.items() if k != "custom_parameters"},
            "custom_parameters": custom or {},
            "deployment_id": type_id,
            "version": "1.3.0",
        }
        return answer


def _domain(url: str) -> str:
    """lti_get_domain_from_url: the host[:port], without a scheme or a leading www."""
    text = str(url)
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0].lower()
    return text[4:] if text.startswith("www.") else text
