"""For the operator: /metrics (Prometheus), /readyz, and per-request bookkeeping (the request
id, one JSON access line, the launch and proxy-auth metrics). `/healthz` (alive) is in app.py.

Who may read /metrics: with `METRICS_TOKEN` set, whoever sends `Authorization: Bearer
<token>`; without it, only a client on this host talking to the tool directly (a loopback
peer and no `X-Forwarded-For`/`Forwarded`: a request through nginx carries one, so the
public never reaches it). Anyone else gets 404, as if there were nothing there.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from sqlalchemy import text

from config.logging import new_request_id, reset_request_id, set_request_id
from lti_tool import metrics

bp = Blueprint("ops", __name__)
access_log = logging.getLogger("labpool.access")


def _runtime() -> Any:
    return current_app.extensions["labpool"]


def _direct_loopback() -> bool:
    environ = request.environ
    peer = environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR") or environ.get(
        "REMOTE_ADDR", ""
    )
    if request.headers.get("X-Forwarded-For") or request.headers.get("Forwarded"):
        return False
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return peer == ""  # a unix socket: only this host's processes


def may_read_metrics() -> bool:
    token = _runtime().settings.metrics_token
    if token:
        offered = request.headers.get("Authorization", "")
        return hmac.compare_digest(offered.encode(), f"Bearer {token}".encode())
    return _direct_loopback()


@bp.get("/metrics")
def metrics_page() -> Response:
    if not may_read_metrics():
        return Response("Not Found\n", status=404, mimetype="text/plain")
    rt = _runtime()
    body = metrics.render(rt.sessions, rt.redis, rt.settings.queue_name)
    return Response(body, mimetype=None, content_type=metrics.CONTENT_TYPE)


def _check(name: str, probe: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail = probe()
        result: dict[str, Any] = {"ok": True}
        if detail:
            result["detail"] = detail
    except Exception as exc:  # each check reports its own failure; none is fatal to the page
        result = {"ok": False, "error": _short(exc)}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


def _short(exc: Exception) -> str:
    from config.logging import redact

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact(f"{type(exc).__name__}: {first}"[:300])


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Ready to serve: the database answers, Redis answers, and the cloud answers when an
    environment uses it. 200 or 503, with what was checked."""
    rt = _runtime()

    def database() -> None:
        with rt.sessions() as session:
            session.execute(text("SELECT 1"))

    checks = {
        "database": _check("database", database),
        "redis": _check("redis", lambda: rt.redis.ping() and None),
    }
    cloud = _cloud_probe(rt)
    if cloud is not None:
        checks["cloud"] = _check("cloud", cloud)
    ready = all(c["ok"] for c in checks.values())
    response = jsonify(ready=ready, checks=checks)
    response.status_code = 200 if ready else 503
    response.cache_control.no_store = True
    return response


def _cloud_probe(rt: Any) -> Any:
    """A probe of the cloud when an environment is on it, else None."""
    from sqlalchemy import select

    from provisioning.backends import backends_that
    from provisioning.models import Environment

    cloud = backends_that(lambda can: can.pooled)  # the backends that talk to a cloud
    try:
        with rt.sessions() as session:
            on_cloud = session.scalar(
                select(Environment.id).where(Environment.backend.in_(cloud)).limit(1)
            )
    except Exception:
        return None  # the database check says it
    if on_cloud is None and rt.settings.backend not in cloud:
        return None

    def probe() -> str:
        from provisioning.backends.openstack import connection_for

        conn = connection_for(rt.settings.openstack_cloud, rt.settings.openstack_api_timeout_s)
        conn.compute.get_limits()  # one authenticated call, cheap for Nova
        return f"cloud {rt.settings.openstack_cloud!r}"

    return probe


def logged_path() -> str:
    """The request's path as every log line shows it: never the query string (links and
    tokens live there), and a route whose path carries a secret (`<token>`: a one-time
    registration or admin link) as its rule, without the secret."""
    rule = request.url_rule
    if rule is not None and request.view_args and "token" in request.view_args:
        return rule.rule
    return request.path


def install(app: Flask) -> None:
    """The request id and access line for every request; the launch and proxy metrics."""

    @app.before_request
    def _begin() -> None:
        g.labpool_started = time.perf_counter()
        g.labpool_request_id = new_request_id(request.headers.get("X-Request-ID"))
        g.labpool_request_id_token = set_request_id(g.labpool_request_id)

    @app.after_request
    def _end(response: Response) -> Response:
        started = g.get("labpool_started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        endpoint = request.endpoint or ""
        if endpoint == "lti.launch":
            metrics.observe_launch(
                response.status_code, response.headers.get("Location", ""), seconds
            )
        elif endpoint == "proxy.auth":
            metrics.observe_proxy_auth(response.status_code)
        request_id = g.get("labpool_request_id")
        if request_id:
            response.headers["X-Request-ID"] = request_id
        if endpoint != "proxy.auth":  # nginx asks once per IDE request: its own log has them
            access_log.info(
                "%s %s %s %.1fms",
                request.method,
                logged_path(),
                response.status_code,
                seconds * 1000,
            )
        return response

    @app.teardown_request
    def _forget(_exc: BaseException | None) -> None:
        token = g.pop("labpool_request_id_token", None)
        if token is not None:
            try:
                reset_request_id(token)
            except ValueError:  # set in another context (a streamed response): just clear
                set_request_id(None)
