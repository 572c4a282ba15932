"""IDEs behind the authenticating nginx proxy: a real nginx (`tests/nginx.py`, the config
`labpool nginx-config --standalone` renders) in front of the tool and of real JupyterLab
machines (local backend). Students launch from the fake Moodle *through* nginx, as they
would in production, and reach their IDE at `/ide/<machine id>/` on the tool's origin.

Some checks need no JupyterLab: a tiny echo server stands in for a machine (its route is
written into Redis as the hand-over would), which shows exactly what nginx forwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
import websocket
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from werkzeug.wrappers import Request, Response

from config.runtime import Runtime
from lti_tool.ide_access import IDE_COOKIE, PROXY_HEADER, proxy_secret
from provisioning.backends.base import MachineSpec
from provisioning.backends.local import LocalBackend
from provisioning.models import Machine
from provisioning.proxy_table import ACTIVITY_KEY, last_activity, publish_route, withdraw_route
from tests.conftest import passable, run_worker_burst
from tests.fakeplatform import FakePlatform, ServedApp
from tests.nginx import Nginx, free_port, tool_behind_nginx

pytestmark = pytest.mark.nginx  # without nginx: conftest.py's rule for a missing tool

AUTH_CACHE_S = 1


# --------------------------------------------------------------------------- fixtures


class _Counting:
    """WSGI middleware counting the tool's /proxy/auth answers (to see nginx's cache)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.auth_calls = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/proxy/auth":
            with self._lock:
                self.auth_calls += 1
        return self.app(environ, start_response)


class _Echo:
    """A stand-in machine: answers every request with the headers it received."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.seen.append({"path": request.full_path, **headers})
        return Response(
            json.dumps({"echo": True, "headers": headers}), mimetype="application/json"
        )(environ, start_response)


@dataclasses.dataclass
class Proxied:
    url: str  # nginx: the public URL
    tool: ServedApp  # the proxied tool, nginx's upstream
    flask_app: Any
    counter: _Counting
    nginx: Nginx
    echo: ServedApp
    echo_app: _Echo

    def cookie_for(self, owner_id: int, machine_id: int) -> str:
        return self.flask_app.extensions["labpool.ide_cookies"].dumps(
            {"u": owner_id, "m": machine_id}
        )


@pytest.fixture(scope="module")
def proxied(
    rt: Runtime, platform: FakePlatform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxied]:
    """The tool behind nginx on its own public URL (same database, Redis and platform
    registration as the `tool` fixture), nginx's auth cache at AUTH_CACHE_S."""
    echo_app = _Echo()
    with (
        tool_behind_nginx(
            rt.settings,
            platform,
            tmp_path_factory.mktemp("nginx"),
            wrap=_Counting,
            auth_cache_s=AUTH_CACHE_S,
        ) as behind,
        ServedApp(echo_app) as echo,
    ):
        yield Proxied(
            behind.url,
            behind.tool,
            behind.flask_app,
            behind.served,
            behind.nginx,
            echo,
            echo_app,
        )


@pytest.fixture
def echo_machine(proxied: Proxied, rt: Runtime) -> Iterator[tuple[int, int, str]]:
    """A route to the echo server, as the hand-over publishes it: (machine id, owner, token)."""
    machine_id, owner_id, token = 900000 + free_port(), 4242, "echo-" + uuid.uuid4().hex
    publish_route(rt.redis, machine_id, owner_id, f"127.0.0.1:{proxied.echo.port}", token)
    proxied.echo_app.seen.clear()
    yield machine_id, owner_id, token
    withdraw_route(rt.redis, machine_id)
    rt.redis.delete(ACTIVITY_KEY.format(machine_id))


# --------------------------------------------------------------------------- helpers


def launch_through_nginx(
    proxied: Proxied, platform: FakePlatform, browser: requests.Session, sub: str
) -> int:
    result = platform.launch(browser, proxied.url, platform.learner(sub=sub))
    response = result.launch_response
    assert response.status_code == 303, response.text[:500]
    return int(response.headers["Location"].rstrip("/").split("/machines/")[1])


