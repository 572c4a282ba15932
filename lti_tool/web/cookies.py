"""The cookies of the OIDC login inside Moodle's frame, and what a student sees when the
browser will not keep them.

pylti1p3's Flask cookie service gives the state cookie `SameSite=None; Secure` only when the
request looks like https, and no SameSite at all otherwise (see docs/moodle.md,
"Cookies"). Labpool also looks at its public URL, like its own session cookie:
https (the URL, or the request through ProxyFix) → `Secure; SameSite=None; Partitioned` (a third-party cookie inside Moodle's iframe,
kept per top-level site by CHIPS); plain http (single-server trials) → `SameSite=Lax`, which
works when Moodle and Labpool share a site (same host name, any port).

When third-party cookies are blocked, pylti1p3's cookie check (`enable_check_cookies`) finds
out in the frame before the login goes on; its page is replaced by one that offers one clear
button: open the activity in a new tab, where the cookies are first-party.
"""

from __future__ import annotations

from typing import Any

from pylti1p3.contrib.flask import FlaskCookieService
from pylti1p3.cookies_allowed_check import CookiesAllowedCheckPage

BLOCKED_TEXT = (
    "Your browser does not let Labpool keep its cookies inside this frame (third-party "
    "cookies are blocked), so the activity cannot open here."
)
NEW_TAB_TEXT = "Open the activity in a new tab"
LOADING_TEXT = "Opening the activity…"


class LabpoolCookieService(FlaskCookieService):
    """pylti1p3's state and session-id cookies, with the SameSite attribute always set."""

    def __init__(self, request: Any, secure: bool):
        super().__init__(request)
        self._secure = secure

    def update_response(self, response: Any) -> None:
        # An https public URL, or a request that arrived over https (through ProxyFix).
        secure = self._secure or bool(self._request.is_secure())
        for key, data in self._cookie_data_to_set.items():
            response.set_cookie(
                key,
                data["value"],
                max_age=data["exp"],
                path="/",
                httponly=True,
                secure=secure,
                samesite="None" if secure else "Lax",
                partitioned=secure,
            )


class CookieCheckPage(CookiesAllowedCheckPage):
    """pylti1p3's check (its script stays as is) with the new-tab link made one big button."""

    def get_css_block(self) -> str:
        return (
            "body { font: 16px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 40rem;"
            " padding: 0 1rem; color: #1d2430; }\n"
            "#lti1p3-new-tab-link { display: inline-block; margin-top: 1rem; padding: .6rem 1.2rem;"
            " border-radius: .4rem; background: #1d4ed8; color: #fff; font-weight: 600;"
            " text-decoration: none; }\n"
            "#lti1p3-warning-msg strong { font-weight: normal; display: block; }\n"
        )


def cookie_check_page(protocol: str, params: Any) -> str:
    return CookieCheckPage(params, protocol, BLOCKED_TEXT, NEW_TAB_TEXT, LOADING_TEXT).get_html()
