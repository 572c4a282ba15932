"""LTI 1.3 endpoints: OIDC login initiation, launch, and the tool's JWKS.

Login: 1EdTech Security Framework §5.1.1 (third-party initiated login),
http://www.imsglobal.org/spec/security/v1p0/#step-1-third-party-initiated-login
Launch: §5.1.3 and LTI Core 1.3 §5. A deep-linking request (LTI Deep Linking 2.0) is
validated here like any launch, then answered by `deep_link_routes`.
"""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, redirect, request, url_for
from pylti1p3.contrib.flask import FlaskRequest
from pylti1p3.exception import LtiException, OIDCException
from sqlalchemy.exc import IntegrityError

from config.db import transaction
from grading.release_jobs import RELEASE_ON_LAUNCH_JOB, enqueue_release
from jwks.keys import published_jwks
from lti_tool.launches import NRPS_CLAIM, MalformedClaims, claim_roles, record_launch
from lti_tool.lti import DatabaseToolConf, RedisLaunchDataStorage, is_url_of_tool
from lti_tool.models import Platform
from lti_tool.roles import is_admin
from lti_tool.services.nrps import SYNC_JOB
from lti_tool.web import deep_link_routes
from lti_tool.web.auth import runtime, sign_in
from lti_tool.web.errors import LaunchRejected
from lti_tool.web.launch_messages import LabpoolMessageLaunch, LabpoolOIDCLogin
from lti_tool.web.rate_limits import rate_limited
from provisioning.queue import enqueue
from provisioning.triggers import machine_wanted

log = logging.getLogger(__name__)
bp = Blueprint("lti", __name__)

# Garbage in an id_token (wrong types where pylti1p3 expects strings or dicts) surfaces as
# these; they are the sender's fault, never a reason for a 500.
LOGIN_LIFETIME_S = 600
BAD_INPUT = (LtiException, OIDCException, ValueError, TypeError, KeyError, AttributeError)


def _tool_conf() -> DatabaseToolConf:
    rt = runtime()
    return DatabaseToolConf(
        rt.sessions,
        allow_http_issuers=not rt.settings.is_production,
        cache=current_app.extensions["labpool.registrations"],
    )


@bp.route("/lti/login", methods=["GET", "POST"])
@rate_limited("login", "login_rate_limit")
def login():  # type: ignore[no-untyped-def]
    """Every check that can refuse the login runs before pylti1p3 stores the login's nonce
    (its only write), so a refused login leaves nothing in Redis but the rate counter."""
    rt = runtime()
    launch_url = rt.settings.url("/lti/launch")
    target = request.values.get("target_link_uri", "")
    if not is_url_of_tool(target, rt.settings.public_url):
        raise LaunchRejected(
            "The login request's target_link_uri is not this tool "
            f"(expected a URL under {rt.settings.public_url})."
        )
    oidc = LabpoolOIDCLogin(FlaskRequest(), _tool_conf(), secure=rt.settings.is_production)
    oidc.set_launch_data_storage(RedisLaunchDataStorage(rt.redis))
    # A login's state and nonce are worth keeping only as long as the login can complete.
    oidc.set_launch_data_lifetime(LOGIN_LIFETIME_S)
    # Only a framed login can lose its cookies to third-party cookie blocking; a top-level
    # window goes straight on.
    if request.headers.get("Sec-Fetch-Dest") == "iframe":
        oidc.enable_check_cookies()
    try:
        return oidc.redirect(launch_url)
    except BAD_INPUT as exc:
        raise LaunchRejected(f"The login request was refused: {exc}") from None


@bp.post("/lti/launch")
@rate_limited("launch", "launch_rate_limit")
def launch():  # type: ignore[no-untyped-def]
    rt = runtime()
    tool_conf = _tool_conf()
    try:
        message = LabpoolMessageLaunch(
            FlaskRequest(),
            tool_conf,
            launch_data_storage=RedisLaunchDataStorage(rt.redis),
            platform_keys=current_app.extensions["labpool.platform_keys"],
            leeway_s=rt.settings.jwt_leeway_s,
        )
        claims = message.get_launch_data()
        deep_link = message.is_deep_link_launch()
        resource_link = message.is_resource_launch()
        platform = tool_conf.platform(claims["iss"], message.get_client_id())
    except BAD_INPUT as exc:
        raise LaunchRejected(_reason(exc)) from None

    if deep_link and platform is not None:
        # A teacher's "Select content" (LTI Deep Linking 2.0): the selection page.
        return deep_link_routes.begin(platform, message.get_client_id(), claims)
    if not resource_link or platform is None:
        raise LaunchRejected("Only resource link launches are supported.")

    try:
        with transaction(rt.sessions) as session:
            outcome = record_launch(session, platform.id, claims)
    except MalformedClaims as exc:  # the transaction rolled back: nothing was written
        raise LaunchRejected(str(exc)) from None
    except IntegrityError:
        # This process's registration cache (30 s) may still hold a platform an admin has
        # just removed: its rows are gone, so the launch's own rows cannot be written.
        with rt.sessions() as session:
            if session.get(Platform, platform.id) is not None:
                raise
        raise LaunchRejected(
            "This platform is no longer registered with Labpool: ask Labpool's "
            "administrator to register it again."
        ) from None
    sign_in(
        outcome.user_id,
        staff_course_id=outcome.course_id if outcome.staff else None,
        admin=is_admin(claim_roles(claims)),  # a list: record_launch took it
    )
    if outcome.staff:
        if claims.get(NRPS_CLAIM):  # a teacher's visit refreshes the roster
            enqueue(rt.redis, rt.settings.queue_name, SYNC_JOB, outcome.course_id)
        return redirect(url_for("teacher.class_page", activity_id=outcome.activity_id), 303)
    assert outcome.machine is not None and outcome.how is not None
    machine_wanted(rt, outcome.machine, outcome.how)
    # The activity's published assignments go into the home from the worker, once the
    # machine is handed over (grading.release_jobs): the launch itself only enqueues.
    if outcome.release_owed:
        enqueue_release(rt, RELEASE_ON_LAUNCH_JOB, outcome.activity_id, outcome.user_id)
    return redirect(url_for("machines.status_page", machine_id=outcome.machine.id), 303)


def _reason(exc: Exception) -> str:
    if isinstance(exc, (LtiException, OIDCException)) and str(exc):
        return str(exc)
    return f"The launch message is malformed ({type(exc).__name__})."


@bp.get("/lti/jwks.json")
def jwks():  # type: ignore[no-untyped-def]
    with runtime().sessions() as session:
        body = published_jwks(session)
    response = jsonify(body)
    response.cache_control.max_age = 300
    response.cache_control.public = True
    return response