def wait_assigned(proxied: Proxied, browser: requests.Session, machine_id: int) -> dict:
    deadline = time.monotonic() + 60
    while True:
        state = browser.get(f"{proxied.url}/machines/{machine_id}/state").json()
        if state["state"] == "assigned":
            return state
        assert state["state"] in ("requested", "starting"), state
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def open_ide(proxied: Proxied, browser: requests.Session, machine_id: int) -> requests.Response:
    """The student's click on "Open your IDE", through nginx, following to the IDE."""
    state = wait_assigned(proxied, browser, machine_id)
    handover = browser.get(proxied.url + state["open_url"], allow_redirects=False)
    assert handover.status_code == 303, handover.text[:300]
    assert handover.headers["Location"] == f"/ide/{machine_id}/lab"
    cookie = handover.headers["Set-Cookie"]
    assert cookie.startswith(f"{IDE_COOKIE}=") and f"Path=/ide/{machine_id}/" in cookie
    assert "HttpOnly" in cookie
    return browser.get(proxied.url + handover.headers["Location"], allow_redirects=False)


def machine_row(rt: Runtime, machine_id: int) -> Machine:
    with rt.sessions() as session:
        machine = session.get_one(Machine, machine_id)
        session.expunge(machine)
        return machine


def is_jupyterlab(response: requests.Response) -> bool:
    return response.status_code == 200 and "JupyterLab" in response.text


def refused_to_handover(response: requests.Response, machine_id: int) -> bool:
    return response.status_code == 302 and response.headers["Location"].endswith(
        f"/machines/{machine_id}/open"
    )


def raw_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """GET `path` exactly as written; (status, response head)."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
        "",
        "",
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
    return int(head.split(" ", 2)[1]), head


def execute(ws: websocket.WebSocket, code: str, timeout: float = 60) -> dict[str, Any]:
    """Run `code` in the kernel behind `ws` (Jupyter's JSON websocket protocol): its
    execute_result's text and its stdout."""
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "student",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": datetime.now(UTC).isoformat(),
                },
                "parent_header": {},
                "metadata": {},
                "buffers": [],
                "channel": "shell",
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            }
        )
    )
    result: dict[str, Any] = {"stdout": "", "frames": []}
    deadline = time.monotonic() + timeout
    while "reply" not in result or "result" not in result:
        assert time.monotonic() < deadline, result
        frame = ws.recv()
        result["frames"].append(frame)
        msg = json.loads(frame)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "execute_result":
            result["result"] = msg["content"]["data"]["text/plain"]
        elif kind == "stream" and msg["content"]["name"] == "stdout":
            result["stdout"] += msg["content"]["text"]
        elif kind == "execute_reply":
            result["reply"] = msg["content"]["status"]
            assert result["reply"] == "ok", msg["content"]
        elif kind == "error":
            raise AssertionError(msg["content"])
    return result


# --------------------------------------------------------------------------- tests


