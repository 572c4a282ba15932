"""Who may frame Labpool: the tool itself and every platform it is registered with.

Moodle shows an activity in an iframe by default ("Embed, without blocks"), so both the
tool's pages and the IDEs must admit the platforms' origins in their CSP `frame-ancestors`
(CSP Level 3, https://www.w3.org/TR/CSP3/#directive-frame-ancestors). The list is read from
the `platforms` table (an issuer is the platform's wwwroot; its origin is what frames us)
and cached per process for a short while: web pages ask on every response, and the
provisioning side asks each time it writes an IDE's configuration.

No Flask here: the web edge and the provisioning backends both use it.
"""

from __future__ import annotations

import re
import threading
import time
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.db import session_factory
from config.settings import Settings
from lti_tool.models import Platform

ORIGINS_TTL_S = 30.0  # a platform registered a moment ago may frame us within this
# What a CSP source expression may hold of an origin: nothing that could end the directive
# (`;`, `,`, spaces) or quote a keyword.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")

DEFAULT_PORTS = {"http": 80, "https": 443}

_cache: dict[str, tuple[float, tuple[str, ...]]] = {}
_lock = threading.Lock()


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL, normalised (lower case, default port
    dropped), or None if it is not one a CSP can name. The one origin rule: framing and the
    proxy's Origin check both use it."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not _HOST.match(parts.netloc or ""):
        return None
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return (
        f"{scheme}://{host}"
        if port in (None, DEFAULT_PORTS[scheme])
        else f"{scheme}://{host}:{port}"
    )


def platform_origins(sessions: sessionmaker[Session], url_key: str = "") -> tuple[str, ...]:
    """The origins of every registered platform, sorted, cached for ORIGINS_TTL_S."""
    key = url_key or str(sessions.kw.get("bind"))
    hit = _cache.get(key)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    with sessions() as session:
        issuers = session.scalars(select(Platform.issuer).distinct()).all()
    origins = tuple(sorted({o for o in map(origin_of, issuers) if o}))
    with _lock:
        _cache[key] = (time.monotonic() + ORIGINS_TTL_S, origins)
    return origins


def forget_platform_origins() -> None:
    """Drop the cache (after registering a platform in this process, and in tests)."""
    with _lock:
        _cache.clear()


def frame_ancestors(settings: Settings, sessions: sessionmaker[Session] | None = None) -> str:
    """The `frame-ancestors` source list: 'self', the tool's public origin (an IDE served from
    another origin, as in single-server mode without the proxy, is still framed by the
    tool's pages) and every registered platform's origin."""
    sessions = sessions or session_factory(settings.database_url)
    sources = ["'self'"]
    tool = origin_of(settings.public_url)
    for origin in (tool, *platform_origins(sessions, settings.database_url)):
        if origin and origin not in sources:
            sources.append(origin)
    return " ".join(sources)
