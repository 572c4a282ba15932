"""The `openstack` backend and its cloud-init user-data, against the fake cloud
(tests/fakecloud) through the real openstacksdk."""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openstack
import pytest
import requests
import yaml

from provisioning.backends.base import MachineSpec
from provisioning.backends.openstack import (
    TOKEN_DIGEST_KEY,
    CloudConflict,
    CloudSpec,
    CloudUnavailable,
    OpenStackBackend,
    QuotaExceeded,
    connection_for,
    forget_connections,
    token_digest,
)
from provisioning.cloud_init import cloud_config, user_data
from provisioning.errors import BackendUnavailable
from tests.fakecloud import NO_VALID_HOST, FakeCloud

BOOT = 0.2
pytestmark = [
    pytest.mark.filterwarnings(f"ignore::openstack.warnings.{name}")
    for name in ("OpenStackDeprecationWarning", "RemovedInSDK50Warning", "RemovedInSDK60Warning")
] + [pytest.mark.fake_cloud(boot_time=BOOT, max_instances=10)]  # for `cloud` (conftest.py)
POOL = 7
TOKEN = "k3y-for-machine-42_" + "x" * 24
DETAIL = ("GET", "/compute/v2.1/servers/detail")
CREATE = ("POST", "/compute/v2.1/servers")
# Nothing of the tool or the cloud account may reach a machine's user-data.
FORBIDDEN = ("LABPOOL_", "OS_", "password", "labpool-secret", "appcred-secret", "/identity")


@pytest.fixture
def backend(cloud: FakeCloud) -> Iterator[OpenStackBackend]:
    with cloud.state.lock:  # Nova looks the group up in Neutron
        cloud.state.add_security_group("labpool-ide")
    spec = CloudSpec(
        image_id="img-1",
        flavor_id="m1.small",
        network_id=cloud.config.network_id,
        security_groups=["labpool-ide"],
        key_name="ops",
    )
    yield OpenStackBackend("fake", spec)
    forget_connections()  # the next test's fake cloud listens on another port


def machine(machine_id: int = 42, pool_id: int = POOL, **changes: Any) -> MachineSpec:
    values: dict[str, Any] = dict(
        id=machine_id,
        ide_kind="jupyterlab",
        owner_id=None,
        course_id=None,
        ref={"pool_id": pool_id},
    )
    values.update(changes)
    return MachineSpec(**values)


def boot(backend: OpenStackBackend, spec: MachineSpec) -> MachineSpec:
    """Create the machine's server as the reconciler does (its token chosen first); the
    spec as the database then records it."""
    spec = dataclasses.replace(spec, ide_token=spec.ide_token or TOKEN)
    server_id = backend.create(spec)
    return dataclasses.replace(spec, ref={**spec.ref, "server_id": server_id})


def wait_for_status(backend: OpenStackBackend, machine_id: int, status: str) -> Any:
    """The machine's server as the pool's list shows it, once it has `status`."""
    deadline = time.monotonic() + 5
    views: list[Any] = []
    while time.monotonic() < deadline:
        views = [v for v in backend.list_pool_servers(POOL) if v.machine_id == machine_id]
        if views and views[0].status == status:
            return views[0]
        time.sleep(0.05)
    raise AssertionError(f"machine {machine_id} never reached {status}: {views}")


def decoded(user_data_b64: str) -> str:
    return base64.b64decode(user_data_b64, validate=True).decode()


