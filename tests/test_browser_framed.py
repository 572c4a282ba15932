"""Chromium (Debian's, through Playwright) shows the activity inside the fake Moodle's frame,
as Moodle's "Embed" launch containers do: the framed launch, the status page and the IDE
render in an iframe of a page on the registered platform's origin; a page on an origin that
is no registered platform cannot frame the tool.

The course page and Moodle's ``launch.php`` are served by the fake platform itself (on its
origin and on loopback like the tool: Chromium's local-network checks would refuse a framed
request from a routed, "public" page to 127.0.0.1); the rest is the real tool, the fake's
auth.php and a real JupyterLab. The unregistered origin is another loopback server, so only
the tool's `frame-ancestors` can be what stops it.
"""

from __future__ import annotations

import re
import secrets
import threading

import pytest

from tests.browser_helpers import (
    CHROMIUM_ARGS,
    IDE_TIMEOUT_MS,
    chromium_and_playwright,
    screenshot,
)
from tests.conftest import run_worker_burst
from tests.fakeplatform import ServedApp

pytestmark = pytest.mark.browser
FRAME_TIMEOUT_MS = 20_000


def _course_page(src: str) -> str:
    return (
        "<!doctype html><html><head><title>Course</title></head><body>"
        f'<iframe id="activity" src="{src}" width="1100" height="800"></iframe></body></html>'
    )


def _frames(page) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(f.url, f.content()[:800]) for f in page.frames]


def test_the_status_page_and_the_ide_render_in_a_frame_of_the_registered_platform(
    tool, platform, rt, tmp_path
):
    sync_playwright, chromium = chromium_and_playwright()
    from playwright.sync_api import expect

    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    launch_id, launch_html = platform.launch_page(tool.url, platform.learner(sub="60"))
    entry = platform.serve_page(f"/mod/lti/launch-{secrets.token_hex(4)}.php", launch_html)
    course = platform.serve_page("/course/view-framed.php", _course_page(entry))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            seen: list[str] = []
            page.on("response", lambda r: seen.append(f"{r.status} {r.url[:100]}"))
            page.on("requestfailed", lambda r: seen.append(f"failed {r.url[:100]} {r.failure}"))
            page.goto(course)
            frame = page.frame_locator("#activity")
            # The framed login checks cookies, goes on, and lands on the status page.
            try:
                expect(frame.locator("#state")).to_be_visible(timeout=FRAME_TIMEOUT_MS)
            except AssertionError:
                raise AssertionError(
                    f"the framed launch got stuck: {seen} {_frames(page)[1:]}"
                ) from None
            activity = page.frame(url=re.compile(r".*/machines/\d+$"))
            assert activity is not None, [f.url for f in page.frames]
            machine_id = int(activity.url.rsplit("/", 1)[1])
            assert page.url == course  # Moodle's page stays; the activity is in the frame

            worker = threading.Thread(target=run_worker_burst, args=(rt.settings, 90), daemon=True)
            worker.start()
            # The status page moves the same frame on to the IDE, which agrees to be framed.
            expect(frame.locator(".jp-LabShell")).to_be_visible(timeout=IDE_TIMEOUT_MS)
            assert any(f"/ide/{machine_id}/lab" in f.url for f in page.frames)
            assert page.url == course
            worker.join(timeout=60)
        finally:
            screenshot(page, tmp_path / "framed.png")
            browser.close()
            platform.forget_launch(launch_id)


def test_a_page_on_an_unregistered_origin_cannot_frame_the_tool(tool, platform):
    sync_playwright, chromium = chromium_and_playwright()
    from playwright.sync_api import expect

    registered = platform.serve_page("/course/view-home.php", _course_page(f"{tool.url}/"))
    body = _course_page(f"{tool.url}/").encode()

    def stranger_app(environ, start_response):  # type: ignore[no-untyped-def]
        start_response("200 OK", [("Content-Type", "text/html")])
        return [body]

    stranger_site = ServedApp(stranger_app).start()
    stranger = stranger_site.url + "/page.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(registered)
            expect(page.frame_locator("#activity").locator("body")).to_contain_text(
                "Labpool", timeout=FRAME_TIMEOUT_MS
            )

            page.goto(stranger)
            page.wait_for_timeout(1500)
            framed = [f for f in page.frames if f != page.main_frame]
            assert framed, "the iframe is missing"
            # Chromium refuses the tool's page (frame-ancestors): the frame holds no tool page.
            assert "Labpool" not in framed[0].content()
        finally:
            browser.close()
            stranger_site.stop()
