"""The one rule for a missing outside tool (conftest.py): under CI=true a marked test fails,
in a developer's run it is skipped, and both say what to install. Run on a real `browser`
test with Chromium pointed at nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MARKED = "tests/test_browser_framed.py::test_a_page_on_an_unregistered_origin_cannot_frame_the_tool"
INSTALL = "apt-get update && apt-get install -y chromium"


def run_without_chromium(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["LABPOOL_TEST_CHROMIUM"] = "/nonexistent/chromium"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsE", MARKED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("ci", [None, "false"])
def test_a_developers_run_skips_a_test_whose_tool_is_missing_and_says_what_to_install(ci):
    done = run_without_chromium(ci)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 skipped" in done.stdout and INSTALL in done.stdout


def test_under_ci_a_missing_tool_fails_the_test_with_the_install_command():
    done = run_without_chromium("true")
    assert done.returncode == 1, done.stdout[-2000:]
    assert "1 error" in done.stdout and "CI=true" in done.stdout and INSTALL in done.stdout
