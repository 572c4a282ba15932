"""LTI 1.3 core on pylti1p3, without Flask: the registrations a launch is checked against
(`DatabaseToolConf`, cached per process), the platforms' keys (`PlatformKeys`: their JWKS
cached in Redis, refetched at most once per URL and interval on an unknown `kid`), the OIDC
state and nonces in Redis (`RedisLaunchDataStorage`), and the check that a URL is the tool's.

The launch itself is validated in the web package (`lti_tool/web/launch_messages.py`, on
pylti1p3's Flask adapter), which closes pylti1p3 2.0's gaps (docs/moodle.md).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import requests
from jwcrypto.jwk import JWK
from pylti1p3.deployment import Deployment as LtiDeployment
from pylti1p3.exception import LtiException, LtiKeyException
from pylti1p3.launch_data_storage.base import LaunchDataStorage
from pylti1p3.registration import Registration
from pylti1p3.tool_config import ToolConfAbstract
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from lti_tool.models import Platform

KEY_PREFIX = "labpool:lti:"
JWKS_PREFIX = "labpool:platform-jwks:"


class RedisLaunchDataStorage(LaunchDataStorage[Any]):
    """pylti1p3's state, nonces and launch data in Redis, keyed by the browser's
    `lti1p3-session-id` cookie (set at login)."""

    key_prefix = KEY_PREFIX

    def __init__(self, conn: redis.Redis):
        super().__init__()
        self._redis = conn

    def can_set_keys_expiration(self) -> bool:
        return True

    def _key(self, key: str) -> str:
        return self.key_prefix + self._prepare_key(key)

    def get_value(self, key: str) -> Any:
        raw = self._redis.get(self._key(key))
        return None if raw is None else json.loads(raw)

    def set_value(self, key: str, value: Any, exp: int | None = None) -> None:
        self._redis.set(self._key(key), json.dumps(value), ex=exp)

    def check_value(self, key: str) -> bool:
        return bool(self._redis.exists(self._key(key)))

    def consume(self, key: str) -> bool:
        """Delete a value; True only for the one caller that actually removed it."""
        return self._redis.delete(self._key(key)) == 1


@dataclass(frozen=True)
class KnownPlatform:
    """A registration as the launch path needs it (a plain value, safe to cache)."""

    id: int
    issuer: str
    client_id: str
    auth_url: str
    token_url: str
    jwks_url: str
    deployment_ids: frozenset[str]
    disabled: bool = False


class RegistrationCache:
    """Registrations found in the database, kept per process for a short while: every login
    and launch needs one, and they change only when an admin registers a platform. Misses and
    disabled platforms are never cached, so a platform registered (or enabled) a moment ago
    works at once; a removed or disabled one stops working within `ttl_s` (a launch through a
    removed one in that window is refused by the launch route, its rows being gone)."""

    def __init__(self, ttl_s: float = 30.0):
        self._ttl = ttl_s
        self._entries: dict[tuple[str, str | None], tuple[float, KnownPlatform]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str | None]) -> KnownPlatform | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: tuple[str, str | None], platform: KnownPlatform) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self._ttl, platform)


class DatabaseToolConf(ToolConfAbstract[Any]):
    """Registrations from the database. One issuer may have several client ids, so
    `check_iss_has_one_client` is always False and lookups go by (issuer, client id)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        allow_http_issuers: bool,
        cache: RegistrationCache | None = None,
    ):
        super().__init__()
        self._sessions = sessions
        self._allow_http = allow_http_issuers
        self._cache = cache or RegistrationCache(ttl_s=0)

    def check_iss_has_one_client(self, iss: str) -> bool:
        return False

    def check_iss_has_many_clients(self, iss: str) -> bool:
        return True

    def platform(self, iss: str, client_id: str | None) -> KnownPlatform | None:
        """The registered platform for (issuer, client id), or None."""
        if not isinstance(iss, str) or not (client_id is None or isinstance(client_id, str)):
            return None
        if "\x00" in iss or (client_id and "\x00" in client_id):
            return None  # no registration has one; PostgreSQL refuses it in a query
        if not iss.startswith("https://") and not (self._allow_http and iss.startswith("http://")):
            raise LtiException(
                f"Issuer {iss!r} is not https; plain http platforms are accepted only while "
                "the tool itself runs on plain http (single-server trials)."
            )
        key = (iss, client_id)
        found = self._cache.get(key) or self._load(key)
        if found is not None and found.disabled:
            raise LtiException(
                "Labpool's administrator has disabled this platform's registration: ask them "
                "(`labpool platform enable`) or your site administrator."
            )
        return found

    def _load(self, key: tuple[str, str | None]) -> KnownPlatform | None:
        iss, client_id = key
        query = select(Platform).options(selectinload(Platform.deployments))
        query = query.where(Platform.issuer == iss)
        if client_id:
            query = query.where(Platform.client_id == client_id)
        with self._sessions() as session:
            rows = session.scalars(query.limit(2)).all()
            # Without a client id the issuer must be unambiguous.
            if len(rows) != 1:
                return None
            row = rows[0]
            found = KnownPlatform(
                id=row.id,
                issuer=row.issuer,
                client_id=row.client_id,
                auth_url=row.auth_url,
                token_url=row.token_url,
                jwks_url=row.jwks_url,
                deployment_ids=frozenset(d.deployment_id for d in row.deployments),
                disabled=row.disabled_at is not None,
            )
        if not found.disabled:  # like a miss: enabling it again works at once
            self._cache.put(key, found)
        return found

    def find_registration_by_issuer(self, iss: str, *args: Any, **kwargs: Any) -> Registration:
        return self.find_registration_by_params(iss, None)

    def find_registration_by_params(
        self, iss: str, client_id: str | None, *args: Any, **kwargs: Any
    ) -> Registration | None:  # type: ignore[override]
        platform = self.platform(iss, client_id)
        if platform is None:
            return None
        return (
            Registration()
            .set_issuer(platform.issuer)
            .set_client_id(platform.client_id)
            .set_auth_login_url(platform.auth_url)
            .set_auth_token_url(platform.token_url)
            .set_key_set_url(platform.jwks_url)
        )

    def find_deployment(self, iss: str, deployment_id: str) -> LtiDeployment | None:
        return self.find_deployment_by_params(iss, deployment_id, None)

    def find_deployment_by_params(
        self, iss: str, deployment_id: str, client_id: str | None, *args: Any, **kwargs: Any
    ) -> LtiDeployment | None:
        platform = self.platform(iss, client_id)
        if platform is None:
            return None
        if deployment_id not in platform.deployment_ids:
            return None
        return LtiDeployment().set_deployment_id(deployment_id)


