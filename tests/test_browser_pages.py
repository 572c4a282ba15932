"""The class page and the student's page as a teacher and a student see them in Chromium
(issue 13), at Moodle's narrow iframe width (800 px) and at 1280 px: the counts, states in
words, sorting, the confirmation before a reset, no page wider than the window, and no
spinner on a failed machine. Screenshots of each go to the test's temporary folder
(`--basetemp=DIR` keeps them): class-800.png, class-1280.png, student-error-800.png,
student-waiting-1280.png.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from sqlalchemy import select, update

from config.db import transaction, utcnow
from lti_tool.models import User
from provisioning.models import Machine, MachineState
from tests.browser_helpers import (
    CHROMIUM_ARGS,
    chromium_and_playwright,
    launch_in_browser,
    screenshot,
)
from tests.test_launch import machine_id_of

pytestmark = pytest.mark.browser
S = MachineState


def _class_of_four(platform, tool, rt) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Four students launched; their machines are set to four different states."""
    machines = {}
    for sub in ("41", "42", "43", "44"):
        with requests.Session() as student:
            response = platform.launch(student, tool.url, platform.learner(sub=sub))
            machines[sub] = machine_id_of(response.launch_response)
    now = utcnow()
    with transaction(rt.sessions) as session:
        session.execute(
            update(Machine)
            .where(Machine.id == machines["41"])
            .values(state=S.assigned, address="127.0.0.1:1", last_activity_at=now)
        )
        session.execute(
            update(Machine)
            .where(Machine.id == machines["42"])
            .values(
                state=S.assigned,
                address="127.0.0.1:1",
                assigned_at=now - timedelta(minutes=50),
                state_changed_at=now - timedelta(minutes=50),
                last_activity_at=now - timedelta(minutes=40),
            )
        )
        session.execute(
            update(Machine)
            .where(Machine.id == machines["43"])
            .values(state=S.error, error="the IDE did not answer within 60 s")
        )
    return machines


def _fits(page) -> bool:  # type: ignore[no-untyped-def]
    return page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1"
    )


def test_the_class_page_reads_at_a_glance_at_800_and_1280_px(tool, platform, rt, tmp_path):
    sync_playwright, chromium = chromium_and_playwright()
    from playwright.sync_api import expect

    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    machines = _class_of_four(platform, tool, rt)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 800, "height": 900}).new_page()
            launch_in_browser(
                page, platform, tool.url, platform.instructor(sub="3"), "**/activities/*/class"
            )
            counts = page.locator("#counts")
            expect(counts.locator('[data-count="working"]')).to_have_text("1")
            expect(counts.locator('[data-count="idle"]')).to_have_text("1")
            expect(counts.locator('[data-count="problem"]')).to_have_text("1")
            expect(counts.locator('[data-count="starting"]')).to_have_text("1")
            row = page.locator(f'#roster tr[data-machine="{machines["43"]}"]')
            expect(row.locator("span.state")).to_have_text(
                "problem: the IDE did not answer within 60 s"
            )
            # The teacher is listed apart, not among the class.
            expect(page.locator("#staff tr")).to_have_count(1)
            expect(page.locator("#roster tr")).to_have_count(4)
            assert _fits(page), "the class page is wider than Moodle's 800 px frame"
            screenshot(page, tmp_path / "class-800.png")

            # Sorting by state puts the problem first.
            page.get_by_role("button", name="State").click()
            first = page.locator("#roster tr").first
            expect(first).to_have_attribute("data-status", "problem")
            page.get_by_role("button", name="State").click()
            expect(page.locator("#roster tr").first).to_have_attribute("data-status", "working")

            # Reset asks first; saying no changes nothing.
            questions: list[str] = []

            def dismiss(dialog) -> None:  # type: ignore[no-untyped-def]
                questions.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", dismiss)
            row.get_by_role("button", name="Reset").click()
            assert questions and "Reset the machine of" in questions[0]
            with rt.sessions() as session:
                assert session.get_one(Machine, machines["43"]).state is S.error
            page.get_by_role("button", name="Stop all idle machines").click()
            assert len(questions) == 2 and "Stop every machine nobody" in questions[1]
            with rt.sessions() as session:
                assert session.get_one(Machine, machines["42"]).state is S.assigned

            page.set_viewport_size({"width": 1280, "height": 900})
            screenshot(page, tmp_path / "class-1280.png")
        finally:
            browser.close()


def test_the_student_page_names_the_activity_and_stops_spinning_on_an_error(
    tool, platform, rt, tmp_path
):
    sync_playwright, chromium = chromium_and_playwright()
    from playwright.sync_api import expect

    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            launch_in_browser(page, platform, tool.url, platform.learner(sub="45"), "**/machines/*")
            expect(page.locator("h1")).to_have_text("LTI 1.3 Test Activity")
            expect(page.locator("#state")).to_have_text("waiting")
            expect(page.locator("#spinner")).to_be_visible()
            expect(page.locator("#waited")).to_contain_text("Waiting for")
            screenshot(page, tmp_path / "student-waiting-1280.png")

            with transaction(rt.sessions) as session:
                user_id = session.scalars(select(User.id).where(User.sub == "45")).one()
                session.execute(
                    update(Machine)
                    .where(Machine.owner_id == user_id)
                    .values(state=S.error, error="no free slot on this server")
                )
            page.set_viewport_size({"width": 800, "height": 800})
            expect(page.locator("#state")).to_have_text("problem", timeout=10_000)
            # `hidden` wins over the spinner's own display rule: it no longer spins.
            expect(page.locator("#spinner")).to_be_hidden()
            expect(page.locator("#error")).to_have_text("no free slot on this server")
            expect(page.get_by_role("button", name="Start it again")).to_be_visible()
            assert _fits(page)
            screenshot(page, tmp_path / "student-error-800.png")
        finally:
            browser.close()
