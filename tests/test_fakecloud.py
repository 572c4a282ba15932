"""The fake cloud (tests/fakecloud) driven through the real openstacksdk.

These tests pin the contract in docs/openstack.md ("The fake cloud"): the requests
openstacksdk 4.22 really makes and the answers and exceptions it turns them into.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keystoneauth1.exceptions
import openstack
import openstack.connection
import pytest
import requests
from openstack import exceptions as os_exc

from provisioning import cloud_init
from tests.conftest import fake_cloud_threads
from tests.fakecloud import NO_VALID_HOST, FakeCloud
from tests.fakecloud.ide import token_from_user_data

ROOT = Path(__file__).resolve().parent.parent

# openstacksdk warns about its own deprecations on nearly every call; that is not ours.
BOOT = 0.2
# `cloud` (conftest.py) is the fake cloud; tests that need another one say so with their own
# fake_cloud mark.
pytestmark = [
    pytest.mark.filterwarnings(f"ignore::openstack.warnings.{name}")
    for name in ("OpenStackDeprecationWarning", "RemovedInSDK50Warning", "RemovedInSDK60Warning")
] + [pytest.mark.fake_cloud(boot_time=BOOT, max_instances=50)]
STUB_IDES = pytest.mark.fake_cloud(max_instances=60, ide="stub")


@pytest.fixture
def conn(cloud: FakeCloud) -> Iterator[openstack.connection.Connection]:
    connection = openstack.connect(cloud="fake")
    yield connection
    connection.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def create(
    conn: openstack.connection.Connection, name: str, tags: list[str] | None = None, **extra: Any
) -> Any:
    return conn.compute.create_server(
        name=name,
        image_id="img-1",
        flavor_id="m1.small",
        networks=[{"uuid": "0d1c2b3a-4f5e-4d6c-8b7a-695847362514"}],
        user_data=b64("#cloud-config\n{}\n"),
        tags=tags or ["labpool", "pool-1"],
        **extra,
    )


def wait_active(conn: openstack.connection.Connection, server: Any) -> Any:
    return conn.compute.wait_for_server(server, status="ACTIVE", interval=0.05, wait=5)


# -- create, boot, read ---------------------------------------------------------------
def test_create_builds_then_active_with_address(cloud: FakeCloud, conn: Any) -> None:
    created = create(conn, "lab-1", metadata={"machine": "42"}, key_name="ops")
    assert created.id and created.admin_password

    first = conn.compute.get_server(created.id)
    assert first.status == "BUILD"
    assert first.addresses == {}
    assert first.tags == ["labpool", "pool-1"]
    assert first.metadata == {"machine": "42"}

    server = wait_active(conn, created)
    (address,) = server.addresses["private"]
    assert address["addr"].startswith("10.0.") and address["version"] == 4
    assert address["OS-EXT-IPS:type"] == "fixed"
    assert server.key_name == "ops" and server.image.id == "img-1"
    assert server.flavor.original_name == "m1.small" and server.flavor.vcpus == 1

    (seen,) = cloud.servers()
    assert base64.b64decode(seen["user_data"]).startswith(b"#cloud-config")
    # Connection setup as OPENSTACK.md says: identity discovery, token, compute discovery.
    assert [(r.method, r.path) for r in cloud.request_log[:4]] == [
        ("GET", "/identity/v3"),
        ("POST", "/identity/v3/auth/tokens"),
        ("GET", "/compute/v2.1"),
        ("POST", "/compute/v2.1/servers"),
    ]


def test_user_data_must_be_base64(conn: Any) -> None:
    with pytest.raises(os_exc.BadRequestException, match="base64"):
        conn.compute.create_server(
            name="x",
            image_id="i",
            flavor_id="f",
            networks="none",
            user_data="#!/bin/sh\necho not encoded\n",
        )


@pytest.mark.fake_cloud(
    images={"img-1"}, flavors={"m1.small": {"vcpus": 2, "ram": 4096, "disk": 20}}
)
def test_unknown_image_or_flavor_is_400(conn: Any) -> None:
    with pytest.raises(os_exc.BadRequestException, match="Image nope could not be found"):
        conn.compute.create_server(name="x", image_id="nope", flavor_id="m1.small", networks="none")
    with pytest.raises(os_exc.BadRequestException, match="Flavor m9 could not be found"):
        conn.compute.create_server(name="x", image_id="img-1", flavor_id="m9", networks="none")
    ok = conn.compute.create_server(
        name="x", image_id="img-1", flavor_id="m1.small", networks="none"
    )
    assert conn.compute.get_server(ok.id).flavor.ram == 4096


# -- listing --------------------------------------------------------------------------
def test_list_filters_by_tags_and_follows_pages(cloud: FakeCloud, conn: Any) -> None:
    wanted = {create(conn, f"p1-{i}").id for i in range(25)}
    create(conn, "p2", tags=["labpool", "pool-2"])
    create(conn, "bare", tags=["labpool"])
    route = ("GET", "/compute/v2.1/servers/detail")

    # Nova caps a page at [api] max_limit; the sdk follows servers_links: 10 + 10 + 5.
    cloud.config.max_limit = 10
    cloud.reset_counters()
    got = list(conn.compute.servers(details=True, tags="labpool,pool-1"))
    assert {s.id for s in got} == wanted and len(got) == 25
    assert cloud.counts[route] == 3
    assert cloud.request_log[0].query == {"tags": "labpool,pool-1"}
    assert cloud.request_log[1].query["marker"] == got[9].id

    # With an explicit limit the sdk asks once more after the short last page
    # (openstack/resource.py _get_next_link: "no link and limit given" -> try again).
    cloud.config.max_limit = 1000
    cloud.reset_counters()
    got = list(conn.compute.servers(details=True, tags="labpool,pool-1", limit=10))
    assert {s.id for s in got} == wanted
    assert cloud.counts[route] == 4
    assert cloud.request_log[-1].query["limit"] == "10"

    assert {s.name for s in conn.compute.servers(tags="labpool")} >= {"p2", "bare", "p1-0"}
    assert [s.name for s in conn.compute.servers(details=False, tags="pool-2")] == ["p2"]


def test_list_status_and_changes_since(cloud: FakeCloud, conn: Any) -> None:
    cloud.set_boot_time(0)
    old = create(conn, "old")
    wait_active(conn, old)
    time.sleep(0.05)
    since = datetime.now(UTC).isoformat()  # e.g. 2026-01-01T12:00:00.123456+00:00
    cloud.set_boot_time(30)
    building = create(conn, "building")
    assert [s.id for s in conn.compute.servers(status="BUILD")] == [building.id]
    assert [s.id for s in conn.compute.servers(status="ACTIVE")] == [old.id]

    conn.compute.delete_server(old)
    changed = {s.id: s.status for s in conn.compute.servers(changes_since=since)}
    assert changed == {building.id: "BUILD", old.id: "DELETED"}
    assert [s.id for s in conn.compute.servers()] == [building.id]  # deleted ones are gone


# -- quota and limits -----------------------------------------------------------------
def test_quota_403_and_delete_frees_it(cloud: FakeCloud, conn: Any) -> None:
    cloud.set_quota(2)
    first, _ = create(conn, "a"), create(conn, "b")
    with pytest.raises(os_exc.ForbiddenException) as err:
        create(conn, "c")
    assert "Quota exceeded for instances: Requested 1, but already used 2 of 2 instances" in str(
        err.value
    )
    assert err.value.status_code == 403

    limits = conn.compute.get_limits().absolute
    assert (limits.instances, limits.instances_used) == (2, 2)
    assert limits.total_cores_used == 2 and limits.total_ram_used == 4096

    conn.compute.delete_server(first)
    assert conn.compute.get_limits().absolute.instances_used == 1
    create(conn, "c")  # fits again
    assert len(cloud.servers()) == 2


def test_quota_holds_under_concurrent_creates(cloud: FakeCloud) -> None:
    cloud.set_quota(5)
    outcomes: list[str] = []

    def worker(i: int) -> None:
        conn = openstack.connect(cloud="fake")
        try:
            create(conn, f"t{i}")
            outcomes.append("ok")
        except os_exc.ForbiddenException:
            outcomes.append("quota")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(outcomes) == ["ok"] * 5 + ["quota"] * 3
    assert len(cloud.servers()) == 5


# -- injected failures ----------------------------------------------------------------
def test_injected_409_then_success(cloud: FakeCloud, conn: Any) -> None:
    server = create(conn, "busy")
    cloud.fail_next("DELETE", "/compute/v2.1/servers/", 409, message="task_state deleting")
    with pytest.raises(os_exc.ConflictException, match="task_state deleting"):
        conn.compute.delete_server(server)
    assert conn.compute.get_server(server.id).status in ("BUILD", "ACTIVE")
    conn.compute.delete_server(server)
    with pytest.raises(os_exc.NotFoundException):
        conn.compute.get_server(server.id)


def test_injected_503_is_plain_http_exception(cloud: FakeCloud, conn: Any) -> None:
    cloud.fail_next("POST", "/compute/v2.1/servers", 503, count=2)
    for _ in range(2):
        with pytest.raises(os_exc.HttpException) as err:
            create(conn, "x")
        assert err.value.status_code == 503
        assert not isinstance(err.value, (os_exc.ConflictException, os_exc.NotFoundException))
    assert cloud.servers() == []  # an injected answer does nothing else
    create(conn, "x")
    assert len(cloud.servers()) == 1


def test_error_next_create_shows_fault(cloud: FakeCloud, conn: Any) -> None:
    cloud.error_next_create()
    doomed = create(conn, "doomed")
    assert conn.compute.get_server(doomed.id).status == "BUILD"
    with pytest.raises(os_exc.ResourceFailure):
        wait_active(conn, doomed)
    server = conn.compute.get_server(doomed.id)
    assert server.status == "ERROR"
    assert server.fault["message"] == NO_VALID_HOST and server.fault["code"] == 500
    assert server.addresses == {}
    assert conn.compute.get_limits().absolute.instances_used == 1  # ERROR still counts


def test_error_server_on_active_server(cloud: FakeCloud, conn: Any) -> None:
    server = wait_active(conn, create(conn, "ok"))
    assert "fault" not in cloud.server(server.id)  # only in ERROR
    cloud.error_server(server.id, "Host compute-3 went away")
    (seen,) = list(conn.compute.servers(tags="pool-1"))
    assert seen.status == "ERROR" and seen.fault["message"] == "Host compute-3 went away"


def test_vanished_server_is_not_found(cloud: FakeCloud, conn: Any) -> None:
    server = create(conn, "ghost")
    cloud.vanish_server(server.id)
    with pytest.raises(os_exc.NotFoundException, match="could not be found"):
        conn.compute.get_server(server.id)
    assert list(conn.compute.servers(tags="pool-1")) == []
    assert conn.compute.get_limits().absolute.instances_used == 0


@pytest.mark.parametrize("mode", ["502", "reset"])
def test_lost_create_response_leaves_server(cloud: FakeCloud, conn: Any, mode: str) -> None:
    cloud.lose_next_create_response(mode)
    expected = os_exc.HttpException if mode == "502" else keystoneauth1.exceptions.ConnectFailure
    with pytest.raises(expected):
        create(conn, "lost", tags=["labpool", "pool-9", "machine-7"])
    assert cloud.count("POST", "/compute/v2.1/servers") == 1  # no silent retry
    (found,) = list(conn.compute.servers(details=True, tags="labpool,machine-7"))
    assert found.name == "lost"
    create(conn, "next")  # only the next create is lost
    assert len(cloud.servers()) == 2


@pytest.mark.fake_cloud(delete_time=0.3)
def test_delete_delay_shows_deleted_then_gone(cloud: FakeCloud, conn: Any) -> None:
    server = create(conn, "slow")
    conn.compute.delete_server(server)
    assert conn.compute.get_server(server.id).status == "DELETED"
    assert cloud.count("GET", "/compute/v2.1/limits") == 0
    assert conn.compute.get_limits().absolute.instances_used == 1  # not freed yet
    # The sdk's wait_for_delete already returns on status DELETED; wait for the 404.
    deadline = time.monotonic() + 5
    with pytest.raises(os_exc.NotFoundException):
        while time.monotonic() < deadline:
            conn.compute.get_server(server.id)
            time.sleep(0.05)
    assert conn.compute.get_limits().absolute.instances_used == 0
    with pytest.raises(os_exc.NotFoundException):
        conn.compute.delete_server(server, ignore_missing=False)


# -- auth -----------------------------------------------------------------------------
def test_application_credential_cloud(cloud: FakeCloud) -> None:
    conn = openstack.connect(cloud="fake-appcred")
    server = create(conn, "via-appcred")
    assert conn.compute.get_server(server.id).name == "via-appcred"


def test_wrong_credentials_and_missing_token_are_401(cloud: FakeCloud) -> None:
    cloud.config.password = "changed"
    with pytest.raises(keystoneauth1.exceptions.Unauthorized):
        list(openstack.connect(cloud="fake").compute.servers())
    answer = requests.get(f"{cloud.url}/compute/v2.1/servers/detail", timeout=5)
    assert answer.status_code == 401
    answer = requests.get(
        f"{cloud.url}/compute/v2.1/servers", timeout=5, headers={"X-Auth-Token": "made-up"}
    )
    assert answer.status_code == 401


def test_expired_token_reauthenticates(cloud: FakeCloud, conn: Any) -> None:
    list(conn.compute.servers())
    cloud.expire_tokens()
    cloud.reset_counters()
    list(conn.compute.servers())
    assert [(r.method, r.path) for r in cloud.request_log] == [
        ("GET", "/compute/v2.1/servers/detail"),
        ("POST", "/identity/v3/auth/tokens"),
        ("GET", "/compute/v2.1/servers/detail"),
    ]


def test_microversion_negotiation(cloud: FakeCloud, conn: Any) -> None:
    token = conn.session.get_token()
    body = {
        "server": {
            "name": "x",
            "imageRef": "i",
            "flavorRef": "f",
            "networks": "none",
            "tags": ["a"],
        }
    }
    url = f"{cloud.url}/compute/v2.1/servers"
    old = requests.post(
        url,
        json=body,
        timeout=5,
        headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.51"},
    )
    assert old.status_code == 400 and "'tags' was unexpected" in old.text
    future = requests.get(
        url, timeout=5, headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.200"}
    )
    assert future.status_code == 406
    latest = requests.post(
        url,
        json=body,
        timeout=5,
        headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute latest"},
    )
    assert latest.status_code == 202
    assert latest.headers["OpenStack-API-Version"] == "compute 2.96"


def test_latency_is_added(cloud: FakeCloud, conn: Any) -> None:
    conn.compute.get_limits()  # the first use also runs discovery and auth
    cloud.set_latency(0.2)
    started = time.monotonic()
    conn.compute.get_limits()
    assert 0.2 <= time.monotonic() - started < 2


# -- volumes --------------------------------------------------------------------------
def test_volume_create_attach_detach(cloud: FakeCloud, conn: Any) -> None:
    server = create(conn, "with-disk")
    volume = conn.block_storage.create_volume(size=10, name="home-42", metadata={"user": "42"})
    assert volume.status == "creating"
    volume = conn.block_storage.wait_for_status(volume, "available", interval=0.05, wait=5)
    assert (volume.size, volume.metadata) == (10, {"user": "42"})

    with pytest.raises(os_exc.ConflictException, match="vm_state building"):
        conn.compute.create_volume_attachment(server.id, volume=volume.id)
    wait_active(conn, server)
    attachment = conn.compute.create_volume_attachment(server.id, volume=volume.id)
    assert attachment.device == "/dev/vdb" and attachment.volume_id == volume.id
    volume = conn.block_storage.get_volume(volume)
    assert volume.status == "in-use" and volume.attachments[0]["server_id"] == server.id
    assert [v.id for v in conn.compute.get_server(server.id).attached_volumes] == [volume.id]
    with pytest.raises(os_exc.BadRequestException):
        conn.block_storage.delete_volume(volume)  # still attached

    conn.compute.delete_volume_attachment(server.id, volume.id)
    assert conn.block_storage.get_volume(volume).status == "available"
    conn.block_storage.delete_volume(volume)
    with pytest.raises(os_exc.NotFoundException):
        conn.block_storage.get_volume(volume.id)


def test_deleting_server_frees_its_volumes(cloud: FakeCloud, conn: Any) -> None:
    server = wait_active(conn, create(conn, "vm"))
    volume = conn.block_storage.create_volume(size=1)
    conn.compute.create_volume_attachment(server, volume=volume)
    conn.compute.delete_server(server)
    assert conn.block_storage.get_volume(volume).status == "available"


# -- standalone -----------------------------------------------------------------------
def test_standalone_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clouds = tmp_path / "clouds.yaml"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakecloud",
            "--port",
            "0",
            "--boot-time",
            "0",
            "--quota",
            "3",
            "--clouds-yaml",
            str(clouds),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "listening on http://127.0.0.1:" in proc.stdout.readline()
        assert "wrote" in proc.stdout.readline()
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
        conn = openstack.connect(cloud="fake")
        assert conn.compute.get_limits().absolute.instances == 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


# -- IDEs on the servers ----------------------------------------------------------------
def create_machine(
    conn: openstack.connection.Connection, machine_id: int, token: str, **extra: Any
) -> Any:
    """A server as the openstack backend creates it: cloud-init user-data and tags."""
    return conn.compute.create_server(
        name=f"labpool-{machine_id}",
        image_id="img-1",
        flavor_id="m1.small",
        networks=[{"uuid": "0d1c2b3a-4f5e-4d6c-8b7a-695847362514"}],
        user_data=cloud_init.user_data(
            machine_id=machine_id, ide_kind="jupyterlab", ide_token=token
        ),
        tags=["labpool", "pool-1", f"machine-{machine_id}"],
        **extra,
    )


def ide_address(server: Any, port: int = 8888) -> str:
    """As the openstack backend reads it: the first fixed IP, ":", the IDE port."""
    fixed = [
        a
        for addrs in server.addresses.values()
        for a in addrs
        if a.get("OS-EXT-IPS:type") == "fixed"
    ]
    return f"{fixed[0]['addr']}:{port}"


def ide_get(
    address: str, path: str, token: str | None = None, timeout: float = 2
) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(
        f"http://{address}{path}", headers=headers, timeout=timeout, allow_redirects=False
    )


def answers(address: str, machine_id: int, token: str) -> bool:
    """Does the machine's IDE answer its health check? (Not: refused, or another fake cloud
    running in parallel got the address since and answers 403/404.)"""
    try:
        return ide_get(address, f"/ide/{machine_id}/api/status", token, timeout=1).ok
    except requests.ConnectionError:
        return False


def test_token_from_user_data() -> None:
    token = secrets.token_urlsafe(32)
    assert token_from_user_data(cloud_init.user_data(7, "jupyterlab", token)) == token
    assert token_from_user_data(cloud_init.user_data(7, "terminal", token, port=9000)) == token
    # code-server's guard reads the same file, under its own name.
    assert token_from_user_data(cloud_init.user_data(7, "code-server", token)) == token
    encoded = base64.b64encode(f"export JUPYTER_TOKEN='{token}'\n".encode()).decode()
    assert (
        token_from_user_data(
            b64(
                "#cloud-config\nwrite_files:\n- path: /etc/other\n  content: JUPYTER_TOKEN=nope\n"
                f"- path: /etc/labpool/ide.env\n  encoding: b64\n  content: {encoded}\n"
            )
        )
        == token
    )
    for junk in (
        None,
        "",
        "%%% not base64",
        b64("#!/bin/sh\necho hi\n"),
        b64("- a\n- b\n"),
        b64("write_files: [{path: /etc/labpool/ide.env, content: 'OTHER=1'}]"),
        b64("#cloud-config\nwrite_files: {oops: 1}\n"),
        b64(": : :\n\t["),
    ):
        assert token_from_user_data(junk) is None


@STUB_IDES
def test_stub_ide_answers_once_active_and_only_with_its_token(cloud: FakeCloud, conn: Any) -> None:
    token = secrets.token_urlsafe(32)
    created = create_machine(conn, 7, token)
    address = cloud.ide_address(created.id)
    assert address.startswith("127.1.") and address.endswith(":8888")
    assert not cloud.ide_running(created.id)
    assert not answers(address, 7, token)  # BUILD: nothing listens yet

    server = wait_active(conn, created)
    assert ide_address(server) == address
    # Seen ACTIVE through the API means the IDE already listens (no sleep needed).
    assert cloud.ide_running(server.id)
    answer = ide_get(address, "/ide/7/api/status", token)
    assert answer.status_code == 200
    status = answer.json()
    assert set(status) == {"started", "last_activity", "connections", "kernels"}
    assert status["connections"] == status["kernels"] == 0
    assert datetime.fromisoformat(status["started"].replace("Z", "+00:00")).tzinfo is not None

    assert ide_get(address, "/ide/7/api/status").status_code == 403
    assert ide_get(address, "/ide/7/api/status", "wrong-" + token).status_code == 403
    assert (
        requests.get(f"http://{address}/ide/7/api/status?token={token}", timeout=2).status_code
        == 200
    )
    page = ide_get(address, "/ide/7/lab/tree/x.ipynb", token)
    assert (page.status_code, page.text) == (200, "stub IDE")
    assert ide_get(address, "/ide/7/lab").status_code == 403
    assert ide_get(address, "/ide/8/api/status", token).status_code == 404
    with requests.Session() as session:  # keep-alive: several requests on one connection
        for _ in range(3):
            answer = session.get(
                f"http://{address}/ide/7/api/status",
                timeout=2,
                headers={"Authorization": f"token {token}"},
            )
            assert answer.status_code == 200


@STUB_IDES
def test_stub_ide_comes_up_without_api_calls(cloud: FakeCloud, conn: Any) -> None:
    token = secrets.token_urlsafe(32)
    server = create_machine(conn, 3, token)
    address = cloud.ide_address(server.id)
    cloud.reset_counters()
    deadline = time.monotonic() + BOOT + 2
    while not cloud.ide_running(server.id) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ide_get(address, "/ide/3/api/status", token).status_code == 200
    assert cloud.request_log == []  # the ticker did it


@STUB_IDES
def test_stub_ide_stops_on_delete_vanish_and_error(cloud: FakeCloud, conn: Any) -> None:
    tokens = {mid: secrets.token_urlsafe(32) for mid in (1, 2, 3)}
    servers = {mid: wait_active(conn, create_machine(conn, mid, tokens[mid])) for mid in tokens}
    addresses = {mid: ide_address(s) for mid, s in servers.items()}
    assert len(set(addresses.values())) == 3
    for mid, address in addresses.items():
        assert ide_get(address, f"/ide/{mid}/api/status", tokens[mid]).status_code == 200

    conn.compute.delete_server(servers[1])
    assert not cloud.ide_running(servers[1].id)
    assert not answers(addresses[1], 1, tokens[1])
    cloud.vanish_server(servers[2].id)
    assert not answers(addresses[2], 2, tokens[2])
    cloud.error_server(servers[3].id, "Host compute-3 went away")
    assert not cloud.ide_running(servers[3].id)
    assert not answers(addresses[3], 3, tokens[3])
    assert conn.compute.get_server(servers[3].id).status == "ERROR"

    # Freed addresses are handed out again (unless a parallel fake cloud took them since).
    token = secrets.token_urlsafe(32)
    reborn = wait_active(conn, create_machine(conn, 4, token))
    assert ide_address(reborn) != addresses[3]  # still held: ERROR servers keep their IPs
    assert ide_get(ide_address(reborn), "/ide/4/api/status", token).status_code == 200


@STUB_IDES
def test_stub_ide_hang(cloud: FakeCloud, conn: Any) -> None:
    token = secrets.token_urlsafe(32)
    server = wait_active(conn, create_machine(conn, 5, token))
    address = ide_address(server)
    assert ide_get(address, "/ide/5/api/status", token).status_code == 200

    cloud.ide_hang(server.id)
    with pytest.raises(requests.ReadTimeout):  # connected, but no answer
        ide_get(address, "/ide/5/api/status", token, timeout=0.3)
    assert cloud.ide_running(server.id)
    assert conn.compute.get_server(server.id).status == "ACTIVE"
    cloud.ide_hang(server.id, False)
    assert ide_get(address, "/ide/5/api/status", token).status_code == 200

    # Hung before it boots: ACTIVE, but the IDE never answers.
    doomed = create_machine(conn, 6, token)
    cloud.ide_hang(doomed.id)
    doomed = wait_active(conn, doomed)
    with pytest.raises(requests.ReadTimeout):
        ide_get(ide_address(doomed), "/ide/6/api/status", token, timeout=0.3)
    conn.compute.delete_server(doomed)  # a hung stub goes down like any other
    assert not answers(ide_address(doomed), 6, token)


@STUB_IDES
def test_server_without_token_gets_no_ide(
    cloud: FakeCloud, conn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tests.fakecloud.ide")
    server = wait_active(conn, create(conn, "bare", tags=["labpool", "machine-9"]))
    assert not cloud.ide_running(server.id)
    assert "JUPYTER_TOKEN" in (cloud.ide_skipped(server.id) or "")
    assert not answers(ide_address(server), 9, "whatever")
    assert any(server.id in r.getMessage() and "no IDE" in r.getMessage() for r in caplog.records)
    untagged = wait_active(
        conn,
        conn.compute.create_server(
            name="untagged",
            image_id="img-1",
            flavor_id="m1.small",
            networks="none",
            user_data=cloud_init.user_data(9, "jupyterlab", secrets.token_urlsafe(32)),
        ),
    )
    assert "machine-<id>" in (cloud.ide_skipped(untagged.id) or "")


@STUB_IDES
def test_fifty_stub_ides_at_once(cloud: FakeCloud, conn: Any) -> None:
    tokens = {mid: secrets.token_urlsafe(32) for mid in range(100, 150)}
    for mid, token in tokens.items():
        create_machine(conn, mid, token)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        servers = list(conn.compute.servers(tags="labpool,pool-1"))
        if len(servers) == 50 and all(s.status == "ACTIVE" for s in servers):
            break
        time.sleep(0.05)
    by_machine = {int(next(t for t in s.tags if t.startswith("machine-"))[8:]): s for s in servers}
    assert set(by_machine) == set(tokens)

    def check(mid: int) -> int:
        return ide_get(
            ide_address(by_machine[mid]), f"/ide/{mid}/api/status", tokens[mid]
        ).status_code

    with ThreadPoolExecutor(max_workers=25) as pool:
        assert list(pool.map(check, tokens)) == [200] * 50
    assert fake_cloud_threads(cloud.port) == ["stubs", "ticker"]  # not one per server

    cloud.stop()  # every stub goes, with the threads (the fixture checks those)
    assert not any(answers(ide_address(s), mid, tokens[mid]) for mid, s in by_machine.items())


@STUB_IDES
def test_ide_addresses_skip_busy_ports_and_other_clouds(cloud: FakeCloud, conn: Any) -> None:
    first = cloud.ide_address(create_machine(conn, 1, secrets.token_urlsafe(32)).id)
    ip = ipaddress.ip_address(first.split(":")[0])
    squatters = []
    try:
        for n in range(1, 4):  # something else listens on the next IPs' port 8888
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                squatter.bind((str(ip + n), 8888))
            except OSError:  # a parallel fake cloud's IDE: busy as well
                squatter.close()
                continue
            squatter.listen()
            squatters.append(squatter)
        busy = {f"{s.getsockname()[0]}:8888" for s in squatters}
        with FakeCloud(ide="stub") as other:  # another cloud, alive at the same time
            with other.state.lock:
                theirs = f"{ipaddress.ip_address(other.state.free_address())}:8888"
            second = cloud.ide_address(create_machine(conn, 2, secrets.token_urlsafe(32)).id)
        assert len({first, second, theirs}) == 3
        assert not {first, second, theirs} & busy
    finally:
        for squatter in squatters:
            squatter.close()


@pytest.mark.fake_cloud(ide="jupyterlab")
def test_jupyterlab_ide(cloud: FakeCloud, conn: Any) -> None:
    token = secrets.token_urlsafe(32)
    assert fake_cloud_threads(cloud.port) == ["ticker"]  # no stub loop
    server = wait_active(conn, create_machine(conn, 12, token))
    address = ide_address(server)
    assert cloud.ide_running(server.id)
    deadline, answer = time.monotonic() + 30, None
    while time.monotonic() < deadline and not (answer is not None and answer.ok):
        with contextlib.suppress(requests.ConnectionError):  # not listening yet
            answer = ide_get(address, "/ide/12/api/status", token, timeout=1)
        time.sleep(0.1)
    workdir = cloud.ide_workdir(server.id)
    assert workdir is not None
    log = (workdir / "jupyterlab.log").read_text(errors="replace")
    assert answer is not None and answer.status_code == 200, log
    assert {"started", "last_activity", "connections", "kernels"} <= set(answer.json())
    assert ide_get(address, "/ide/12/api/status").status_code == 403
    assert ide_get(address, "/ide/12/api/status", "wrong-" + token).status_code == 403

    cloud.ide_hang(server.id)  # SIGSTOP: the kernel still accepts, nobody answers
    with pytest.raises(requests.ReadTimeout):
        ide_get(address, "/ide/12/api/status", token, timeout=0.5)
    cloud.ide_hang(server.id, False)
    assert ide_get(address, "/ide/12/api/status", token).status_code == 200

    cloud.ide_hang(server.id)
    groups = cloud.ide_pids()
    assert len(groups) == 1
    conn.compute.delete_server(server)  # even a stopped JupyterLab goes, with its group
    assert not cloud.ide_running(server.id)
    deadline = time.monotonic() + 10
    while cloud.ide_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cloud.ide_pids() == []
    for pgid in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    assert not answers(address, 12, token)
    assert not workdir.exists()


# -- Neutron security groups, and the stub IDEs enforcing them ---------------------------------
def neutron_error(call: Any) -> tuple[int, str]:
    with pytest.raises(os_exc.HttpException) as caught:
        call()
    return caught.value.status_code, str(caught.value.details)


def test_security_groups_are_validated_like_neutron(conn: Any, cloud: FakeCloud) -> None:
    network = conn.network
    # The project's default group: members reach each other, egress open.
    (default,) = list(network.security_groups(name="default"))
    rules = list(network.security_group_rules(security_group_id=default.id))
    assert sorted((r.direction, r.ether_type, r.remote_group_id) for r in rules) == [
        ("egress", "IPv4", None),
        ("egress", "IPv6", None),
        ("ingress", "IPv4", default.id),
        ("ingress", "IPv6", default.id),
    ]

    group = network.create_security_group(name="ide", description="IDE port")
    assert [
        (r.direction, r.remote_ip_prefix)
        for r in network.security_group_rules(security_group_id=group.id)
    ] == [("egress", None), ("egress", None)]  # Neutron's defaults for a new group
    rule = network.create_security_group_rule(
        security_group_id=group.id,
        direction="ingress",
        ether_type="IPv4",
        protocol="tcp",
        port_range_min=8888,
        port_range_max=8888,
        remote_ip_prefix="10.0.0.5",
    )
    assert rule.remote_ip_prefix == "10.0.0.5/32"  # stored normalized
    assert network.get_security_group_rule(rule.id).port_range_max == 8888

    def add(**values: Any) -> Any:
        body = dict(security_group_id=group.id, direction="ingress", ether_type="IPv4")
        body.update(values)
        return lambda: network.create_security_group_rule(**body)

    before = len(cloud.state.security_group_rules)
    assert neutron_error(
        add(
            protocol="tcp", port_range_min=8888, port_range_max=8888, remote_ip_prefix="10.0.0.5/32"
        )
    ) == (409, f"Security group rule already exists. Rule id is {rule.id}.")
    assert neutron_error(add(port_range_min=22, port_range_max=22))[0] == 400  # no protocol
    assert neutron_error(add(protocol="tcp", port_range_min=90, port_range_max=80))[0] == 400
    assert neutron_error(add(protocol="tcp", port_range_min=0, port_range_max=80))[0] == 400
    assert neutron_error(add(remote_ip_prefix="::/0")) == (
        400,
        "Conflicting value ethertype IPv4 for CIDR ::/0",
    )
    assert neutron_error(add(remote_ip_prefix="10.0.0.0/8", remote_group_id=group.id))[0] == 400
    assert neutron_error(add(remote_ip_prefix="10.0.0.300/32"))[0] == 400
    assert neutron_error(add(protocol="carrier-pigeon"))[0] == 400
    assert neutron_error(add(direction="sideways"))[0] == 400
    assert neutron_error(add(security_group_id="no-such-group"))[0] == 404
    assert len(cloud.state.security_group_rules) == before  # refused: nothing stored

    # Nova takes groups by name or id; an unknown one is refused; one in use cannot go.
    server = create(conn, "in-ide", security_groups=[{"name": "ide"}])
    assert cloud.server(server.id)["security_groups"] == [{"name": "ide"}]
    assert neutron_error(lambda: create(conn, "x", security_groups=[{"name": "nope"}]))[0] == 400
    assert neutron_error(lambda: network.delete_security_group(group.id))[0] == 409
    conn.compute.delete_server(server.id)
    network.delete_security_group(group.id)
    assert network.find_security_group("ide") is None
    assert not [
        r for r in cloud.state.security_group_rules.values() if r["security_group_id"] == group.id
    ]


def connect_from(source: str, address: str, path: str, token: str) -> int | None:
    """GET ``path`` from a socket bound to ``source`` (another machine's fixed IP plays that
    machine); the status code, or None when the connection is refused or reset."""
    host, port = address.rsplit(":", 1)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: token {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.socket() as sock:
        sock.settimeout(2)
        sock.bind((source, 0))
        try:
            sock.connect((host, int(port)))
            sock.sendall(request)
            head = sock.recv(4096)
        except (ConnectionError, TimeoutError):
            return None
        return int(head.split()[1]) if head else None


@pytest.mark.fake_cloud(ide="stub", enforce_security_groups=True)
def test_stub_ides_answer_only_the_sources_their_security_groups_admit(
    cloud: FakeCloud, conn: Any
) -> None:
    group = conn.network.create_security_group(name="labpool-ide")
    conn.network.create_security_group_rule(
        security_group_id=group.id,
        direction="ingress",
        ether_type="IPv4",
        protocol="tcp",
        port_range_min=8888,
        port_range_max=8888,
        remote_ip_prefix="127.0.0.1/32",
    )  # the proxy's address in tests
    tokens = {mid: secrets.token_urlsafe(32) for mid in (1, 2, 3, 4)}
    servers = {
        mid: wait_active(
            conn, create_machine(conn, mid, tokens[mid], security_groups=[{"name": group.id}])
        )
        for mid in (1, 2)
    }
    servers |= {
        mid: wait_active(conn, create_machine(conn, mid, tokens[mid])) for mid in (3, 4)
    }  # no group: Nova puts them in `default`
    address = {mid: ide_address(server) for mid, server in servers.items()}
    ip = {mid: a.rsplit(":", 1)[0] for mid, a in address.items()}
    status = "/ide/{}/api/status"

    # Machine 1 (the proxy's rule only): the proxy gets in, another student's machine
    # does not, even holding the token.
    assert connect_from("127.0.0.1", address[1], status.format(1), tokens[1]) == 200
    assert connect_from(ip[2], address[1], status.format(1), tokens[1]) is None
    assert connect_from(ip[3], address[1], status.format(1), tokens[1]) is None
    # Machine 3 (default group): its fellow member 4 gets in, the proxy does not.
    assert connect_from(ip[4], address[3], status.format(3), tokens[3]) == 200
    assert connect_from("127.0.0.1", address[3], status.format(3), tokens[3]) is None
    assert connect_from(ip[1], address[3], status.format(3), tokens[3]) is None

    # The rules are read as stored, when the connection comes: opening the port to the
    # private network lets machine 2 in; deleting that rule shuts it out again.
    wide = conn.network.create_security_group_rule(
        security_group_id=group.id,
        direction="ingress",
        ether_type="IPv4",
        protocol="tcp",
        port_range_min=8000,
        port_range_max=9000,
        remote_ip_prefix="127.1.0.0/16",
    )
    assert connect_from(ip[2], address[1], status.format(1), tokens[1]) == 200
    conn.network.delete_security_group_rule(wide.id)
    assert connect_from(ip[2], address[1], status.format(1), tokens[1]) is None
