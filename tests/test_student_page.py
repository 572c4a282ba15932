"""The student's page (issue 13, item 4): it names the activity and the course, says the
state in words with the usual wait, points at the new machine after a teacher's reset, and
offers "start it again" after a stop without going back to Moodle — to the student only, and
only while they are in the course."""

from __future__ import annotations

import html
import re

import requests
from sqlalchemy import select, update

from config.db import transaction
from lti_tool.models import Enrolment, Launch
from provisioning.models import Machine, MachineState
from tests.test_class_aware import csrf_of, teacher_launch
from tests.test_launch import machine_id_of

S = MachineState


def student_launch(platform, tool, browser, sub="4"):  # type: ignore[no-untyped-def]
    return machine_id_of(
        platform.launch(browser, tool.url, platform.learner(sub=sub)).launch_response
    )


def page_csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]*)"', page).group(1)


def stop(rt, machine_id: int) -> None:  # type: ignore[no-untyped-def]
    with transaction(rt.sessions) as session:
        session.execute(update(Machine).where(Machine.id == machine_id).values(state=S.stopped))


def test_the_page_names_the_activity_and_course_and_says_the_state_in_words(tool, platform, rt):
    with requests.Session() as student:
        machine = student_launch(platform, tool, student)
        page = html.unescape(student.get(f"{tool.url}/machines/{machine}").text)
        assert "<title>LTI 1.3 Test Activity · Labpool</title>" in page
        assert "LTI 1.3 Test Course" in page
        assert ">waiting<" in page  # the state in words, not "requested"
        state = student.get(f"{tool.url}/machines/{machine}/state").json()
        assert state["words"] == "waiting" and "next_url" not in state


def test_usual_wait_is_the_median_of_recent_starts(tool, platform, rt):
    from datetime import timedelta

    with requests.Session() as student:
        machine = student_launch(platform, tool, student)
        with transaction(rt.sessions) as session:
            env = session.get_one(Machine, machine).environment_id
            for i, seconds in enumerate((3, 5, 40)):
                created = session.get_one(Machine, machine).created_at - timedelta(hours=i + 1)
                session.add(
                    Machine(
                        environment_id=env,
                        backend="local",
                        state=S.stopped,
                        created_at=created,
                        assigned_at=created + timedelta(seconds=seconds),
                    )
                )
        page = student.get(f"{tool.url}/machines/{machine}").text
    assert "usually ready about 5 s after" in page


def test_start_again_after_a_stop_gives_a_new_machine_of_the_activity(tool, platform, rt):
    with requests.Session() as student:
        old = student_launch(platform, tool, student)
        stop(rt, old)
        page = student.get(f"{tool.url}/machines/{old}").text
        assert "Start it again" in page
        again = student.post(
            f"{tool.url}/machines/{old}/again",
            data={"csrf": page_csrf(page)},
            allow_redirects=False,
        )
        new = machine_id_of(again)
        assert new != old
        with rt.sessions() as session:
            machine = session.get_one(Machine, new)
            assert machine.state is S.requested and machine.owner_id is not None
            launch = session.scalars(select(Launch).where(Launch.machine_id == new)).one()
            assert launch.roles and all("Learner" in r for r in launch.roles)
        # The new machine's page names the activity too.
        assert "LTI 1.3 Test Activity" in student.get(f"{tool.url}/machines/{new}").text
        # Pressed twice (a stale tab): the live machine, not a third.
        twice = student.post(
            f"{tool.url}/machines/{old}/again",
            data={"csrf": page_csrf(page)},
            allow_redirects=False,
        )
        assert machine_id_of(twice) == new


def test_start_again_is_refused_to_others_without_csrf_and_after_leaving(tool, platform, rt):
    with requests.Session() as student, requests.Session() as other:
        old = student_launch(platform, tool, student)
        student_launch(platform, tool, other, sub="5")
        stop(rt, old)
        csrf = page_csrf(student.get(f"{tool.url}/machines/{old}").text)

        def machines() -> int:
            with rt.sessions() as session:
                return len(session.scalars(select(Machine.id)).all())

        before = machines()
        url = f"{tool.url}/machines/{old}/again"
        other_csrf = page_csrf(other.get(f"{tool.url}/machines/{old + 1}").text)
        assert other.post(url, data={"csrf": other_csrf}).status_code == 403
        assert student.post(url, data={"csrf": "forged"}).status_code == 403
        with transaction(rt.sessions) as session:
            session.execute(update(Enrolment).values(ended_at=Enrolment.started_at))
        refused = student.post(url, data={"csrf": csrf})
        assert refused.status_code == 403 and "no longer listed" in refused.text
        assert machines() == before


def test_after_a_reset_the_old_page_points_at_the_new_machine(tool, platform, rt, browser):
    with requests.Session() as student:
        old = student_launch(platform, tool, student)
        class_url = teacher_launch(platform, tool, browser)
        activity_id = class_url.split("/activities/")[1].split("/")[0]
        reset = browser.post(
            f"{tool.url}/activities/{activity_id}/machines/{old}/reset",
            data={"csrf": csrf_of(browser, class_url)},
            allow_redirects=False,
        )
        assert reset.status_code == 303
        state = student.get(f"{tool.url}/machines/{old}/state").json()
        with rt.sessions() as session:
            new = session.scalars(
                select(Machine.id).where(Machine.id != old, Machine.state == S.requested)
            ).one()
        assert state["next_url"] == f"/machines/{new}"
        assert state["words"] in ("stopping — files kept", "stopped — files kept")
