"""Nova (Compute API v2.1) subset: discovery, servers, limits, volume attachments.

Mimics https://docs.openstack.org/api-ref/compute/ at microversions up to 2.96: the request
bodies and answers openstacksdk's ``conn.compute`` proxy sends and parses. Response fields
that depend on the microversion (``tags`` ≥ 2.26, embedded ``flavor`` ≥ 2.47, ...) follow it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from werkzeug.wrappers import Request

from .replies import Reply, json_reply
from .state import DEFAULT_FLAVOR, CloudState, FakeServer, LostResponse, iso, nova_error

Microversion = tuple[int, int]

CREATE_KEYS = {
    "name",
    "imageRef",
    "flavorRef",
    "networks",
    "user_data",
    "metadata",
    "tags",
    "key_name",
    "security_groups",
    "block_device_mapping_v2",
    "availability_zone",
    "config_drive",
    "min_count",
    "max_count",
    "return_reservation_id",
    "accessIPv4",
    "accessIPv6",
    "adminPass",
    "description",
    "hostname",
    "OS-DCF:diskConfig",
    "trusted_image_certificates",
    "host",
    "hypervisor_hostname",
}


def parse_microversion(value: str) -> Microversion:
    major, minor = value.split(".")
    return int(major), int(minor)


def microversion(req: Request) -> Microversion:
    """The microversion the app negotiated for this request (2.1 when none was asked)."""
    return req.environ.get("fakecloud.microversion", (2, 1))


# -- discovery ------------------------------------------------------------------------
def _v21(state: CloudState, base: str) -> dict[str, Any]:
    return {
        "id": "v2.1",
        "status": "CURRENT",
        "version": state.config.max_microversion,
        "min_version": "2.1",
        "updated": "2013-07-23T11:33:21Z",
        "links": [
            {"rel": "self", "href": f"{base}/compute/v2.1/"},
            {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"},
        ],
        "media-types": [
            {
                "base": "application/json",
                "type": "application/vnd.openstack.compute+json;version=2.1",
            }
        ],
    }


def versions(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /compute/``: Nova's version list."""
    v2 = {
        "id": "v2.0",
        "status": "SUPPORTED",
        "version": "",
        "min_version": "",
        "updated": "2011-01-21T11:33:21Z",
        "links": [{"rel": "self", "href": f"{base}/compute/v2/"}],
    }
    return json_reply({"versions": [v2, _v21(state, base)]})


