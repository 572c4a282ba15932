"""In-memory state of the fake cloud: configuration, servers, volumes, tokens, faults.

Everything here is plain data guarded by ``CloudState.lock``; the HTTP handlers in
``identity.py``, ``compute.py`` and ``volume.py`` read and change it while holding that lock.
Server and volume states are computed lazily from timestamps (no timers): a server is
``BUILD`` until ``ready_at``, then ``ACTIVE`` (or ``ERROR`` when a fault was planned).
(The IDEs that ``ide.py`` runs on ACTIVE servers follow these states from outside.)
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

NETWORK = ipaddress.ip_network("10.0.0.0/16")
FIRST_HOST = int(NETWORK.network_address) + 2  # .1 is the router
# With an IDE (``ide="stub"`` or ``"jupyterlab"``) fixed IPs are loopback addresses the fake
# can really listen on: Linux routes all of 127.0.0.0/8 to ``lo`` without any setup.
IDE_NETWORK = ipaddress.ip_network("127.1.0.0/16")
IDE_MODES = ("none", "stub", "jupyterlab")


class ApiError(Exception):
    """An error answer in the style of the service that raises it.

    ``key`` is the top-level body key: Nova and Cinder use ``badRequest``, ``forbidden``,
    ``itemNotFound``, ``conflictingRequest``...; Keystone uses ``error``.
    """

    def __init__(self, status: int, key: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.key = key
        self.message = message
        self.headers = headers or {}
        self.neutron_type = "HTTPBadRequest"  # the ``type`` of a NeutronError

    def body(self) -> dict[str, Any]:
        if self.key == "NeutronError":
            return {
                "NeutronError": {"type": self.neutron_type, "message": self.message, "detail": ""}
            }
        if self.key == "error":  # Keystone
            return {
                "error": {
                    "code": self.status,
                    "message": self.message,
                    "title": _KEYSTONE_TITLES.get(self.status, "Error"),
                }
            }
        return {self.key: {"code": self.status, "message": self.message}}


_KEYSTONE_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# Nova's nova.api.openstack.wsgi.Fault names (Cinder uses the same ones).
NOVA_FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    429: "overLimit",
    501: "notImplemented",
    503: "serviceUnavailable",
}


def nova_error(status: int, message: str, headers: dict[str, str] | None = None) -> ApiError:
    """An error with Nova's body key for ``status`` (``computeFault`` for other 5xx)."""
    return ApiError(status, NOVA_FAULT_NAMES.get(status, "computeFault"), message, headers)


