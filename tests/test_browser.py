"""One test drives a real browser (Chromium through Playwright): a student's status page moves
on to the IDE by itself when the machine becomes ready, and the teacher's class page shows that
student's state change without a reload.

The LTI launches happen in the browser too (tests/browser_helpers.py), so the tool's cookies
(OIDC state, session) go through a real browser's cookie rules.

Needs Debian's ``chromium`` (at /usr/bin/chromium, or $LABPOOL_TEST_CHROMIUM) and the PyPI
``playwright`` package: the ``browser`` marker.
"""

from __future__ import annotations

import re
import threading

import pytest

from tests.browser_helpers import (
    CHROMIUM_ARGS,
    IDE_TIMEOUT_MS,
    chromium_and_playwright,
    launch_in_browser,
    screenshot,
)
from tests.conftest import run_worker_burst

CLASS_TIMEOUT_MS = 30_000  # class.html polls class.json every 2 s


pytestmark = pytest.mark.browser


def test_status_page_opens_the_ide_and_class_page_follows_without_reload(
    tool, platform, rt, tmp_path
):
    sync_playwright, chromium = chromium_and_playwright()
    from playwright.sync_api import expect

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            student_ctx = browser.new_context()
            teacher_ctx = browser.new_context()
            student = student_ctx.new_page()
            teacher = teacher_ctx.new_page()
            # Uncaught JavaScript errors, with the page's URL (JupyterLab's own are not ours).
            errors: list[tuple[str, str]] = []
            student.on("pageerror", lambda e: errors.append((student.url, str(e))))
            teacher.on("pageerror", lambda e: errors.append((teacher.url, str(e))))
            try:
                _run_scenario(student, teacher, platform, tool, rt, errors, expect)
            finally:
                for name, page in (("student", student), ("teacher", teacher)):
                    screenshot(page, tmp_path / f"{name}.png")
                print(f"screenshots: {tmp_path}/student.png, {tmp_path}/teacher.png")
        finally:
            browser.close()


def _run_scenario(student, teacher, platform, tool, rt, errors, expect):  # type: ignore[no-untyped-def]
    # The student opens the activity: the launch ends on their machine's status page.
    launch_in_browser(student, platform, tool.url, platform.learner(sub="4"), "**/machines/*")
    match = re.fullmatch(re.escape(tool.url) + r"/machines/(\d+)", student.url)
    assert match, student.url
    machine_id = int(match[1])
    expect(student.locator("#state")).to_have_text("waiting")  # the state in words
    assert student.locator(".jp-LabShell").count() == 0  # not in the IDE yet

    # The teacher opens it too: the class page lists the student, still waiting.
    launch_in_browser(
        teacher, platform, tool.url, platform.instructor(sub="3"), "**/activities/*/class"
    )
    class_url = teacher.url
    row_state = teacher.locator(f'tr[data-machine="{machine_id}"] span.state')
    expect(row_state).to_have_attribute("data-state", "requested")
    expect(row_state).to_have_text("waiting for a slot")
    # Anything that reloads or leaves the page would lose this, and fire a navigation.
    teacher.evaluate("window.__marker = 'same page'")
    teacher_navigations: list[str] = []
    teacher.on(
        "framenavigated",
        lambda frame: frame == teacher.main_frame and teacher_navigations.append(frame.url),
    )

    # A worker starts the machine (a real JupyterLab) while both pages sit open.
    worker_failure: list[BaseException] = []

    def work() -> None:
        try:
            run_worker_burst(rt.settings, timeout=90)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            worker_failure.append(exc)

    worker = threading.Thread(target=work, name="rq-worker-burst", daemon=True)
    worker.start()

    # The student's page goes on to the IDE by itself...
    try:
        student.wait_for_url(f"**/ide/{machine_id}/lab**", timeout=IDE_TIMEOUT_MS)
    except Exception:
        worker.join(timeout=5)
        raise AssertionError(
            f"the status page never moved on to the IDE; it is at {student.url} showing "
            f"{student.locator('body').inner_text()[:500]!r}; worker: {worker_failure}"
        ) from None
    expect(student.locator(".jp-LabShell")).to_be_visible(timeout=30_000)
    # JupyterLab's tab names the activity ("<launcher or file> - <activity> · Labpool").
    expect(student).to_have_title(re.compile("LTI 1.3 Test Activity · Labpool"))

    # ...and the teacher's page shows the change without anyone reloading it.
    expect(row_state).to_have_attribute("data-state", "assigned", timeout=CLASS_TIMEOUT_MS)
    assert teacher.evaluate("window.__marker") == "same page"
    assert teacher_navigations == []
    assert teacher.url == class_url

    worker.join(timeout=60)
    assert not worker.is_alive(), "the burst worker did not finish"
    if worker_failure:
        raise worker_failure[0]
    assert [(url, e) for url, e in errors if url.startswith(tool.url)] == []
