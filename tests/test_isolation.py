"""Students are kept apart from each other and from the tool (single-server mode).

Real JupyterLab machines of the `local` backend, in their sandboxes, as `labpool run` starts
them behind nginx (IDE on a unix socket). From inside student A's kernel, driven over the
kernel WebSocket the way a browser would, every escape a hostile notebook would try: another
student's home, the database, the secret key and data folder, the tool's processes and their
environment, PostgreSQL and Redis, the tool's virtualenv, a fork bomb, memory past the limit.
Each must fail, and the tool must keep serving.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pwd
import socket
import sys
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import websocket

from config.runtime import Runtime
from provisioning.backends.base import MachineSpec
from provisioning.backends.local import LocalBackend
from provisioning.ide_http import TOKEN_HEADER, _UnixConnection
from provisioning.sandbox import Limits
from tests.test_proxy import execute

pytestmark = pytest.mark.sandbox  # root, bubblewrap, prlimit: conftest.py's rule

ALICE, BOB = 910001, 910002
LIMITS = Limits(memory_mb=1024, processes=96, open_files=256, file_size_mb=64)


@dataclasses.dataclass
class Running:
    backend: LocalBackend
    spec: MachineSpec

    @property
    def socket_path(self) -> str:
        assert self.spec.address and self.spec.address.startswith("unix:")
        return self.spec.address.removeprefix("unix:")

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, list[str]]:
        conn = _UnixConnection(self.socket_path, timeout=30)
        try:
            conn.request(
                method,
                f"/ide/{self.spec.id}/{path}",
                body=json.dumps(body) if body is not None else None,
                headers={
                    TOKEN_HEADER: self.spec.ide_token or "",
                    "Host": "127.0.0.1",
                    **(headers or {}),
                },
            )
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.headers.get_all("Set-Cookie") or []
        finally:
            conn.close()

    def kernel(self) -> websocket.WebSocket:
        """A new kernel, and a WebSocket to it, as JupyterLab's page gets them through the
        proxy: the token in the proxy's header, Jupyter's XSRF cookie echoed."""
        status, _, cookies = self.request("GET", "lab")
        assert status == 200
        jar = SimpleCookie()
        for raw in cookies:
            jar.load(raw)
        xsrf = jar["_xsrf"].value
        status, body, _ = self.request(
            "POST",
            "api/kernels",
            {"name": "python3"},
            headers={
                "Cookie": f"_xsrf={xsrf}",
                "X-XSRFToken": xsrf,
                "Content-Type": "application/json",
            },
        )
        assert status == 201, body
        kernel_id = json.loads(body)["id"]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.socket_path)
        return websocket.create_connection(
            f"ws://127.0.0.1/ide/{self.spec.id}/api/kernels/{kernel_id}/channels",
            socket=sock,
            header=[f"{TOKEN_HEADER}: {self.spec.ide_token}"],
            timeout=60,
        )


def start(backend: LocalBackend, machine_id: int, owner_id: int, course_id: int = 1) -> Running:
    spec = MachineSpec(
        id=machine_id, ide_kind="jupyterlab", owner_id=owner_id, course_id=course_id, limits=LIMITS
    )
    started = backend.start(spec)
    spec = dataclasses.replace(
        spec, ref=started.ref, address=started.address, ide_token=started.ide_token
    )
    deadline = time.monotonic() + 60
    while not backend.health(spec):
        log = backend.machine_dir(machine_id) / "ide.log"
        assert backend.poll(spec), f"the IDE exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "JupyterLab did not answer in 60 s"
        time.sleep(0.2)
    return Running(backend, spec)


@pytest.fixture(scope="module")
def machines(rt: Runtime, tool) -> Iterator[tuple[Running, Running]]:  # noqa: ANN001
    settings = dataclasses.replace(rt.settings, ide_proxy=True)
    backend = LocalBackend(settings.data_dir, settings=settings)
    base = 700000 + os.getpid() % 10000 * 10
    alice = start(backend, base + 1, ALICE)
    bob = start(backend, base + 2, BOB)
    try:
        yield alice, bob
    finally:
        backend.stop(alice.spec)
        backend.stop(bob.spec)


@pytest.fixture(scope="module")
def alice_kernel(machines: tuple[Running, Running]) -> Iterator[websocket.WebSocket]:
    ws = machines[0].kernel()
    yield ws
    ws.close()


def run(ws: websocket.WebSocket, code: str) -> object:
    """Run `code` in the kernel; its last line must evaluate to a JSON-able value."""
    *body, last = code.strip().splitlines()
    result = execute(ws, "\n".join([*body, f"import json as _j; _j.dumps({last})"]))
    return json.loads(ast.literal_eval(result["result"]))


ATTEMPT = """
def attempt(f):
    try:
        return "allowed: " + repr(f())[:200]
    except BaseException as exc:
        return "refused: " + type(exc).__name__