def test_a_student_reaches_their_notebook_through_the_proxy(proxied, platform, rt, browser):
    seen: list[str] = []

    def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        seen.append(response.url)
        seen.extend(f"{k}: {v}" for k, v in response.headers.items())
        if "<title>JupyterLab</title>" not in response.text:  # see the test below
            seen.append(response.content.decode(errors="replace"))

    browser.hooks["response"].append(record)
    machine_id = launch_through_nginx(proxied, platform, browser, sub="4")
    run_worker_burst(rt.settings)

    lab = open_ide(proxied, browser, machine_id)
    assert is_jupyterlab(lab), lab.text[:500]
    machine = machine_row(rt, machine_id)
    token = machine.ide_token
    assert token and machine.address

    # Headers a client sends cannot choose the upstream or the token.
    steered = browser.get(
        f"{proxied.url}/ide/{machine_id}/lab",
        headers={
            "X-Upstream": f"127.0.0.1:{proxied.tool.port}",
            "X-IDE-Token": "chosen-by-the-client",
            "Authorization": "token chosen-by-the-client",
        },
    )
    assert is_jupyterlab(steered)

    # A kernel, created and driven through nginx with the browser's cookies, as JupyterLab's
    # page does it: from the tool's origin, with Jupyter's XSRF token from its cookie.
    kernels = f"{proxied.url}/ide/{machine_id}/api/kernels"
    xsrf = browser.cookies.get("_xsrf")
    assert xsrf, "JupyterLab sets its XSRF cookie on the lab page"
    # The IDE's own XSRF check is on behind the proxy: the token is not a "token login".
    unchecked = browser.post(kernels, json={"name": "python3"}, headers={"Origin": proxied.url})
    assert unchecked.status_code == 403 and "_xsrf" in unchecked.text
    created = browser.post(
        kernels, json={"name": "python3"}, headers={"Origin": proxied.url, "X-XSRFToken": xsrf}
    )
    assert created.status_code == 201, created.text
    kernel_id = created.json()["id"]
    cookie = browser.cookies.get(IDE_COOKIE, path=f"/ide/{machine_id}/")
    assert cookie
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{proxied.nginx.ports[0]}/ide/{machine_id}/api/kernels/{kernel_id}/channels",
        cookie=f"{IDE_COOKIE}={cookie}",
        origin=proxied.url,
        timeout=60,
    )
    try:
        handshake = "\n".join(f"{k}: {v}" for k, v in (ws.getheaders() or {}).items())
        ran = execute(ws, "import os\nprint(os.getcwd())\n1+1")
    finally:
        ws.close()
    assert ran["result"] == "2"
    # The notebook works in the student's home: /home/student inside the sandbox, which is
    # their folder under the data folder on the host.
    assert ran["stdout"].strip() == "/home/student"

    # The browser never saw the IDE's token: not in a URL, header, cookie, frame or body
    # (the lab page included: see test_the_lab_page_does_not_carry_the_ides_token).
    seen += [c.value or "" for c in browser.cookies] + [handshake, *ran["frames"]]
    assert len(seen) > 20
    assert not [item for item in seen if token in item]


def test_the_lab_page_does_not_carry_the_ides_token(proxied, rt, tmp_path):
    machine_id, owner_id = 800000 + free_port(), 4343
    passable(tmp_path)
    # Behind the proxy the IDE listens on a unix socket in its sandbox.
    backend = LocalBackend(tmp_path, settings=dataclasses.replace(rt.settings, ide_proxy=True))
    spec = MachineSpec(id=machine_id, ide_kind="jupyterlab", owner_id=owner_id, course_id=1)
    started = backend.start(spec)
    spec = dataclasses.replace(
        spec, ref=started.ref, address=started.address, ide_token=started.ide_token
    )
    try:
        deadline = time.monotonic() + 60
        while not backend.health(spec):
            assert backend.poll(spec) and time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(0.2)
        publish_route(rt.redis, machine_id, owner_id, started.address, started.ide_token)
        lab = requests.get(
            f"{proxied.url}/ide/{machine_id}/lab",
            headers={"Cookie": f"{IDE_COOKIE}={proxied.cookie_for(owner_id, machine_id)}"},
        )
        assert is_jupyterlab(lab)
        assert started.address.startswith("unix:")
        assert started.ide_token not in lab.text
    finally:
        withdraw_route(rt.redis, machine_id)
        rt.redis.delete(ACTIVITY_KEY.format(machine_id))
        with contextlib.suppress(ProcessLookupError):  # no need for a graceful shutdown
            os.killpg(started.ref["pid"], signal.SIGKILL)
        backend.stop(spec)


