"""A graded assignment walked through in Chromium (Debian's, through Playwright), every step on
the real pages: the tool behind a real nginx, the student's real JupyterLab in its bubblewrap
sandbox (listening on a unix socket only nginx can open), real nbgrader, a real RQ worker; only
Moodle is the fake platform (launch, and its grade service at the HTTP API).

1. The teacher launches, creates an assignment on the class page's form by uploading one
   nbgrader source notebook (a solution region, a hidden test) with a maximum score, and
   publishes it on the assignment's page.
2. The student launches and lands in JupyterLab, whose file browser shows the assignment's
   folder and notebook; the copy holds neither the solution nor the hidden test. The student
   writes an answer and saves.
3. Opening the activity again, the student's Labpool page counts down to the IDE (their
   machine runs already); the student presses "Stay on this page", follows "Your assignments
   and grades" and presses Submit: "submitted at …, 1 files"; the teacher's download of it holds
   the answer.
4. The teacher grades it with a comment on the assignment's page; the worker sends the score,
   and the fake Moodle's gradebook has it.
5. The student's page shows the grade and the comment.
6. Opening the activity once more, the countdown ends in JupyterLab.

Screenshots of each step go to the test's temporary folder (run with --basetemp=DIR to keep
them).
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from provisioning.backends.local import UNIX
from provisioning.models import Machine
from tests.browser_helpers import (
    CHROMIUM_ARGS,
    IDE_TIMEOUT_MS,
    chromium_and_playwright,
    launch_in_browser,
    screenshot,
)
from tests.conftest import run_worker_burst
from tests.fakeplatform.ags import FakeGradebook
from tests.nginx import tool_behind_nginx
from tests.test_assignment_release import nbgrader_source

pytestmark = [pytest.mark.browser, pytest.mark.nginx, pytest.mark.sandbox]

SECRETS = ("BEGIN SOLUTION", "secret-answer", "BEGIN HIDDEN TESTS", "hidden-check")
ANSWER = "def square(x):\n    return x * x  # my-own-answer\n"
FILES_TIMEOUT_MS = 30_000  # the release lands a moment after the hand-over


class Walk:
    """The two browsers of the walk-through and what they share."""

    def __init__(self, url: str, shots: Path, expect: Any) -> None:
        self.url = url
        self.shots = shots
        self.expect = expect
        self.step = 0
        self.errors: list[tuple[str, str]] = []

    def page(self, browser: Any) -> Any:
        page = browser.new_context(accept_downloads=True).new_page()
        page.on("pageerror", lambda e: self.errors.append((page.url, str(e))))
        page.on("dialog", lambda dialog: dialog.accept())
        return page

    def shot(self, page: Any, name: str) -> None:
        self.step += 1
        screenshot(page, self.shots / f"{self.step:02d}-{name}.png")

    def flash(self, page: Any) -> Any:
        return page.locator('p[role="status"]:not([id])').first


def test_a_graded_assignment_from_upload_to_moodles_gradebook_in_chromium(
    rt, platform, tmp_path, tmp_path_factory, monkeypatch
):
    sync_playwright, chromium = chromium_and_playwright()
    from playwright.sync_api import expect

    notebook = tmp_path / "square.ipynb"
    notebook.write_bytes(nbgrader_source())
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with (
        tool_behind_nginx(
            rt.settings,
            platform,
            tmp_path_factory.mktemp("nginx"),  # nginx's workers pass
        ) as site,
        sync_playwright() as p,
    ):
        # The worker starts machines as `labpool run` does behind nginx: unix sockets.
        monkeypatch.setenv("LABPOOL_PUBLIC_URL", site.url)
        monkeypatch.setenv("LABPOOL_IDE_PROXY", "true")
        platform.tool_jwks_url = f"{site.url}/lti/jwks.json"
        platform.gradebook = FakeGradebook(platform)
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        walk = Walk(site.url, shots, expect)
        try:
            teacher, student = walk.page(browser), walk.page(browser)
            try:
                _walk_through(walk, teacher, student, platform, rt, notebook)
            except BaseException:
                print(site.nginx.logs())
                raise
            finally:
                walk.shot(teacher, "teacher-at-the-end")
                walk.shot(student, "student-at-the-end")
                print(f"screenshots: {shots}")
        finally:
            browser.close()
    assert [(url, e) for url, e in walk.errors if url.startswith(site.url + "/")] == [], (
        "uncaught JavaScript errors on the tool's pages"
    )


def _walk_through(walk: Walk, teacher, student, platform, rt, notebook: Path) -> None:  # type: ignore[no-untyped-def]
    expect = walk.expect
    started = time.monotonic()

    # 1. The teacher creates the assignment on the class page's form, then publishes it.
    launch_in_browser(
        teacher, platform, walk.url, platform.instructor(sub="3"), "**/activities/*/class"
    )
    form = teacher.locator("form", has=teacher.get_by_role("button", name="Create assignment"))
    form.get_by_label("title").fill("Squares")
    form.get_by_label("folder name").fill("squares")
    form.get_by_label("maximum score").fill("10")
    form.locator('input[type="file"][name="files"]').set_input_files(str(notebook))
    form.get_by_role("button", name="Create assignment").click()
    expect(walk.flash(teacher)).to_contain_text("Assignment 'Squares' created with 1 files")
    expect(teacher.locator("#assignments")).to_contain_text("out of 10")
    walk.shot(teacher, "teacher-created")
    teacher.locator("#assignments").get_by_role("link", name="Squares").click()
    expect(teacher.locator("#release-state")).to_contain_text("not published yet")
    teacher.locator("#publish").click()
    expect(walk.flash(teacher)).to_contain_text("Published")
    expect(teacher.locator("#release-state")).to_contain_text("Solutions and hidden tests stay")
    assignment_url = teacher.url
    walk.shot(teacher, "teacher-published")

    # 2. The student launches; the worker starts their sandboxed JupyterLab and releases the
    # assignment into their home once it is handed over.
    launch_in_browser(student, platform, walk.url, platform.learner(sub="4"), "**/machines/*")
    machine_id = int(student.url.rsplit("/", 1)[1])
    status_url = student.url
    worker = _in_background(lambda: run_worker_burst(rt.settings, timeout=150))
    student.wait_for_url(f"**/ide/{machine_id}/lab**", timeout=IDE_TIMEOUT_MS)
    expect(student.locator(".jp-LabShell")).to_be_visible(timeout=30_000)
    assert student.url.startswith(walk.url + f"/ide/{machine_id}/")  # through nginx
    with rt.sessions() as session:  # the sandboxed IDE listens on a socket only nginx opens
        assert session.get_one(Machine, machine_id).address.startswith(UNIX)
    folder = _listed(student, "squares")
    # The file browser opens in the student's own home: the released folder, nothing else.
    assert student.locator(".jp-DirListing-itemText").all_inner_texts() == ["squares"]
    walk.shot(student, "student-jupyterlab-home")
    folder.dblclick()
    _listed(student, "square.ipynb").dblclick()
    cells = student.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")
    expect(cells).to_have_count(3, timeout=30_000)
    expect(cells.nth(1)).to_contain_text("YOUR CODE HERE")
    expect(cells.nth(2)).to_contain_text("assert square(2) == 4")  # the visible test stays
    released = _contents(student, machine_id, "squares/square.ipynb")
    for secret in SECRETS:
        assert secret not in released, secret
    assert "YOUR CODE HERE" in released
    walk.shot(student, "student-released-notebook")

    # The student answers in the solution cell and saves.
    cells.nth(1).locator(".cm-content").click()
    student.keyboard.press("ControlOrMeta+a")
    student.keyboard.insert_text(ANSWER.rstrip("\n"))
    expect(cells.nth(1)).to_contain_text("my-own-answer")  # in the editor before saving
    # Saved when the file says so (a loaded CI machine may take the first Ctrl+S before the
    # notebook's model has the edit: save again until the file has it).
    deadline = time.monotonic() + 30
    while True:
        student.keyboard.press("ControlOrMeta+s")
        student.wait_for_timeout(1000)
        saved = json.loads(_contents(student, machine_id, "squares/square.ipynb"))
        if "my-own-answer" in "".join(saved["cells"][1]["source"]):
            break
        assert time.monotonic() < deadline, "the student's answer was never saved"
    assert "".join(saved["cells"][1]["source"]) == ANSWER.rstrip("\n")
    walk.shot(student, "student-answered")
    worker.join(timeout=120)
    assert worker.outcome == ["done"], worker.outcome

    # 3. The student opens the activity again: their Labpool page counts down to the IDE (the
    # machine runs already); "Stay on this page" keeps it, with the way to their work.
    launch_in_browser(student, platform, walk.url, platform.learner(sub="4"), "**/machines/*")
    assert student.url == status_url  # the same machine
    expect(student.locator("#message")).to_contain_text("Your machine is running: opening it in")
    expect(student.locator("#open-link")).to_be_visible()
    student.locator("#stay").click()
    expect(student.locator("#message")).to_have_text("Your machine is running.")
    student.wait_for_timeout(4000)  # past the countdown: it would have moved on by now
    assert student.url == status_url, "'Stay on this page' must keep the page"
    walk.shot(student, "student-status-page")
    student.locator("#my-work").click()
    row = student.locator("#work tbody tr").filter(has_text="Squares")
    expect(row.locator(".submission")).to_contain_text("—")
    row.get_by_role("button", name="Submit").click()
    expect(walk.flash(student)).to_contain_text(
        re.compile(r"Submitted at .* 1 files \(version 1\)")
    )
    expect(student.locator("#versions tbody tr")).to_have_count(1)
    student.get_by_role("link", name="All your assignments and grades").click()
    expect(row.locator(".submission")).to_contain_text(
        re.compile(r"submitted at \S+ \S+ UTC, 1 files")
    )
    expect(row.locator(".grade")).to_have_text("not graded yet")
    walk.shot(student, "student-submitted")

    # 4. The teacher sees the submission, downloads it, grades it with a comment.
    teacher.goto(assignment_url)
    grade_row = teacher.locator("#grades tbody tr")
    expect(grade_row).to_have_count(1)
    expect(grade_row).to_contain_text("1 files")
    with teacher.expect_download() as download:
        grade_row.get_by_role("link", name="download").click()
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as zipped:
        assert zipped.namelist() == ["square.ipynb"]
        submitted = json.loads(zipped.read("square.ipynb"))
    assert "".join(submitted["cells"][1]["source"]) == ANSWER.rstrip("\n")
    grade_row.get_by_label("score").fill("8.5")
    grade_row.get_by_label("comment").fill("Right; mind negative numbers.")
    grade_row.get_by_role("button", name="Save").click()
    expect(walk.flash(teacher)).to_contain_text("Grade saved")
    expect(grade_row.locator(".delivery")).to_contain_text("waiting to be sent")
    run_worker_burst(rt.settings, timeout=60)  # the score's send job
    stored = platform.gradebook.grade("4")
    assert stored is not None, platform.gradebook.accepted
    assert stored["score_given"] == 8.5 and stored["comment"] == "Right; mind negative numbers."
    assert platform.gradebook.accepted[-1]["scoreMaximum"] == 10
    teacher.reload()
    expect(grade_row.locator(".delivery")).to_contain_text("in Moodle since")
    walk.shot(teacher, "teacher-graded")

    # 5. The student's page shows the grade.
    student.reload()
    expect(row.locator(".grade")).to_contain_text("8.5 / 10")
    expect(row.locator(".grade")).to_contain_text("Right; mind negative numbers.")
    walk.shot(student, "student-graded")

    # 6. Opening the activity once more without staying: the countdown ends in the IDE.
    launch_in_browser(student, platform, walk.url, platform.learner(sub="4"), "**/machines/*")
    student.wait_for_url(re.compile(r".*/ide/\d+/lab.*"), timeout=15_000)
    print(f"walk-through: {time.monotonic() - started:.1f} s")


def _listed(page, name: str):  # type: ignore[no-untyped-def]
    """The file browser's entry `name` in the current folder, refreshing as a student would
    (the browser polls the folder itself only every few seconds)."""
    item = page.locator(".jp-DirListing-item", has=page.locator(f'text="{name}"'))
    deadline = time.monotonic() + FILES_TIMEOUT_MS / 1000
    while not item.is_visible():
        assert time.monotonic() < deadline, f"{name!r} never showed in JupyterLab's file browser"
        page.locator('[data-command="filebrowser:refresh"]').first.click()
        page.wait_for_timeout(500)
    return item


def _contents(page, machine_id: int, path: str) -> str:  # type: ignore[no-untyped-def]
    """A file of the student's home as JupyterLab's own contents API gives it to the page
    (through nginx, with the page's own cookies)."""
    return page.evaluate(
        """async (url) => {
             const r = await fetch(url, {credentials: 'same-origin'});
             if (!r.ok) throw new Error(url + ': ' + r.status);
             return (await r.json()).content;
           }""",
        f"/ide/{machine_id}/api/contents/{path}?content=1&type=file&format=text",
    )


class _Background(threading.Thread):
    def __init__(self, work) -> None:  # type: ignore[no-untyped-def]
        super().__init__(name="rq-worker-burst", daemon=True)
        self.work = work
        self.outcome: list[Any] = []

    def run(self) -> None:
        try:
            self.work()
            self.outcome.append("done")
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.outcome.append(exc)


def _in_background(work) -> _Background:  # type: ignore[no-untyped-def]
    thread = _Background(work)
    thread.start()
    return thread
