"""An admin disables, enables and removes a platform registration (issue 14's CLI twins):
launches are refused with a message saying why, and nothing is written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from lti_tool.cli import main
from lti_tool.models import Launch
from tests.fakeplatform import FakePlatform
from tests.fakeplatform.platform import FakePlatformError


def launches(rt) -> int:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalar(select(func.count()).select_from(Launch)) or 0


def test_a_disabled_platform_is_refused_until_enabled_again(tool, rt, browser):
    runner = CliRunner()
    with FakePlatform(tool_url=tool.url, key_namespace="disabled-moodle") as moodle:
        assert runner.invoke(main, moodle.platform_add_argv()).exit_code == 0
        off = runner.invoke(main, ["platform", "disable", "--issuer", moodle.issuer])
        assert off.exit_code == 0 and "disabled" in off.output, off.output
        listed = runner.invoke(main, ["platform", "list"])
        assert "DISABLED" in listed.output

        with pytest.raises(FakePlatformError):  # the login initiation is refused already
            moodle.launch(browser, tool.url, moodle.instructor(sub="3"))
        login = browser.post(
            f"{tool.url}/lti/login",
            data={
                "iss": moodle.issuer,
                "client_id": moodle.client_id,
                "login_hint": "3",
                "target_link_uri": f"{tool.url}/lti/launch",
                "lti_deployment_id": moodle.deployment_id,
            },
            allow_redirects=False,
        )
        assert login.status_code == 400 and "disabled this platform" in login.text
        assert launches(rt) == 0

        on = runner.invoke(main, ["platform", "enable", "--issuer", moodle.issuer])
        assert on.exit_code == 0, on.output
        accepted = moodle.launch(browser, tool.url, moodle.instructor(sub="3")).launch_response
        assert accepted.status_code == 303  # at once: a disabled platform is never cached
        assert launches(rt) == 1

        unknown = runner.invoke(main, ["platform", "disable", "--issuer", "https://nowhere"])
        assert unknown.exit_code == 1 and "no platform" in unknown.output


def test_a_launch_through_a_just_removed_platform_is_refused_not_a_500(tool, rt, browser):
    runner = CliRunner()
    with FakePlatform(tool_url=tool.url, key_namespace="gone-moodle") as moodle:
        assert runner.invoke(main, moodle.platform_add_argv()).exit_code == 0
        first = moodle.launch(browser, tool.url, moodle.instructor(sub="3")).launch_response
        assert first.status_code == 303  # the tool now caches the registration for 30 s
        removed = runner.invoke(main, ["platform", "remove", "--issuer", moodle.issuer])
        assert removed.exit_code == 0, removed.output
        again = moodle.launch(browser, tool.url, moodle.instructor(sub="3")).launch_response
        assert again.status_code in (400, 403), again.status_code
        assert "no longer registered" in again.text or "not registered" in again.text.lower()
        assert launches(rt) == 0
