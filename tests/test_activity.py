"""One last-activity rule for the idle release, the teacher's "stop idle" and the class page
(`provisioning/activity.py`): the database's and the proxy's signals, and the IDE asked
last — over TCP (cloud machines) or a unix socket (sandboxed local ones)."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from config.runtime import Runtime
from provisioning.activity import idle_among, is_idle, last_activity, recorded_activity
from provisioning.models import Machine, MachineState
from provisioning.proxy_table import ACTIVITY_KEY

NOW = datetime.now(UTC)
TOKEN = "t" * 43
IDLE_FOR = timedelta(minutes=10)


class StubIde:
    """Jupyter's /api/status for machine 7, for the right token only; remembers the asks."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = {
            "connections": 0,
            "kernels": 0,
            "last_activity": NOW.isoformat(),
        }
        self.asked = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.asked += 1
                ok = (
                    self.path == "/ide/7/api/status"
                    and stub.status is not None
                    and self.headers.get("X-Labpool-Token") == TOKEN
                )
                body = json.dumps(stub.status).encode() if ok else b""
                self.send_response(200 if ok else 403)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.handler = Handler


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture(params=["tcp", "unix"])
def ide(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[StubIde, str]]:
    stub = StubIde()
    if request.param == "tcp":
        server: Any = ThreadingHTTPServer(("127.0.0.1", 0), stub.handler)
        address = f"127.0.0.1:{server.server_address[1]}"
    else:
        path = tmp_path / "ide.sock"
        server = UnixHTTPServer(str(path), stub.handler)
        address = f"unix:{path}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield stub, address
    server.shutdown()
    server.server_close()


def machine(
    *,
    assigned_ago: timedelta,
    seen_ago: timedelta | None = None,
    address: str | None = None,
    machine_id: int = 7,
) -> Machine:
    return Machine(
        id=machine_id,
        state=MachineState.assigned,
        backend="local",
        assigned_at=NOW - assigned_ago,
        state_changed_at=NOW - assigned_ago,
        last_activity_at=NOW - seen_ago if seen_ago else None,
        address=address,
        ide_token=TOKEN,
    )


def test_the_latest_of_the_database_and_the_proxy_counts() -> None:
    old = machine(assigned_ago=timedelta(hours=3), seen_ago=timedelta(hours=1))
    assert recorded_activity(old, None) == NOW - timedelta(hours=1)
    proxied = (NOW - timedelta(minutes=2)).timestamp()
    assert recorded_activity(old, proxied) == datetime.fromtimestamp(proxied, UTC)
    fresh = machine(assigned_ago=timedelta(minutes=1), seen_ago=timedelta(hours=1))
    assert recorded_activity(fresh, None) == NOW - timedelta(minutes=1)  # just handed over


def test_the_class_page_reads_the_proxys_activity(rt: Runtime) -> None:
    m = machine(assigned_ago=timedelta(hours=3), machine_id=90_001)
    rt.redis.set(ACTIVITY_KEY.format(m.id), int((NOW - timedelta(seconds=30)).timestamp()))
    try:
        assert NOW - last_activity(rt.redis, m) < timedelta(seconds=32)  # type: ignore[operator]
        assert not is_idle(rt.redis, m, NOW, IDLE_FOR)
    finally:
        rt.redis.delete(ACTIVITY_KEY.format(m.id))


def test_recent_cheap_signals_spare_the_ide_a_call(rt: Runtime, ide: tuple[StubIde, str]) -> None:
    stub, address = ide
    m = machine(assigned_ago=timedelta(hours=2), seen_ago=timedelta(minutes=3), address=address)
    assert not is_idle(rt.redis, m, NOW, IDLE_FOR)
    assert stub.asked == 0


def test_the_ide_is_asked_before_a_machine_is_taken_away(
    rt: Runtime, ide: tuple[StubIde, str]
) -> None:
    stub, address = ide
    m = machine(assigned_ago=timedelta(hours=2), seen_ago=timedelta(hours=1), address=address)
    # A kernel computing for an hour: the proxy saw nothing, the IDE did.
    assert not is_idle(rt.redis, m, NOW, IDLE_FOR)
    assert stub.asked == 1
    stub.status = {"connections": 1, "last_activity": (NOW - timedelta(hours=2)).isoformat()}
    assert not is_idle(rt.redis, m, NOW, IDLE_FOR)  # a browser is connected
    stub.status = {
        "connections": 0,
        "last_activity": (NOW - timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
    }
    assert is_idle(rt.redis, m, NOW, IDLE_FOR)
    stub.status = None  # the IDE does not answer: the cheap signals decide
    assert is_idle(rt.redis, m, NOW, IDLE_FOR)


def test_idle_among_takes_a_timeout_per_machine(rt: Runtime) -> None:
    short = machine(assigned_ago=timedelta(minutes=20), machine_id=90_002)
    long = machine(assigned_ago=timedelta(minutes=20), machine_id=90_003)
    limits = {short.id: timedelta(minutes=10), long.id: timedelta(hours=1)}
    assert idle_among(rt.redis, [short, long], NOW, limits) == [short]
    assert idle_among(rt.redis, [], NOW, IDLE_FOR) == []
