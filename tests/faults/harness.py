"""The fault suite's harness: a class-start burst, the real processes behind it, and the one
convergence check every scenario ends with.

`Fleet` runs `labpool worker` and `labpool cron` as subprocesses (each in its own session,
so a SIGKILL of its process group kills exactly it) with the settings a production fleet
has, shortened: passes every second, orphans deleted after a short grace. `ClassStart`
launches the students through the fake platform and plays their browsers (each polls its
status page, as the page does; a student whose machine failed opens the activity again).
`problems()` lists what is not converged yet; `wait_converged()` measures how long after
the fault ended it took.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import select

from config.runtime import Runtime
from lti_tool.models import User
from provisioning.models import LIVE_STATES, Machine, MachineState, StudentVolume
from tests.test_fleet import PROXY, live_servers, make_pool, use_environment

S = MachineState
WORKER = [sys.executable, "-m", "lti_tool.cli", "worker"]
CRON = [sys.executable, "-m", "lti_tool.cli", "cron"]


class Fleet:
    """The real processes: workers and the cron, started and killed by this test only."""

    def __init__(self, logs: Path, **settings: str) -> None:
        self.logs = logs
        self.env = {
            **os.environ,
            "LABPOOL_PROXY_ADDRESSES": PROXY,
            "LABPOOL_RECONCILE_INTERVAL_S": "1",
            "LABPOOL_ORPHAN_GRACE_S": "5",
            "LABPOOL_CLOUD_START_TIMEOUT_S": "120",  # above CREATE_GRACE (60 s), as in production
            **settings,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._n = 0

    def start(self, kind: str = "worker", *args: str) -> str:
        self._n += 1
        name = f"{kind}-{self._n}"
        argv = {"worker": WORKER, "cron": CRON}[kind] + list(args)
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return name

    def kill(self, name: str) -> None:
        """SIGKILL, no warning: the process and anything it started."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            self.procs.pop(name)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


@dataclass
class Student:
    sub: str
    browser: requests.Session
    machine_id: int | None = None
    relaunches: int = 0


