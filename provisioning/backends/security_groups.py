"""The security group of a cloud environment: the IDE port admits the proxy's addresses alone.

Machines sit on the students' shared private network. Their IDE refuses requests without
the machine's token (see `cloud_init`), and the security group is the wall before that: a
student's machine must not even reach another's IDE port. So Labpool never boots a machine
into a group it has not looked at. At `labpool env add` it either creates the environment's
group (`labpool-<environment>`: one ingress rule per proxy address, TCP on the IDE port, and
Neutron's default egress rules), or checks the groups the admin named, and refuses an
environment whose groups admit the IDE port from anywhere else: no remote at all (0.0.0.0/0,
::/0), a CIDR outside the proxy's addresses (the private network's, say), or a remote
security group or address group (a group's members are machines, the `default` group's
ingress rule is exactly that).

Neutron's model (https://docs.openstack.org/api-ref/network/v2/#security-group-rules-security-group-rules):
the ingress rules of a port's groups are a union of allows; a rule matches a packet by
ethertype, protocol (null: any), port range (null: all) and one remote (`remote_ip_prefix`,
`remote_group_id`, `remote_address_group_id`, or none: anyone). Security groups are read
and written through openstacksdk's network proxy (`conn.network`).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openstack import exceptions as os_exc

from provisioning.errors import BackendUnavailable, ProvisioningError

if TYPE_CHECKING:
    from provisioning.backends.openstack import OpenStackBackend

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_TCP = {None, "", "any", "tcp", "6"}


class IdePortExposed(ProvisioningError):
    """The environment's security groups would let something other than the proxy reach the
    IDE port (or would not let the proxy reach it); the message says which rule."""


@dataclass(frozen=True)
class Rule:
    """The parts of a Neutron rule that decide who reaches a TCP port."""

    id: str
    group: str
    direction: str
    ethertype: str
    protocol: str | None
    port_min: int | None
    port_max: int | None
    remote_ip_prefix: Network | None
    remote_group_id: str | None
    remote_address_group_id: str | None

    def covers(self, port: int) -> bool:
        """Does this ingress rule admit TCP to `port` (from its remote)?"""
        if self.direction != "ingress" or self.protocol not in _TCP:
            return False
        if self.port_min is None:
            return True
        high = self.port_max if self.port_max is not None else self.port_min
        return self.port_min <= port <= high

    def source(self) -> str:
        if self.remote_group_id:
            return f"the members of security group {self.remote_group_id} (machines)"
        if self.remote_address_group_id:
            return f"address group {self.remote_address_group_id}"
        if self.remote_ip_prefix is not None:
            return str(self.remote_ip_prefix)
        return "anywhere (" + ("0.0.0.0/0" if self.ethertype == "IPv4" else "::/0") + ")"


def proxy_networks(addresses: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(a, strict=False) for a in addresses]


def group_name(environment_name: str) -> str:
    """`labpool-<environment>`, in the characters any cloud accepts."""
    return "labpool-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", environment_name).strip("-") or "env")


def secure_ide_port(
    backend: OpenStackBackend,
    *,
    environment_name: str,
    groups: Sequence[str],
    ide_port: int,
    proxy_addresses: Sequence[str],
) -> list[str]:
    """The ids of the security groups the environment's machines get, after making sure they
    admit TCP `ide_port` from `proxy_addresses` and from nowhere else.

    With no `groups`, the environment's own group is created (or, when one of that name exists
    already, e.g. from an earlier attempt, checked). Raises `IdePortExposed` when a group is
    open to anything else or closed to the proxy, `BackendUnavailable` when a group cannot be
    found or the cloud's answer makes no sense, and the backend's cloud errors otherwise.
    Nothing is changed in the cloud except creating the environment's own group.
    """
    proxies = proxy_networks(proxy_addresses)
    if not proxies:
        raise IdePortExposed(
            "LABPOOL_PROXY_ADDRESSES is not set: Labpool needs the address(es) of the nginx "
            "host(s) (and of the workers, which check each machine's IDE) to let only them "
            "reach the IDE port of cloud machines."
        )
    network = backend.network
    ids: list[str] = []
    if groups:
        for ref in groups:
            ids.append(_find_group(backend, network, ref))
    else:
        name = group_name(environment_name)
        existing = _find_group(backend, network, name, missing_ok=True)
        ids.append(existing or _create_group(backend, network, name, ide_port, proxies))
    ids = list(dict.fromkeys(ids))
    check_rules(_rules(backend, network, ids), ide_port, proxies)
    return ids


def check_rules(rules: Sequence[Rule], ide_port: int, proxies: Sequence[Network]) -> None:
    """Refuse rules that admit `ide_port` from outside `proxies`, or leave a proxy out."""
    admitted: list[Network] = []
    for rule in rules:
        if not rule.covers(ide_port):
            continue
        prefix = rule.remote_ip_prefix
        if (
            prefix is not None
            and not (rule.remote_group_id or rule.remote_address_group_id)
            and any(
                prefix.version == p.version and prefix.subnet_of(p)  # type: ignore[arg-type]
                for p in proxies
            )
        ):
            admitted.append(prefix)
            continue
        raise IdePortExposed(
            f"security group {rule.group} admits the IDE port (TCP {ide_port}) from "
            f"{rule.source()} (rule {rule.id}): other machines on the network could reach "
            "the students' IDEs. Only the proxy's addresses (LABPOOL_PROXY_ADDRESSES: "
            f"{', '.join(str(p) for p in proxies)}) may be admitted on that port; remove the "
            "rule, or name no group and Labpool creates one."
        )
    for proxy in proxies:
        if not any(
            proxy.version == a.version and proxy.subnet_of(a)  # type: ignore[arg-type]
            for a in admitted
        ):
            raise IdePortExposed(
                f"the security groups do not admit the IDE port (TCP {ide_port}) from the "
                f"proxy's address {proxy}: the proxy could not reach the machines. Add an "
                "ingress rule for it, or name no group and Labpool creates one."
            )


# -- cloud calls ------------------------------------------------------------------------------
def _find_group(
    backend: OpenStackBackend, network: Any, ref: str, missing_ok: bool = False
) -> str | None:
    with backend.cloud_errors("look up the security group"):
        try:
            group = network.find_security_group(ref, ignore_missing=False)
        except os_exc.NotFoundException:
            group = None
        except os_exc.DuplicateResource:
            raise BackendUnavailable(
                f"several security groups are named {ref!r}; give the id of the one to use"
            ) from None
    if group is None:
        if missing_ok:
            return None
        raise BackendUnavailable(f"no security group {ref!r} in the cloud's project")
    if not isinstance(group.id, str) or not group.id:
        raise BackendUnavailable(f"the cloud's answer for security group {ref!r} has no id")
    return group.id


def _create_group(
    backend: OpenStackBackend, network: Any, name: str, ide_port: int, proxies: Sequence[Network]
) -> str:
    """The environment's group: TCP `ide_port` from each proxy address; Neutron adds its
    default egress rules (machines still reach package mirrors). Deleted again if a rule
    cannot be added, so a refused `env add` leaves nothing behind."""
    with backend.cloud_errors("create the environment's security group", creating=True):
        group = network.create_security_group(
            name=name, description="Labpool: the IDE port admits the proxy alone"
        )
    try:
        for proxy in proxies:
            with backend.cloud_errors("add the proxy's rule to the security group", creating=True):
                network.create_security_group_rule(
                    security_group_id=group.id,
                    direction="ingress",
                    ether_type=f"IPv{proxy.version}",
                    protocol="tcp",
                    port_range_min=ide_port,
                    port_range_max=ide_port,
                    remote_ip_prefix=str(proxy),
                    description="Labpool proxy",
                )
    except ProvisioningError:
        with backend.cloud_errors("remove the half-made security group"):
            network.delete_security_group(group.id, ignore_missing=True)
        raise
    log.info(
        "created security group %s (%s): TCP %s from %s",
        name,
        group.id,
        ide_port,
        ", ".join(str(p) for p in proxies),
    )
    return str(group.id)


def _rules(backend: OpenStackBackend, network: Any, group_ids: Sequence[str]) -> list[Rule]:
    rules: list[Rule] = []
    for group_id in group_ids:
        with backend.cloud_errors("read the security group's rules"):
            raw = list(network.security_group_rules(security_group_id=group_id))
        for item in raw:
            rules.append(_rule(item, group_id))
    return rules


def _rule(item: Any, group_id: str) -> Rule:
    """A rule from the cloud's answer, or BackendUnavailable when it makes no sense (a rule
    we cannot read is a rule we cannot vouch for)."""
    try:
        body = item.to_dict(computed=False) if hasattr(item, "to_dict") else dict(item)
        if body.get("security_group_id") not in (None, group_id):
            raise ValueError("a rule of another group")
        direction = body.get("direction")
        ethertype = body.get("ether_type", body.get("ethertype")) or "IPv4"
        if direction not in ("ingress", "egress") or ethertype not in ("IPv4", "IPv6"):
            raise ValueError(f"direction {direction!r}, ethertype {ethertype!r}")
        protocol = body.get("protocol")
        if protocol is not None and not isinstance(protocol, str | int):
            raise ValueError(f"protocol {protocol!r}")
        ports = [body.get("port_range_min"), body.get("port_range_max")]
        for port in ports:
            if port is not None and (isinstance(port, bool) or not 0 <= int(port) <= 65535):
                raise ValueError(f"port {port!r}")
        prefix = body.get("remote_ip_prefix")
        network = ipaddress.ip_network(prefix, strict=False) if prefix else None
        remote_group = body.get("remote_group_id") or None
        address_group = body.get("remote_address_group_id") or None
        return Rule(
            id=str(body.get("id") or "?"),
            group=group_id,
            direction=direction,
            ethertype=ethertype,
            protocol=None if protocol is None else str(protocol).lower(),
            port_min=None if ports[0] is None else int(ports[0]),
            port_max=None if ports[1] is None else int(ports[1]),
            remote_ip_prefix=network,
            remote_group_id=str(remote_group) if remote_group else None,
            remote_address_group_id=str(address_group) if address_group else None,
        )
    except (TypeError, ValueError) as exc:
        raise BackendUnavailable(
            f"the cloud's answer for a rule of security group {group_id} cannot be read "
            f"({exc}); Labpool will not vouch for that group"
        ) from exc
