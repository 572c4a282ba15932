"""Talking to a machine's IDE from the tool's side: its health and its activity.

An IDE's address is `host:port` (cloud machines, and local ones in direct mode) or
`unix:/path/ide.sock` (local machines in their sandbox, which has no network). Requests
carry the machine's token in `X-Labpool-Token`, the header the IDE's Jupyter config accepts
from the proxy (see `provisioning/ide_config.py`).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

TOKEN_HEADER = "X-Labpool-Token"
UNIX = "unix:"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def nginx_upstream(address: str) -> str:
    """The address as nginx's `proxy_pass http://<this><uri>` wants it."""
    return address + ":" if address.startswith(UNIX) else address


def ide_get(address: str, path: str, token: str, timeout: float = 2) -> tuple[int, bytes]:
    """GET `path` from the IDE at `address`; (status, body), or (0, b"") if it did not answer."""
    if address.startswith(UNIX):
        conn: http.client.HTTPConnection = _UnixConnection(address[len(UNIX) :], timeout)
    else:
        # http.client parses `host:port` itself, and unwraps `[IPv6]:port` (a server on an
        # IPv6-only cloud network) only when it parses.
        conn = http.client.HTTPConnection(address, timeout=timeout)
    try:
        # Both headers: JupyterLab reads X-Labpool-Token; a cloud image's other IDEs and
        # older configurations read the standard one.
        conn.request("GET", path, headers={TOKEN_HEADER: token, "Authorization": f"token {token}"})
        resp = conn.getresponse()
        return resp.status, resp.read(1_000_000)
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def ide_status(address: str, base_url: str, token: str) -> dict[str, Any] | None:
    """Jupyter's /api/status of the IDE, or None if it does not answer with one."""
    status, body = ide_get(address, f"{base_url}api/status", token)
    if status != 200:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