def test_a_student_cannot_open_another_students_machine(proxied, platform, rt):
    with requests.Session() as alice, requests.Session() as bob:
        alices = launch_through_nginx(proxied, platform, alice, sub="4")
        bobs = launch_through_nginx(proxied, platform, bob, sub="5")
        # Two workers, so that both machines start at once.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: run_worker_burst(rt.settings), range(2)))
        assert is_jupyterlab(open_ide(proxied, alice, alices))
        assert is_jupyterlab(open_ide(proxied, bob, bobs))

        # Alice's cookie is scoped to her machine's path: her browser sends nothing to Bob's,
        # and nginx sends her to the hand-over page, which refuses her.
        to_bobs = alice.get(f"{proxied.url}/ide/{bobs}/lab", allow_redirects=False)
        assert refused_to_handover(to_bobs, bobs)
        assert alice.get(urljoin(proxied.url, to_bobs.headers["Location"])).status_code == 403

        # Her valid cookie copied to Bob's path is refused outright.
        alices_cookie = alice.cookies.get(IDE_COOKIE, path=f"/ide/{alices}/")
        for path in ("lab", "api/status", "api/contents"):
            copied = requests.get(
                f"{proxied.url}/ide/{bobs}/{path}",
                allow_redirects=False,
                headers={"Cookie": f"{IDE_COOKIE}={alices_cookie}"},
            )
            assert copied.status_code == 403, (path, copied.status_code)
        # ... while it still opens her own.
        own = requests.get(
            f"{proxied.url}/ide/{alices}/lab", headers={"Cookie": f"{IDE_COOKIE}={alices_cookie}"}
        )
        assert is_jupyterlab(own)


def test_expired_and_forged_cookies_go_back_to_the_handover(proxied, echo_machine):
    machine_id, owner_id, _ = echo_machine
    max_age = proxied.flask_app.extensions["labpool"].settings.ide_cookie_max_age_s

    class SignedLongAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - max_age - 60

    expired_signer = copy.copy(proxied.flask_app.extensions["labpool.ide_cookies"])
    expired_signer.signer = SignedLongAgo
    expired = expired_signer.dumps({"u": owner_id, "m": machine_id})
    forged = URLSafeTimedSerializer("not the tool's key", salt="labpool ide cookie").dumps(
        {"u": owner_id, "m": machine_id}
    )
    tampered = proxied.cookie_for(owner_id, machine_id)[:-2] + "xx"

    for cookie in (expired, forged, tampered, ""):
        refused = requests.get(
            f"{proxied.url}/ide/{machine_id}/lab",
            allow_redirects=False,
            headers={"Cookie": f"{IDE_COOKIE}={cookie}"},
        )
        assert refused_to_handover(refused, machine_id), (cookie, refused.status_code)
    no_cookie = requests.get(f"{proxied.url}/ide/{machine_id}/api/status", allow_redirects=False)
    assert refused_to_handover(no_cookie, machine_id)
    assert proxied.echo_app.seen == []  # the machine was never reached

    # The same request with a valid cookie does reach it.
    valid = requests.get(
        f"{proxied.url}/ide/{machine_id}/lab",
        headers={"Cookie": f"{IDE_COOKIE}={proxied.cookie_for(owner_id, machine_id)}"},
    )
    assert valid.status_code == 200 and valid.json()["echo"] is True


def test_a_released_machine_is_no_longer_reachable(proxied, platform, rt, browser):
    from provisioning.jobs import stop_machine

    machine_id = launch_through_nginx(proxied, platform, browser, sub="4")
    run_worker_burst(rt.settings)
    assert is_jupyterlab(open_ide(proxied, browser, machine_id))

    assert stop_machine(machine_id) == "stopped"
    # Within the auth cache's few seconds nginx may still try the (dead) machine; then the
    # tool's answer — no route — sends the browser to the hand-over page.
    deadline = time.monotonic() + AUTH_CACHE_S + 5
    while True:
        gone = browser.get(f"{proxied.url}/ide/{machine_id}/api/status", allow_redirects=False)
        if gone.status_code != 502:
            break
        assert time.monotonic() < deadline, gone.status_code
        time.sleep(0.2)
    assert refused_to_handover(gone, machine_id), (gone.status_code, gone.text[:300])
    status = browser.get(urljoin(proxied.url, gone.headers["Location"]))
    assert status.status_code == 200
    assert status.url == f"{proxied.url}/machines/{machine_id}"
    assert "Your machine was stopped" in status.text