def version(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /compute/v2.1``: the v2.1 version document with the max microversion."""
    return json_reply({"version": _v21(state, base)})


# -- views ----------------------------------------------------------------------------
def _links(base: str, kind: str, ident: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base}/compute/v2.1/{kind}/{ident}"},
        {"rel": "bookmark", "href": f"{base}/compute/{kind}/{ident}"},
    ]


def _has_address(server: FakeServer, now: float) -> bool:
    failed_on_boot = server.error_at is not None and server.error_at <= server.ready_at
    return now >= server.ready_at and not failed_on_boot


def server_view(
    state: CloudState,
    server: FakeServer,
    base: str,
    mv: Microversion,
    deleted_at: float | None = None,
) -> dict[str, Any]:
    """``GET /servers/{id}`` / ``/servers/detail`` representation of one server."""
    now = state.now()
    status = "DELETED" if deleted_at is not None else server.status(now)
    vm_state = {"BUILD": "building", "ACTIVE": "active", "ERROR": "error", "DELETED": "deleted"}[
        status
    ]
    task_state = {"BUILD": "spawning", "DELETED": "deleting" if deleted_at is None else None}
    addresses: dict[str, Any] = {}
    if _has_address(server, now):
        mac = "fa:16:3e:" + ":".join(f"{b:02x}" for b in server.address.to_bytes(4, "big")[1:])
        addresses = {
            state.config.network_name: [
                {
                    "version": 4,
                    "addr": server.ip,
                    "OS-EXT-IPS:type": "fixed",
                    "OS-EXT-IPS-MAC:mac_addr": mac,
                }
            ]
        }
    if mv >= (2, 47):
        flavor: dict[str, Any] = {
            "original_name": server.flavor.get("name", server.flavor_id),
            "extra_specs": {},
        }
        flavor.update({k: server.flavor.get(k, DEFAULT_FLAVOR[k]) for k in DEFAULT_FLAVOR})
    else:
        flavor = {"id": server.flavor_id, "links": _links(base, "flavors", server.flavor_id)}
    view: dict[str, Any] = {
        "id": server.id,
        "name": server.name,
        "status": status,
        "tenant_id": state.config.project_id,
        "user_id": state.config.user_id,
        "metadata": dict(server.metadata),
        "hostId": hashlib.sha224((state.config.project_id + "compute-1").encode()).hexdigest()
        if status != "BUILD"
        else "",
        "image": {"id": server.image_id, "links": _links(base, "images", server.image_id)}
        if server.image_id
        else "",
        "flavor": flavor,
        "created": iso(server.created),
        "updated": iso(deleted_at if deleted_at is not None else server.updated(now)),
        "addresses": addresses,
        "accessIPv4": "",
        "accessIPv6": "",
        "links": _links(base, "servers", server.id),
        "OS-DCF:diskConfig": "MANUAL",
        "progress": 0,
        "OS-EXT-AZ:availability_zone": "nova" if status != "BUILD" else "",
        "config_drive": "",
        "key_name": server.key_name,
        "OS-SRV-USG:launched_at": iso(server.ready_at, "cinder")
        if _has_address(server, now)
        else None,
        "OS-SRV-USG:terminated_at": iso(deleted_at, "cinder") if deleted_at is not None else None,
        "security_groups": [{"name": name} for name in server.security_groups],
        "OS-EXT-STS:task_state": task_state.get(status),
        "OS-EXT-STS:vm_state": vm_state,
        "OS-EXT-STS:power_state": 1 if status == "ACTIVE" else 0,
        "os-extended-volumes:volumes_attached": [
            {"id": vid, "delete_on_termination": False} for vid in server.volumes
        ],
    }
    if mv >= (2, 9):
        view["locked"] = False
    if mv >= (2, 19):
        view["description"] = None
    if mv >= (2, 26):
        view["tags"] = list(server.tags)
    if mv >= (2, 63):
        view["trusted_image_certificates"] = None
    if mv >= (2, 71):
        view["server_groups"] = []
    if mv >= (2, 73):
        view["locked_reason"] = None
    if mv >= (2, 96):
        view["pinned_availability_zone"] = None
    if server.fault_message is not None and status in ("ERROR", "DELETED"):
        view["fault"] = {
            "code": 500,
            "message": server.fault_message,
            "created": iso(server.error_at or now),
        }
    return view


def _get_server(state: CloudState, server_id: str) -> FakeServer:
    state.sweep()
    server = state.servers.get(server_id)
    if server is None:
        raise nova_error(404, f"Instance {server_id} could not be found.")
    return server


# -- create ---------------------------------------------------------------------------
def _validate_create(body: Any, mv: Microversion) -> dict[str, Any]:
    """The parts of Nova's JSON-schema for ``POST /servers`` that matter to a client."""
    if not isinstance(body, dict) or not isinstance(body.get("server"), dict):
        raise nova_error(400, "Invalid input for field/attribute server.")
    server = body["server"]
    unknown = sorted(set(server) - CREATE_KEYS)
    if "tags" in server and mv < (2, 52):
        unknown.append("tags")
    if unknown:
        raise nova_error(
            400,
            "Invalid input for field/attribute server. Value: ... "
            f"Additional properties are not allowed ({unknown[0]!r} was unexpected)",
        )
    for required in ("name", "flavorRef") + (("networks",) if mv >= (2, 37) else ()):
        if required not in server:
            raise nova_error(
                400,
                f"Invalid input for field/attribute server. '{required}' is a required property",
            )
    name = server["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= 255:
        raise nova_error(400, "Invalid input for field/attribute name.")
    if not server.get("imageRef") and not server.get("block_device_mapping_v2"):
        raise nova_error(400, "Missing imageRef attribute")
    networks = server.get("networks")
    if (
        networks is not None
        and networks not in ("auto", "none")
        and not (isinstance(networks, list) and all(isinstance(n, dict) for n in networks))
    ):
        raise nova_error(400, "Invalid input for field/attribute networks.")
    user_data = server.get("user_data")
    if user_data is not None:
        if not isinstance(user_data, str) or len(user_data) > 65535:
            raise nova_error(400, "Invalid input for field/attribute user_data.")
        try:
            base64.b64decode(user_data, validate=True)
        except (binascii.Error, ValueError):
            raise nova_error(
                400,
                "Invalid input for field/attribute user_data. Value: ... is not a 'base64' string",
            ) from None
    metadata = server.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 255 and len(v) <= 255
        for k, v in metadata.items()
    ):
        raise nova_error(400, "Invalid input for field/attribute metadata.")
    tags = server.get("tags", [])
    if (
        not isinstance(tags, list)
        or len(tags) > 50
        or not all(
            isinstance(t, str) and 0 < len(t) <= 60 and "," not in t and "/" not in t for t in tags
        )
    ):
        raise nova_error(400, "Invalid input for field/attribute tags.")
    if int(server.get("max_count", 1)) > 1 or int(server.get("min_count", 1)) > 1:
        raise nova_error(400, "fakecloud: min_count/max_count > 1 is not supported")
    return server


def create_server(state: CloudState, req: Request, base: str) -> Reply:
    """``POST /servers``: 202 with only id/links/adminPass; 400 bad input; 403 quota."""
    cfg = state.config
    server = _validate_create(req.get_json(silent=True), microversion(req))
    flavor_id = str(server["flavorRef"]).rstrip("/").rsplit("/", 1)[-1]
    image_id = str(server.get("imageRef") or "").rstrip("/").rsplit("/", 1)[-1]
    if not flavor_id or (cfg.flavors is not None and flavor_id not in cfg.flavors):
        raise nova_error(400, f"Flavor {flavor_id} could not be found.")
    if image_id and cfg.images is not None and image_id not in cfg.images:
        raise nova_error(400, f"Image {image_id} could not be found.")
    flavor = dict(cfg.flavors[flavor_id]) if cfg.flavors is not None else dict(DEFAULT_FLAVOR)
    state.check_quota(flavor)
    now = state.now()
    asked = server.get("security_groups") or [{"name": "default"}]
    if not isinstance(asked, list) or not all(
        isinstance(g, dict) and isinstance(g.get("name"), str) for g in asked
    ):
        raise nova_error(400, "Invalid input for field/attribute security_groups.")
    # Nova asks Neutron for each group, by name or id (an unknown one is a 400).
    resolved = list(
        {g["id"]: g for g in (state.resolve_security_group(a["name"]) for a in asked)}.values()
    )
    groups = [g["name"] for g in resolved]
    record = FakeServer(
        id=str(uuid.uuid4()),
        seq=state.next_seq(),
        name=server["name"],
        image_id=image_id,
        flavor_id=flavor_id,
        flavor=flavor,
        networks=server.get("networks"),
        user_data=server.get("user_data"),
        metadata=dict(server.get("metadata") or {}),
        tags=list(dict.fromkeys(server.get("tags") or [])),
        key_name=server.get("key_name"),
        security_groups=groups,
        security_group_ids=[g["id"] for g in resolved],
        created=now,
        ready_at=now + cfg.boot_time,
        address=state.free_address(),
        changed=now,
    )
    if state.error_next_creates:
        record.fault_message = state.error_next_creates.pop(0)
        record.error_at = record.ready_at
    state.servers[record.id] = record
    if state.lost_creates:
        raise LostResponse(state.lost_creates.pop(0))
    body = {
        "server": {
            "id": record.id,
            "links": _links(base, "servers", record.id),
            "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": name} for name in groups],
            "adminPass": secrets.token_urlsafe(9),
        }
    }
    return json_reply(body, 202, {"Location": f"{base}/compute/v2.1/servers/{record.id}"})


