"""`/lti/register/<link>`: the page Moodle opens for LTI Dynamic Registration 1.0
(https://www.imsglobal.org/spec/lti-dr/v1p0 §3.3-§3.6); the exchange itself is
`lti_tool/dynamic_registration.py`.

Who is asking is the one-time link: only a holder of a link made by `labpool
registration-link` gets the tool to fetch anything or write anything. The link and the
platform's registration token are secrets: refusals are rendered here (not through the app's
error handler, which logs the path) and logged with the link's short label only. For the
same reason the route has no per-address rate limit (its refusal logs the path): a link's
token is 256 random bits, and a valid link registers once.
"""

from __future__ import annotations

import logging

import requests
from flask import Blueprint, render_template, request

from lti_tool.dynamic_registration import DynamicRegistrationError, complete_registration
from lti_tool.framing import frame_ancestors, origin_of
from lti_tool.registration_links import LinkRefused, RegistrationLinks
from lti_tool.web.auth import runtime

log = logging.getLogger(__name__)
bp = Blueprint("registration", __name__)

TITLES = {
    404: "Unknown registration link",
    409: "Registration in progress",
    410: "Registration link no longer valid",
}


@bp.get("/lti/register/<token>")
def register(token: str):  # type: ignore[no-untyped-def]
    rt = runtime()
    links = RegistrationLinks(rt.redis)
    openid_configuration = request.args.get("openid_configuration", "")
    with requests.Session() as http:
        http.headers["User-Agent"] = "Labpool LTI tool (dynamic registration)"
        try:
            registered = complete_registration(
                links=links,
                sessions=rt.sessions,
                settings=rt.settings,
                http=http,
                link_token=token,
                openid_configuration=openid_configuration,
                registration_token=request.args.get("registration_token", ""),
            )
        except (LinkRefused, DynamicRegistrationError) as exc:
            log.info(
                "dynamic registration (link %s) refused (%s): %s",
                links.label(token),
                exc.status,
                exc,
            )
            title = (
                TITLES.get(exc.status, "Registration refused")
                if isinstance(exc, LinkRefused)
                else "Labpool could not register with this platform"
            )
            page = render_template("registration.html", title=title, message=str(exc))
            return _framable(page, exc.status, openid_configuration)
    page = render_template(
        "registration.html",
        title="Labpool is registered",
        registered=registered,
        target_origin=origin_of(registered.issuer) or "*",
    )
    return _framable(page, 200, openid_configuration)


def _framable(page: str, status: int, openid_configuration: str):  # type: ignore[no-untyped-def]
    """Moodle may show this page in a frame of its tool management page, before the platform
    is registered (so before the usual frame-ancestors admit it): admit the origin the
    registration request names. The page has no form and no action to be tricked into."""
    rt = runtime()
    sources = frame_ancestors(rt.settings, rt.sessions)
    asking = origin_of(openid_configuration) if openid_configuration else None
    if asking and asking not in sources.split():
        sources += f" {asking}"
    return page, status, {"Content-Security-Policy": f"frame-ancestors {sources}"}