def test_the_client_cannot_choose_the_upstream_or_see_the_proxys_headers(proxied, echo_machine):
    machine_id, owner_id, token = echo_machine
    cookie = proxied.cookie_for(owner_id, machine_id)
    tool_address = f"127.0.0.1:{proxied.tool.port}"
    sent = {
        "X-Upstream": tool_address,
        "X-IDE-Token": "chosen-by-the-client",
        PROXY_HEADER: proxy_secret(proxied.flask_app.extensions["labpool"].settings),
        "Authorization": "token chosen-by-the-client",
        "Cookie": f"theme=dark; labpool_session=tool-session; {IDE_COOKIE}={cookie}; _xsrf=abc",
    }
    answer = requests.get(f"{proxied.url}/ide/{machine_id}/api/contents?x=1", headers=sent)
    assert answer.status_code == 200
    got = answer.json()["headers"]  # what the machine received: the echo server, not the tool
    assert got["authorization"] == f"token {token}"
    for header in ("x-upstream", "x-ide-token", PROXY_HEADER.lower()):
        assert header not in got, header
    # The tool's cookies stay with the tool; the IDE's own cookies pass.
    assert "labpool_session" not in got["cookie"] and IDE_COOKIE not in got["cookie"]
    assert "theme=dark" in got["cookie"] and "_xsrf=abc" in got["cookie"]
    assert proxied.echo_app.seen[-1]["path"] == f"/ide/{machine_id}/api/contents?x=1"
    # ... and the token does not come back to the client.
    assert token not in json.dumps(dict(answer.headers))

    # Without a valid cookie, naming an upstream gets nowhere.
    seen_before = len(proxied.echo_app.seen)
    steered = requests.get(
        f"{proxied.url}/ide/{machine_id}/lab",
        allow_redirects=False,
        headers={k: v for k, v in sent.items() if k != "Cookie"},
    )
    assert refused_to_handover(steered, machine_id)
    assert len(proxied.echo_app.seen) == seen_before


def test_the_auth_check_is_not_reachable_from_outside(proxied, echo_machine):
    machine_id, owner_id, _ = echo_machine
    cookie = proxied.cookie_for(owner_id, machine_id)
    secret = proxy_secret(proxied.flask_app.extensions["labpool"].settings)
    asking = {"X-Original-URI": f"/ide/{machine_id}/lab", "Cookie": f"{IDE_COOKIE}={cookie}"}

    # Through nginx: /proxy/ is closed and the internal location is internal, however the
    # path is spelled (sent as is: requests would normalise some of these).
    for path in (
        "/proxy/auth",
        "/proxy/auth/",
        "/_labpool_auth",
        "/%70roxy/auth",
        "//proxy/auth",
        "/./proxy/auth",
        f"/ide/{machine_id}/../../proxy/auth",
        "/proxy%2Fauth",
        "/proxy/auth?x=1",
    ):
        status, head = raw_get(proxied.nginx.ports[0], path, {**asking, PROXY_HEADER: secret})
        assert status == 404, path
        assert "x-upstream" not in head.lower() and "x-ide-token" not in head.lower(), path

    # Straight at the tool: without nginx's secret header, refused.
    direct = proxied.tool.url + "/proxy/auth"
    for headers in (asking, {**asking, PROXY_HEADER: "guess"}, {**asking, PROXY_HEADER: ""}):
        refused = requests.get(direct, headers=headers)
        assert refused.status_code == 403
        assert "X-Upstream" not in refused.headers and "X-IDE-Token" not in refused.headers
    # (with it, the same question is answered: the refusals above are the header's doing)
    assert requests.get(direct, headers={**asking, PROXY_HEADER: secret}).status_code == 200


def test_activity_seen_by_the_proxy_is_recorded(proxied, echo_machine, rt):
    machine_id, owner_id, _ = echo_machine
    headers = {"Cookie": f"{IDE_COOKIE}={proxied.cookie_for(owner_id, machine_id)}"}
    url = f"{proxied.url}/ide/{machine_id}/api/status"
    assert last_activity(rt.redis, machine_id) is None

    before = proxied.counter.auth_calls
    with requests.Session() as client:
        for _ in range(10):
            assert client.get(url, headers=headers).status_code == 200
    first = last_activity(rt.redis, machine_id)
    assert first is not None and abs(first - time.time()) < 3
    # nginx reused the tool's answer: the burst asked the tool once or twice, not ten times.
    assert 1 <= proxied.counter.auth_calls - before <= 3
    assert len(proxied.echo_app.seen) == 10

    # Once the cached answer is stale, the next request is seen by the tool again.
    deadline = time.monotonic() + AUTH_CACHE_S + 5
    while last_activity(rt.redis, machine_id) == first:
        assert time.monotonic() < deadline, "activity never advanced"
        time.sleep(0.25)
        assert requests.get(url, headers=headers).status_code == 200
    assert last_activity(rt.redis, machine_id) > first


