"""The IDE proxy's auth check, asked by nginx (`auth_request`) before every request to
`/ide/<machine id>/…` (see deploy/nginx.conf.template and shared/OPENSTACK.md, "The proxy").

The browser holds a signed, short-lived, HttpOnly cookie bound to (user, machine), scoped to
the machine's path. The check verifies it, compares its machine with the one in the path,
reads the machine's route from Redis (no SQL on this path), records the activity, and answers
200 with `X-Upstream` (where the IDE listens) and `X-IDE-Token` (which nginx adds for the
IDE and never shows the browser), or 401 (no valid cookie, or the machine was released: nginx
sends the browser to the hand-over page) or 403 (someone else's machine).

Only nginx may ask: it sends a secret header derived from the tool's secret key, and the
template makes `/proxy/` unreachable from outside.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from flask import Blueprint, Response, current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from config.settings import Settings
from provisioning.routes import route_for_owner

bp = Blueprint("proxy", __name__)

IDE_COOKIE = "labpool_ide"
PROXY_HEADER = "X-Labpool-Proxy"
IDE_PATH = re.compile(r"^/ide/(\d+)/")


def proxy_secret(settings: Settings) -> str:
    """The header value nginx proves itself with (rendered into its config)."""
    return hmac.new(settings.secret_key.encode(), b"labpool ide proxy", hashlib.sha256).hexdigest()


def ide_cookies(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.secret_key, salt="labpool ide cookie")


def _deny(status: int) -> Response:
    return Response(status=status, headers={"Cache-Control": "no-store"})


@bp.get("/proxy/auth")
def auth() -> Response:
    ext = current_app.extensions
    if not hmac.compare_digest(request.headers.get(PROXY_HEADER, ""), ext["labpool.proxy_secret"]):
        return _deny(403)
    match = IDE_PATH.match(request.headers.get("X-Original-URI", ""))
    if match is None:
        return _deny(403)
    machine_id = int(match.group(1))
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
            "X-Upstream": route[b"address"].decode(),
            "X-IDE-Token": route[b"token"].decode(),
            "X-IDE-Strip": route.get(b"strip", b"0").decode(),
        },
    )
