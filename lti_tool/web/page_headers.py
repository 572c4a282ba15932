"""Headers every tool page carries.

- `Content-Security-Policy: frame-ancestors 'self' <tool origin> <platform origins>`: Moodle
  embeds the activity in an iframe, so the tool's pages (status, class, error pages) may be
  framed by the registered platforms and by nobody else (no clickjacking from other sites).
- `Cache-Control: no-store` on pages and JSON: they show one person's machine or class, live;
  a shared cache or the back button must never serve them stale or to someone else. A
  response that chose its own caching (the JWKS is public for five minutes) keeps it.

The proxy's auth answers are nginx's business and are left alone.
"""

from __future__ import annotations

from flask import Flask, Response, request

from config.runtime import Runtime
from lti_tool.framing import frame_ancestors

NO_STORE_TYPES = ("text/html", "application/json")
# For HTML made of a student's content (a rendered notebook, autograder feedback): no script
# runs, nothing is fetched but inline styles, and the document gets an opaque origin.
UNTRUSTED_HTML_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'none'; sandbox"
)


def install(app: Flask) -> None:
    @app.after_request
    def _page_headers(response: Response) -> Response:
        if request.blueprint == "proxy":
            return response
        rt: Runtime = app.extensions["labpool"]
        directive = "frame-ancestors " + frame_ancestors(rt.settings, rt.sessions)
        csp = response.headers.get("Content-Security-Policy")
        if not csp:
            response.headers["Content-Security-Policy"] = directive
        elif "frame-ancestors" not in csp:
            response.headers["Content-Security-Policy"] = f"{csp}; {directive}"
        if response.mimetype in NO_STORE_TYPES and "Cache-Control" not in response.headers:
            response.cache_control.no_store = True
        return response