def test_code_server_machines_get_the_path_below_their_prefix(proxied, echo_machine, rt):
    """code-server has no base URL: the tool tells nginx to pass the path below /ide/<id>."""
    machine_id, owner_id, token = echo_machine
    publish_route(
        rt.redis,
        machine_id,
        owner_id,
        f"127.0.0.1:{proxied.echo.port}",
        token,
        ide_kind="code-server",
    )
    time.sleep(AUTH_CACHE_S + 0.2)  # a cached answer from before would still say "whole path"
    cookie = proxied.cookie_for(owner_id, machine_id)
    answer = requests.get(
        f"{proxied.url}/ide/{machine_id}/static/x.js?v=1",
        headers={"Cookie": f"{IDE_COOKIE}={cookie}"},
    )
    assert answer.status_code == 200
    assert proxied.echo_app.seen[-1]["path"] == "/static/x.js?v=1"


def test_writes_and_websockets_from_another_origin_are_refused(proxied, echo_machine, rt):
    """The proxy keeps the browser's protections: a page on another origin (even of the same
    site, e.g. another port of this host) riding on the student's cookie gets nothing that
    changes state, and no WebSocket; the tool's own origin gets both."""
    machine_id, owner_id, _ = echo_machine
    url = f"{proxied.url}/ide/{machine_id}/api/terminals"
    cookie = {"Cookie": f"{IDE_COOKIE}={proxied.cookie_for(owner_id, machine_id)}"}
    foreign = f"http://127.0.0.1:{free_port()}"
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    ws_path = f"/ide/{machine_id}/terminals/websocket/1"

    # A plain read first, so that nginx caches a "yes" for this cookie: the cache must not
    # carry it over to a foreign write.
    assert requests.get(url, headers=cookie).status_code == 200
    seen = len(proxied.echo_app.seen)
    assert requests.post(url, headers={**cookie, "Origin": foreign}).status_code == 403
    assert requests.post(url, headers=cookie).status_code == 403  # no Origin: not the tool's
    assert requests.delete(url, headers={**cookie, "Origin": foreign}).status_code == 403
    assert requests.get(url, headers={**cookie, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    status, _ = raw_get(proxied.nginx.ports[0], ws_path, {**cookie, **upgrade, "Origin": foreign})
    assert status == 403
    status, _ = raw_get(proxied.nginx.ports[0], ws_path, {**cookie, **upgrade})
    assert status == 403
    assert len(proxied.echo_app.seen) == seen  # none of them reached the machine

    same = {**cookie, "Origin": proxied.url, "Sec-Fetch-Site": "same-origin"}
    assert requests.post(url, headers=same).status_code == 200
    status, _ = raw_get(proxied.nginx.ports[0], ws_path, {**same, **upgrade})
    assert status != 403  # through to the machine (the echo server is no WebSocket peer)
    assert len(proxied.echo_app.seen) == seen + 2
    assert proxied.echo_app.seen[-2]["x-labpool-token"] == echo_machine[2]


def test_a_route_expires_unless_used(proxied, echo_machine, rt):
    """A route left behind (a stop racing a hand-over) cannot outlive its machine for long:
    it carries a TTL, renewed by every request that passes."""
    from provisioning.proxy_table import ROUTE_KEY, ROUTE_TTL_S

    machine_id, owner_id, _ = echo_machine
    key = ROUTE_KEY.format(machine_id)
    assert 0 < rt.redis.ttl(key) <= ROUTE_TTL_S
    rt.redis.expire(key, 30)
    cookie = {"Cookie": f"{IDE_COOKIE}={proxied.cookie_for(owner_id, machine_id)}"}
    time.sleep(AUTH_CACHE_S + 0.2)
    assert requests.get(f"{proxied.url}/ide/{machine_id}/x", headers=cookie).status_code == 200
    assert rt.redis.ttl(key) > 30


ATTACK_PAGE = """<!doctype html><title>a page on another origin of this site</title><script>
window.results = {};
const ide = %(ide)s;
fetch(ide + "api/terminals", {method: "POST", credentials: "include", mode: "no-cors"})
  .then(() => { results.post = "sent"; }, () => { results.post = "failed"; });
const ws = new WebSocket(ide.replace("http", "ws") + "terminals/websocket/1");
ws.onopen = () => { results.ws = "open"; ws.send(JSON.stringify(["stdin", "touch ~/pwned\\r"])); };
ws.onerror = () => { results.ws = "refused"; };
</script>"""

OWN_PAGE_SCRIPT = """async (ide) => {
  const xsrf = document.cookie.split("; ").find(c => c.startsWith("_xsrf=")).slice(6);
  const r = await fetch(ide + "api/terminals", {method: "POST", credentials: "include",
                                                headers: {"X-XSRFToken": xsrf}});
  return r.status;
}"""


@pytest.mark.browser
def test_a_cross_site_page_in_chromium_cannot_open_a_terminal_in_the_students_ide(
    proxied, platform, rt, browser
):
    """Seen before: a page on another origin of the same site, with only the student's cookie,
    created a terminal in the student's IDE and ran a command in it. Now Chromium, holding the
    student's cookies, loads such a page: its POST and its WebSocket are refused by the proxy,
    and no terminal exists. The student's own page (the tool's origin) still opens one."""
    from tests.browser_helpers import CHROMIUM_ARGS, chromium_and_playwright

    sync_playwright, chromium = chromium_and_playwright()
    machine_id = launch_through_nginx(proxied, platform, browser, sub="77")
    run_worker_burst(rt.settings)
    assert is_jupyterlab(open_ide(proxied, browser, machine_id))
    ide = f"{proxied.url}/ide/{machine_id}/"
    terminals = f"{ide}api/terminals"
    cookies = [
        {
            "name": c.name,
            "value": c.value or "",
            "domain": "127.0.0.1",
            "path": c.path,
            "httpOnly": c.name != "_xsrf",
            "sameSite": "Lax",
        }
        for c in browser.cookies
        if c.path.startswith(("/ide/", "/"))
    ]
    # A real server on another port of this host: another origin of the same site (a page
    # Playwright made up would count as a public page, which Chromium already keeps away
    # from loopback addresses).
    attack = Response(ATTACK_PAGE % {"ide": json.dumps(ide)}, mimetype="text/html")
    with ServedApp(attack) as attacker_site, sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = chrome.new_context()
            context.add_cookies(cookies)
            page = context.new_page()
            logged_before = len(proxied.nginx.access_log())
            page.goto(f"{attacker_site.url}/attack.html")
            page.wait_for_function("window.results.post && window.results.ws", timeout=15_000)
            results = page.evaluate("window.results")
            assert results["ws"] == "refused", results
            # They did reach the proxy, which refused them there.
            refused = [
                line
                for line in proxied.nginx.access_log()[logged_before:].splitlines()
                if f"/ide/{machine_id}/" in line and '" 403 ' in line
            ]
            assert len(refused) == 2, refused
            assert browser.get(terminals).json() == []  # nothing was created

            own = context.new_page()
            own.goto(f"{ide}lab")
            assert own.evaluate(OWN_PAGE_SCRIPT, ide) == 200
            assert len(browser.get(terminals).json()) == 1
        finally:
            chrome.close()
    home = LocalBackend(rt.settings.data_dir, settings=rt.settings).home_folder(
        MachineSpec(
            id=machine_id,
            ide_kind="jupyterlab",
            owner_id=machine_row(rt, machine_id).owner_id,
            course_id=machine_row(rt, machine_id).course_id,
        )
    )
    assert not (home / "pwned").exists()
