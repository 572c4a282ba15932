"""``FakeCloud``: runs the fake Keystone/Nova/Cinder on loopback and steers it from tests.

    with FakeCloud(boot_time=0.2, max_instances=5) as cloud:
        cloud.write_clouds_yaml(tmp_path)          # clouds "fake" and "fake-appcred"
        cloud.fail_next("POST", "/compute/v2.1/servers", 503)
        ...
        assert cloud.count("GET", "/compute/v2.1/servers/detail") == 3

The HTTP server is werkzeug's threaded ``make_server`` in a daemon thread. All state lives
in ``CloudState`` behind one lock, so the methods below are safe to call while requests run.

With ``ide="stub"`` or ``ide="jupyterlab"`` servers get loopback fixed IPs (127.1.0.0/16) and
an IDE listening on ``(IP, ide_port)`` while ``ACTIVE`` (see ``ide.py``):

    with FakeCloud(ide="stub", boot_time=0.2) as cloud:
        ...  # create a server with cloud_init.user_data(...) and a machine-7 tag
        requests.get(f"http://{cloud.ide_address(sid)}/ide/7/api/status",
                     headers={"Authorization": f"token {token}"})   # 200 once ACTIVE
        cloud.ide_hang(sid)                                           # now it never answers
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import yaml
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from .app import FakeCloudApp
from .compute import parse_microversion, server_view
from .ide import IdeManager
from .state import CloudState, Config, FailRule, LoggedRequest
from .volume import volume_view

NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


class _QuietHandler(WSGIRequestHandler):
    """Request handler without werkzeug's per-request access log line."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class FakeCloud:
    """A fake OpenStack cloud (Keystone v3, Nova v2.1, Cinder v3) for openstacksdk.

    Keyword arguments set ``state.Config`` fields, e.g. ``boot_time``, ``delete_time``,
    ``volume_time``, ``latency``, ``max_instances``, ``max_cores``, ``max_ram``,
    ``network_name``, ``images`` (set of ids), ``flavors`` ({id: {vcpus, ram, disk}}),
    ``max_limit``, ``username``/``password``/``project_name``, ``app_credential_*``,
    ``ide`` (``"none"``, ``"stub"`` or ``"jupyterlab"``: what answers on an ACTIVE server's
    fixed IP, see ``ide.py``) and ``ide_port`` (8888).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True, **config: Any
    ):
        self.config = Config(**config)
        self.state = CloudState(self.config)
        self.host = host
        self._port = port
        self._quiet = quiet
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._ide: IdeManager | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Self:
        """Bind (port 0 picks a free port) and serve in a daemon thread."""
        if self._server is not None:
            return self
        handler = _QuietHandler if self._quiet else WSGIRequestHandler
        app: Callable[..., Iterable[bytes]] = FakeCloudApp(self.state)
        ide = None
        if self.config.ide != "none":
            ide = IdeManager(self.state, self.config.ide, self.config.ide_port)
            app = _reconciling(app, ide)
        self._server = make_server(
            self.host, self._port, app, threaded=True, request_handler=handler
        )
        if ide is not None:  # before the first request: it hands out the fixed IPs
            ide.start(name=f"fakecloud-ide:{self.port}")
            self._ide = ide
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(0.05,),
            name=f"fakecloud:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket; stop every IDE (and its threads and
        processes)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        if self._ide is not None:
            self._ide.stop()
            self._ide = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeCloud is not started")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (services live under it)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/identity/v3"

    # -- clouds.yaml ----------------------------------------------------------------------
    def clouds_config(
        self, cloud_name: str = "fake", compute_api_version: str | None = None
    ) -> dict[str, Any]:
        """``{"clouds": {name: password cloud, name-appcred: application credential cloud}}``.

        No ``compute_api_version`` by default: openstacksdk then negotiates per resource
        (2.96 for servers, 2.89 for volume attachments). A value with a minor part pins
        *every* compute request to it: "2.1" would make tags at create fail with 400.
        """
        cfg = self.config
        common: dict[str, Any] = {
            "region_name": cfg.region,
            "interface": "public",
            "identity_api_version": 3,
        }
        if compute_api_version is not None:
            common["compute_api_version"] = compute_api_version
        password = {
            "auth": {
                "auth_url": self.auth_url,
                "username": cfg.username,
                "password": cfg.password,
                "project_name": cfg.project_name,
                "user_domain_name": cfg.domain_name,
                "project_domain_name": cfg.domain_name,
            },
            **common,
        }
        appcred = {
            "auth_type": "v3applicationcredential",
            "auth": {
                "auth_url": self.auth_url,
                "application_credential_id": cfg.app_credential_id,
                "application_credential_secret": cfg.app_credential_secret,
            },
            **common,
        }
        return {"clouds": {cloud_name: password, f"{cloud_name}-appcred": appcred}}

    def clouds_yaml(
        self, path: str | Path, cloud_name: str = "fake", compute_api_version: str | None = None
    ) -> Path:
        """Write the clouds.yaml to ``path`` (a file name) and return it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        config = self.clouds_config(cloud_name, compute_api_version)
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        return target

    def write_clouds_yaml(
        self,
        directory: str | Path,
        cloud_name: str = "fake",
        compute_api_version: str | None = None,
    ) -> Path:
        """Write ``<directory>/clouds.yaml``; point ``OS_CLIENT_CONFIG_FILE`` at the result."""
        return self.clouds_yaml(Path(directory) / "clouds.yaml", cloud_name, compute_api_version)

    # -- fault injection --------------------------------------------------------------------
    def fail_next(
        self,
        method: str,
        path_prefix: str,
        status: int,
        count: int = 1,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``count`` requests ``method`` (or ``"*"``) to a path starting with
        ``path_prefix`` (e.g. ``/compute/v2.1/servers``) with ``status`` and a Nova-style body
        (Keystone-style under ``/identity``). Nothing else happens for those requests."""
        rule = FailRule(
            method.upper() if method != "*" else "*",
            path_prefix,
            status,
            count,
            message,
            dict(headers or {}),
        )
        with self.state.lock:
            self.state.fail_rules.append(rule)

    def stall_next(self, method: str, path_prefix: str, seconds: float, count: int = 1) -> None:
        """The next ``count`` requests ``method`` (or ``"*"``) to a path starting with
        ``path_prefix`` wait ``seconds`` before they are handled (a create stalled in Nova:
        the server appears only then, whether or not the client is still there)."""
        with self.state.lock:
            self.state.stalls.append(
                [method.upper() if method != "*" else "*", path_prefix, seconds, count]
            )

    def error_server(self, server_id: str, fault_message: str = NO_VALID_HOST) -> None:
        """Put an existing server into ``ERROR`` now, with ``fault.message``."""
        with self.state.lock:
            server = self.state.servers[server_id]
            server.error_at = self.state.now()
            server.fault_message = fault_message
        self._reconcile_ides()

    def error_next_create(self, fault_message: str = NO_VALID_HOST, count: int = 1) -> None:
        """The next ``count`` created servers go ``BUILD`` → ``ERROR`` (not ``ACTIVE``)."""
        with self.state.lock:
            self.state.error_next_creates.extend([fault_message] * count)

    def vanish_server(self, server_id: str) -> None:
        """The server disappears without a DELETE (as if someone else deleted it)."""
        with self.state.lock:
            self.state.forget_server(server_id, tombstone=False)
        self._reconcile_ides()

    def lose_next_create_response(self, mode: str = "502") -> None:
        """The next ``POST /servers`` creates the server but the client gets ``502`` (or
        ``"500"``, or ``"reset"``: the connection is closed without an answer)."""
        if mode not in ("502", "500", "reset"):
            raise ValueError(f"unknown mode {mode!r}")
        with self.state.lock:
            self.state.lost_creates.append(mode)

    def set_quota(
        self, max_instances: int, max_cores: int | None = None, max_ram: int | None = None
    ) -> None:
        """Change the project's quota (-1 = unlimited). Existing servers are kept."""
        with self.state.lock:
            self.config.max_instances = max_instances
            if max_cores is not None:
                self.config.max_cores = max_cores
            if max_ram is not None:
                self.config.max_ram = max_ram

    def set_boot_time(self, seconds: float) -> None:
        """Boot time of servers created from now on."""
        with self.state.lock:
            self.config.boot_time = seconds

    def set_latency(self, seconds: float) -> None:
        """Delay added to every request."""
        with self.state.lock:
            self.config.latency = seconds

    def expire_tokens(self) -> None:
        """Invalidate every issued token (the next request gets 401 and must re-auth)."""
        with self.state.lock:
            self.state.tokens.clear()

    def ide_hang(self, server_id: str, hung: bool = True) -> None:
        """The server's IDE stops answering: connections are accepted, requests never get a
        reply (a stub waits; a JupyterLab gets SIGSTOP). ``hung=False`` lets it answer again
        (pending requests too). Also works before the IDE starts. ``ide="none"``: no-op."""
        with self.state.lock:
            if server_id not in self.state.servers:
                raise KeyError(server_id)
        if self._ide is not None:
            self._ide.hang(server_id, hung)

    def _reconcile_ides(self) -> None:
        if self._ide is not None:
            self._ide.reconcile()

    # -- inspection -------------------------------------------------------------------------
    def ide_running(self, server_id: str) -> bool:
        """Is the server's IDE up (listening; hung ones too; for JupyterLab: the process is
        alive, which is not yet answering)? False for unknown servers and ``ide="none"``."""
        return self._ide is not None and self._ide.running(server_id)

    def ide_address(self, server_id: str) -> str:
        """``ip:ide_port`` where the server's IDE listens (once ACTIVE), as the openstack
        backend derives it from the first fixed address."""
        with self.state.lock:
            return f"{self.state.servers[server_id].ip}:{self.config.ide_port}"

    def ide_skipped(self, server_id: str) -> str | None:
        """Why an ACTIVE server got no IDE (no token in its user-data, no ``machine-<id>``
        tag, its port busy), or None."""
        return self._ide.skipped(server_id) if self._ide is not None else None

    def ide_workdir(self, server_id: str) -> Path | None:
        """The temporary HOME/root dir of a server's JupyterLab (its output is in
        ``jupyterlab.log`` there); None for stubs."""
        return self._ide.workdir(server_id) if self._ide is not None else None

    def ide_pids(self) -> list[int]:
        """Pids (= process group ids) of JupyterLab processes not yet reaped."""
        return self._ide.pids() if self._ide is not None else []

    def servers(self) -> list[dict[str, Any]]:
        """Existing servers as ``GET /servers/detail`` at the max microversion shows them,
        newest first, plus ``user_data`` (base64, as sent) and ``networks`` (as sent)."""
        mv = parse_microversion(self.config.max_microversion)
        with self.state.lock:
            out = []
            for server in self.state.live_servers():
                view = server_view(self.state, server, self.url, mv)
                view.update(user_data=server.user_data, networks=server.networks)
                out.append(view)
            return out

    def server(self, server_id: str) -> dict[str, Any] | None:
        return next((s for s in self.servers() if s["id"] == server_id), None)

    def volumes(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return [volume_view(self.state, v, self.url) for v in self.state.volumes.values()]

    @property
    def request_log(self) -> list[LoggedRequest]:
        """Every request so far as ``(method, path, query)``, oldest first (a copy)."""
        with self.state.lock:
            return list(self.state.request_log)

    @property
    def counts(self) -> Counter[tuple[str, str]]:
        """Requests per ``(method, route)``; routes are rule strings such as
        ``/compute/v2.1/servers/<server_id>`` (``<unrouted>`` for unknown paths)."""
        with self.state.lock:
            return Counter(self.state.counts)

    def count(self, method: str, route: str) -> int:
        with self.state.lock:
            return self.state.counts[(method.upper(), route)]

    def reset_counters(self) -> None:
        """Clear ``request_log`` and ``counts``."""
        with self.state.lock:
            self.state.request_log.clear()
            self.state.counts.clear()


def _reconciling(
    app: Callable[..., Iterable[bytes]], ide: IdeManager
) -> Callable[..., Iterable[bytes]]:
    """Reconcile the IDEs after each request, before its answer goes out: a client that sees
    a server ``ACTIVE`` finds its IDE listening, one that deleted it finds it gone."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        finally:
            ide.reconcile()

    return wsgi
