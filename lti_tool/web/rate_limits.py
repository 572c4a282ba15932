"""Per-address rate limits on the endpoints anyone can call without a session (the LTI login
and launch) and on the teacher actions, counted in Redis so every web process shares them.

A fixed window per (endpoint group, client address): one pipelined round trip (INCR, EXPIRE)
per request, no Lua, no scan. Past the limit the answer is 429 with `Retry-After` (the end of
the window) and a short page, or JSON for a JSON client.

The client address is `request.remote_addr`, i.e. what werkzeug's ProxyFix took from
`X-Forwarded-For` when `LABPOOL_PROXY_COUNT` is set (without it, behind a proxy, every
student would count as the proxy's address). An IPv6 client counts by its /64, the block one
host usually holds. A whole classroom often shares one public address (NAT), so the limits
are per address but sized for a class of 300 opening the activity in the same minute.

When Redis does not answer, requests pass: the limiter must not be what takes the tool down
(and the launch itself needs Redis anyway).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Response, jsonify, render_template, request

from lti_tool.web.auth import runtime
from lti_tool.web.ops_routes import logged_path

log = logging.getLogger(__name__)

RATE_PREFIX = "labpool:rate:"


def client_address() -> str:
    """Who is counted: the client's address, or its /64 for IPv6."""
    raw = request.remote_addr or "unknown"
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def over_limit(
    conn: redis.Redis,
    group: str,
    client: str,
    limit: int,
    window_s: int,
    now: float | None = None,
) -> int | None:
    """Count one request of `client` in `group`; None if it is within `limit` per window,
    else the seconds until the window ends (for Retry-After). A limit of 0 counts nothing."""
    if limit <= 0:
        return None
    now = time.time() if now is None else now
    window = int(now // window_s)
    key = f"{RATE_PREFIX}{group}:{client}:{window}"
    pipe = conn.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, window_s)
    count, _ = pipe.execute()
    if count <= limit:
        return None
    return max(1, math.ceil((window + 1) * window_s - now))


def rate_limited(group: str, setting: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a view: past `settings.<setting>` requests per address and window, answer 429."""

    def wrap(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def limited(*args: Any, **kwargs: Any) -> Any:
            refused = check_rate_limit(group, setting)
            return refused if refused is not None else view(*args, **kwargs)

        return limited

    return wrap


def check_rate_limit(group: str, setting: str) -> Response | None:
    """The 429 answer if this request is one too many, else None (and it is counted)."""
    rt = runtime()
    limit = getattr(rt.settings, setting)
    window_s = rt.settings.rate_limit_window_s
    client = client_address()
    try:
        retry_after = over_limit(rt.redis, group, client, limit, window_s)
    except redis.RedisError as exc:
        log.warning("rate limit of %s not checked (Redis: %s)", group, exc)
        return None
    if retry_after is None:
        return None
    log.info(
        "rate limit: %s %s from %s refused (more than %s in %s s)",
        request.method,
        logged_path(),
        client,
        limit,
        window_s,
    )
    message = (
        f"Too many requests from your network in a short time. Wait {retry_after} "
        "seconds, then try again."
    )
    if request.accept_mimetypes.best == "application/json":
        response = jsonify(error=message)
    else:
        response = Response(
            render_template("error.html", title="Too many requests", message=message)
        )
    response.status_code = 429
    response.headers["Retry-After"] = str(retry_after)
    return response