"""


def test_the_ide_runs_as_the_students_own_user_in_its_own_namespaces(machines, alice_kernel):
    alice, _ = machines
    ide_env = alice.backend.ide_env
    seen = run(
        alice_kernel,
        f"""
import os
[os.getuid(), os.getcwd(), sorted(os.listdir("/")), sorted(os.listdir("/proc"))[:50], sorted(os.listdir({str(ide_env.parent)!r}))]
""",
    )
    uid, cwd, top, procs, beside_ide_env = seen  # type: ignore[misc]
    assert uid == pwd.getpwnam(f"lp-{ALICE}").pw_uid != 0
    assert cwd == "/home/student"
    # The system and its own folders; nothing of the tool's (/root, /srv, /var/lib, …): of
    # the folder holding the IDE's environment, only that environment.
    assert "root" not in top and "srv" not in top
    assert beside_ide_env == [ide_env.name]
    # Its own PID namespace: a handful of processes (bwrap's init, JupyterLab, this kernel),
    # none of the host's.
    pids = [int(p) for p in procs if p.isdigit()]
    assert 2 <= len(pids) < 10 and max(pids) < 100


def test_a_notebook_cannot_reach_another_student_or_the_tool(machines, alice_kernel, rt, tool):
    alice, bob = machines
    bob_home = bob.backend.home_folder(bob.spec)
    (bob_home / "answers.py").write_text("secret = 42\n")
    data = rt.settings.data_dir.resolve()
    tool_venv = Path(sys.prefix)
    redis_url = urlsplit(rt.settings.effective_redis_url)
    db_url = urlsplit(rt.settings.database_url.replace("+psycopg", ""))
    checks = {
        "bob's home": f"open({str(bob_home / 'answers.py')!r}).read()",
        "bob's home by listing": f"os.listdir({str(bob_home.parent)!r})",
        "the data folder": f"os.listdir({str(data)!r})",
        "the database file": f"open({str(data / 'labpool.db')!r}, 'rb').read(16)",
        "the secret key": f"open({str(data / 'secret_key')!r}).read()",
        "the tool's environ": f"open('/proc/{os.getpid()}/environ', 'rb').read()",
        "signal the tool": f"os.kill({os.getpid()}, 15)",
        "signal bob's IDE": f"os.kill({bob.spec.ref['pid']}, 9)",
        "write into the tool's virtualenv": f"open({str(tool_venv / 'lib' / 'evil.pth')!r}, 'w').write('x')",
        "write into the IDE's environment": f"open({str(alice.backend.ide_env / 'lib' / 'evil.pth')!r}, 'w').write('x')",
        "postgres on loopback": "socket.create_connection(('127.0.0.1', 5432), timeout=2)",
        "redis": (
            f"socket.socket(socket.AF_UNIX).connect({redis_url.path!r})"
            if redis_url.scheme == "unix"
            else f"socket.create_connection(({redis_url.hostname!r}, {redis_url.port or 6379}), timeout=2)"
        ),
        "the database server": (
            f"socket.create_connection(({db_url.hostname or '127.0.0.1'!r}, {db_url.port or 5432}), timeout=2)"
            if db_url.scheme.startswith("postgresql")
            else "open('/nonexistent')"
        ),
        "the tool's web server": f"socket.create_connection(('127.0.0.1', {tool.port}), timeout=2)",
        "root's home": "os.listdir('/root')",
    }
    code = (
        "import os, socket\n"
        + ATTEMPT
        + "{"
        + ", ".join(f"{name!r}: attempt(lambda: {expr})" for name, expr in checks.items())
        + "}"
    )
    results = run(alice_kernel, code)
    print(json.dumps(results, indent=1))  # what stopped each attempt, for the record
    allowed = {
        name: outcome
        for name, outcome in results.items()  # type: ignore[union-attr]
        if not outcome.startswith("refused")
    }
    assert not allowed, allowed
    # Nothing happened to the tool, to Bob, or to the tool's files.
    assert requests.get(tool.url + "/healthz", timeout=5).ok
    assert bob.backend.health(bob.spec)
    assert not (tool_venv / "lib" / "evil.pth").exists()


def test_limits_hold_and_the_tool_keeps_serving(machines, tool):
    alice, bob = machines
    ws = alice.kernel()
    try:
        memory = run(ws, ATTEMPT + "attempt(lambda: len(bytearray(1536 * 1024 * 1024)))")
        assert memory == "refused: MemoryError"
        bomb = run(
            ws,
            """
