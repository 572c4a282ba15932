"""The LTI Advantage service connector every outside conversation shares (names and roles
now, grades and deep linking next): the OAuth2 client-credentials token of 1EdTech Security
Framework §4 (https://www.imsglobal.org/spec/security/v1p0/#using-json-web-tokens-with-oauth-2-0-client-credentials-grant),
signed with the tool's active key, and cached in Redis until shortly before it expires.

The cache is keyed by issuer **and** client id (and token URL and scopes): Moodle binds a
token to the tool type (client id) that asked for it and answers 401 when another tool type
of the same site uses it; pylti1p3's own key hashes issuer and scopes only.
"""

from __future__ import annotations

import hashlib

import redis
import requests
from pylti1p3.registration import Registration
from pylti1p3.service_connector import ServiceConnector
from sqlalchemy.orm import Session

from config.runtime import Runtime
from jwks.keys import active_signing_key
from lti_tool.models import Platform

TOKEN_KEY = "labpool:access-token:{}"
TOKEN_MARGIN_S = 60


class ServiceRegistration(Registration):
    """pylti1p3 derives the `kid` from the public key; ours are database rows with their own
    kid, which the client assertion must name so the platform finds the key in our JWKS."""

    def __init__(self, kid: str):
        super().__init__()
        self._labpool_kid = kid

    def get_kid(self) -> str | None:
        return self._labpool_kid


class CachedTokenConnector(ServiceConnector):
    """pylti1p3's connector with the access token cached in Redis across jobs, per
    (issuer, client id, token URL, scopes)."""

    def __init__(self, registration: Registration, conn: redis.Redis, http: requests.Session):
        super().__init__(registration, http)
        self._redis = conn
        self.http = http  # for services that read the status and reason themselves (AGS)

    def _scope_key(self, scopes) -> str:  # type: ignore[no-untyped-def, override]
        reg = self._registration
        parts = [
            reg.get_issuer() or "",
            reg.get_client_id() or "",
            reg.get_auth_token_url() or "",
            *sorted(scopes),
        ]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def forget_access_token(self, scopes: list[str]) -> None:
        """Drop a cached token the platform no longer accepts (a 401), so the next call asks
        for a new one."""
        self._redis.delete(TOKEN_KEY.format(self._scope_key(sorted(scopes))))

    def _get_cached_access_token(self, scope_key: str) -> str | None:
        raw = self._redis.get(TOKEN_KEY.format(scope_key))
        return raw.decode() if raw else None

    def _cache_access_token(self, scope_key: str, access_token: str, expires_in: float) -> None:
        ttl = int(expires_in or 0) - TOKEN_MARGIN_S
        if ttl > 0:
            self._redis.set(TOKEN_KEY.format(scope_key), access_token, ex=ttl)


def connector_for(session: Session, rt: Runtime, platform: Platform) -> CachedTokenConnector:
    key = active_signing_key(session, rt.settings.secret_key)
    registration = (
        ServiceRegistration(key.kid)
        .set_issuer(platform.issuer)
        .set_client_id(platform.client_id)
        .set_auth_token_url(platform.token_url)
        .set_auth_login_url(platform.auth_url)
        .set_key_set_url(platform.jwks_url)
        .set_tool_private_key(key.private_pem)
    )
    http = requests.Session()
    http.headers["User-Agent"] = "Labpool LTI tool"
    return CachedTokenConnector(registration, rt.redis, http)
