"""A launch from a fake Moodle ends in the student's own, live JupyterLab."""

from __future__ import annotations

import json
import time

import requests
from sqlalchemy import select

from provisioning.models import Machine, MachineState
from tests.conftest import count_rows, run_worker_burst


def machine_id_of(response: requests.Response) -> int:
    assert response.status_code == 303, response.text[:500]
    location = response.headers["Location"]
    assert "/machines/" in location, location
    return int(location.rstrip("/").split("/machines/")[1])


def wait_for_state(browser, tool, machine_id, wanted, timeout=60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = browser.get(f"{tool.url}/machines/{machine_id}/state").json()
        if state["state"] == wanted:
            return state
        time.sleep(0.2)
    raise AssertionError(f"machine {machine_id} never became {wanted}: {state}")


def test_learner_launch_ends_at_a_jupyterlab_that_answers(tool, platform, rt, browser):
    result = platform.launch(browser, tool.url, platform.learner(sub="4"))
    machine_id = machine_id_of(result.launch_response)

    status_page = browser.get(f"{tool.url}/machines/{machine_id}")
    assert status_page.status_code == 200
    assert "LTI 1.3 Test Activity" in status_page.text  # the activity, named
    assert browser.get(f"{tool.url}/machines/{machine_id}/state").json()["state"] == "requested"

    run_worker_burst(rt.settings)
    state = wait_for_state(browser, tool, machine_id, "assigned")
    assert state["ready"] is True

    ide = browser.get(f"{tool.url}{state['open_url']}", allow_redirects=False)
    assert ide.status_code == 303
    lab = browser.get(ide.headers["Location"])
    assert lab.status_code == 200
    assert "JupyterLab" in lab.text
    # No news pop-up and no nbgrader teacher panels in a class's JupyterLab.
    config = json.loads(
        lab.text.split('id="jupyter-config-data" type="application/json">')[1].split("</script>")[0]
    )
    assert "@jupyterlab/apputils-extension:announcements" in config["disabledExtensions"]
    assert "@jupyter/nbgrader:create-assignment" in config["disabledExtensions"]
    assert config["token"] == ""
    assert config["appName"] == "LTI 1.3 Test Activity · Labpool"  # the tab names the activity

    # The IDE is real: a file written through Jupyter's API lands in the student's home.
    with rt.sessions() as session:
        machine = session.get(Machine, machine_id)
        address, token = machine.address, machine.ide_token
    put = requests.put(
        f"http://{address}/ide/{machine_id}/api/contents/hello.txt",
        json={"type": "file", "format": "text", "content": "hi"},
        params={"token": token},  # direct mode: the token logs a client in, like the hand-over
        timeout=10,
    )
    assert put.status_code in (200, 201), put.text
    homes = list((rt.settings.data_dir / "homes").glob("course-*/user-*/hello.txt"))
    assert [p.read_text() for p in homes] == ["hi"]


def test_second_launch_reuses_the_same_machine(tool, platform, rt, browser):
    first = machine_id_of(
        platform.launch(browser, tool.url, platform.learner(sub="4")).launch_response
    )
    second = machine_id_of(
        platform.launch(browser, tool.url, platform.learner(sub="4")).launch_response
    )
    assert first == second
    assert count_rows(rt)["machines"] == 1
    assert count_rows(rt)["launches"] == 2


def test_another_student_gets_another_machine(tool, platform, rt, browser):
    mine = machine_id_of(
        platform.launch(browser, tool.url, platform.learner(sub="4")).launch_response
    )
    with requests.Session() as other_browser:
        theirs = machine_id_of(
            platform.launch(other_browser, tool.url, platform.learner(sub="5")).launch_response
        )
        assert mine != theirs
        # ...and cannot look at mine.
        assert other_browser.get(f"{tool.url}/machines/{mine}/state").status_code == 403
    with rt.sessions() as session:
        owners = session.scalars(select(Machine.owner_id)).all()
    assert len(set(owners)) == 2


def test_instructor_launch_shows_the_class_page(tool, platform, rt, browser):
    student = requests.Session()
    machine_id = machine_id_of(
        platform.launch(student, tool.url, platform.learner(sub="4")).launch_response
    )

    result = platform.launch(browser, tool.url, platform.instructor(sub="3"))
    assert result.launch_response.status_code == 303
    class_url = tool.url + result.launch_response.headers["Location"]
    page = browser.get(class_url)
    assert page.status_code == 200
    roster = browser.get(class_url + ".json").json()["roster"]
    students = [r for r in roster if r["role"] == "student"]
    assert [r["machine"] for r in students] == [machine_id]
    assert students[0]["state"] == MachineState.requested.value
    assert students[0]["storage"] == "home folder"

    # A student cannot see the class page.
    assert student.get(class_url).status_code == 403


def test_platform_registered_with_the_cli_can_launch(tool, rt, browser):
    """An admin's `labpool platform add` is all a new platform needs."""
    from click.testing import CliRunner

    from lti_tool.cli import main
    from tests.fakeplatform import FakePlatform

    with FakePlatform(tool_url=tool.url, key_namespace="second-moodle") as moodle:
        result = CliRunner().invoke(main, moodle.platform_add_argv())
        assert result.exit_code == 0, result.output
        launched = moodle.launch(browser, tool.url, moodle.learner(sub="42"))
    machine_id = machine_id_of(launched.launch_response)
    with rt.sessions() as session:
        assert session.get(Machine, machine_id).state is MachineState.requested


def test_a_start_lost_with_its_worker_is_picked_up_again(tool, platform, rt, browser):
    """The queue loses the job (Redis flushed, worker gone): polling the status finds the
    machine again and a worker starts it."""
    from datetime import timedelta

    from config.db import transaction

    machine_id = machine_id_of(
        platform.launch(browser, tool.url, platform.learner(sub="4")).launch_response
    )
    rt.redis.delete(f"rq:queue:{rt.settings.queue_name}")  # the job is gone
    with transaction(rt.sessions) as session:
        machine = session.get(Machine, machine_id)
        machine.state_changed_at -= timedelta(seconds=30)
    assert browser.get(f"{tool.url}/machines/{machine_id}/state").json()["state"] == "requested"
    run_worker_burst(rt.settings)
    assert wait_for_state(browser, tool, machine_id, "assigned")["ready"] is True