@dataclass
class ClassStart:
    """A class of `n` students launching one activity on a cloud pool."""

    rt: Runtime
    tool: Any
    platform: Any
    cloud: Any
    n: int = 20
    warm: int = 4
    env_id: int = 0
    pool_id: int = 0
    students: list[Student] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _pollers: list[threading.Thread] = field(default_factory=list)

    def prepare(self) -> ClassStart:
        """The pool, and the teacher's first launch (which makes the activity)."""
        self.env_id, self.pool_id = make_pool(self.rt, warm=self.warm, max_size=self.n + 20)
        with requests.Session() as teacher:
            answer = self.platform.launch(
                teacher, self.tool.url, self.platform.instructor(sub="1")
            ).launch_response
            assert answer.status_code == 303, answer.text[:300]
        use_environment(self.rt, self.env_id)
        return self

    def launch(self, student: Student) -> None:
        answer = self.platform.launch(
            student.browser, self.tool.url, self.platform.learner(sub=student.sub)
        ).launch_response
        assert answer.status_code == 303, answer.text[:300]
        student.machine_id = int(answer.headers["Location"].rsplit("/", 1)[1])

    def burst(self, first: int = 0, count: int | None = None, threads: int = 4) -> None:
        """Students launch, `threads` at a time; each then keeps their status page open."""
        count = self.n - first if count is None else count
        new = [Student(f"s{i}", requests.Session()) for i in range(first, first + count)]
        self.students.extend(new)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(self.launch, new))
        poller = threading.Thread(target=self._poll, args=(new,), daemon=True)
        poller.start()
        self._pollers.append(poller)

    def _poll(self, students: list[Student]) -> None:
        """The open status pages: each asks its machine's state every second or so (which
        nudges a stale start); a failed machine is opened again from the course."""
        while not self._stop.wait(1.0):
            for student in students:
                if self._stop.is_set():
                    return
                try:
                    state = student.browser.get(
                        f"{self.tool.url}/machines/{student.machine_id}/state", timeout=10
                    ).json()
                    if state["state"] in ("error", "stopped") and not state.get("next_url"):
                        student.relaunches += 1
                        self.launch(student)
                    elif state.get("next_url"):
                        student.machine_id = int(state["next_url"].rsplit("/", 1)[1])
                except Exception:  # the tool may be the thing that is failing
                    continue

    def stop(self) -> None:
        self._stop.set()
        for poller in self._pollers:
            poller.join(15)
        for student in self.students:
            student.browser.close()

    # ------------------------------------------------------------------ convergence

    def problems(self) -> list[str]:
        """What keeps the class from being converged; empty when it is."""
        found: list[str] = []
        with self.rt.sessions() as session:
            machines = session.execute(
                select(Machine.id, Machine.state, Machine.owner_id, Machine.address)
                .where(Machine.environment_id == self.env_id)
                .where(Machine.state.in_(LIVE_STATES))
            ).all()
            volumes = session.execute(
                select(StudentVolume.owner_id, StudentVolume.volume_id, StudentVolume.status)
            ).all()
            owner_of = dict(session.execute(select(User.sub, User.id)).all())
        live_by_owner = Counter(m.owner_id for m in machines if m.owner_id is not None)
        by_id = {m.id: m for m in machines}
        for student in self.students:
            uid = owner_of.get(student.sub)
            mine = [m for m in machines if uid is not None and m.owner_id == uid]
            if len(mine) != 1:
                found.append(f"{student.sub}: {len(mine)} live machines")
                continue
            machine = mine[0]
            if machine.state is not S.assigned or not machine.address:
                found.append(f"{student.sub}: machine {machine.id} {machine.state.value}")
        dupes = [uid for uid, n in live_by_owner.items() if n > 1]
        if dupes:
            found.append(f"users with more than one live machine: {dupes}")

        servers = live_servers(self.cloud)
        tags = Counter(
            int(tag.removeprefix("machine-"))
            for server in servers
            for tag in server["tags"]
            if tag.startswith("machine-")
        )
        for machine_id, n in tags.items():
            if n > 1:
                found.append(f"machine {machine_id} has {n} servers")
            if machine_id not in by_id:
                found.append(f"orphan server of machine {machine_id}")
        for server in servers:
            if server["status"] != "ACTIVE":
                found.append(f"server {server['id']} is {server['status']}")
        for machine in machines:
            if machine.state in (S.ready, S.assigned) and tags.get(machine.id) != 1:
                found.append(f"machine {machine.id} ({machine.state.value}) has no server")

        known = {v.volume_id for v in volumes}
        per_owner = Counter(v.owner_id for v in volumes)
        for volume in self.cloud.volumes():
            if volume["id"] not in known:
                found.append(f"orphan volume {volume['id']}")
        found += [f"user {u} has {n} volumes" for u, n in per_owner.items() if n > 1]
        in_use = {v.owner_id for v in volumes if v.status == "in-use"}
        for student in self.students:
            if owner_of.get(student.sub) not in in_use:
                found.append(f"{student.sub}: volume not attached")
        return found

    def ides_answer(self) -> list[str]:
        """Every student's IDE answers with its machine's token (only checked once
        converged: a request per student)."""
        wrong = []
        with self.rt.sessions() as session:
            rows = session.execute(
                select(Machine.id, Machine.address, Machine.ide_token).where(
                    Machine.environment_id == self.env_id, Machine.state == S.assigned
                )
            ).all()
        for row in rows:
            try:
                status = requests.get(
                    f"http://{row.address}/ide/{row.id}/api/status",
                    headers={"Authorization": f"token {row.ide_token}"},
                    timeout=5,
                ).status_code
            except requests.RequestException as exc:
                status = str(exc)  # type: ignore[assignment]
            if status != 200:
                wrong.append(f"machine {row.id}: IDE answered {status}")
        return wrong

    def wait_converged(self, fleet: Fleet, within: float, since: float | None = None) -> float:
        """Seconds from `since` (the fault's end; default now) until converged; fails with
        what is still wrong if that takes longer than `within`."""
        since = time.monotonic() if since is None else since
        left: list[str] = []
        while time.monotonic() - since < within:
            left = self.problems()
            if not left:
                took = time.monotonic() - since
                wrong = self.ides_answer()
                assert not wrong, wrong
                return took
            time.sleep(0.25)
        raise AssertionError(
            f"not converged {within:.0f} s after the fault: {left[:12]}\n{fleet.log_tail()}"
        )
