"""The Flask application factory (after Flask's tutorial app: no module-level app)."""

from __future__ import annotations

import logging
from typing import Any

import requests
from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from config.logging import configure_logging
from config.runtime import runtime_for
from config.settings import Settings, load_settings
from lti_tool.framing import origin_of
from lti_tool.ide_access import ide_cookies, proxy_secret
from lti_tool.launch_context import ContextNotSettled
from lti_tool.launches import LAUNCH_SESSION_S
from lti_tool.lti import PlatformKeys, RegistrationCache
from lti_tool.web.errors import WebError
from lti_tool.web.ops_routes import logged_path
from provisioning.claiming import EnvironmentUnavailable

log = logging.getLogger(__name__)
ROW_ID_MAX = 2**31 - 1  # every id column is an INTEGER (PostgreSQL's int4)


class RowIdConverter(IntegerConverter):
    """`<int:…>` in a route is a row id: one larger than any id column holds is no row (a
    404), never a query the database driver cannot send (OverflowError, a 500)."""

    def __init__(self, map, fixed_digits=0, min=None, max=ROW_ID_MAX, signed=False):  # type: ignore[no-untyped-def]  # noqa: A002
        super().__init__(map, fixed_digits, min, max, signed)


class _Flask(Flask):
    def log_exception(self, exc_info: Any) -> None:
        # Flask's own line names `request.path`, which carries a one-time link's token.
        self.logger.error("Exception on %s [%s]", logged_path(), request.method, exc_info=exc_info)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    configure_logging(settings)
    app = _Flask(__name__)
    app.url_map.converters["int"] = RowIdConverter  # before any route is added
    secure = settings.is_production
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_NAME="labpool_session",
        SESSION_COOKIE_HTTPONLY=True,
        # Moodle may frame the tool: in production the session must be a third-party cookie.
        SESSION_COOKIE_SECURE=secure,
        SESSION_COOKIE_SAMESITE="None" if secure else "Lax",
        SESSION_COOKIE_PARTITIONED=secure,
        PERMANENT_SESSION_LIFETIME=LAUNCH_SESSION_S,  # a staff launch's grant lasts as long
        MAX_CONTENT_LENGTH=256 * 1024,
    )
    if settings.proxy_count:
        n = settings.proxy_count
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)  # type: ignore[method-assign]

    rt = runtime_for(settings)
    http = requests.Session()
    http.headers["User-Agent"] = "Labpool LTI tool"
    app.extensions["labpool"] = rt
    app.extensions["labpool.registrations"] = RegistrationCache(ttl_s=30)
    app.extensions["labpool.proxy_secret"] = proxy_secret(settings)
    app.extensions["labpool.ide_cookies"] = ide_cookies(settings)
    app.extensions["labpool.public_origin"] = origin_of(settings.public_url)
    app.extensions["labpool.platform_keys"] = PlatformKeys(
        rt.redis, http, settings.platform_jwks_ttl_s
    )

    from lti_tool.web import (
        admin_routes,
        autograde_routes,
        deep_link_routes,
        grading_routes,
        home_view_routes,
        lti_routes,
        machine_routes,
        ops_routes,
        page_headers,
        proxy_routes,
        registration_routes,
        release_routes,
        submission_routes,
        teacher_actions,
        teacher_routes,
    )

    app.register_blueprint(lti_routes.bp)
    app.register_blueprint(deep_link_routes.bp)
    app.register_blueprint(machine_routes.bp)
    app.register_blueprint(teacher_routes.bp)
    app.register_blueprint(teacher_actions.bp)
    app.register_blueprint(proxy_routes.bp)
    app.register_blueprint(registration_routes.bp)
    app.register_blueprint(grading_routes.bp)
    app.register_blueprint(release_routes.bp)
    app.register_blueprint(submission_routes.bp)
    app.register_blueprint(autograde_routes.bp)
    app.register_blueprint(home_view_routes.bp)
    app.register_blueprint(admin_routes.bp)
    app.register_blueprint(ops_routes.bp)
    ops_routes.install(app)
    page_headers.install(app)

    @app.errorhandler(WebError)
    def _web_error(exc: WebError):  # type: ignore[no-untyped-def]
        log.info("%s %s refused (%s): %s", request.method, logged_path(), exc.status, exc.message)
        if request.accept_mimetypes.best == "application/json":
            return jsonify(error=exc.message), exc.status
        return render_template("error.html", title=exc.title, message=exc.message), exc.status

    @app.errorhandler(EnvironmentUnavailable)
    def _unavailable(exc: EnvironmentUnavailable):  # type: ignore[no-untyped-def]
        # Retired, or not open to the course; from any route that would start a machine (a
        # launch, "start it again", a teacher's own machine or a reset): nothing was
        # written (the transaction rolled back).
        return _web_error(WebError(str(exc), exc.status))

    @app.errorhandler(ContextNotSettled)
    def _not_settled(exc: ContextNotSettled):  # type: ignore[no-untyped-def]
        # Concurrent first launches of a new course kept winning its insert: nothing was
        # written; the same launch again settles it.
        log.warning("%s %s: %s", request.method, logged_path(), exc)
        return _web_error(
            WebError(
                "Many people are opening this activity for the first time at once. Please open "
                "it again from the course page in a moment.",
                503,
            )
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        return (
            render_template("error.html", title=exc.name, message=exc.description),
            exc.code or 500,
        )

    @app.get("/")
    def home():  # type: ignore[no-untyped-def]
        return render_template("home.html", settings=settings)

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return {"ok": True}

    return app
