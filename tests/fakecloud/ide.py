"""IDEs on the fake cloud's servers, answering like a real VM's would.

With ``FakeCloud(ide="stub")`` or ``ide="jupyterlab"`` fixed IPs come from 127.1.0.0/16 (all of
127.0.0.0/8 is routed to ``lo`` on Linux), and once a server is ``ACTIVE`` something listens on
``(its IP, ide_port)`` at base URL ``/ide/<machine id>/`` (the id from its ``machine-<id>`` tag),
guarded by the token its user-data writes to ``/etc/labpool/ide.env`` (``JUPYTER_TOKEN=...``):

* ``stub``: a tiny HTTP server. ``GET /ide/<id>/api/status`` gives JupyterLab's
  ``{"started", "last_activity", "connections", "kernels"}``, other paths under the base URL
  give ``stub IDE``; both 200 with ``Authorization: token <token>`` (or ``?token=``), 403
  without; 404 outside the base URL. All stubs share one asyncio thread.
* ``jupyterlab``: a real ``python -m jupyterlab`` per server, in its own session (process
  group) with a temporary HOME/root dir, killed with its group when the server goes.

With ``enforce_security_groups=True`` a stub answers only connections whose source address
its server's security groups admit on the IDE port: the rules stored through the Neutron API
(``network.py``), evaluated by ``CloudState.admits``. The source is the TCP peer address: a
test plays "another student's machine" by binding its client socket to that server's fixed
IP (any 127.0.0.0/8 address can be bound on Linux) before connecting; an unbound client
connects from 127.0.0.1 (the kernel's source for ``lo``), which is where the proxy and the
workers run in tests. A refused connection is reset at once (Neutron would drop its packets).
JupyterLab IDEs listen directly on the fixed IP: groups are not enforced for them.

``IdeManager.reconcile`` brings IDEs in line with the servers: up when ``ACTIVE``, down on
delete (``DELETED``), vanish and ``ERROR``. It runs after every API request (so a client that
sees ``ACTIVE`` finds the IDE listening), after ``FakeCloud``'s fault methods, and every 50 ms
on a ticker thread (so IDEs come up when ``boot_time`` passes with nobody asking).
A server without a token or a ``machine-<id>`` tag gets no IDE (logged once).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import gzip
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import yaml

from .state import CloudState

log = logging.getLogger(__name__)

ENV_FILE = "/etc/labpool/ide.env"
TOKEN_VARIABLES = ("JUPYTER_TOKEN", "IDE_GUARD_TOKEN")
TICK = 0.05  # seconds between reconciles of the ticker thread
_MACHINE_TAG = re.compile(r"machine-([A-Za-z0-9_.-]+)")
_AUTH = re.compile(r"(?:token|bearer)\s+(\S+)", re.IGNORECASE)
_PROBE_LIMIT = 16  # busy candidates skipped before an address is handed out unprobed
_KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a JupyterLab process group

# A fixed IP is claimed for an IDE port, for as long as a server holds it, by a one-byte
# open-file-description lock (Linux's F_OFD_SETLK) at offset ``port * 65536 + host`` of
# CLAIM_FILE: two fake clouds (in this process or others, e.g. parallel test runs) never share
# an (IP, port). Each cloud has one fd on the file; the kernel drops its locks when it dies.
CLAIM_FILE = Path(tempfile.gettempdir()) / f"fakecloud-ide-claims-{os.getuid()}.lock"
_FLOCK = "@hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)


# -- reading user-data and tags ---------------------------------------------------------
def token_from_user_data(user_data: str | None) -> str | None:
    """The IDE token from the ``write_files`` entry for ``/etc/labpool/ide.env`` of a base64
    ``#cloud-config``: ``JUPYTER_TOKEN``, or code-server's guard's ``IDE_GUARD_TOKEN``
    (None when anything is missing or malformed)."""
    if not user_data:
        return None
    try:
        text = base64.b64decode(user_data).decode("utf-8")
        document = yaml.safe_load(text)
    except (binascii.Error, ValueError, yaml.YAMLError):
        return None
    files = document.get("write_files") if isinstance(document, dict) else None
    for entry in files if isinstance(files, list) else []:
        if not isinstance(entry, dict) or entry.get("path") != ENV_FILE:
            continue
        content = _file_content(entry)
        for line in (content or "").splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export ") :].lstrip()
            key, sep, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            if sep and key.strip() in TOKEN_VARIABLES and value:
                return value
    return None


def _is_code_server(user_data: str | None) -> bool:
    """Does the user-data start code-server (behind its guard, which the stub then plays)?"""
    try:
        return b"IDE_GUARD_TOKEN=" in base64.b64decode(user_data or "")
    except (binascii.Error, ValueError):
        return False


def _file_content(entry: dict[str, Any]) -> str | None:
    """A write_files entry's content, decoded as cloud-init does (``encoding``: b64, gzip,
    gz+b64)."""
    content = entry.get("content", "")
    encoding = str(entry.get("encoding", "text/plain")).lower()
    try:
        raw = content if isinstance(content, bytes) else str(content).encode()
        if encoding in ("b64", "base64", "gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
            raw = base64.b64decode(raw)
        if encoding.startswith("gz"):
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (binascii.Error, OSError, EOFError, UnicodeDecodeError):
        return None


def machine_id_from_tags(tags: list[str]) -> str | None:
    """``7`` from a ``machine-7`` tag (the first one), else None."""
    for tag in tags:
        match = _MACHINE_TAG.fullmatch(tag)
        if match:
            return match.group(1)
    return None


def _iso(ts: float) -> str:
    """Jupyter's timestamps: ``2026-01-01T12:00:00.123456Z``."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """``proc``'s exit status once it has exited, else None. Checked without reaping it, so
    its pid (= its process group id) cannot be reused while we may still signal the group."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1
    return None if info is None else info.si_status


