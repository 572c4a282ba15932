"""The IDE proxy's auth check, asked by nginx (`auth_request`) before every request to
`/ide/<machine id>/…` (see deploy/nginx.conf.template and docs/openstack.md, "The IDE proxy").

The browser holds a signed, short-lived, HttpOnly cookie bound to (user, machine), scoped to
the machine's path. The check verifies it, compares its machine with the one in the path,
reads the machine's route from Redis (no SQL on this path), records the activity, and answers
200 with `X-Upstream` (where the IDE listens) and `X-IDE-Token` (which nginx adds for the
IDE and never shows the browser), or 401 (no valid cookie, or the machine was released: nginx
sends the browser to the hand-over page) or 403 (someone else's machine).

Only nginx may ask: it sends a secret header derived from the tool's secret key, and the
template makes `/proxy/` unreachable from outside.

The proxy keeps the browser's protections (a page on another origin must not ride on the
student's cookie): WebSocket upgrades and every request that may change something (not GET
or HEAD) must come from the tool's own origin, and nothing that the browser marks
`Sec-Fetch-Site: cross-site` passes. The IDE's own XSRF check stays on as well (the proxy
presents the token in a header JupyterLab does not treat as a token login; see
provisioning/ide_config.py).
"""

from __future__ import annotations

import hmac
import re

from flask import Blueprint, Response, current_app, request
from itsdangerous import BadSignature

from lti_tool.framing import origin_of
from lti_tool.ide_access import IDE_COOKIE, PROXY_HEADER
from provisioning.ide_http import nginx_upstream
from provisioning.proxy_table import route_for_owner

bp = Blueprint("proxy", __name__)

IDE_PATH = re.compile(r"^/ide/(\d+)/")
SAFE_METHODS = ("GET", "HEAD")


def foreign_request(headers: object, public_origin: str) -> str | None:
    """Why the original request must not reach the IDE, or None. `headers` are the
    original request's, as nginx's auth subrequest carries them."""
    get = headers.get  # type: ignore[attr-defined]
    if get("Sec-Fetch-Site", "").lower() == "cross-site":
        return "cross-site request"
    method = get("X-Original-Method", "GET").upper()
    upgrade = get("X-Original-Upgrade", "") or get("Upgrade", "")
    if method in SAFE_METHODS and not upgrade:
        return None
    if origin_of(get("Origin", "")) != public_origin:
        return "websocket from another origin" if upgrade else "write from another origin"
    return None


def _deny(status: int) -> Response:
    return Response(status=status, headers={"Cache-Control": "no-store"})


@bp.get("/proxy/auth")
def auth() -> Response:
    ext = current_app.extensions
    # Compared as bytes: a header may carry any Latin-1 character, which compare_digest
    # refuses in a str.
    offered = request.headers.get(PROXY_HEADER, "").encode()
    if not hmac.compare_digest(offered, ext["labpool.proxy_secret"].encode()):
        return _deny(403)
    match = IDE_PATH.match(request.headers.get("X-Original-URI", ""))
    if match is None:
        return _deny(403)
    machine_id = int(match.group(1))
    if foreign_request(request.headers, ext["labpool.public_origin"]):
        return _deny(403)
    cookie = request.cookies.get(IDE_COOKIE)
    if not cookie:
        return _deny(401)
    settings = ext["labpool"].settings
    try:
        claims = ext["labpool.ide_cookies"].loads(cookie, max_age=settings.ide_cookie_max_age_s)
    except BadSignature:  # forged, tampered or expired
        return _deny(401)
    if not isinstance(claims, dict) or claims.get("m") != machine_id:
        return _deny(403)
    route = route_for_owner(ext["labpool"].redis, machine_id, claims.get("u"))
    if not route:
        return _deny(401)  # released (or Redis lost it): the hand-over page sorts it out
    if route.get(b"owner", b"").decode() != str(claims.get("u")):
        return _deny(403)
    return Response(
        status=200,
        headers={
            "X-Upstream": nginx_upstream(route[b"address"].decode()),
            "X-IDE-Token": route[b"token"].decode(),
            "X-IDE-Strip": route.get(b"strip", b"0").decode(),
        },
    )