class LostResponse(Exception):
    """Raised after a create succeeded to make the client miss the answer."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self.mode = mode


class LoggedRequest(NamedTuple):
    """One request the fake received: method, path, and query parameters."""

    method: str
    path: str
    query: dict[str, str]


@dataclass
class FailRule:
    """An injected answer: the next ``count`` requests matching method+prefix get ``status``."""

    method: str
    path_prefix: str
    status: int
    count: int
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and path.startswith(self.path_prefix)


@dataclass
class Config:
    """Tunables of the fake cloud; every one can be passed to ``FakeCloud(...)``."""

    username: str = "labpool"
    password: str = "labpool-secret"
    project_name: str = "labpool"
    project_id: str = "5e8f1a2b3c4d4e5f8a9b0c1d2e3f4a5b"
    user_id: str = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
    domain_name: str = "Default"
    domain_id: str = "default"
    region: str = "RegionOne"
    app_credential_id: str = "f0e1d2c3b4a5968778695a4b3c2d1e0f"
    app_credential_name: str = "labpool-appcred"
    app_credential_secret: str = "appcred-secret"
    token_ttl: float = 3600.0
    boot_time: float = 0.0
    delete_time: float = 0.0
    volume_time: float = 0.0
    latency: float = 0.0
    max_instances: int = 10
    max_cores: int = -1  # -1 = unlimited, as Nova reports it
    max_ram: int = -1
    network_name: str = "private"
    network_id: str = "0d1c2b3a-4f5e-4d6c-8b7a-695847362514"
    images: set[str] | None = None  # None: any non-empty image id is accepted
    flavors: dict[str, dict[str, Any]] | None = None  # None: any non-empty flavor id
    max_limit: int = 1000  # Nova's [api] max_limit: page size cap for lists
    max_microversion: str = "2.96"
    volume_max_microversion: str = "3.71"
    clock: Callable[[], float] = time.time
    ide: str = "none"  # what answers on an ACTIVE server: IDE_MODES (see ide.py)
    ide_port: int = 8888  # where it listens, on the server's fixed IP
    # Stub IDEs answer only the source addresses their server's security groups admit (see
    # ``CloudState.admits``); others get their connection reset. Off by default: a server
    # booted without a group lands in ``default``, which admits only its own members.
    enforce_security_groups: bool = False

    def __post_init__(self) -> None:
        if self.ide not in IDE_MODES:
            raise ValueError(f"ide must be one of {IDE_MODES}, not {self.ide!r}")
        if not 1 <= self.ide_port <= 65535:
            raise ValueError(f"ide_port must be 1-65535, not {self.ide_port!r}")


DEFAULT_FLAVOR = {"vcpus": 1, "ram": 2048, "disk": 20, "ephemeral": 0, "swap": 0}


@dataclass
class FakeServer:
    """One Nova instance. Status is derived from timestamps by ``status(now)``."""

    id: str
    seq: int
    name: str
    image_id: str
    flavor_id: str
    flavor: dict[str, Any]
    networks: Any
    user_data: str | None
    metadata: dict[str, str]
    tags: list[str]
    key_name: str | None
    security_groups: list[str]  # names, as Nova shows them
    created: float
    ready_at: float
    address: int
    error_at: float | None = None
    fault_message: str | None = None
    deleted_at: float | None = None
    gone_at: float | None = None
    changed: float = 0.0
    volumes: list[str] = field(default_factory=list)
    security_group_ids: list[str] = field(default_factory=list)  # resolved at create

    def status(self, now: float) -> str:
        if self.deleted_at is not None:
            return "DELETED"
        if self.error_at is not None and now >= self.error_at:
            return "ERROR"
        if now < self.ready_at:
            return "BUILD"
        return "ACTIVE"

    def updated(self, now: float) -> float:
        stamps = [self.created, self.changed]
        stamps += [
            t for t in (self.ready_at, self.error_at, self.deleted_at) if t is not None and t <= now
        ]
        return max(stamps)

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_address(self.address))


@dataclass
class FakeVolume:
    """One Cinder volume: ``creating`` until ``ready_at``, then ``available``/``in-use``."""

    id: str
    name: str | None
    description: str | None
    size: int
    metadata: dict[str, str]
    created: float
    ready_at: float
    changed: float
    attachment: dict[str, Any] | None = None  # {server_id, attachment_id, device, attached_at}

    def status(self, now: float) -> str:
        if now < self.ready_at:
            return "creating"
        return "in-use" if self.attachment else "available"


@dataclass
class Token:
    project_id: str
    expires_at: float
    methods: list[str]


def iso(ts: float, style: str = "nova") -> str:
    """Timestamps as each service writes them (Nova: ``...Z``; Keystone: ``.ffffffZ``;
    Cinder: ``.ffffff`` without zone)."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    if style == "nova":
        return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == "keystone":
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")


