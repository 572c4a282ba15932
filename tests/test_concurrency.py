"""Concurrent launches never share a machine, and a student never gets two."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests
from sqlalchemy import func, select

from config.db import transaction
from lti_tool.launches import default_environment
from provisioning.models import Machine, MachineState
from tests.conftest import count_rows


def _warm_machines(rt, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Ready, unowned machines, as the reconciler leaves them in a warm pool."""
    with transaction(rt.sessions) as session:
        env = default_environment(session)
        machines = [
            Machine(
                environment_id=env.id,
                backend="local",
                state=MachineState.ready,
                address=f"127.0.0.1:{20000 + i}",
                ide_token=f"t{i}",
            )
            for i in range(n)
        ]
        session.add_all(machines)
        session.flush()
        return [m.id for m in machines]


def _launch(platform, tool, sub: str) -> int:  # type: ignore[no-untyped-def]
    with requests.Session() as browser:
        response = platform.launch(browser, tool.url, platform.learner(sub=sub)).launch_response
    assert response.status_code == 303, response.text[:300]
    return int(response.headers["Location"].rsplit("/", 1)[1])


def test_concurrent_launches_claim_distinct_warm_machines(tool, platform, rt):
    warm = _warm_machines(rt, 12)
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(lambda i: _launch(platform, tool, f"s{i}"), range(12)))
    assert len(set(got)) == 12
    assert set(got) == set(warm)  # every launch claimed a warm one; none had to wait
    with rt.sessions() as session:
        owners = session.scalars(select(Machine.owner_id)).all()
        states = set(session.scalars(select(Machine.state)).all())
    assert len(set(owners)) == 12 and states == {MachineState.assigned}


def test_more_students_than_warm_machines_get_new_ones_without_sharing(tool, platform, rt):
    warm = _warm_machines(rt, 4)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda i: _launch(platform, tool, f"t{i}"), range(8)))
    assert len(set(got)) == 8
    assert set(warm) <= set(got)
    with rt.sessions() as session:
        requested = session.scalar(
            select(func.count()).where(Machine.state == MachineState.requested)
        )
    assert requested == 4


def test_one_student_launching_many_times_at_once_gets_one_machine(tool, platform, rt):
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda _: _launch(platform, tool, "same"), range(8)))
    assert len(set(got)) == 1
    assert count_rows(rt)["machines"] == 1
    assert count_rows(rt)["launches"] == 8
