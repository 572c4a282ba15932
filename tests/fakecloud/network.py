"""Neutron (Networking API v2.0) subset: discovery, security groups and their rules.

Mimics https://docs.openstack.org/api-ref/network/v2/#security-groups-security-groups and
#security-group-rules-security-group-rules as far as openstacksdk's ``conn.network`` proxy
uses them: list (with filters), create, show, delete. Input is validated as Neutron does
(``neutron/extensions/securitygroup.py`` and ``neutron/db/securitygroups_db.py``): direction,
ethertype, protocol, port ranges, a CIDR that matches the ethertype, one remote only, a
group that exists, no duplicate rule. Errors come as ``{"NeutronError": {type, message,
detail}}``.

Like Neutron, a new group gets two egress rules (IPv4 and IPv6, anything), and the project
has a ``default`` group (made on first need) whose ingress rules admit the group's own
members (``remote_group_id`` = itself): servers booted without a group land there.
The rules stored here are what ``state.CloudState.admits`` enforces on the fake IDEs.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from werkzeug.wrappers import Request

from .replies import Reply, json_reply
from .state import ApiError, CloudState, iso

# Neutron's protocol names (neutron_lib.constants.IP_PROTOCOL_MAP, the common part).
PROTOCOLS = {
    "tcp": 6,
    "udp": 17,
    "icmp": 1,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "sctp": 132,
    "ah": 51,
    "esp": 50,
    "gre": 47,
    "ipip": 4,
    "vrrp": 112,
    "udplite": 136,
}
_PORTED = {"tcp", "udp", "sctp", "udplite", "6", "17", "132", "136"}
GROUP_KEYS = {"name", "description", "stateful", "tenant_id", "project_id", "tags"}
RULE_KEYS = {
    "security_group_id",
    "direction",
    "ethertype",
    "protocol",
    "port_range_min",
    "port_range_max",
    "remote_ip_prefix",
    "remote_group_id",
    "remote_address_group_id",
    "description",
    "tenant_id",
    "project_id",
}


def neutron_error(status: int, kind: str, message: str) -> ApiError:
    """Neutron's error: ``{"NeutronError": {"type": kind, "message": …, "detail": ""}}``."""
    error = ApiError(status, "NeutronError", message)
    error.neutron_type = kind
    return error


