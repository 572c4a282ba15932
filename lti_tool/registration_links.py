"""One-time registration links for LTI Dynamic Registration (`labpool registration-link`;
used by lti_tool/dynamic_registration.py). Redis keeps only a hash of a link's token, with
its expiry and, once it served, when it was used: a used link is told apart from an expired
or unknown one for `USED_KEPT_S` after its expiry. No migration: a link lost with a flushed
Redis costs the admin a new link, nothing more."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import redis

LINK_PREFIX = "labpool:registration-link:"
USED_KEPT_S = 30 * 24 * 3600  # how long after its expiry a link is still recognised
CLAIM_S = 120  # a registration in progress holds its link this long at most
MIN_LINK_S, MAX_LINK_S = 60, 30 * 24 * 3600


class LinkRefused(Exception):
    """The registration link is unknown, expired, used, or being used right now; the
    message says which, for the admin. `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def parse_duration(text: str) -> int:
    """`90s`, `30m`, `24h`, `7d` (or plain seconds) → seconds, within 1 minute and 30 days."""
    match = re.fullmatch(r"\s*(\d{1,7})\s*([smhd]?)\s*", text or "")
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30m, 24h or 7d")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not MIN_LINK_S <= seconds <= MAX_LINK_S:
        raise ValueError(f"a registration link lives between 1 minute and 30 days, not {text!r}")
    return seconds


@dataclass(frozen=True)
class RegistrationLink:
    token: str
    expires_at: float


class RegistrationLinks:
    """One-time registration links in Redis, keyed by the sha256 of their token (the token
    itself is never stored or logged)."""

    def __init__(self, conn: redis.Redis):
        self._redis = conn

    @staticmethod
    def _key(token: str) -> str:
        return LINK_PREFIX + hashlib.sha256(token.encode()).hexdigest()

    @staticmethod
    def label(token: str) -> str:
        """A short name for a link in logs: not the token, not enough to find it."""
        return hashlib.sha256(token.encode()).hexdigest()[:8]

    def create(self, lifetime_s: int, now: float | None = None) -> RegistrationLink:
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        expires_at = now + lifetime_s
        self._redis.hset(self._key(token), mapping={"expires_at": f"{expires_at:.0f}"})
        self._redis.expire(self._key(token), lifetime_s + USED_KEPT_S)
        return RegistrationLink(token, expires_at)

    def check(self, token: str, now: float | None = None) -> None:
        """LinkRefused unless the link may be used now (it is not claimed by this)."""
        now = time.time() if now is None else now
        if not isinstance(token, str) or not 20 <= len(token) <= 100:
            raise LinkRefused(_UNKNOWN, 404)
        entry = self._redis.hgetall(self._key(token))
        if not entry:
            raise LinkRefused(_UNKNOWN, 404)
        if b"used_at" in entry:
            used = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(entry[b"used_at"])))
            raise LinkRefused(
                f"This registration link was already used (on {used}). Each link registers "
                "one tool; ask the Labpool administrator for a new one "
                "(`labpool registration-link`).",
                410,
            )
        if float(entry[b"expires_at"]) <= now:
            raise LinkRefused(
                "This registration link has expired. Ask the Labpool administrator for a new "
                "one (`labpool registration-link`).",
                410,
            )

    def claim(self, token: str, now: float | None = None) -> None:
        """Check the link and hold it for one registration (two windows opening the same
        link at once cannot both register)."""
        self.check(token, now)
        if not self._redis.set(self._key(token) + ":claim", 1, nx=True, ex=CLAIM_S):
            raise LinkRefused(
                "This registration link is being used right now; wait for that window to finish.",
                409,
            )

    def release(self, token: str) -> None:
        """The registration failed before anything was stored: the link may be used again."""
        self._redis.delete(self._key(token) + ":claim")

    def mark_used(self, token: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._redis.hset(self._key(token), "used_at", f"{now:.0f}")
        self._redis.delete(self._key(token) + ":claim")


_UNKNOWN = (
    "This registration link is not known to Labpool. Check that the whole link was pasted, "
    "or ask the Labpool administrator for a new one (`labpool registration-link`)."
)
