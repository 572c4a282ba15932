"""An admin retires an environment (issue 14's `env retire`): launches onto it start no new
machine and say why, a student's machine already handed out stays theirs, teachers can no
longer pick it, the pool keeps no warm machine; `env restore` takes it back. The admin page's
button writes what the CLI writes."""

from __future__ import annotations

import requests
from click.testing import CliRunner
from sqlalchemy import func, select

from config.db import transaction
from lti_tool.cli import main
from lti_tool.launches import _environments
from lti_tool.models import Activity
from provisioning.environments import add_environment
from provisioning.models import Environment, Machine
from tests.test_class_aware import csrf_of, teacher_launch
from tests.test_launch import machine_id_of


def machines(rt) -> int:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalar(select(func.count()).select_from(Machine)) or 0


def test_a_retired_environment_starts_no_new_machine_and_says_why(tool, platform, rt, browser):
    runner = CliRunner()
    with transaction(rt.sessions) as session:
        lab = add_environment(session, name="old-lab").id
    class_url = teacher_launch(platform, tool, browser)
    activity_id = class_url.split("/activities/")[1].split("/")[0]
    chosen = browser.post(
        f"{tool.url}/activities/{activity_id}/environment",
        data={"csrf": csrf_of(browser, class_url), "environment_id": lab},
        allow_redirects=False,
    )
    assert chosen.status_code == 303
    with requests.Session() as kept:
        held = machine_id_of(
            platform.launch(kept, tool.url, platform.learner(sub="4")).launch_response
        )

        retired = runner.invoke(main, ["env", "retire", "old-lab"])
        assert retired.exit_code == 0 and "retired" in retired.output, retired.output
        assert "RETIRED" in runner.invoke(main, ["env", "list"]).output
        _environments.clear()  # this process's 10 s cache; the tool's own expires likewise

        # A student holding a machine keeps it; a new one gets none, and is told why.
        again = platform.launch(kept, tool.url, platform.learner(sub="4")).launch_response
        assert machine_id_of(again) == held
    before = machines(rt)
    with requests.Session() as newcomer:
        refused = platform.launch(newcomer, tool.url, platform.learner(sub="5")).launch_response
    assert refused.status_code == 409 and "has been retired" in refused.text
    assert machines(rt) == before

    # Teachers can no longer pick it (and the page no longer offers it to others).
    picked = browser.post(
        f"{tool.url}/activities/{activity_id}/environment",
        data={"csrf": csrf_of(browser, class_url), "environment_id": lab},
        allow_redirects=False,
    )
    assert picked.status_code == 400 and "retired" in picked.text

    assert runner.invoke(main, ["env", "retire", "default"]).exit_code == 1
    assert runner.invoke(main, ["env", "retire", "nowhere"]).exit_code == 1
    restored = runner.invoke(main, ["env", "restore", "old-lab"])
    assert restored.exit_code == 0, restored.output
    _environments.clear()
    with requests.Session() as newcomer:
        back = platform.launch(newcomer, tool.url, platform.learner(sub="5")).launch_response
        assert machine_id_of(back) != held
    with rt.sessions() as session:
        assert session.get_one(Environment, lab).retired_at is None
        assert session.get_one(Activity, int(activity_id)).environment_id == lab
