"""What the Chromium tests share: Debian's Chromium driven by Playwright (its driver only:
browsers are never downloaded), an LTI launch done in the browser, screenshots that never
hide a failure.

A launch in the browser: the page Moodle's ``mod/lti/launch.php`` would serve (the
auto-submitting login initiation form) is served on the fake platform's origin by Playwright,
and from there Chromium follows the tool's redirect to the fake's auth.php, runs its
auto-submitting id_token form, and ends where the tool sends it. So the tool's cookies (OIDC
state, session) go through a real browser's cookie rules.

Tests using these carry the ``browser`` marker (conftest.py's rule: under CI=true the test
fails without Chromium and Playwright, otherwise it is skipped).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from tests.conftest import chromium_path
from tests.fakeplatform import FakePlatform

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium reaches for the internet (updates, sync, field trials).
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IDE_TIMEOUT_MS = 45_000  # the worker starts a real JupyterLab, then the page polls every 1 s


def chromium_and_playwright() -> tuple[Any, str]:
    """`sync_playwright` and Chromium's path, for tests marked `browser` (which have both)."""
    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    assert chromium is not None, "mark the test `browser`: conftest.py then checks for Chromium"
    return sync_playwright, chromium


def launch_in_browser(
    page: Any, platform: FakePlatform, tool_url: str, claims: dict[str, Any], lands_on: str
) -> None:
    """Open the activity from the (fake) course page and wait for the tool's page `lands_on`
    (a glob)."""
    entry = f"{platform.url}/mod/lti/launch.php?id={secrets.randbelow(10**6)}"
    launch_id, body = platform.launch_page(tool_url, claims)
    page.route(entry, lambda route: route.fulfill(status=200, content_type="text/html", body=body))
    try:
        page.goto(entry)
        page.wait_for_url(lands_on, timeout=15_000)
    except Exception:
        # Show where it got stuck (auth.php and the tool answer errors as text or JSON).
        raise AssertionError(
            f"the browser launch of sub={claims.get('sub')} did not reach {lands_on}; it is at "
            f"{page.url}: {page.content()[:1500]}"
        ) from None
    finally:
        page.unroute(entry)
        platform.forget_launch(launch_id)  # auth.php drops it once it is used


def screenshot(page: Any, path: Path) -> None:
    """A full-page screenshot; failing to take one never hides the test's own failure."""
    try:
        page.screenshot(path=str(path), full_page=True)
    except Exception as exc:  # noqa: BLE001
        print(f"no screenshot {path.name}: {exc}")