# -- read / list / delete ---------------------------------------------------------------
def show_server(state: CloudState, req: Request, base: str, server_id: str) -> Reply:
    """``GET /servers/{id}``: the server, or 404 ``itemNotFound``."""
    server = _get_server(state, server_id)
    return json_reply({"server": server_view(state, server, base, microversion(req))})


def _parse_since(value: str) -> float:
    try:
        dt = datetime.fromisoformat(value.replace(" ", "+"))
    except ValueError:
        raise nova_error(
            400,
            f"Invalid input for query parameters changes-since. "
            f"Value: {value}. '{value}' is not a 'date-time'",
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _tag_filter(args: Any, mv: Microversion) -> Any:
    if mv < (2, 26):
        return lambda tags: True

    def split(key: str) -> set[str]:
        return {t for t in args.get(key, "").split(",") if t}

    all_, any_, not_all, not_any = (
        split("tags"),
        split("tags-any"),
        split("not-tags"),
        split("not-tags-any"),
    )

    def keep(tags: list[str]) -> bool:
        have = set(tags)
        return (
            (not all_ or all_ <= have)
            and (not any_ or bool(any_ & have))
            and (not not_all or not not_all <= have)
            and not (not_any & have)
        )

    return keep


def _list(state: CloudState, req: Request, base: str, detail: bool) -> Reply:
    mv = microversion(req)
    args = req.args
    now = state.now()
    rows: list[tuple[FakeServer, float | None]] = [(s, None) for s in state.live_servers()]
    if "changes-since" in args:
        since = _parse_since(args["changes-since"])
        rows = [(s, None) for s, _ in rows if s.updated(now) >= since]
        rows += [(s, t) for s, t in state.tombstones.values() if t >= since]
        rows.sort(key=lambda row: (row[0].created, row[0].seq), reverse=True)
    keep_tags = _tag_filter(args, mv)
    status = args.get("status", "").upper()
    name_re = re.compile(args["name"]) if args.get("name") else None
    rows = [
        (s, t)
        for s, t in rows
        if keep_tags(s.tags)
        and (not status or ("DELETED" if t is not None else s.status(now)) == status)
        and (name_re is None or name_re.search(s.name))
    ]
    if "marker" in args:
        ids = [s.id for s, _ in rows]
        if args["marker"] not in ids:
            raise nova_error(400, f"marker [{args['marker']}] not found")
        rows = rows[ids.index(args["marker"]) + 1 :]
    limit = state.config.max_limit
    if "limit" in args:
        try:
            limit = min(limit, int(args["limit"]))
            assert limit >= 0
        except (ValueError, AssertionError):
            raise nova_error(400, "Invalid input for query parameters limit.") from None
    page, more = rows[:limit], len(rows) > limit
    if detail:
        servers = [server_view(state, s, base, mv, deleted_at=t) for s, t in page]
    else:
        servers = [
            {"id": s.id, "name": s.name, "links": _links(base, "servers", s.id)} for s, _ in page
        ]
    body: dict[str, Any] = {"servers": servers}
    if more and page:
        params = dict(sorted(args.items()))
        params.update(limit=str(limit), marker=page[-1][0].id)
        collection = "servers/detail" if detail else "servers"
        body["servers_links"] = [
            {"rel": "next", "href": f"{base}/compute/v2.1/{collection}?{urlencode(params)}"}
        ]
    return json_reply(body)


def list_servers(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /servers``: ids, names and links, with the same filters and paging as detail."""
    return _list(state, req, base, detail=False)


def list_servers_detail(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /servers/detail?tags=a,b&status=&changes-since=&limit=&marker=``."""
    return _list(state, req, base, detail=True)


def delete_server(state: CloudState, req: Request, base: str, server_id: str) -> Reply:
    """``DELETE /servers/{id}``: 204; gone at once, or ``DELETED`` for ``delete_time``."""
    server = _get_server(state, server_id)
    if server.deleted_at is None:
        now = state.now()
        server.deleted_at = now
        server.gone_at = now + state.config.delete_time
        state.sweep()
    return json_reply(None, 204)


def limits(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /limits``: absolute quota limits and usage of the project (2.57+ shape)."""
    cfg = state.config
    used = state.usage()
    absolute = {
        "maxServerMeta": 128,
        "maxTotalInstances": cfg.max_instances,
        "maxTotalCores": cfg.max_cores,
        "maxTotalRAMSize": cfg.max_ram,
        "maxServerGroups": 10,
        "maxServerGroupMembers": 10,
        "maxTotalKeypairs": 100,
        "totalInstancesUsed": used["instances"],
        "totalCoresUsed": used["cores"],
        "totalRAMUsed": used["ram"],
        "totalServerGroupsUsed": 0,
    }
    if microversion(req) < (2, 39):
        absolute["maxImageMeta"] = 128
    return json_reply({"limits": {"absolute": absolute, "rate": []}})


# -- volume attachments -----------------------------------------------------------------
def _attachment_view(
    server: FakeServer,
    volume_id: str,
    device: str,
    attachment_id: str,
    mv: Microversion,
    show: bool,
) -> dict[str, Any]:
    view: dict[str, Any] = {"device": device, "serverId": server.id, "volumeId": volume_id}
    if not (show and mv >= (2, 89)):
        view["id"] = volume_id
    if mv >= (2, 70):
        view["tag"] = None
    if mv >= (2, 79):
        view["delete_on_termination"] = False
    if show and mv >= (2, 89):
        view["attachment_id"] = attachment_id
        view["bdm_uuid"] = str(uuid.uuid5(uuid.NAMESPACE_OID, attachment_id))
    return view


def attach_volume(state: CloudState, req: Request, base: str, server_id: str) -> Reply:
    """``POST /servers/{id}/os-volume_attachments``: 200; volume becomes ``in-use``."""
    server = _get_server(state, server_id)
    body = (req.get_json(silent=True) or {}).get("volumeAttachment") or {}
    volume_id = body.get("volumeId")
    if not volume_id:
        raise nova_error(
            400,
            "Invalid input for field/attribute volumeAttachment. 'volumeId' is a required property",
        )
    status = server.status(state.now())
    if status != "ACTIVE":
        vm_state = {"BUILD": "building", "ERROR": "error", "DELETED": "deleted"}[status]
        raise nova_error(
            409, f"Cannot 'attach_volume' instance {server_id} while it is in vm_state {vm_state}"
        )
    volume = state.volumes.get(volume_id)
    if volume is None:
        raise nova_error(404, f"Volume {volume_id} could not be found.")
    if volume.status(state.now()) != "available":
        raise nova_error(
            400,
            f"Invalid volume: volume {volume_id} status must be 'available'. "
            f"Currently in '{volume.status(state.now())}'",
        )
    used = {
        state.volumes[v].attachment["device"]
        for v in server.volumes
        if v in state.volumes and state.volumes[v].attachment
    }
    device = next(f"/dev/vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"/dev/vd{c}" not in used)
    now = state.now()
    volume.attachment = {
        "server_id": server.id,
        "attachment_id": str(uuid.uuid4()),
        "device": device,
        "attached_at": now,
    }
    volume.changed = now
    server.volumes.append(volume_id)
    server.changed = now
    view = _attachment_view(
        server, volume_id, device, volume.attachment["attachment_id"], microversion(req), show=False
    )
    return json_reply({"volumeAttachment": view})


def _attached(state: CloudState, server: FakeServer, volume_id: str) -> dict[str, Any]:
    volume = state.volumes.get(volume_id)
    if volume_id not in server.volumes or volume is None or volume.attachment is None:
        raise nova_error(404, f"No volume Block Device Mapping with id {volume_id}.")
    return volume.attachment


def list_attachments(state: CloudState, req: Request, base: str, server_id: str) -> Reply:
    """``GET /servers/{id}/os-volume_attachments``."""
    server = _get_server(state, server_id)
    mv = microversion(req)
    views = []
    for vid in server.volumes:
        att = _attached(state, server, vid)
        views.append(_attachment_view(server, vid, att["device"], att["attachment_id"], mv, True))
    return json_reply({"volumeAttachments": views})


def show_attachment(
    state: CloudState, req: Request, base: str, server_id: str, volume_id: str
) -> Reply:
    """``GET /servers/{id}/os-volume_attachments/{volume_id}``."""
    server = _get_server(state, server_id)
    att = _attached(state, server, volume_id)
    view = _attachment_view(
        server, volume_id, att["device"], att["attachment_id"], microversion(req), show=True
    )
    return json_reply({"volumeAttachment": view})


def detach_volume(
    state: CloudState, req: Request, base: str, server_id: str, volume_id: str
) -> Reply:
    """``DELETE /servers/{id}/os-volume_attachments/{volume_id}``: 202; volume ``available``."""
    server = _get_server(state, server_id)
    _attached(state, server, volume_id)
    now = state.now()
    volume = state.volumes[volume_id]
    volume.attachment = None
    volume.changed = now
    server.volumes.remove(volume_id)
    server.changed = now
    return json_reply(None, 202)
