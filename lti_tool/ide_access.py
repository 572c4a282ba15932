"""What lets a browser through the IDE proxy, without Flask (nginx's configuration is rendered
from it too): the secret header nginx proves itself with, and the signed per-machine cookie
the hand-over sets and `/proxy/auth` checks (lti_tool/web/proxy_routes.py)."""

from __future__ import annotations

import hashlib
import hmac

from itsdangerous import URLSafeTimedSerializer

from config.settings import Settings

IDE_COOKIE = "labpool_ide"
PROXY_HEADER = "X-Labpool-Proxy"


def proxy_secret(settings: Settings) -> str:
    """The header value nginx proves itself with (rendered into its config)."""
    return hmac.new(settings.secret_key.encode(), b"labpool ide proxy", hashlib.sha256).hexdigest()


def ide_cookies(settings: Settings) -> URLSafeTimedSerializer:
    """Signs and checks the per-machine cookie: {"u": owner id, "m": machine id}."""
    return URLSafeTimedSerializer(settings.secret_key, salt="labpool ide cookie")
