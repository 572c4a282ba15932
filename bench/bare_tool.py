"""The baseline of `bench/launch.py`: a bare pylti1p3 tool that only validates a launch.

Plain `pylti1p3.contrib.flask` (FlaskOIDCLogin / FlaskMessageLaunch) with an in-memory
ToolConfDict for one platform, state and nonces in Redis (a ten-line LaunchDataStorage,
since FlaskCacheDataStorage needs flask-caching), the platform's JWKS cached in the same
Redis (`set_public_key_caching`), and a 303 to a fixed URL once the id_token is valid. No
database, no users, no machines: what any pylti1p3 tool pays before doing its own work.

Run by the benchmark under gunicorn as `bench.bare_tool:create_app()`; the configuration
comes as JSON in `BENCH_BARE_CONF` (keys: public_url, redis_url, issuer, client_id,
deployment_id, auth_url, token_url, jwks_url).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import redis
from flask import Flask, redirect
from pylti1p3.contrib.flask import FlaskMessageLaunch, FlaskOIDCLogin, FlaskRequest
from pylti1p3.exception import LtiException, OIDCException
from pylti1p3.tool_config import ToolConfDict

from lti_tool.lti import RedisLaunchDataStorage

KEY_PREFIX = "bench:bare:"
DONE_PATH = "/launched"


class RedisJsonStorage(RedisLaunchDataStorage):
    """pylti1p3's launch data as JSON in Redis (the storage Labpool uses, nothing more:
    the bare tool adds none of Labpool's checks), under its own key prefix."""

    key_prefix = KEY_PREFIX


def create_app(conf: Mapping[str, str] | None = None) -> Flask:
    """The bare tool, configured by `conf` or by `BENCH_BARE_CONF` (JSON)."""
    conf = conf if conf is not None else json.loads(os.environ["BENCH_BARE_CONF"])
    tool_conf = ToolConfDict(
        {
            conf["issuer"]: {
                "default": True,
                "client_id": conf["client_id"],
                "auth_login_url": conf["auth_url"],
                "auth_token_url": conf["token_url"],
                "key_set_url": conf["jwks_url"],
                "deployment_ids": [conf["deployment_id"]],
            }
        }
    )
    conn = redis.Redis.from_url(conf["redis_url"], socket_timeout=5)
    launch_url = conf["public_url"].rstrip("/") + "/lti/launch"
    done_url = conf["public_url"].rstrip("/") + DONE_PATH

    app = Flask(__name__)
    app.config.update(SECRET_KEY="bench-bare-tool", MAX_CONTENT_LENGTH=256 * 1024)

    @app.route("/lti/login", methods=["GET", "POST"])
    def login():  # type: ignore[no-untyped-def]
        oidc = FlaskOIDCLogin(FlaskRequest(), tool_conf, launch_data_storage=RedisJsonStorage(conn))
        try:
            return oidc.redirect(launch_url)
        except (LtiException, OIDCException) as exc:
            return f"login refused: {exc}", 400

    @app.post("/lti/launch")
    def launch():  # type: ignore[no-untyped-def]
        storage = RedisJsonStorage(conn)
        try:
            message = FlaskMessageLaunch(FlaskRequest(), tool_conf, launch_data_storage=storage)
            message.set_public_key_caching(storage, cache_lifetime=7200)
            message.get_launch_data()
        except (LtiException, OIDCException) as exc:
            return f"launch refused: {exc}", 400
        return redirect(done_url, 303)

    @app.get(DONE_PATH)
    def launched():  # type: ignore[no-untyped-def]
        return "launched"

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return {"ok": True}

    return app
