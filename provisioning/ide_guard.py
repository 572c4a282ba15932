"""The IDE guard: a cloud machine's IDE port admits only requests that carry its token.

code-server authenticates with its own login form and a cookie, not with a
header, so on a cloud machine it runs with `--auth none` bound to 127.0.0.1, and this guard
listens on the IDE port in front of it. A request whose `Authorization: token <T>` (or
`Bearer <T>`) is not the machine's own IDE token is answered 403 on the machine itself, so
another student's machine on the private network gets nothing, whatever the security group
says. The proxy (nginx) adds that header to every request it passes to an IDE.

One request per connection: the guard checks the request head, forwards it without the
Authorization header and with `Connection: close` (a WebSocket upgrade keeps its
`Connection: upgrade` and becomes a plain byte stream), then relays bytes both ways. So no
second request can ride on a connection the first one opened.

Cloud-init writes this file to the machine and systemd runs it with the machine's python3
(standard library only, Python 3.8+):
    IDE_GUARD_TOKEN=<token> python3 ide_guard.py 0.0.0.0:8888 127.0.0.1:8889
It carries nothing of the tool: the token is the machine's own, from a root-only env file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import sys

HEAD_LIMIT = 64 * 1024
HEAD_TIMEOUT = 30.0
_AUTH = re.compile(rb"(?:token|bearer)[ \t]+(\S+)", re.IGNORECASE)
_DENIED = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
    b"Connection: close\r\n\r\nForbidden\n"
)
_BAD = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: close\r\n\r\nBad Request\n"
)
_DOWN = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: close\r\n\r\nBad Gateway\n"
)


def checked_head(head: bytes, token: bytes) -> bytes | None:
    """The request head to forward, or None when it does not carry the token (exactly one
    Authorization header, with the machine's token)."""
    lines = head[:-4].split(b"\r\n")
    given = [
        line.split(b":", 1)[1].strip()
        for line in lines[1:]
        if line.split(b":", 1)[0].strip().lower() == b"authorization" and b":" in line
    ]
    match = _AUTH.fullmatch(given[0]) if len(given) == 1 else None
    if match is None or not hmac.compare_digest(match.group(1), token):
        return None
    kept, upgrade = [lines[0]], False
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"connection":
            upgrade = b"upgrade" in line.split(b":", 1)[1].lower()
        if name not in (b"authorization", b"connection"):
            kept.append(line)
    kept.append(b"Connection: upgrade" if upgrade else b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n"


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _serve(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    token: bytes,
    upstream: tuple[str, int],
) -> None:
    try:
        try:
            head = await asyncio.wait_for(client_r.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        # asyncio.TimeoutError: the builtin only from Python 3.11; the machine's may be older.
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):  # noqa: UP041
            client_w.write(_BAD)
            return
        forwarded = checked_head(head, token)
        if forwarded is None:
            client_w.write(_DENIED)
            return
        try:
            up_r, up_w = await asyncio.open_connection(*upstream)
        except OSError:
            client_w.write(_DOWN)
            return
        up_w.write(forwarded)
        to_upstream = asyncio.ensure_future(_relay(client_r, up_w))
        await _relay(up_r, client_w)  # the IDE's answer, to its end: then the client's turn is over
        to_upstream.cancel()
        up_w.close()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            await client_w.drain()
        client_w.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main(listen: str, upstream: str, token: str) -> None:
    target = _address(upstream)
    secret = token.encode()
    host, port = _address(listen)
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, secret, target), host, port, limit=HEAD_LIMIT
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    machine_token = os.environ.get("IDE_GUARD_TOKEN", "")
    if len(sys.argv) != 3 or len(machine_token) < 16:
        sys.exit("usage: IDE_GUARD_TOKEN=<token> ide_guard.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT")
    asyncio.run(main(sys.argv[1], sys.argv[2], machine_token))
