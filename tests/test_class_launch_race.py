"""A class launching on a warm pool while the reconciler passes (PostgreSQL only): a launch
that commits in the middle of a pass makes the pass neither request a machine nor, on the
next pass, stop a ready one; every student gets one of the machines warmed for the class.

Under READ COMMITTED every statement of the pass saw its own snapshot: the students still
waiting (the schedule's demand) were read before a launch committed and the warm machines
after, so the pass counted that student as waiting and their machine as taken, requested
one machine too many, and the next pass stopped a ready one as surplus while the class was
still launching (the soak test's "cold" machines). SQLite cannot show it: a pass's
transaction starts with BEGIN IMMEDIATE, so no launch commits in the middle of it.
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, time

import pytest
import requests
from sqlalchemy import select, update

import provisioning.reconciler
from config.db import transaction
from lti_tool.models import Activity
from lti_tool.services.nrps import sync_course
from provisioning.models import ClassSession, Machine
from provisioning.reconciler import reconcile_pool
from tests.test_fleet import crt, make_pool, states  # noqa: F401  (crt: fixture)

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("LABPOOL_TEST_DATABASE_URL"),
        reason="needs PostgreSQL (LABPOOL_TEST_DATABASE_URL): SQLite serialises the pass "
        "and the launches",
    ),
    pytest.mark.fake_cloud(boot_time=0.1, max_instances=20, ide="stub"),
]

CLASS_SIZE = 4
IN_CLASS = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)  # a Monday, half an hour into class


def _class_on_pool(tool, platform, rt, env_id: int, context: str) -> list[str]:  # type: ignore[no-untyped-def]
    """A course whose activity uses the pool, its roster synced from Moodle, and its class on
    Mondays 12:00–13:00 UTC. Returns the students' subs."""
    platform.tool_jwks_url = f"{tool.url}/lti/jwks.json"
    subs = [f"{context}-s{i}" for i in range(CLASS_SIZE)]
    platform.set_roster(
        context,
        [platform.member(f"{context}-t", role="Instructor")] + [platform.member(s) for s in subs],
    )
    with requests.Session() as teacher:
        answer = platform.launch(
            teacher, tool.url, platform.instructor(sub=f"{context}-t", context_id=context)
        ).launch_response
    assert answer.status_code == 303, answer.text[:300]
    activity_id = int(answer.headers["Location"].split("/activities/")[1].split("/")[0])
    with transaction(rt.sessions) as session:
        session.execute(
            update(Activity).where(Activity.id == activity_id).values(environment_id=env_id)
        )
        session.add(
            ClassSession(
                activity_id=activity_id,
                weekday=IN_CLASS.weekday(),
                starts=time(12),
                ends=time(13),
                timezone="UTC",
                lead_minutes=15,
            )
        )
        course_id = session.get_one(Activity, activity_id).course_id
    sync_course(rt, course_id)
    return subs


def _launch(platform, tool, sub: str, context: str) -> int:  # type: ignore[no-untyped-def]
    with requests.Session() as browser:
        response = platform.launch(
            browser, tool.url, platform.learner(sub=sub, context_id=context)
        ).launch_response
    assert response.status_code == 303, response.text[:300]
    return int(response.headers["Location"].rsplit("/", 1)[1])


def test_a_launch_amid_a_pass_makes_it_add_or_stop_no_machine(tool, platform, crt, monkeypatch):  # type: ignore[no-untyped-def]  # noqa: F811
    rt = crt
    env_id, pool_id = make_pool(rt, warm=0, max_size=CLASS_SIZE + 4)
    subs = _class_on_pool(tool, platform, rt, env_id, "race")
    for _ in range(50):  # the schedule warms the pool for the class
        reconcile_pool(rt, pool_id, clock=IN_CLASS)
        if states(rt, env_id) == {"ready": CLASS_SIZE}:
            break
    assert states(rt, env_id) == {"ready": CLASS_SIZE}
    with rt.sessions() as session:
        warm = set(session.scalars(select(Machine.id).where(Machine.environment_id == env_id)))

    # The first student's launch commits right after the pass has read who is still waiting.
    got: list[int] = []
    read_demand = provisioning.reconciler.scheduled_demand

    def demand_then_a_launch(*args, **kwargs):  # type: ignore[no-untyped-def]
        demand = read_demand(*args, **kwargs)
        if not got:  # the launch runs in another thread, as it would in a web worker
            launch = threading.Thread(
                target=lambda: got.append(_launch(platform, tool, subs[0], "race"))
            )
            launch.start()
            launch.join(30)
        return demand

    with monkeypatch.context() as patch:
        patch.setattr(provisioning.reconciler, "scheduled_demand", demand_then_a_launch)
        report = reconcile_pool(rt, pool_id, clock=IN_CLASS)
    assert got and got[0] in warm
    assert report.warm_requested == 0, "the pass counted the launching student twice"

    reconcile_pool(rt, pool_id, clock=IN_CLASS)  # the next pass finds nothing to stop
    assert states(rt, env_id, owned=False) == {"ready": CLASS_SIZE - 1}
    got += [_launch(platform, tool, sub, "race") for sub in subs[1:]]
    assert set(got) == warm  # every student on a machine warmed for the class