# -- discovery --------------------------------------------------------------------------
def versions(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /networking/``: Neutron's version list."""
    return json_reply(
        {
            "versions": [
                {
                    "id": "v2.0",
                    "status": "CURRENT",
                    "links": [{"rel": "self", "href": f"{base}/networking/v2.0/"}],
                }
            ]
        }
    )


def version(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /networking/v2.0/``: the resources of v2.0 (Neutron lists them)."""
    resources = [
        {
            "name": name,
            "collection": f"{name}s",
            "links": [{"rel": "self", "href": f"{base}/networking/v2.0/{name}s"}],
        }
        for name in ("security-group", "security-group-rule")
    ]
    return json_reply({"resources": resources})


# -- views ----------------------------------------------------------------------------------
def rule_view(state: CloudState, rule: dict[str, Any]) -> dict[str, Any]:
    project = state.config.project_id
    return {
        **{k: v for k, v in rule.items() if not k.startswith("_")},
        "tenant_id": project,
        "project_id": project,
        "created_at": iso(rule["_created"]),
        "updated_at": iso(rule["_created"]),
        "revision_number": 0,
        "tags": [],
        "normalized_cidr": rule["remote_ip_prefix"],
        "belongs_to_default_sg": state.security_groups[rule["security_group_id"]]["name"]
        == "default",
    }


def group_view(state: CloudState, group: dict[str, Any]) -> dict[str, Any]:
    project = state.config.project_id
    rules = [
        rule_view(state, r)
        for r in state.security_group_rules.values()
        if r["security_group_id"] == group["id"]
    ]
    return {
        **{k: v for k, v in group.items() if not k.startswith("_")},
        "tenant_id": project,
        "project_id": project,
        "shared": False,
        "created_at": iso(group["_created"]),
        "updated_at": iso(group["_created"]),
        "revision_number": len(rules),
        "tags": [],
        "security_group_rules": rules,
    }


def _filtered(rows: list[dict[str, Any]], req: Request, skip: set[str]) -> list[dict[str, Any]]:
    """Neutron's list filters: each query parameter (repeatable) must match the field."""
    out = rows
    for key in set(req.args) - skip:
        wanted = req.args.getlist(key)
        out = [r for r in out if key in r and _as_query(r[key]) in wanted]
    return out


def _as_query(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    return str(value)


def _fields(rows: list[dict[str, Any]], req: Request) -> list[dict[str, Any]]:
    fields = req.args.getlist("fields")
    return [{k: v for k, v in r.items() if k in fields} for r in rows] if fields else rows


# -- security groups ------------------------------------------------------------------------
def list_groups(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /v2.0/security-groups?name=&id=&fields=``."""
    state.default_security_group()
    rows = [group_view(state, g) for g in state.security_groups.values()]
    rows = _filtered(rows, req, {"fields", "limit", "marker", "sort_key", "sort_dir"})
    return json_reply({"security_groups": _fields(rows, req)})


def create_group(state: CloudState, req: Request, base: str) -> Reply:
    """``POST /v2.0/security-groups``: 201; the group comes with its two egress rules."""
    body = _body(req, "security_group", GROUP_KEYS)
    name = body.get("name", "")
    description = body.get("description", "")
    if not isinstance(name, str) or len(name) > 255:
        raise neutron_error(
            400,
            "HTTPBadRequest",
            f"Invalid input for name. Reason: '{name}' is not a valid string.",
        )
    if name == "default":
        raise neutron_error(
            409, "SecurityGroupDefaultAlreadyExists", "Default security group already exists."
        )
    if not isinstance(description, str) or len(description) > 255:
        raise neutron_error(400, "HTTPBadRequest", "Invalid input for description.")
    state.default_security_group()
    group = state.add_security_group(name, description, bool(body.get("stateful", True)))
    return json_reply({"security_group": group_view(state, group)}, 201)


def _group(state: CloudState, group_id: str) -> dict[str, Any]:
    state.default_security_group()
    group = state.security_groups.get(group_id)
    if group is None:
        raise neutron_error(
            404, "SecurityGroupNotFound", f"Security group {group_id} does not exist"
        )
    return group


def show_group(state: CloudState, req: Request, base: str, group_id: str) -> Reply:
    view = group_view(state, _group(state, group_id))
    return json_reply({"security_group": _fields([view], req)[0]})


def delete_group(state: CloudState, req: Request, base: str, group_id: str) -> Reply:
    """``DELETE``: 204; 409 while a server uses it (or for ``default``)."""
    group = _group(state, group_id)
    if group["name"] == "default":
        raise neutron_error(
            409,
            "SecurityGroupCannotRemoveDefault",
            "Insufficient rights for removing default security group.",
        )
    if any(group_id in s.security_group_ids for s in state.live_servers()):
        raise neutron_error(409, "SecurityGroupInUse", f"Security Group {group_id} in use.")
    for rule_id in [
        r["id"] for r in state.security_group_rules.values() if r["security_group_id"] == group_id
    ]:
        del state.security_group_rules[rule_id]
    del state.security_groups[group_id]
    return json_reply(None, 204)


# -- rules ------------------------------------------------------------------------------------
def list_rules(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /v2.0/security-group-rules?security_group_id=&direction=…``."""
    state.default_security_group()
    rows = [rule_view(state, r) for r in state.security_group_rules.values()]
    rows = _filtered(rows, req, {"fields", "limit", "marker", "sort_key", "sort_dir"})
    return json_reply({"security_group_rules": _fields(rows, req)})


def show_rule(state: CloudState, req: Request, base: str, rule_id: str) -> Reply:
    rule = state.security_group_rules.get(rule_id)
    if rule is None:
        raise neutron_error(
            404, "SecurityGroupRuleNotFound", f"Security group rule {rule_id} does not exist"
        )
    return json_reply({"security_group_rule": rule_view(state, rule)})


def delete_rule(state: CloudState, req: Request, base: str, rule_id: str) -> Reply:
    if state.security_group_rules.pop(rule_id, None) is None:
        raise neutron_error(
            404, "SecurityGroupRuleNotFound", f"Security group rule {rule_id} does not exist"
        )
    return json_reply(None, 204)


def create_rule(state: CloudState, req: Request, base: str) -> Reply:
    """``POST /v2.0/security-group-rules``: 201, or 400/404/409 as Neutron answers."""
    body = _body(req, "security_group_rule", RULE_KEYS)
    rule = validate_rule(state, body)
    duplicate = state.find_duplicate_rule(rule)
    if duplicate is not None:
        raise neutron_error(
            409,
            "SecurityGroupRuleExists",
            f"Security group rule already exists. Rule id is {duplicate}.",
        )
    stored = state.add_security_group_rule(**rule)
    return json_reply({"security_group_rule": rule_view(state, stored)}, 201)


def validate_rule(state: CloudState, body: dict[str, Any]) -> dict[str, Any]:
    """A rule as Neutron stores it, or Neutron's error."""
    group_id = body.get("security_group_id")
    if not group_id:
        raise neutron_error(
            400,
            "HTTPBadRequest",
            "Failed to parse request. Required attribute 'security_group_id' not specified",
        )
    _group(state, str(group_id))
    direction = body.get("direction")
    if direction not in ("ingress", "egress"):
        raise neutron_error(
            400,
            "HTTPBadRequest",
            f"Invalid input for direction. Reason: {direction} is not in valid_values.",
        )
    ethertype = body.get("ethertype", "IPv4")
    if ethertype not in ("IPv4", "IPv6"):
        raise neutron_error(
            400,
            "SecurityGroupRuleInvalidEtherType",
            f"Security group rule for ethertype '{ethertype}' not supported. "
            "Allowed values are ['IPv4', 'IPv6'].",
        )
    protocol = _protocol(body.get("protocol"))
    low, high = _ports(protocol, body.get("port_range_min"), body.get("port_range_max"))
    prefix = body.get("remote_ip_prefix")
    remotes = [
        k for k in ("remote_ip_prefix", "remote_group_id", "remote_address_group_id") if body.get(k)
    ]
    if len(remotes) > 1:
        raise neutron_error(
            400,
            "SecurityGroupRemoteGroupAndRemoteIpPrefix",
            "Only one of remote_ip_prefix, remote_group_id or "
            "remote_address_group_id may be provided.",
        )
    if prefix:
        try:
            network = ipaddress.ip_network(str(prefix), strict=False)
        except ValueError:
            raise neutron_error(
                400,
                "HTTPBadRequest",
                f"Invalid input for remote_ip_prefix. Reason: '{prefix}' is not a valid IP subnet.",
            ) from None
        if f"IPv{network.version}" != ethertype:
            raise neutron_error(
                400,
                "SecurityGroupRuleParameterConflict",
                f"Conflicting value ethertype {ethertype} for CIDR {prefix}",
            )
        prefix = str(network)  # Neutron stores the normalized CIDR (host bits cleared)
    remote_group = body.get("remote_group_id")
    if remote_group:
        _group(state, str(remote_group))
    if body.get("remote_address_group_id"):
        raise neutron_error(
            404,
            "AddressGroupNotFound",
            f"Address group {body['remote_address_group_id']} could not be found.",
        )
    return {
        "security_group_id": str(group_id),
        "direction": direction,
        "ethertype": ethertype,
        "protocol": protocol,
        "port_range_min": low,
        "port_range_max": high,
        "remote_ip_prefix": prefix or None,
        "remote_group_id": remote_group or None,
        "remote_address_group_id": None,
        "description": str(body.get("description") or ""),
    }


def _protocol(value: Any) -> str | None:
    if value is None or value == "" or value == "any":
        return None
    text = str(value).lower()
    if text in PROTOCOLS:
        return text
    if text.isdigit() and 0 <= int(text) <= 255:
        return text
    raise neutron_error(
        400,
        "SecurityGroupRuleInvalidProtocol",
        f"Security group rule protocol {value} not supported. Only protocol "
        f"values {sorted(PROTOCOLS)} and integer representations [0 to 255] "
        "are supported.",
    )


def _ports(protocol: str | None, low: Any, high: Any) -> tuple[int | None, int | None]:
    if low is None and high is None:
        return None, None
    if protocol is None:
        raise neutron_error(
            400,
            "SecurityGroupProtocolRequiredWithPorts",
            "Must also specify protocol if port range is given.",
        )
    try:
        low_i = None if low is None else int(low)
        high_i = None if high is None else int(high)
    except (TypeError, ValueError):
        raise neutron_error(
            400, "HTTPBadRequest", "Invalid input for port_range_min/max. Reason: not an integer."
        ) from None
    if protocol in _PORTED:
        if low_i is None or high_i is None:
            # Neutron: a single bound means that one port (min given alone: min..min).
            low_i = high_i = low_i if low_i is not None else high_i
        assert low_i is not None and high_i is not None
        if not (1 <= low_i <= 65535 and 1 <= high_i <= 65535):
            raise neutron_error(
                400,
                "SecurityGroupInvalidPortValue",
                f"Invalid value for port {low_i if not 1 <= low_i <= 65535 else high_i}.",
            )
        if low_i > high_i:
            raise neutron_error(
                400,
                "SecurityGroupInvalidPortRange",
                "For TCP/UDP protocols, port_range_min must be <= port_range_max",
            )
    return low_i, high_i


def _body(req: Request, key: str, allowed: set[str]) -> dict[str, Any]:
    payload = req.get_json(silent=True)
    if not isinstance(payload, dict) or not isinstance(payload.get(key), dict):
        raise neutron_error(400, "HTTPBadRequest", f"Resource body required: {key}")
    body = payload[key]
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise neutron_error(
            400, "HTTPBadRequest", f"Unrecognized attribute(s) '{', '.join(unknown)}'"
        )
    return body


def new_id() -> str:
    return str(uuid.uuid4())