import os, time
children, refused = [], None
for _ in range(500):
    try:
        pid = os.fork()
    except OSError as exc:
        refused = exc.errno
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
[len(children), refused]
""",
        )
        started, errno = bomb  # type: ignore[misc]
        assert errno == 11 and started < LIMITS.processes  # EAGAIN at the student's limit
        big = run(
            ws,
            ATTEMPT
            + "attempt(lambda: open('/home/student/big', 'wb').write(b'x' * 100 * 1024 * 1024))",
        )
        assert big.startswith("refused")  # type: ignore[union-attr]
    finally:
        ws.close()
    assert requests.get(tool.url + "/healthz", timeout=5).ok
    assert bob.backend.health(bob.spec) and alice.backend.health(alice.spec)


def test_files_persist_across_a_stop_and_a_start_and_belong_to_the_student(machines):
    alice, _ = machines
    backend = alice.backend
    first = start(backend, alice.spec.id + 5, ALICE, course_id=7)
    try:
        ws = first.kernel()
        run(ws, "open('/home/student/notes.txt', 'w').write('kept')\n1")
        ws.close()
    finally:
        backend.stop(first.spec)
    assert not backend.poll(first.spec)
    home = backend.home_folder(first.spec)
    on_host = home / "notes.txt"
    assert on_host.read_text() == "kept"
    assert on_host.stat().st_uid == pwd.getpwnam(f"lp-{ALICE}").pw_uid
    assert home.stat().st_mode & 0o777 == 0o700

    again = start(backend, alice.spec.id + 6, ALICE, course_id=7)
    try:
        ws = again.kernel()
        assert run(ws, "open('/home/student/notes.txt').read()") == "kept"
        ws.close()
    finally:
        backend.stop(again.spec)


def test_nothing_of_a_sandbox_outlives_its_recorded_process(machines):
    """The worst case for stop(): the machine's recorded process is killed outright (OOM,
    an admin's kill -9). Everything of its sandbox, the student's own processes included,
    must go with it rather than run on unseen."""
    import psutil

    backend = machines[0].backend
    owner = 910009
    running = start(backend, machines[0].spec.id + 9, owner)
    ws = running.kernel()
    run(ws, "import subprocess\nsubprocess.Popen(['sleep', '600'], start_new_session=True)\n1")
    ws.close()
    uid = pwd.getpwnam(f"lp-{owner}").pw_uid

    def alive() -> list[str]:
        return [
            p.info["name"]
            for p in psutil.process_iter(["name", "uids", "status"])
            if p.info["uids"]
            and p.info["uids"].real == uid
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ]

    assert "sleep" in alive()
    os.killpg(running.spec.ref["pid"], 9)
    deadline = time.monotonic() + 10
    while alive():
        assert time.monotonic() < deadline, alive()
        time.sleep(0.2)
    assert not backend.poll(running.spec)
    backend.stop(running.spec)  # and stopping what is already gone is fine
