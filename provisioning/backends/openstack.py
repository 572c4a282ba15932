"""The `openstack` backend: each machine is a Nova server booted from a golden image, whose
cloud-init user-data starts the IDE on the private network (no floating IP).

Its machines are pooled: the reconciler sees a whole pool in one paged list and creates
servers in batches (`PooledBackend`), so there is no per-machine start or poll here — a
lost create is found by tag on the next pass (`provisioning/reconcile_decisions.py`).

It talks to the cloud through openstacksdk's proxy layer (`conn.compute.*`: one request per
call; the cloud layer adds lookups and floating IPs), with one `Connection` per process
(RQ forks its work horses: a connection made before a fork is never reused after it).

A server carries its machine: name `labpool-m<id>`, tags `labpool`, `pool-<pool id>`,
`machine-<id>` (Nova filters lists by tags, never by metadata: microversion 2.26 to filter,
2.52 to tag at create) and metadata `labpool_machine`. So every call is idempotent: a start
is preceded by the machine moving to `starting` in the database, and the reconciler finds
by tag whatever a create left (`list_pool_servers`, one paged list for a whole pool).

Nova's answers mapped to our errors (see docs/openstack.md): 403 at create is a quota
(`QuotaExceeded`), 409 a task-state conflict (`CloudConflict`, retry later), 5xx, 429,
timeouts and refused connections `CloudUnavailable` (retry with backoff); "no valid host"
comes later, as the server in ERROR with a fault, which `list_pool_servers` reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import keystoneauth1.exceptions as ks_exc
import openstack
import openstack.connection
from openstack import exceptions as os_exc

from config.settings import Settings
from provisioning import cloud_init
from provisioning.backends import BACKENDS
from provisioning.backends.base import (
    MachineSpec,
    PooledBackend,
    ServerView,
    StudentVolumes,
)
from provisioning.errors import (
    BackendUnavailable,
    CloudConflict,
    CloudUnavailable,
    ProvisioningError,
    QuotaExceeded,
)
from provisioning.ide_http import ide_get

if TYPE_CHECKING:
    from provisioning.models import Environment

__all__ = [
    "CloudSpec",
    "OpenStackBackend",
    "ServerView",
    "connection_for",
    "forget_connections",
    "token_digest",
    "CloudConflict",
    "CloudUnavailable",
    "QuotaExceeded",
]

log = logging.getLogger(__name__)

GONE = "gone"
_MACHINE_TAG = re.compile(r"machine-([0-9]{1,18})")
TOKEN_DIGEST_KEY = "labpool_ide_token_sha256"


@dataclass(frozen=True)
class CloudSpec:
    """What every machine of an environment boots from, and where."""

    image_id: str
    flavor_id: str
    network_id: str
    security_groups: list[str] = field(default_factory=list)
    key_name: str | None = None  # for an admin's SSH access, through the image's default user
    ide_port: int = 8888
    # Nova keys a server's addresses by network *name*; when unset, the first fixed address
    # of any network is used (our servers have one NIC, on network_id).
    network_name: str | None = None


# -- one Connection per process ---------------------------------------------------------
_connections: dict[tuple[str, int], openstack.connection.Connection] = {}
_connections_lock = threading.Lock()


def connection_for(cloud: str, api_timeout: float | None = None) -> openstack.connection.Connection:
    """This process's connection to `cloud` (clouds.yaml or OS_CLIENT_CONFIG_FILE).

    Creating one costs nothing; its first call adds three requests (identity discovery,
    token, compute discovery), which is why it is kept. The first caller's `api_timeout`
    (seconds per request; None: clouds.yaml's) holds for the connection's life.
    """
    key = (cloud, os.getpid())
    with _connections_lock:
        conn = _connections.get(key)
        if conn is None:
            conn = openstack.connect(cloud=cloud, api_timeout=api_timeout)
            _connections[key] = conn
        return conn


def forget_connections() -> None:
    """Close this process's connections (tests, or after clouds.yaml changed)."""
    pid = os.getpid()
    with _connections_lock:
        for (_, owner), conn in list(_connections.items()):
            if owner == pid:  # a parent's connection is the parent's to close
                conn.close()
        _connections.clear()


def token_digest(token: str) -> str:
    """A fingerprint of an IDE token, kept in the server's metadata so that an admin (or a
    later check) can tell which token a server was booted with without the token itself. A
    SHA-256 of 256 random bits reveals nothing of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


# -- the backend ------------------------------------------------------------------------
class OpenStackBackend(PooledBackend, StudentVolumes):
    name = "openstack"
    capabilities = BACKENDS[name].capabilities

    def __init__(
        self,
        cloud: str,
        cloud_spec: CloudSpec,
        *,
        api_timeout: float | None = 30.0,
        frame_ancestors: str | Callable[[], str] = "'self'",
    ):
        """`cloud` names an entry of clouds.yaml; `api_timeout` bounds every request, so a
        hung cloud costs a worker seconds, not forever (None: clouds.yaml's `api_timeout`).
        `frame_ancestors` is the IDE's CSP source list (or what computes it, asked only when
        a server is created: it reads the database, which a caller inside a transaction must
        not be made to wait for), baked into each server's user-data at boot (a platform
        registered later is admitted by machines booted after it)."""
        self.cloud = cloud
        self.cloud_spec = cloud_spec
        self.api_timeout = api_timeout
        self._frame_ancestors = frame_ancestors

    @property
    def _compute(self) -> Any:
        with self._errors("connect to the cloud"):
            return connection_for(self.cloud, self.api_timeout).compute

    @property
    def network(self) -> Any:
        """openstacksdk's network (Neutron) proxy, for the environment's security groups."""
        with self._errors("connect to the cloud"):
            return connection_for(self.cloud, self.api_timeout).network

    def cloud_errors(self, action: str, *, creating: bool = False) -> Any:
        """The context that turns openstacksdk's errors into ours (see `_errors`)."""
        return self._errors(action, creating=creating)

    def frame_ancestors(self) -> str:
        """Who may frame this backend's IDEs (CSP source list)."""
        value = self._frame_ancestors
        return value if isinstance(value, str) else value()

    @classmethod
    def for_environment(
        cls, settings: Settings, environment: Environment | None
    ) -> OpenStackBackend:
        """The cloud backend for an environment: its image, flavor and network, on the cloud
        named by the settings."""
        from provisioning.backends import ide_frame_ancestors

        if environment is None:
            raise BackendUnavailable("the openstack backend needs the machine's environment")
        missing = [name for name, _ in cls.capabilities.needs if not getattr(environment, name)]
        if missing:
            raise BackendUnavailable(
                f"environment {environment.name!r} lacks "
                f"{', '.join(missing)} for the openstack backend"
            )
        spec = CloudSpec(
            image_id=environment.image_id or "",
            flavor_id=environment.flavor_id or "",
            network_id=environment.network_id or "",
            network_name=environment.network_name,
            security_groups=list(environment.security_groups or []),
            key_name=environment.key_name,
            ide_port=environment.ide_port,
        )
        return cls(
            settings.openstack_cloud,
            spec,
            api_timeout=settings.openstack_api_timeout_s,
            # read when a server boots, not now (see __init__)
            frame_ancestors=lambda: ide_frame_ancestors(settings),
        )

    # -- the PooledBackend interface ------------------------------------------------------
    def create(self, machine: MachineSpec) -> str:
        """Boot a server for a machine the caller knows has none (the reconciler, which has
        just listed the pool); returns the server id. `machine.ide_token` must be set."""
        if machine.ide_kind not in self.capabilities.ide_kinds:
            raise BackendUnavailable(
                f"the openstack backend cannot run {machine.ide_kind!r} machines"
            )
        if not machine.ide_token:
            raise ValueError("create() needs the machine's IDE token")
        return self._create(machine, _pool_id(machine), machine.ide_token)

    def health(self, machine: MachineSpec) -> bool:
        """Does the IDE answer, with its token, at its base URL (no redirects followed)?
        `ide_get` sends the token as `Authorization: token …` too, which is what
        code-server's guard (`provisioning/ide_guard.py`) reads."""
        if not machine.address or not machine.ide_token:
            return False
        # code-server has no base URL (the proxy strips the prefix).
        path = "/healthz" if machine.ide_kind == "code-server" else f"{machine.base_url}api/status"
        status, _ = ide_get(machine.address, path, machine.ide_token)
        return status == 200

    def stop(self, machine: MachineSpec) -> None:
        """Delete the machine's server; one that is already gone is fine. Without a server
        id (a start that never recorded one), every server tagged with the machine goes."""
        server_id = _server_id(machine)
        if server_id:
            self._delete(server_id)
            return
        for server in self._servers_of_machine(machine.id):
            self._delete(server.id)

    def list_pool_servers(self, pool_id: int) -> list[ServerView]:
        """Every server of a pool: `GET /servers/detail?tags=…` page by page (Nova's page
        size, `servers_links`), one request per page.

        Through the proxy's plain REST call, not `compute.servers()`: building an
        openstacksdk `Server` costs milliseconds per server (10,000 servers: ~50 s a pass),
        and the pass needs five fields of each."""
        compute = self._compute
        version = _list_microversion(compute)
        url: str | None = "/servers/detail"
        params: dict[str, Any] | None = {"tags": f"labpool,pool-{pool_id}"}
        views: list[ServerView] = []
        seen: set[str] = set()
        with self._errors("list the pool's servers"):
            while url:
                response = compute.get(url, params=params, microversion=version)
                os_exc.raise_from_response(response)
                body = response.json()
                for raw in body.get("servers", []):
                    server = _ListedServer(raw)
                    views.append(
                        ServerView(
                            server_id=server.id,
                            machine_id=_machine_id(server),
                            status=str(server.status),
                            address=self._address(server),
                            fault=_fault(server),
                            created=_created(server),
                        )
                    )
                url = next(
                    (
                        link.get("href")
                        for link in body.get("servers_links", [])
                        if link.get("rel") == "next"
                    ),
                    None,
                )
                if url in seen:  # a cloud whose "next" goes round in circles
                    break
                if url:
                    seen.add(url)
                params = None  # the next link carries the query
        return views

    def quota_headroom(self) -> int | None:
        """How many more servers the project's quota allows; None when it is unlimited."""
        with self._errors("read the cloud's quota"):
            absolute = self._compute.get_limits().absolute
        limit, used = absolute.instances, absolute.instances_used
        if not isinstance(limit, int) or limit < 0:
            return None
        return max(0, limit - int(used or 0))

    # -- student volumes (Cinder), attached to whichever machine the student gets ------------
    def create_volume(self, name: str, size_gb: int, metadata: dict[str, str]) -> str:
        with self._errors("create a student's volume", creating=True):
            conn = connection_for(self.cloud, self.api_timeout)
            return str(
                conn.block_storage.create_volume(size=size_gb, name=name, metadata=metadata).id
            )

    def volume_status(self, volume_id: str) -> str:
        """Cinder's status (creating, available, in-use, error, …), or `gone`."""
        with self._errors("read a student's volume"):
            conn = connection_for(self.cloud, self.api_timeout)
            try:
                return str(conn.block_storage.get_volume(volume_id).status)
            except os_exc.NotFoundException:
                return GONE

    def find_volume(self, name: str) -> str | None:
        with self._errors("find a student's volume"):
            conn = connection_for(self.cloud, self.api_timeout)
            found = [v for v in conn.block_storage.volumes(name=name) if v.name == name]
            return str(found[0].id) if found else None

    def volume_servers(self, volume_id: str) -> list[str]:
        with self._errors("read a student's volume"):
            conn = connection_for(self.cloud, self.api_timeout)
            try:
                volume = conn.block_storage.get_volume(volume_id)
            except os_exc.NotFoundException:
                return []
            return [str(a.get("server_id")) for a in volume.attachments or []]

    def attach_volume(self, server_id: str, volume_id: str) -> None:
        """Attach; the image's agent mounts it as the student's home (see cloud_init)."""
        with self._errors("attach a student's volume"):
            self._compute.create_volume_attachment(server_id, volume=volume_id)

    def delete_volume(self, volume_id: str) -> None:
        """Only ever on an admin's explicit request: the student's files go with it."""
        with self._errors("delete a student's volume"):
            connection_for(self.cloud, self.api_timeout).block_storage.delete_volume(
                volume_id, ignore_missing=True
            )

    # -- cloud calls -------------------------------------------------------------------------
    def _create(self, machine: MachineSpec, pool_id: int, token: str) -> str:
        spec = self.cloud_spec
        extra: dict[str, Any] = {}
        if spec.key_name:
            extra["key_name"] = spec.key_name
        if spec.security_groups:
            extra["security_groups"] = [{"name": name} for name in spec.security_groups]
        with self._errors("create the machine's server", creating=True):
            server = self._compute.create_server(
                name=f"labpool-m{machine.id}",
                image_id=spec.image_id,
                flavor_id=spec.flavor_id,
                networks=[{"uuid": spec.network_id}],
                user_data=cloud_init.user_data(
                    machine.id,
                    machine.ide_kind,
                    token,
                    spec.ide_port,
                    frame_ancestors=self.frame_ancestors(),
                ),
                tags=["labpool", f"pool-{pool_id}", f"machine-{machine.id}"],
                metadata={
                    "labpool_machine": str(machine.id),
                    TOKEN_DIGEST_KEY: token_digest(token),
                },
                **extra,
            )
        log.info("machine %s: created server %s", machine.id, server.id)
        return str(server.id)

    def _servers_of_machine(self, machine_id: int) -> list[Any]:
        with self._errors("look for the machine's server"):
            return list(self._compute.servers(details=True, tags=f"labpool,machine-{machine_id}"))

    def _delete(self, server_id: str) -> None:
        with self._errors("delete the machine's server"):
            self._compute.delete_server(server_id, ignore_missing=True)

    def _address(self, server: Any) -> str | None:
        """host:port of the IDE: the first fixed address on the machine's network."""
        addresses = server.addresses if isinstance(server.addresses, dict) else {}
        wanted = self.cloud_spec.network_name
        for network, entries in addresses.items():
            if (wanted and network != wanted) or not isinstance(entries, list):
                continue
            for entry in sorted(
                (e for e in entries if isinstance(e, dict)), key=lambda e: e.get("version") != 4
            ):  # IPv4 first
                addr = entry.get("addr")
                if not isinstance(addr, str) or entry.get("OS-EXT-IPS:type", "fixed") != "fixed":
                    continue
                host = f"[{addr}]" if ":" in addr else addr
                return f"{host}:{self.cloud_spec.ide_port}"
        return None

    @contextlib.contextmanager
    def _errors(self, action: str, *, creating: bool = False) -> Iterator[None]:
        """Turn what openstacksdk and keystoneauth raise into our errors, with messages a
        teacher can read. Only the cloud's own message goes in (str(exc) carries URLs)."""
        try:
            yield
        except ProvisioningError:
            raise
        except os_exc.HttpException as exc:
            raise _http_error(
                exc.status_code, _detail(exc.details), action, creating, self.cloud
            ) from exc
        except ks_exc.HttpError as exc:  # from the identity service, while authenticating
            raise _http_error(exc.http_status, "", action, False, self.cloud) from exc
        except ks_exc.ConnectTimeout as exc:
            raise CloudUnavailable(
                f"The cloud did not answer in time when Labpool tried to {action}; "
                "it will try again."
            ) from exc
        except ks_exc.SSLError as exc:
            raise BackendUnavailable(
                f"The cloud's TLS certificate was not accepted when Labpool tried to {action}; "
                f"an administrator must check cloud {self.cloud!r}."
            ) from exc
        except ks_exc.ConnectionError as exc:
            raise CloudUnavailable(
                f"The cloud could not be reached when Labpool tried to {action}; it will try again."
            ) from exc
        except (os_exc.ConfigException, ks_exc.AuthPluginException) as exc:
            raise BackendUnavailable(
                f"Cloud {self.cloud!r} is not configured properly (clouds.yaml or "
                f"OS_CLIENT_CONFIG_FILE on the workers: {type(exc).__name__})."
            ) from exc
        except (os_exc.SDKException, ks_exc.ClientException) as exc:
            raise CloudUnavailable(
                f"The cloud's answer could not be used when Labpool tried to {action} "
                f"({type(exc).__name__}); it will try again."
            ) from exc