# -- cloud-init ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["jupyterlab", "code-server", "terminal"])
def test_user_data_is_a_small_cloud_config_that_starts_the_ide(kind: str) -> None:
    text = decoded(user_data(42, kind, TOKEN, port=8888))
    assert text.startswith("#cloud-config\n") and text == cloud_config(42, kind, TOKEN)
    # Nova allows 64 KiB; small documents boot fast (code-server's carries its guard).
    assert len(text) < (12000 if kind == "code-server" else 4000)
    document = yaml.safe_load(text)
    assert set(document) == {"users", "write_files", "runcmd"}  # no mounts, no packages
    assert document["users"][1] == {
        "name": "student",
        "gecos": "Labpool student",
        "shell": "/bin/bash",
        "lock_passwd": True,
    }
    assert "sudo" not in document["users"][1]
    files = {f["path"]: f for f in document["write_files"]}
    unit = files["/etc/systemd/system/labpool-ide.service"]["content"]
    # The student's volume, attached after boot, becomes their home.
    assert "labpool-home@%k.service" in files["/etc/udev/rules.d/90-labpool-home.rules"]["content"]
    mount = files["/usr/local/sbin/labpool-mount-home"]
    assert mount["permissions"] == "0755" and 'mount "$disk" /home/student' in mount["content"]
    assert "User=student" in unit.splitlines()
    assert document["runcmd"][-1] == "systemctl enable --now labpool-ide.service"
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert TOKEN not in exec_start  # argv is visible to `ps`
    if kind == "code-server":
        # code-server on loopback only; its guard holds the IDE port and the token.
        assert exec_start == "ExecStart=code-server --bind-addr 127.0.0.1:8889 --auth none"
        assert "EnvironmentFile" not in unit
        env = files["/etc/labpool/ide.env"]
        assert env["content"] == f"IDE_GUARD_TOKEN={TOKEN}\n" and env["permissions"] == "0600"
        guard = files["/etc/systemd/system/labpool-ide-guard.service"]["content"].splitlines()
        assert (
            "ExecStart=/usr/bin/python3 /usr/local/lib/labpool/ide_guard.py 0.0.0.0:8888 "
            "127.0.0.1:8889" in guard
        )
        assert {"DynamicUser=yes", "EnvironmentFile=/etc/labpool/ide.env"} <= set(guard)
        assert "systemctl enable --now labpool-ide-guard.service" in document["runcmd"]
    else:
        assert "--ip=0.0.0.0 --port=8888 --no-browser --ServerApp.base_url=/ide/42/" in exec_start
        assert exec_start.startswith(
            "ExecStart=jupyter lab" if kind == "jupyterlab" else "ExecStart=jupyter server"
        )
        env = files["/etc/labpool/ide.env"]
        assert env["content"] == f"JUPYTER_TOKEN={TOKEN}\n" and env["permissions"] == "0600"
        assert "EnvironmentFile=/etc/labpool/ide.env" in unit
    for word in FORBIDDEN:
        assert word.lower() not in text.lower()


def test_user_data_refuses_what_could_break_the_document() -> None:
    with pytest.raises(ValueError, match="unknown IDE kind"):
        user_data(1, "emacs", TOKEN)
    with pytest.raises(ValueError, match="token"):
        user_data(1, "jupyterlab", "abc\nLABPOOL_SECRET_KEY=x" + "y" * 20)
    with pytest.raises(ValueError, match="machine id"):
        user_data(0, "jupyterlab", TOKEN)


