"""A launch as the web edge validates it, on pylti1p3's Flask adapter, with the gaps of
pylti1p3 2.0 closed here.

Spec: 1EdTech Security Framework 1.0, §5.1.3 (authentication response validation)
http://www.imsglobal.org/spec/security/v1p0/#authentication-response-validation
and LTI Core 1.3 §5.3/§5.4 (required message claims).

pylti1p3 2.0 accepts an id_token without `exp`/`iat`, ignores `aud`/`azp`, never consumes the
nonce (a replayed launch passes), checks the nonce before the signature (so a forged token
could burn a nonce), and fetches the platform's JWKS on every launch (`PlatformKeys` caches
it instead). `LabpoolMessageLaunch` re-orders the checks and adds the missing ones; see
docs/moodle.md.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
from flask import make_response
from pylti1p3.contrib.flask import FlaskMessageLaunch, FlaskOIDCLogin, FlaskRequest
from pylti1p3.exception import LtiMessageValidationException

from lti_tool.lti import PlatformKeys, RedisLaunchDataStorage
from lti_tool.web.cookies import LabpoolCookieService, cookie_check_page


class LabpoolOIDCLogin(FlaskOIDCLogin):
    """OIDC login initiation with Labpool's cookies (always a SameSite attribute, see
    `cookies.py`) and its cookie-check page (the Flask adapter expects a template we do not
    ship)."""

    def __init__(self, request: FlaskRequest, tool_config: Any, *, secure: bool):
        super().__init__(request, tool_config, cookie_service=LabpoolCookieService(request, secure))

    def get_cookies_allowed_js_check(self):  # type: ignore[override]
        protocol, params = self.get_cookies_allowed_js_check_params()
        return make_response(cookie_check_page(protocol, params))


class LabpoolMessageLaunch(FlaskMessageLaunch):
    """A launch validated in this order: state, format, header, registration, signature and
    time/audience claims, deployment, message claims, and last the nonce, consumed once."""

    def __init__(self, *args: Any, platform_keys: PlatformKeys, leeway_s: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._platform_keys = platform_keys
        self._leeway = leeway_s

    def validate(self) -> LabpoolMessageLaunch:
        if self._restored:
            raise LtiMessageValidationException("A restored launch can't be validated.")
        self._validated = True
        try:
            self.validate_state()
            self.validate_jwt_format()
            self.validate_header()
            self.validate_registration()
            self.validate_jwt_signature()
            self.validate_deployment()
            self.validate_message()
            self.validate_nonce()
        except Exception:
            self._validated = False
            raise
        return self

    def get_client_id(self) -> str:
        # With several audiences, `azp` names the party the token is for (OIDC Core §2).
        body = self._get_jwt_body()
        azp = body.get("azp")
        if isinstance(azp, str):
            return azp
        aud = body.get("aud")
        if isinstance(aud, list) and not aud:  # pylti1p3 would take aud[0]: an IndexError
            raise LtiMessageValidationException('The id_token\'s "aud" claim is an empty list')
        return super().get_client_id()

    def validate_header(self) -> LabpoolMessageLaunch:
        header = self._jwt.get("header", {})
        if header.get("alg") != "RS256":
            raise LtiMessageValidationException(
                f"The id_token must be signed with RS256, not {header.get('alg')!r}"
            )
        if not header.get("kid"):
            raise LtiMessageValidationException("The id_token header has no kid")
        return self

    def validate_jwt_signature(self) -> LabpoolMessageLaunch:
        assert self._registration is not None
        client_id = self._registration.get_client_id()
        pem = self._platform_keys.public_key_pem(
            self._registration.get_key_set_url() or "", self._jwt["header"]["kid"]
        )
        try:
            claims = jwt.decode(
                self._get_id_token(),
                pem,
                algorithms=["RS256"],
                audience=client_id,
                issuer=self._registration.get_issuer(),
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "nonce"]},
            )
        except jwt.InvalidTokenError as exc:
            raise LtiMessageValidationException(f"Invalid id_token: {exc}") from exc
        if claims["iat"] > time.time() + self._leeway:
            raise LtiMessageValidationException("Invalid id_token: issued in the future")
        # OIDC Core §3.1.3.7: with several audiences azp is required; if present it is us.
        aud = claims["aud"]
        azp = claims.get("azp")
        if isinstance(aud, list) and len(aud) > 1 and not azp:
            raise LtiMessageValidationException("Invalid id_token: several audiences and no azp")
        if azp is not None and azp != client_id:
            raise LtiMessageValidationException("Invalid id_token: azp is not this tool")
        self._jwt["body"] = claims  # the verified claims, not the pre-decoded ones
        return self

    def save_launch_data(self) -> LabpoolMessageLaunch:
        """Not kept: pylti1p3 would store the whole id_token (names, emails) in Redis for a
        day, and nothing here reads it back; the database records what matters."""
        return self

    def validate_nonce(self) -> LabpoolMessageLaunch:
        nonce = self._get_jwt_body().get("nonce")
        if not nonce or not isinstance(nonce, str):
            raise LtiMessageValidationException('The "nonce" claim is missing')
        session = self._session_service
        storage = session.data_storage
        if not isinstance(storage, RedisLaunchDataStorage) or not storage.consume(
            session._get_key("nonce", nonce)
        ):
            raise LtiMessageValidationException("Invalid or already used nonce (replayed launch?)")
        return self