def _claim_lock(fd: int, address: int, port: int, lock: bool) -> bool:
    """Take (or drop) the claim on ``(address, port)`` through ``fd``; False if taken."""
    offset = port * 65536 + (address & 0xFFFF)
    kind = fcntl.F_WRLCK if lock else fcntl.F_UNLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))
    except OSError:
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# -- the stub -------------------------------------------------------------------------------
class StubIde:
    """One server's stub: an asyncio server on the shared loop. Only touched on that loop."""

    def __init__(
        self,
        server_id: str,
        machine_id: str,
        token: str,
        clock: Callable[[], float],
        hung: bool,
        admits: Callable[[str], bool] = lambda source: True,
        code_server: bool = False,
    ):
        self.server_id = server_id
        self.admits = admits  # may a connection from this source address reach the port?
        # code-server (behind its guard) has no base URL: the proxy strips /ide/<id>.
        self.code_server = code_server
        self.base_url = "/" if code_server else f"/ide/{machine_id}/"
        self.token = token.encode()
        self.clock = clock
        self.started = self.last_activity = clock()
        self.hung = hung
        self.server: asyncio.base_events.Server | None = None
        self.answering: asyncio.Event | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def open(self, sock: socket.socket) -> None:
        self.answering = asyncio.Event()
        if not self.hung:
            self.answering.set()
        self.server = await asyncio.start_server(self._connection, sock=sock, backlog=128)

    async def set_hung(self, hung: bool) -> None:
        self.hung = hung
        if self.answering is not None:
            (self.answering.clear if hung else self.answering.set)()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = writer.get_extra_info("peername")
        if not self.admits(str(peer[0]) if peer else ""):
            # The security group does not admit this source: Neutron would drop the packets
            # (the client times out); the fake resets the connection so tests need not wait.
            self.tasks.discard(task)
            writer.transport.abort()
            return
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    writer.write(_response(400, "text/plain", b"Bad Request", False, False))
                    await writer.drain()
                    return
                method, target, version = parts
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                length = int(headers.get("content-length", "0") or 0)
                if length > 0:
                    await reader.readexactly(length)
                assert self.answering is not None
                await self.answering.wait()  # a hung IDE: accepted, read, never answered
                status, ctype, body = self.answer(method, target, headers)
                keep = (
                    not chunked
                    and version == "HTTP/1.1"
                    and headers.get("connection", "").lower() != "close"
                )
                writer.write(_response(status, ctype, body, keep, method == "HEAD"))
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    def answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        """What JupyterLab would answer, as far as Labpool looks."""
        path, _, query = target.partition("?")
        path = unquote(path)
        if not (path + "/").startswith(self.base_url):
            return 404, "text/plain", b"404: Not Found"
        presented = _AUTH.fullmatch(headers.get("authorization", "").strip())
        given = presented.group(1) if presented else (parse_qs(query).get("token") or [""])[0]
        api = path.startswith(self.base_url + "api/")
        if not secrets.compare_digest(given.encode(), self.token):
            if api:
                return 403, "application/json", b'{"message": "Forbidden", "reason": null}'
            return 403, "text/plain", b"403: Forbidden"
        if self.code_server and path == "/healthz":
            body = {"status": "alive", "lastHeartbeat": int(self.last_activity * 1000)}
            return 200, "application/json", json.dumps(body).encode()
        if path == self.base_url + "api/status":
            body = {
                "started": _iso(self.started),
                "last_activity": _iso(self.last_activity),
                "connections": 0,
                "kernels": 0,
            }
            return 200, "application/json", json.dumps(body).encode()
        self.last_activity = self.clock()
        return 200, "text/plain", b"stub IDE"


