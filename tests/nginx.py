"""A real nginx for tests and benchmarks: the standalone configuration `labpool nginx-config
--standalone` renders (or any nginx.conf text), run in the foreground under a temporary
prefix, on loopback ports.

    port = free_port()
    settings = dataclasses.replace(settings, public_url=f"http://127.0.0.1:{port}", ide_proxy=True)
    with Nginx(settings, tmp_path / "nginx", tool_upstream="127.0.0.1:8080", auth_cache_s=1) as nginx:
        requests.get(nginx.url + "/healthz")

Needs an nginx with `auth_request` (Debian's nginx-light has it) on PATH or at
/usr/sbin/nginx; `nginx_binary()` is None without one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from config.settings import Settings
from lti_tool.nginx import render_standalone


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


class NginxError(Exception):
    """nginx did not start; the message holds its output and error log."""


class Nginx:
    """nginx in the foreground (`-g "daemon off;"`) with everything under `prefix`.

    `conf` is either the nginx.conf text (then give `ports`, those it listens on) or the
    settings to render the standalone configuration from (`render_kwargs` go to
    `lti_tool.nginx.render_standalone`: tool_upstream, listen, auth_cache_s); the port then
    is `listen`'s or the public URL's. `url` is http://127.0.0.1:<first port>.
    """

    def __init__(
        self,
        conf: str | Settings,
        prefix: Path,
        *,
        ports: tuple[int, ...] = (),
        **render_kwargs: Any,
    ) -> None:
        self.prefix = Path(prefix).resolve()
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "logs").mkdir(exist_ok=True)
        if isinstance(conf, Settings):
            conf_text = render_standalone(conf, prefix=self.prefix, **render_kwargs)
            listen = str(render_kwargs.get("listen") or "")
            port = int(listen.rpartition(":")[2]) if listen else urlsplit(conf.public_url).port
            ports = ports or ((port,) if port else ())
        else:
            conf_text = conf
        if not ports:
            raise ValueError("the ports nginx listens on are needed to know when it is up")
        if os.geteuid() == 0 and not conf_text.lstrip().startswith("user "):
            # As root, nginx's workers would run as `nobody`, who cannot write the cache and
            # temp folders under a private temporary directory.
            conf_text = "user root;\n" + conf_text
        self.conf_text = conf_text
        self.conf_path = self.prefix / "nginx.conf"
        self.conf_path.write_text(conf_text)
        self.ports = ports
        self.url = f"http://127.0.0.1:{ports[0]}"
        self.process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    def _command(self, *extra: str) -> list[str]:
        binary = nginx_binary()
        if binary is None:
            raise NginxError("nginx is not installed (apt-get install nginx-light)")
        return [
            binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf_path),
            "-e",
            str(self.prefix / "logs" / "error.log"),
            *extra,
        ]

    def check(self) -> None:
        """`nginx -t`: raise NginxError with nginx's message when the config is refused."""
        done = subprocess.run(
            self._command("-t", "-q", "-g", "daemon off;"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise NginxError(f"nginx -t refused {self.conf_path}:\n{done.stderr}")

    def start(self, timeout: float = 15) -> Self:
        self.check()
        self._out = (self.prefix / "logs" / "stdout.log").open("wb")
        self.process = subprocess.Popen(
            self._command("-g", "daemon off;"),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        waiting = list(self.ports)
        while waiting:
            if self.process.poll() is not None:
                raise NginxError(f"nginx exited ({self.process.returncode}):\n{self.logs()}")
            if time.monotonic() > deadline:
                self.stop()
                raise NginxError(
                    f"nginx did not listen on {waiting} in {timeout} s:\n{self.logs()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5),
            ):
                waiting.pop(0)
                continue
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10) -> None:
        """Graceful stop (SIGQUIT), then kill."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._out.close()

    def logs(self, chars: int = 4000) -> str:
        parts = []
        for name in ("stdout.log", "error.log"):
            with contextlib.suppress(OSError):
                parts.append(
                    f"--- {name}\n"
                    + (self.prefix / "logs" / name).read_text(errors="replace")[-chars:]
                )
        return "\n".join(parts)

    def access_log(self) -> str:
        try:
            return (self.prefix / "logs" / "access.log").read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclasses.dataclass
class BehindNginx:
    """The tool served behind nginx: `url` is nginx's (the tool's public URL)."""

    url: str
    settings: Settings
    flask_app: Any  # the tool's Flask app
    served: Any  # what nginx's upstream serves: the app, or `wrap(app)`
    tool: Any  # tests.fakeplatform.ServedApp: nginx's upstream
    nginx: Nginx


@contextlib.contextmanager
def tool_behind_nginx(
    settings: Settings,
    platform: Any,
    prefix: Path,
    *,
    wrap: Any = None,
    proxy_count: int = 1,
    **nginx_kwargs: Any,
) -> Iterator[BehindNginx]:
    """Another instance of the tool (same database, Redis and platform registration as
    `settings`') behind a real nginx on a public URL of its own, `ide_proxy` on; the fake
    platform `platform` (tests.fakeplatform.FakePlatform) accepts launches into it until the
    block ends. `wrap` wraps the Flask app (a WSGI middleware class); `nginx_kwargs` go to
    `lti_tool.nginx.render_standalone` (auth_cache_s, …)."""
    from lti_tool.web.app import create_app
    from tests.fakeplatform import ServedApp

    url = f"http://127.0.0.1:{free_port()}"
    settings = dataclasses.replace(
        settings, public_url=url, ide_proxy=True, proxy_count=proxy_count
    )
    flask_app = create_app(settings)
    saved = platform.tool_url, list(platform.registered_redirect_uris)
    platform.register_tool(url, [*saved[1], url + platform.LAUNCH_PATH])
    served = wrap(flask_app) if wrap else flask_app
    try:
        with (
            ServedApp(served) as tool,
            Nginx(
                settings, prefix, tool_upstream=f"127.0.0.1:{tool.port}", **nginx_kwargs
            ) as nginx,
        ):
            yield BehindNginx(url, settings, flask_app, served, tool, nginx)
    finally:
        platform.tool_url, platform.registered_redirect_uris = saved