def _http_error(
    status: int | None, detail: str, action: str, creating: bool, cloud: str
) -> ProvisioningError:
    said = f": {detail}" if detail else f" (HTTP {status})"
    if status == 401:
        return BackendUnavailable(
            f"The cloud refused Labpool's credentials; an administrator must check cloud "
            f"{cloud!r} in clouds.yaml."
        )
    if status == 403 and creating and "quota" in detail.lower():
        return QuotaExceeded(f"The cloud's quota is used up{said}")
    if status == 403:
        return BackendUnavailable(f"The cloud does not allow Labpool to {action}{said}")
    if status == 409:
        return CloudConflict(
            f"The cloud is busy with this server and refused to {action} for now{said}"
        )
    if status == 400:
        return BackendUnavailable(
            f"The cloud refused to {action}{said}. An administrator should check the image, "
            "flavor, network and security groups of this environment."
        )
    if status is None or status >= 500 or status == 429:
        return CloudUnavailable(
            f"The cloud failed when Labpool tried to {action}{said}; it will try again."
        )
    return ProvisioningError(f"The cloud refused to {action}{said}")


def _detail(details: Any) -> str:
    """The cloud's message, on one line and short."""
    text = " ".join(str(details or "").split())
    return text if len(text) <= 300 else text[:297] + "..."