class CloudState:
    """All mutable state of one fake cloud, behind one re-entrant lock."""

    def __init__(self, config: Config):
        self.config = config
        self.lock = threading.RLock()
        self.servers: dict[str, FakeServer] = {}
        self.tombstones: dict[str, tuple[FakeServer, float]] = {}  # id -> (server, deleted at)
        self.volumes: dict[str, FakeVolume] = {}
        # Neutron: id -> group {id, name, description, stateful, _created}; id -> rule.
        self.security_groups: dict[str, dict[str, Any]] = {}
        self.security_group_rules: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, Token] = {}
        self.fail_rules: list[FailRule] = []
        #: (method, path prefix, seconds, count left): requests held before they are handled.
        self.stalls: list[list[Any]] = []
        self.error_next_creates: list[str] = []
        self.lost_creates: list[str] = []
        self.request_log: list[LoggedRequest] = []
        self.counts: Counter[tuple[str, str]] = Counter()
        self._seq = itertools.count(1)
        # Set by the IDE manager: may this fixed IP be handed out (and is it now claimed)?
        self.address_filter: Callable[[int], bool] | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return NETWORK if self.config.ide == "none" else IDE_NETWORK

    def now(self) -> float:
        return self.config.clock()

    def next_seq(self) -> int:
        return next(self._seq)

    # -- lifecycle -----------------------------------------------------------------
    def sweep(self) -> None:
        """Drop servers whose deletion delay has passed (they become tombstones)."""
        now = self.now()
        for sid in [
            s.id for s in self.servers.values() if s.gone_at is not None and s.gone_at <= now
        ]:
            self.forget_server(sid, tombstone=True)

    def forget_server(self, server_id: str, tombstone: bool) -> None:
        server = self.servers.pop(server_id)
        for vid in server.volumes:
            volume = self.volumes.get(vid)
            if volume is not None:
                volume.attachment = None
                volume.changed = self.now()
        server.volumes = []
        if tombstone:
            deleted = server.deleted_at if server.deleted_at is not None else self.now()
            self.tombstones[server_id] = (server, deleted)

    def live_servers(self) -> list[FakeServer]:
        """Servers that exist (incl. BUILD, ERROR and being deleted), newest first like Nova."""
        self.sweep()
        return sorted(self.servers.values(), key=lambda s: (s.created, s.seq), reverse=True)

    def free_address(self) -> int:
        network = self.network
        used = {s.address for s in self.servers.values()}
        for candidate in range(int(network.network_address) + 2, int(network.broadcast_address)):
            if candidate not in used and (
                self.address_filter is None or self.address_filter(candidate)
            ):
                return candidate
        raise nova_error(500, "No more fixed IP addresses available on network")

    # -- usage and quota -----------------------------------------------------------
    def usage(self) -> dict[str, int]:
        live = self.live_servers()
        return {
            "instances": len(live),
            "cores": sum(int(s.flavor.get("vcpus", 0)) for s in live),
            "ram": sum(int(s.flavor.get("ram", 0)) for s in live),
        }

    def check_quota(self, flavor: dict[str, Any]) -> None:
        """Raise Nova's 403 ``Quota exceeded for ...`` when one more server does not fit."""
        used = self.usage()
        wants = {
            "instances": 1,
            "cores": int(flavor.get("vcpus", 0)),
            "ram": int(flavor.get("ram", 0)),
        }
        limits = {
            "instances": self.config.max_instances,
            "cores": self.config.max_cores,
            "ram": self.config.max_ram,
        }
        for resource in ("instances", "cores", "ram"):
            limit = limits[resource]
            if limit >= 0 and used[resource] + wants[resource] > limit:
                raise nova_error(
                    403,
                    f"Quota exceeded for {resource}: Requested {wants[resource]}, "
                    f"but already used {used[resource]} of {limit} {resource}",
                )

    # -- faults --------------------------------------------------------------------
    def take_fail_rule(self, method: str, path: str) -> FailRule | None:
        """Consume one matching injected failure, if any."""
        for rule in self.fail_rules:
            if rule.matches(method, path):
                rule.count -= 1
                if rule.count <= 0:
                    self.fail_rules.remove(rule)
                return rule
        return None

    def take_stall(self, method: str, path: str) -> float:
        """Consume one matching stall, if any: how long the request waits first."""
        for stall in self.stalls:
            if stall[0] in ("*", method) and path.startswith(stall[1]):
                stall[3] -= 1
                if stall[3] <= 0:
                    self.stalls.remove(stall)
                return float(stall[2])
        return 0.0

    # -- security groups (Neutron) ------------------------------------------------------
    def add_security_group(
        self, name: str, description: str = "", stateful: bool = True
    ) -> dict[str, Any]:
        """A new group with Neutron's two default egress rules."""
        group = {
            "id": str(uuid.uuid4()),
            "name": name,
            "description": description,
            "stateful": stateful,
            "_created": self.now(),
        }
        self.security_groups[group["id"]] = group
        for ethertype in ("IPv4", "IPv6"):
            self.add_security_group_rule(
                security_group_id=group["id"], direction="egress", ethertype=ethertype
            )
        return group

    def add_security_group_rule(self, **values: Any) -> dict[str, Any]:
        rule = {
            "id": str(uuid.uuid4()),
            "security_group_id": "",
            "direction": "ingress",
            "ethertype": "IPv4",
            "protocol": None,
            "port_range_min": None,
            "port_range_max": None,
            "remote_ip_prefix": None,
            "remote_group_id": None,
            "remote_address_group_id": None,
            "description": "",
            "_created": self.now(),
        }
        rule.update(values)
        self.security_group_rules[rule["id"]] = rule
        return rule

    def find_duplicate_rule(self, rule: dict[str, Any]) -> str | None:
        keys = (
            "security_group_id",
            "direction",
            "ethertype",
            "protocol",
            "port_range_min",
            "port_range_max",
            "remote_ip_prefix",
            "remote_group_id",
        )
        for other in self.security_group_rules.values():
            if all(other[k] == rule[k] for k in keys):
                return str(other["id"])
        return None

    def default_security_group(self) -> dict[str, Any]:
        """The project's ``default`` group, made on first need as Neutron does: its members
        reach each other (ingress from ``remote_group_id`` = itself), egress is open."""
        for group in self.security_groups.values():
            if group["name"] == "default":
                return group
        group = self.add_security_group("default", "Default security group")
        for ethertype in ("IPv4", "IPv6"):
            self.add_security_group_rule(
                security_group_id=group["id"],
                direction="ingress",
                ethertype=ethertype,
                remote_group_id=group["id"],
            )
        return group

    def resolve_security_group(self, name_or_id: str) -> dict[str, Any]:
        """Nova's lookup of a server's group: by id, else by name (must be unique)."""
        if name_or_id == "default":
            return self.default_security_group()
        if name_or_id in self.security_groups:
            return self.security_groups[name_or_id]
        named = [g for g in self.security_groups.values() if g["name"] == name_or_id]
        if len(named) > 1:
            raise nova_error(
                409,
                f"Multiple security_group matches found for name "
                f"'{name_or_id}', use an ID to be more specific.",
            )
        if not named:
            raise nova_error(
                400, f"Security group {name_or_id} not found for project {self.config.project_id}."
            )
        return named[0]

    def admits(self, server_id: str, source: str, port: int, protocol: str = "tcp") -> bool:
        """Would Neutron let a packet from ``source`` to ``port`` of the server in? Ingress
        rules of the server's groups are a union of allows: a rule matches by ethertype,
        protocol (none = any), port range (none = all), and remote: an IP prefix that holds
        the source, a group one of whose member servers has the source as fixed IP, or
        neither (anyone). Unknown servers admit nothing."""
        self.sweep()
        server = self.servers.get(server_id)
        if server is None:
            return False
        address = ipaddress.ip_address(source)
        number = {"tcp": "6", "udp": "17"}.get(protocol, protocol)
        for rule in self.security_group_rules.values():
            if (
                rule["security_group_id"] not in server.security_group_ids
                or rule["direction"] != "ingress"
                or rule["ethertype"] != f"IPv{address.version}"
                or rule["protocol"] not in (None, protocol, number)
            ):
                continue
            low, high = rule["port_range_min"], rule["port_range_max"]
            if low is not None and not low <= port <= (high if high is not None else low):
                continue
            if rule["remote_ip_prefix"]:
                if address in ipaddress.ip_network(rule["remote_ip_prefix"]):
                    return True
            elif rule["remote_group_id"]:
                members = (
                    s
                    for s in self.servers.values()
                    if rule["remote_group_id"] in s.security_group_ids
                )
                if any(s.ip == source for s in members):
                    return True
            else:
                return True
        return False

    # -- tokens --------------------------------------------------------------------
    def issue_token(self, methods: list[str]) -> tuple[str, Token]:
        token_id = "gAAAAA" + uuid.uuid4().hex + uuid.uuid4().hex
        token = Token(self.config.project_id, self.now() + self.config.token_ttl, methods)
        self.tokens[token_id] = token
        return token_id, token

    def valid_token(self, token_id: str | None) -> Token | None:
        token = self.tokens.get(token_id or "")
        if token is None or token.expires_at <= self.now():
            return None
        return token