# -- create and the pool's list -------------------------------------------------------------
def test_create_boots_one_tagged_server_that_starts_the_ide(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    server_id = backend.create(machine(42, ide_token=TOKEN))
    (server,) = cloud.servers()
    assert server_id == server["id"]
    assert server["name"] == "labpool-m42"
    assert server["tags"] == ["labpool", f"pool-{POOL}", "machine-42"]
    assert server["metadata"] == {"labpool_machine": "42", TOKEN_DIGEST_KEY: token_digest(TOKEN)}
    assert server["networks"] == [{"uuid": cloud.config.network_id}]
    assert server["key_name"] == "ops"
    assert server["security_groups"] == [{"name": "labpool-ide"}]
    text = decoded(server["user_data"])
    assert text.startswith("#cloud-config")
    assert f"JUPYTER_TOKEN={TOKEN}" in text
    for word in (*FORBIDDEN, cloud.url):
        assert word.lower() not in text.lower()
    # The caller has just listed the pool; no floating IP: one compute call.
    assert cloud.count(*DETAIL) == 0 and cloud.count(*CREATE) == 1
    assert not any("floating" in r.path or "network" in r.path for r in cloud.request_log)


def test_the_pool_list_shows_build_then_active_with_the_ide_address(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    boot(backend, machine(42))
    (view,) = backend.list_pool_servers(POOL)
    assert (view.machine_id, view.status, view.address, view.fault) == (42, "BUILD", None, None)
    view = wait_for_status(backend, 42, "ACTIVE")
    host, port = view.address.rsplit(":", 1)
    assert host.startswith("10.0.") and port == "8888" and view.fault is None


def test_a_connection_is_made_once_per_process(cloud: FakeCloud, backend: OpenStackBackend) -> None:
    other = OpenStackBackend("fake", backend.cloud_spec)
    backend.quota_headroom()
    other.quota_headroom()
    assert connection_for("fake") is connection_for("fake")
    assert cloud.count("POST", "/identity/v3/auth/tokens") == 1


@pytest.mark.parametrize("mode", ["502", "reset"])
def test_a_lost_create_answer_is_cloud_unavailable_and_the_server_carries_its_machine(
    cloud: FakeCloud, backend: OpenStackBackend, mode: str
) -> None:
    """The reconciler's next pass finds the server by its tags and adopts it (test_fleet)."""
    cloud.lose_next_create_response(mode)
    with pytest.raises(CloudUnavailable, match="will try again"):
        backend.create(machine(42, ide_token=TOKEN))
    (lost,) = cloud.servers()
    (view,) = backend.list_pool_servers(POOL)
    assert (view.server_id, view.machine_id) == (lost["id"], 42)
    assert lost["metadata"][TOKEN_DIGEST_KEY] == token_digest(TOKEN)


# -- failures -------------------------------------------------------------------------------
def test_a_server_in_error_reports_the_clouds_fault(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    cloud.error_next_create()
    boot(backend, machine(42))
    view = wait_for_status(backend, 42, "ERROR")
    assert (view.status, view.fault, view.machine_id, view.address) == (
        "ERROR",
        NO_VALID_HOST,
        42,
        None,
    )


def test_a_vanished_server_leaves_the_pool_list(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    spec = boot(backend, machine(42))
    assert [v.machine_id for v in backend.list_pool_servers(POOL)] == [42]
    cloud.vanish_server(spec.ref["server_id"])
    assert backend.list_pool_servers(POOL) == []


def test_quota_exceeded_reads_well_and_names_no_secret(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    cloud.set_quota(1)
    boot(backend, machine(1))
    with pytest.raises(QuotaExceeded) as err:
        boot(backend, machine(2))
    message = str(err.value)
    assert message == (
        "The cloud's quota is used up: Quota exceeded for instances: "
        "Requested 1, but already used 1 of 1 instances"
    )
    assert len(cloud.servers()) == 1


def test_a_conflict_is_cloud_conflict(cloud: FakeCloud, backend: OpenStackBackend) -> None:
    cloud.fail_next("POST", "/compute/v2.1/servers", 409, message="task_state is not None")
    with pytest.raises(
        CloudConflict,
        match="refused to create the machine's server for now: task_state is not None",
    ):
        boot(backend, machine(42))
    spec = boot(backend, machine(42))
    cloud.fail_next("DELETE", "/compute/v2.1/servers/", 409, message="task_state deleting")
    with pytest.raises(CloudConflict, match="task_state deleting"):
        backend.stop(spec)


def test_server_errors_and_timeouts_are_cloud_unavailable(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    cloud.fail_next("POST", "/compute/v2.1/servers", 503)
    with pytest.raises(CloudUnavailable, match="failed when Labpool tried to create"):
        boot(backend, machine(42))
    cloud.fail_next("GET", "/compute/v2.1/servers/detail", 500)
    with pytest.raises(CloudUnavailable):
        backend.list_pool_servers(POOL)
    assert cloud.servers() == []

    forget_connections()
    impatient = OpenStackBackend("fake", backend.cloud_spec, api_timeout=0.3)
    impatient.quota_headroom()  # connects while the cloud is quick
    cloud.set_latency(0.6)
    with pytest.raises(CloudUnavailable, match="did not answer in time"):
        impatient.quota_headroom()
    cloud.set_latency(0)

    cloud.stop()
    with pytest.raises(CloudUnavailable, match="could not be reached"):
        impatient.list_pool_servers(POOL)


def test_bad_credentials_or_unknown_cloud_are_backend_unavailable(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    cloud.config.password = "rotated-elsewhere"
    with pytest.raises(BackendUnavailable, match="refused Labpool's credentials") as err:
        boot(backend, machine(42))
    assert "secret" not in str(err.value) and "rotated" not in str(err.value)
    with pytest.raises(BackendUnavailable, match="'nope' is not configured"):
        OpenStackBackend("nope", backend.cloud_spec).quota_headroom()
    with pytest.raises(BackendUnavailable, match="cannot run 'emacs' machines"):
        boot(backend, machine(42, ide_kind="emacs"))


# -- the pool as a whole ----------------------------------------------------------------------
# Servers take long enough to boot that all eight are surely still building at the first
# listing, however loaded the machine (with 0.2 s this failed about half the time).
@pytest.mark.fake_cloud(boot_time=3, max_instances=10)
def test_list_pool_servers_pages_through_the_pool_in_a_few_requests(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    for machine_id in range(1, 8):
        boot(backend, machine(machine_id))
    boot(backend, machine(100, pool_id=POOL + 1))
    untagged = openstack.connect(cloud="fake").compute.create_server(
        name="by-hand",
        image_id="img-1",
        flavor_id="m1.small",
        networks="none",
        tags=["labpool", f"pool-{POOL}"],
    )
    cloud.config.max_limit = 3
    cloud.reset_counters()

    views = backend.list_pool_servers(POOL)
    assert sorted((v.machine_id or 0) for v in views) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert next(v for v in views if v.machine_id is None).server_id == untagged.id
    assert all(v.status == "BUILD" and v.created is not None for v in views)
    assert cloud.count(*DETAIL) == 3  # 8 servers, 3 a page: no request per server
    assert sum(cloud.counts.values()) == 3

    deadline = time.monotonic() + 15
    while not all(v.status == "ACTIVE" for v in views):
        assert time.monotonic() < deadline, [v.status for v in views]
        time.sleep(0.2)
        views = backend.list_pool_servers(POOL)
    assert all(v.address and v.address.endswith(":8888") for v in views if v.machine_id)


def test_quota_headroom_follows_usage(cloud: FakeCloud, backend: OpenStackBackend) -> None:
    cloud.set_quota(5)
    assert backend.quota_headroom() == 5
    boot(backend, machine(1))
    boot(backend, machine(2))
    assert backend.quota_headroom() == 3
    cloud.set_quota(-1)
    assert backend.quota_headroom() is None


def test_stop_deletes_the_server_and_a_second_stop_is_fine(
    cloud: FakeCloud, backend: OpenStackBackend
) -> None:
    spec = boot(backend, machine(42))
    backend.stop(spec)
    assert cloud.servers() == []
    backend.stop(spec)
    assert backend.list_pool_servers(POOL) == []

    boot(backend, machine(43))
    backend.stop(machine(43))  # its server id never got recorded: found by its tags
    assert cloud.servers() == []


# -- health -----------------------------------------------------------------------------------
@pytest.fixture
def ide_stub() -> Iterator[str]:
    """A tiny IDE: answers the machine's status URL with the right token only."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = (
                self.path == "/ide/42/api/status"
                and self.headers.get("Authorization") == f"token {TOKEN}"
            )
            ok = ok or (
                self.path == "/healthz"  # code-server's, behind its guard
                and self.headers.get("Authorization") == f"token {TOKEN}"
            )
            self.send_response(200 if ok else 403)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_health_asks_the_ide_with_its_token(backend: OpenStackBackend, ide_stub: str) -> None:
    assert backend.health(machine(42, address=ide_stub, ide_token=TOKEN))
    assert not backend.health(machine(42, address=ide_stub, ide_token="wrong-" + TOKEN))
    assert not backend.health(machine(43, address=ide_stub, ide_token=TOKEN))
    assert not backend.health(machine(42, address="", ide_token=TOKEN))
    assert backend.health(machine(42, ide_kind="code-server", address=ide_stub, ide_token=TOKEN))
    assert not backend.health(machine(42, ide_kind="code-server", address=ide_stub))


def test_health_is_false_while_the_machine_does_not_answer(backend: OpenStackBackend) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        address = f"127.0.0.1:{closed.server_address[1]}"
    assert not backend.health(machine(42, address=address, ide_token=TOKEN))


# -- code-server's guard, run for real from the user-data ------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def code_server() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """A stand-in for code-server (no auth of its own): records what reaches it; answers
    /healthz, and upgrades /ws to an echo stream."""
    seen: list[dict[str, str]] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
            }
            seen.append({"target": lines[0].split()[1], **headers})
            if lines[0].split()[1] == "/ws":
                conn.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n"
                )
                while data := conn.recv(4096):
                    conn.sendall(data.upper())
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nalive")

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], seen
    listener.close()


def test_code_server_refuses_requests_without_the_machines_token(
    code_server: tuple[int, list[dict[str, str]]],
) -> None:
    """The guard the user-data writes, started as its systemd unit says (addresses changed
    to free loopback ports), in front of a code-server stand-in."""
    upstream_port, seen = code_server
    document = yaml.safe_load(cloud_config(42, "code-server", TOKEN))
    files = {f["path"]: f["content"] for f in document["write_files"]}
    unit = files["/etc/systemd/system/labpool-ide-guard.service"]
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    python, script, listen, upstream = exec_start.removeprefix("ExecStart=").split()
    assert (python, script, listen, upstream) == (
        "/usr/bin/python3",
        "/usr/local/lib/labpool/ide_guard.py",
        "0.0.0.0:8888",
        "127.0.0.1:8889",
    )
    env_file = dict(line.split("=", 1) for line in files["/etc/labpool/ide.env"].splitlines())
    script_path = Path(tempfile.mkdtemp()) / "ide_guard.py"
    script_path.write_text(files[script])
    port = free_port()
    guard = subprocess.Popen(
        [sys.executable, str(script_path), f"127.0.0.1:{port}", f"127.0.0.1:{upstream_port}"],
        env={"PATH": os.environ.get("PATH", ""), **env_file},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and guard.poll() is None
                time.sleep(0.05)

        def get(path: str, authorization: str | None) -> requests.Response:
            headers = {"Authorization": authorization} if authorization else {}
            return requests.get(url + path, headers=headers, timeout=5)

        # Another machine on the network, without the token or with a wrong one: refused
        # on the machine itself, and nothing reaches code-server.
        for wrong in (
            None,
            "",
            f"token {TOKEN[:-1]}",
            "token ",
            f"Basic {TOKEN}",
            f"token wrong-{TOKEN}",
        ):
            assert get("/healthz", wrong).status_code == 403, wrong
        with socket.create_connection(("127.0.0.1", port)) as sock:  # two headers: refused
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: token {TOKEN}\r\n"
                f"Authorization: token {TOKEN}\r\n\r\n".encode()
            )
            assert sock.recv(100).startswith(b"HTTP/1.1 403")
        assert seen == []

        # The proxy's request (nginx adds `Authorization: token <ide token>`): through, without
        # the token, one request per connection.
        answer = get("/healthz", f"token {TOKEN}")
        assert (answer.status_code, answer.text) == (200, "alive")
        (request,) = seen
        assert request["target"] == "/healthz" and "authorization" not in request
        assert request["connection"] == "close"

        # A WebSocket upgrade with the token becomes a byte stream both ways.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nAuthorization: token {TOKEN}\r\n\r\n".encode()
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 101")
            sock.sendall(b"hello")
            assert sock.recv(100) == b"HELLO"
        assert seen[-1]["connection"] == "upgrade"
    finally:
        guard.terminate()
        guard.wait(timeout=10)


# -- the environment's security group ---------------------------------------------------------
PROXY = "10.0.0.5"


@pytest.fixture
def admin(cloud: FakeCloud, rt: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`labpool env …` against the fake cloud, with the proxy at 10.0.0.5."""
    from click.testing import CliRunner

    from lti_tool.cli import main

    monkeypatch.setenv("LABPOOL_OPENSTACK_CLOUD", "fake")
    monkeypatch.setenv("LABPOOL_PROXY_ADDRESSES", PROXY)

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, list(args))

    yield run
    forget_connections()


def env_add(admin: Any, cloud: FakeCloud, name: str, *extra: str) -> Any:
    return admin(
        "env",
        "add",
        name,
        "--backend",
        "openstack",
        "--image",
        "img-1",
        "--flavor",
        "m1.small",
        "--network",
        cloud.config.network_id,
        *extra,
    )


def stored_environment(rt: Any, name: str) -> Any:
    from sqlalchemy import select

    from provisioning.models import Environment, Pool

    with rt.sessions() as session:
        env = session.scalars(select(Environment).where(Environment.name == name)).first()
        pools = session.scalars(
            select(Pool).join(Environment).where(Environment.name == name)
        ).all()
        return None if env is None else (list(env.security_groups), len(pools))


def rules_of(cloud: FakeCloud, group_id: str) -> list[tuple[Any, ...]]:
    keys = (
        "direction",
        "ethertype",
        "protocol",
        "port_range_min",
        "port_range_max",
        "remote_ip_prefix",
        "remote_group_id",
    )
    with cloud.state.lock:
        return sorted(
            (
                tuple(r[k] for k in keys)
                for r in cloud.state.security_group_rules.values()
                if r["security_group_id"] == group_id
            ),
            key=str,
        )


def test_env_add_creates_a_group_whose_ide_port_admits_only_the_proxy(
    admin: Any, cloud: FakeCloud, rt: Any
) -> None:
    result = env_add(admin, cloud, "lab")
    assert result.exit_code == 0, result.output
    (group_id,), pools = stored_environment(rt, "lab")
    assert pools == 1
    assert cloud.state.security_groups[group_id]["name"] == "labpool-lab"
    assert rules_of(cloud, group_id) == sorted(
        [
            ("egress", "IPv4", None, None, None, None, None),  # Neutron's defaults
            ("egress", "IPv6", None, None, None, None, None),
            ("ingress", "IPv4", "tcp", 8888, 8888, "10.0.0.5/32", None),
        ],
        key=str,
    )

    # Its machines boot into that group alone (not `default`).
    from provisioning.backends import pooled_backend_for
    from provisioning.models import Environment

    with rt.sessions() as session:
        environment = session.scalars(select_env("lab")).one()
    backend = pooled_backend_for(
        environment, dataclasses.replace(rt.settings, openstack_cloud="fake")
    )
    backend.create(machine(5, ide_token=TOKEN))
    (server,) = cloud.servers()
    assert server["security_groups"] == [{"name": "labpool-lab"}]
    with cloud.state.lock:
        assert cloud.state.servers[server["id"]].security_group_ids == [group_id]
        assert cloud.state.admits(server["id"], PROXY, 8888)
        assert not cloud.state.admits(server["id"], "10.0.0.6", 8888)
    assert isinstance(environment, Environment)

    # Checking again finds it as it was; nothing new is created.
    result = admin("env", "check", "lab")
    assert result.exit_code == 0, result.output
    assert len(cloud.state.security_groups) == 2  # default + labpool-lab


def select_env(name: str) -> Any:
    from sqlalchemy import select

    from provisioning.models import Environment

    return select(Environment).where(Environment.name == name)


def open_group(cloud: FakeCloud, name: str, **rule: Any) -> str:
    """A group with the proxy's rule and one more ingress rule on the IDE port."""
    with cloud.state.lock:
        cloud.state.default_security_group()  # as any first look at the groups makes it
        group = cloud.state.add_security_group(name)
        cloud.state.add_security_group_rule(
            security_group_id=group["id"],
            protocol="tcp",
            port_range_min=8888,
            port_range_max=8888,
            remote_ip_prefix=f"{PROXY}/32",
        )
        if rule:
            values = dict(protocol="tcp", port_range_min=8888, port_range_max=8888)
            values.update(rule)
            if values.get("remote_group_id") == "itself":
                values["remote_group_id"] = group["id"]
            cloud.state.add_security_group_rule(security_group_id=group["id"], **values)
        return str(group["id"])


@pytest.mark.parametrize(
    "rule, said",
    [
        (dict(remote_ip_prefix="0.0.0.0/0"), "from 0.0.0.0/0"),
        (dict(description="no remote at all"), "from anywhere (0.0.0.0/0)"),
        (
            dict(
                protocol=None,
                port_range_min=None,
                port_range_max=None,
                remote_ip_prefix="0.0.0.0/0",
            ),
            "from 0.0.0.0/0",
        ),  # every protocol and port
        (dict(remote_ip_prefix="10.0.0.0/16"), "from 10.0.0.0/16"),  # the private network
        (dict(remote_group_id="itself"), "(machines)"),  # the VMs themselves
        (
            dict(port_range_min=8000, port_range_max=9000, remote_ip_prefix="192.0.2.0/24"),
            "from 192.0.2.0/24",
        ),
        (dict(ethertype="IPv6", remote_ip_prefix="::/0"), "from ::/0"),
    ],
)
def test_env_add_refuses_a_group_that_admits_the_ide_port_from_elsewhere_and_stores_nothing(
    admin: Any, cloud: FakeCloud, rt: Any, rule: dict[str, Any], said: str
) -> None:
    open_group(cloud, "wide", **rule)
    groups_before = set(cloud.state.security_groups)
    result = env_add(admin, cloud, "lab", "--security-group", "wide")
    assert result.exit_code != 0
    assert "security group" in result.output and said in result.output
    assert "admits the IDE port (TCP 8888)" in result.output
    assert stored_environment(rt, "lab") is None  # no environment, no pool
    assert set(cloud.state.security_groups) == groups_before  # nothing made in the cloud
    assert cloud.servers() == []


def test_env_add_accepts_a_named_group_closed_but_for_the_proxy(
    admin: Any, cloud: FakeCloud, rt: Any
) -> None:
    # SSH from anywhere is the admin's business; the IDE port is ours.
    group_id = open_group(
        cloud, "mine", port_range_min=22, port_range_max=22, remote_ip_prefix="0.0.0.0/0"
    )
    result = env_add(admin, cloud, "lab", "--security-group", "mine")
    assert result.exit_code == 0, result.output
    assert stored_environment(rt, "lab") == ([group_id], 1)  # stored by id


def test_env_add_refuses_groups_that_shut_the_proxy_out_or_do_not_exist(
    admin: Any, cloud: FakeCloud, rt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with cloud.state.lock:
        cloud.state.add_security_group("closed")
    result = env_add(admin, cloud, "lab", "--security-group", "closed")
    assert result.exit_code != 0 and "from the proxy's address 10.0.0.5/32" in result.output
    result = env_add(admin, cloud, "lab", "--security-group", "no-such-group")
    assert result.exit_code != 0 and "no security group 'no-such-group'" in result.output
    result = env_add(admin, cloud, "lab", "--security-group", "default")  # members reach it
    assert result.exit_code != 0 and "(machines)" in result.output
    monkeypatch.delenv("LABPOOL_PROXY_ADDRESSES")
    result = env_add(admin, cloud, "lab")
    assert result.exit_code != 0 and "LABPOOL_PROXY_ADDRESSES is not set" in result.output
    assert stored_environment(rt, "lab") is None
    assert sorted(g["name"] for g in cloud.state.security_groups.values()) == ["closed", "default"]


def test_a_broken_rule_in_the_clouds_answer_is_refused_clearly(
    admin: Any, cloud: FakeCloud, rt: Any
) -> None:
    group_id = open_group(cloud, "odd")
    with cloud.state.lock:
        rule = next(
            r
            for r in cloud.state.security_group_rules.values()
            if r["security_group_id"] == group_id and r["direction"] == "ingress"
        )
        rule["remote_ip_prefix"] = "somewhere"
    result = env_add(admin, cloud, "lab", "--security-group", "odd")
    assert result.exit_code != 0
    assert "cannot be read" in result.output and "Traceback" not in result.output
    assert stored_environment(rt, "lab") is None


def test_a_failed_rule_removes_the_group_labpool_made(
    admin: Any, cloud: FakeCloud, rt: Any
) -> None:
    cloud.fail_next("POST", "/networking/v2.0/security-group-rules", 500)
    result = env_add(admin, cloud, "lab")
    assert result.exit_code != 0 and "it will try again" in result.output
    assert stored_environment(rt, "lab") is None
    assert [g["name"] for g in cloud.state.security_groups.values()] == ["default"]
    result = env_add(admin, cloud, "lab")  # the retry makes it whole
    assert result.exit_code == 0, result.output