# -- reading machine specs and cloud answers --------------------------------------------
def _pool_id(machine: MachineSpec) -> int:
    # MachineSpec has no pool yet: until it has, the pool id comes in the ref.
    value = machine.ref.get("pool_id", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"machine {machine.id}: pool id must be a non-negative integer")
    return value


def _server_id(machine: MachineSpec) -> str | None:
    value = machine.ref.get("server_id")
    return value if isinstance(value, str) and value else None


def _machine_id(server: Any) -> int | None:
    for tag in server.tags or []:
        match = _MACHINE_TAG.fullmatch(str(tag))
        if match:
            return int(match.group(1))
    return None


def _fault(server: Any) -> str | None:
    fault = server.fault
    if isinstance(fault, dict) and fault.get("message"):
        return _detail(fault["message"])
    return None


class _ListedServer:
    """A server of `GET /servers/detail` read straight from its JSON, with the attribute
    names of openstacksdk's `Server` that the helpers below read."""

    def __init__(self, raw: dict[str, Any]):
        self.id = str(raw.get("id", ""))
        self.status = raw.get("status", "")
        self.addresses = raw.get("addresses")
        self.tags = raw.get("tags") or []
        self.fault = raw.get("fault")
        self.metadata = raw.get("metadata")
        self.created_at = raw.get("created", "")


def _list_microversion(compute: Any) -> str:
    """Tags in the list (and filtering by them) need Nova ≥ 2.26; ask for what both sides
    know, up to 2.96."""
    from openstack import utils

    return utils.maximum_supported_microversion(compute, "2.96") or "2.26"


def _created(server: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(server.created_at))
    except ValueError:
        return None