def _response(status: int, ctype: str, body: bytes, keep: bool, head: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Server: fakecloud-stub-ide",
        f"Connection: {'keep-alive' if keep else 'close'}",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head else body)


# -- real JupyterLab -------------------------------------------------------------------------
@dataclass
class JupyterIde:
    """One server's JupyterLab process (the leader of its own process group)."""

    server_id: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    hung: bool = False
    exit_logged: bool = False

    @property
    def log_path(self) -> Path:
        return self.workdir / "jupyterlab.log"


def _jupyterlab_command(ip: str, port: int, machine_id: str, workdir: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ServerApp.ip={ip}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.base_url=/ide/{machine_id}/",
        f"--ServerApp.root_dir={workdir}",
    ]
    if os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")
    return cmd


@dataclass
class _Dying:
    ide: JupyterIde
    kill_at: float  # monotonic time of the SIGKILL if the group is still there


# -- the manager ------------------------------------------------------------------------------
class IdeManager:
    """Runs the IDEs of one ``CloudState``'s servers (``mode`` ``stub`` or ``jupyterlab``).

    Threads: a ticker (reconcile every ``TICK``) and, for stubs, one asyncio loop serving
    every stub socket. Lock order: ``_lock`` → ``state.lock``; claims change under
    ``state.lock``.
    """

    def __init__(self, state: CloudState, mode: str, port: int):
        if mode not in ("stub", "jupyterlab"):
            raise ValueError(f"no IDEs in mode {mode!r}")
        self.state, self.mode, self.port = state, mode, port
        self.ides: dict[str, StubIde | JupyterIde] = {}
        self._skipped: dict[str, str] = {}  # server id -> why it has no IDE (logged once)
        self._hung: set[str] = set()
        self._claims: set[int] = set()  # fixed IPs (as int) this cloud holds a claim on
        self._claim_fd = -1
        self._dying: list[_Dying] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._probe_failures = 0
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, name: str = "fakecloud-ide") -> None:
        """Claim the servers' IPs, start the ticker (and the stub loop) threads, named
        ``<name>-ticker`` and ``<name>-stubs``."""
        self._claim_fd = os.open(CLAIM_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self.state.lock:  # servers kept from an earlier start keep their addresses
            for server in self.state.servers.values():
                if _claim_lock(self._claim_fd, server.address, self.port, True):
                    self._claims.add(server.address)
                else:
                    log.warning(
                        "fakecloud: %s:%s of server %s is claimed by another cloud",
                        server.ip,
                        self.port,
                        server.id,
                    )
            self.state.address_filter = self.claim_address
        if self.mode == "stub":
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, name=f"{name}-stubs", daemon=True
            )
            self._loop_thread.start()
        self._stopping.clear()
        self._running = True
        self._ticker = threading.Thread(target=self._tick, name=f"{name}-ticker", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Tear every IDE down, wait for the processes, stop both threads, free the IPs."""
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
            self._ticker = None
        with self._lock:
            self._running = False
            stubs = [ide for ide in self.ides.values() if isinstance(ide, StubIde)]
            for ide in self.ides.values():
                if isinstance(ide, JupyterIde):
                    self._terminate(ide)
            self.ides.clear()
            if self._loop is not None and stubs:
                self._run(_close_all(stubs))
            deadline = time.monotonic() + _KILL_GRACE
            while self._dying and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.02)
            for dying in self._dying:
                dying.kill_at = 0
            self._reap()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                assert self._loop_thread is not None
                self._loop_thread.join(timeout=10)
                self._loop.close()
                self._loop = self._loop_thread = None
        with self.state.lock:
            if self.state.address_filter == self.claim_address:
                self.state.address_filter = None
            self._claims.clear()
            if self._claim_fd >= 0:
                os.close(self._claim_fd)  # drops every claim of this cloud
                self._claim_fd = -1

    def _tick(self) -> None:
        while not self._stopping.wait(TICK):
            self.reconcile()

    # -- addresses ---------------------------------------------------------------------
    def claim_address(self, address: int) -> bool:
        """``CloudState.free_address``'s filter (called under ``state.lock``): claim
        ``address`` unless another fake cloud has, or (up to a limit) something else listens
        on its IDE port."""
        ip = str(ipaddress.ip_address(address))
        if not _claim_lock(self._claim_fd, address, self.port, True):
            return False
        if not self._can_bind(ip):
            self._probe_failures += 1
            if self._probe_failures <= _PROBE_LIMIT:
                _claim_lock(self._claim_fd, address, self.port, False)
                return False
            log.warning("fakecloud: %s:%s is busy, handing it out anyway", ip, self.port)
        self._probe_failures = 0
        self._claims.add(address)
        return True

    def _can_bind(self, ip: str) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, self.port))
            except OSError:
                return False
        return True

    # -- reconcile ---------------------------------------------------------------------
    def reconcile(self) -> None:
        """Bring the IDEs in line with the servers' states now. Never raises."""
        try:
            self._reconcile()
        except Exception:  # a broken ticker would silently stop every IDE from starting
            log.exception("fakecloud: IDE reconcile failed")

    def _reconcile(self) -> None:
        with self._lock:
            if not self._running:
                return
            with self.state.lock:
                self.state.sweep()
                now = self.state.now()
                servers = list(self.state.servers.values())
                wanted = {
                    s.id: (s.ip, list(s.tags), s.user_data)
                    for s in servers
                    if s.status(now) == "ACTIVE"
                }
                known = {s.id for s in servers}
            for server_id in [sid for sid in self.ides if sid not in wanted]:
                self._teardown(server_id)
            for server_id, (ip, tags, user_data) in wanted.items():
                if server_id not in self.ides and server_id not in self._skipped:
                    self._launch(server_id, ip, tags, user_data)
            for server_id in [sid for sid in self._skipped if sid not in known]:
                del self._skipped[server_id]
            self._hung &= known
            with self.state.lock:  # free the IPs of servers that are gone, IDEs down first
                addresses = {s.address for s in self.state.servers.values()}
                for address in self._claims - addresses:
                    _claim_lock(self._claim_fd, address, self.port, False)
                    self._claims.discard(address)
            self._reap()

    def _launch(self, server_id: str, ip: str, tags: list[str], user_data: str | None) -> None:
        machine_id = machine_id_from_tags(tags)
        token = token_from_user_data(user_data)
        if machine_id is None or token is None:
            missing = (
                "a machine-<id> tag"
                if machine_id is None
                else f"JUPYTER_TOKEN in user_data's {ENV_FILE}"
            )
            log.warning(
                "fakecloud: server %s (%s) has no %s; it gets no IDE", server_id, ip, missing
            )
            self._skipped[server_id] = f"no {missing}"
            return
        if self.mode == "stub":
            self._launch_stub(
                server_id, machine_id, token, ip, code_server=_is_code_server(user_data)
            )
        elif _is_code_server(user_data):
            log.warning(
                "fakecloud: server %s runs code-server: no IDE in jupyterlab mode", server_id
            )
            self._skipped[server_id] = "code-server (jupyterlab mode runs JupyterLab only)"
        else:
            self._launch_jupyterlab(server_id, machine_id, token, ip)

    def _launch_stub(
        self, server_id: str, machine_id: str, token: str, ip: str, code_server: bool = False
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, self.port))
            sock.setblocking(False)
            stub = StubIde(
                server_id,
                machine_id,
                token,
                self.state.config.clock,
                hung=server_id in self._hung,
                admits=lambda source: self.admits(server_id, source),
                code_server=code_server,
            )
            self._run(stub.open(sock))
        except OSError as exc:
            sock.close()
            log.warning(
                "fakecloud: stub IDE of server %s cannot listen on %s:%s: %s",
                server_id,
                ip,
                self.port,
                exc,
            )
            self._skipped[server_id] = str(exc)
            return
        self.ides[server_id] = stub

    def _launch_jupyterlab(self, server_id: str, machine_id: str, token: str, ip: str) -> None:
        workdir = Path(tempfile.mkdtemp(prefix=f"fakecloud-ide-{machine_id}-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
        env.update(JUPYTER_TOKEN=token, HOME=str(workdir), JUPYTER_RUNTIME_DIR=str(workdir))
        with open(workdir / "jupyterlab.log", "wb") as output:
            proc = subprocess.Popen(
                _jupyterlab_command(ip, self.port, machine_id, workdir),
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ide = JupyterIde(server_id, proc, workdir)
        self.ides[server_id] = ide
        if server_id in self._hung:
            self._set_hung(ide, True)

    def _teardown(self, server_id: str) -> None:
        ide = self.ides.pop(server_id)
        if isinstance(ide, StubIde):
            self._run(ide.close())
        else:
            self._terminate(ide)

    def _terminate(self, ide: JupyterIde) -> None:
        """SIGTERM the group (JupyterLab then shuts its kernels down); SIGKILL it later."""
        if _exit_status(ide.proc) is None:
            _signal_group(ide.proc.pid, signal.SIGTERM)
            _signal_group(ide.proc.pid, signal.SIGCONT)  # a hung (stopped) one must wake up
        self._dying.append(_Dying(ide, time.monotonic() + _KILL_GRACE))

    def _reap(self) -> None:
        """Finish off dying process groups; log JupyterLabs that exited on their own."""
        still = []
        for dying in self._dying:
            proc = dying.ide.proc
            if _exit_status(proc) is None and time.monotonic() < dying.kill_at:
                still.append(dying)
                continue
            # The leader is a zombie (or still there): its pid, the group id, is not reused
            # yet, so this reaches only stragglers of the group (npm, kernels) or the leader.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            shutil.rmtree(dying.ide.workdir, ignore_errors=True)
        self._dying = still
        for ide in self.ides.values():
            if isinstance(ide, JupyterIde) and not ide.exit_logged:
                code = _exit_status(ide.proc)
                if code is not None:
                    ide.exit_logged = True
                    log.warning(
                        "fakecloud: JupyterLab of server %s exited (status %s); see %s",
                        ide.server_id,
                        code,
                        ide.log_path,
                    )

    # -- the stub loop -----------------------------------------------------------------
    def _run(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def admits(self, server_id: str, source: str) -> bool:
        """Do the server's security groups, as Neutron stored them, admit a TCP connection
        from ``source`` to the IDE port? Always, unless the cloud enforces groups."""
        with self.state.lock:
            if not self.state.config.enforce_security_groups:
                return True
            try:
                return self.state.admits(server_id, source, self.port)
            except ValueError:  # not an IP address (a unix socket cannot reach a VM)
                return False

    # -- faults and inspection --------------------------------------------------------
    def hang(self, server_id: str, hung: bool) -> None:
        with self._lock:
            if hung:
                self._hung.add(server_id)
            else:
                self._hung.discard(server_id)
            ide = self.ides.get(server_id)
            if ide is not None:
                self._set_hung(ide, hung)

    def _set_hung(self, ide: StubIde | JupyterIde, hung: bool) -> None:
        if isinstance(ide, StubIde):
            self._run(ide.set_hung(hung))
        else:
            ide.hung = hung
            if _exit_status(ide.proc) is None:  # stopped, the kernel still accepts connections
                _signal_group(ide.proc.pid, signal.SIGSTOP if hung else signal.SIGCONT)

    def running(self, server_id: str) -> bool:
        """Is the server's IDE up (a hung one too)?"""
        with self._lock:
            ide = self.ides.get(server_id)
            if isinstance(ide, JupyterIde):
                return _exit_status(ide.proc) is None
            return ide is not None

    def skipped(self, server_id: str) -> str | None:
        """Why an ACTIVE server has no IDE (no token, no machine tag, port busy), if so."""
        with self._lock:
            return self._skipped.get(server_id)

    def workdir(self, server_id: str) -> Path | None:
        """The temporary HOME/root dir of a server's JupyterLab (its log: jupyterlab.log)."""
        with self._lock:
            ide = self.ides.get(server_id)
            return ide.workdir if isinstance(ide, JupyterIde) else None

    def pids(self) -> list[int]:
        """Process group ids of JupyterLabs not yet reaped (running or dying)."""
        with self._lock:
            procs = [ide.proc for ide in self.ides.values() if isinstance(ide, JupyterIde)]
            procs += [dying.ide.proc for dying in self._dying]
            return [proc.pid for proc in procs if proc.returncode is None]


async def _close_all(stubs: list[StubIde]) -> None:
    await asyncio.gather(*(stub.close() for stub in stubs), return_exceptions=True)