class PlatformKeys:
    """The platforms' JWKS, cached in Redis for `ttl_s`, refetched when a launch names a kid
    the cached set lacks (platforms rotate keys) — at most once per JWKS URL per
    `REFETCH_GUARD_S`, whatever the kid, so forged launches with random kids cannot turn
    into a stream of requests to the platform.

    Each process keeps the PEMs it converted (converting a JWK costs more than checking the
    signature), but only as long as Redis still holds the very key set they came from: every
    lookup reads the cached set and compares it with the one the PEMs were made from, so a
    key the platform removed stops working as soon as the cached set expires, is cleared or
    is refetched (by any process)."""

    REFETCH_GUARD_S = 10

    def __init__(self, conn: redis.Redis, http: requests.Session, ttl_s: int):
        self._redis = conn
        self._http = http
        self._ttl = ttl_s
        # JWKS URL → (the cached key set's bytes, {kid: PEM} converted from that set)
        self._pems: dict[str, tuple[bytes, dict[str, bytes]]] = {}
        self._lock = threading.Lock()

    def _cache_key(self, url: str) -> str:
        return JWKS_PREFIX + hashlib.sha256(url.encode()).hexdigest()

    def refetch_guard_key(self, url: str) -> str:
        """Set while a refetch of `url` is barred (one per URL per REFETCH_GUARD_S)."""
        return self._cache_key(url) + ":refetched"

    def _fetch(self, url: str) -> bytes:
        try:
            resp = self._http.get(url, timeout=5)
            resp.raise_for_status()
            keyset = resp.json()
        except (requests.RequestException, ValueError) as exc:
            raise LtiKeyException(f"Cannot fetch the platform's keys from {url}: {exc}") from exc
        if not isinstance(keyset, dict) or not isinstance(keyset.get("keys"), list):
            raise LtiKeyException(f"The platform's key set at {url} is not a JWKS")
        raw = json.dumps(keyset).encode()
        self._redis.set(self._cache_key(url), raw, ex=self._ttl)
        return raw

    def public_key_pem(self, url: str, kid: str) -> bytes:
        """The PEM of the platform's RS256 key `kid`, or LtiKeyException. One Redis GET when
        the key set is cached and this process converted the key already."""
        guard = self.refetch_guard_key(url)
        raw = self._redis.get(self._cache_key(url))
        if raw is None:  # expired or cleared: fetch, and that fetch counts as this interval's
            raw = self._fetch(url)
            self._redis.set(guard, 1, ex=self.REFETCH_GUARD_S)
            return self._require(self._pem_from(url, raw, kid), kid)
        pem = self._pem_from(url, raw, kid)
        if pem is None and self._redis.set(guard, 1, nx=True, ex=self.REFETCH_GUARD_S):
            pem = self._pem_from(url, self._fetch(url), kid)
        return self._require(pem, kid)

    @staticmethod
    def _require(pem: bytes | None, kid: str) -> bytes:
        if pem is None:
            raise LtiKeyException(f"The platform has no RS256 key with kid {kid!r}")
        return pem

    def _pem_from(self, url: str, raw: bytes, kid: str) -> bytes | None:
        with self._lock:
            made_from, pems = self._pems.get(url, (b"", {}))
            if made_from != raw:  # another key set: nothing converted from the old one holds
                pems = {}
                self._pems[url] = (raw, pems)
            pem = pems.get(kid)
        if pem is not None:
            return pem
        key = _rs256_key(json.loads(raw), kid)
        if key is None:
            return None
        pem = JWK.from_json(json.dumps(key)).export_to_pem()
        with self._lock:
            pems[kid] = pem
        return pem


def _rs256_key(keyset: dict, kid: str) -> dict | None:
    for key in keyset.get("keys", []):
        if key.get("kid") == kid and key.get("kty") == "RSA" and key.get("alg", "RS256") == "RS256":
            return key
    return None


def is_url_of_tool(url: str, public_url: str) -> bool:
    """Is `url` a page of the tool at `public_url`: same scheme, host and port, and a path at
    or below the tool's? Compared parsed, not as strings: a string prefix lets
    `http://127.0.0.1:8080.evil.example/` pass for `http://127.0.0.1:8080`."""
    try:
        got, ours = urlsplit(url), urlsplit(public_url)
        got_port, our_port = got.port, ours.port
    except ValueError:  # a port that is not a number, or brackets that do not close
        return False
    default = {"http": 80, "https": 443}
    if got.scheme.lower() not in default or got.username is not None or got.password is not None:
        return False
    base = ours.path.rstrip("/")
    return (
        got.scheme.lower() == ours.scheme.lower()
        and (got.hostname or "") == (ours.hostname or "")
        and (got_port or default[got.scheme.lower()]) == (our_port or default[ours.scheme.lower()])
        and (got.path == base or got.path.startswith(base + "/"))
        and ".." not in got.path.split("/")
    )
