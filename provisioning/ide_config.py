"""Configuration the IDEs of every backend share."""

from __future__ import annotations

# JupyterLab plugins a class has no use for: nbgrader's teacher panels (assignments are made
# on Labpool's class page; students must not see "Create Assignment" or the formgrader), and
# the "get notified about Jupyter news?" pop-up that a new machine shows on every first start.
DISABLED_LAB_PLUGINS = (
    "@jupyter/nbgrader:create-assignment",
    "@jupyter/nbgrader:formgrader",
    "@jupyter/nbgrader:course-list",
    "@jupyter/nbgrader:assignment-list",
    "@jupyter/nbgrader:validate-assignment",
    "@jupyterlab/apputils-extension:announcements",
)
# …and nbgrader's server extensions behind them (ignored when nbgrader is not installed).
DISABLED_SERVER_EXTENSIONS = (
    "nbgrader.server_extensions.formgrader",
    "nbgrader.server_extensions.assignment_list",
    "nbgrader.server_extensions.course_list",
    "nbgrader.server_extensions.validate_assignment",
)


def jupyter_server_config(csp: str, title: str = "") -> str:
    """Jupyter's config for a machine: the CSP header, a lab page that does not carry the
    IDE's token (JupyterLab writes it into the page by default; the proxy adds it to every
    request instead, and without the proxy the login cookie does), and without the plugins
    above. `title` names the page (JupyterLab's appName: "<title> · Labpool")."""
    disabled = list(DISABLED_LAB_PLUGINS)
    app_name = f"        'appName': {title + ' · Labpool'!r},\n" if title else ""
    return (
        "c.ServerApp.tornado_settings = {\n"
        f"    'headers': {{'Content-Security-Policy': {csp!r}}},\n"
        "    'page_config_hook': lambda handler, config: {\n"
        "        **config,\n"
        "        'token': '',\n"
        + app_name
        + f"        'disabledExtensions': [*config.get('disabledExtensions', []), *{disabled!r}],\n"
        "    },\n"
        "}\n"
        "c.ServerApp.jpserver_extensions = {\n"
        + "".join(f"    {name!r}: False,\n" for name in DISABLED_SERVER_EXTENSIONS)
        + "}\n"
        + PROXY_IDENTITY
    )


# Jupyter skips its XSRF check and opens CORS for a request authenticated by a token in the
# `Authorization` header or the URL. The proxy must authenticate every request, yet a page on
# another origin riding on the student's cookie must still be stopped by Jupyter's own checks.
# So the proxy presents the machine's token in `X-Labpool-Token`, which this identity provider
# accepts as a *cookie-like* login: XSRF and Origin checks stay on. `Authorization` is ignored;
# `?token=` still logs a browser in once (direct mode, no proxy), as a cookie afterwards.
PROXY_IDENTITY = """
import hmac as _hmac
from jupyter_server.auth.identity import IdentityProvider as _IdentityProvider, User as _User


class LabpoolProxyIdentity(_IdentityProvider):
    def get_token(self, handler):
        return handler.get_argument("token", "") or None

    async def get_user(self, handler):
        sent = handler.request.headers.get("X-Labpool-Token", "")
        if sent and self.token and _hmac.compare_digest(sent, self.token):
            return _User(username="student", name="Student")
        return await self._get_user(handler)


c.ServerApp.identity_provider_class = LabpoolProxyIdentity
"""
