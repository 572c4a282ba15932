"""Cinder (Block Storage API v3) subset: discovery and volumes create/show/list/delete.

Mimics https://docs.openstack.org/api-ref/block-storage/v3/ as far as openstacksdk's
``conn.block_storage`` proxy needs it. Attaching is done through Nova (``compute.py``).
"""

from __future__ import annotations

import uuid
from typing import Any

from werkzeug.wrappers import Request

from .replies import Reply, json_reply
from .state import CloudState, FakeVolume, iso, nova_error


def _v3(state: CloudState, base: str) -> dict[str, Any]:
    return {
        "id": "v3.0",
        "status": "CURRENT",
        "version": state.config.volume_max_microversion,
        "min_version": "3.0",
        "updated": "2023-08-31T00:00:00Z",
        "links": [
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
            {"rel": "self", "href": f"{base}/volume/v3/"},
        ],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}
        ],
    }


def versions(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /volume/``: Cinder's version list (300 Multiple Choices)."""
    return json_reply({"versions": [_v3(state, base)]}, 300)


def version(state: CloudState, req: Request, base: str, project_id: str | None = None) -> Reply:
    """``GET /volume/v3/`` (and ``/volume/v3/{project}``): Cinder answers a one-item list."""
    return json_reply({"versions": [_v3(state, base)]})


def volume_view(state: CloudState, volume: FakeVolume, base: str) -> dict[str, Any]:
    """The ``volume`` object of ``GET /v3/{project}/volumes/{id}``."""
    now = state.now()
    project = state.config.project_id
    attachments = []
    if volume.attachment:
        att = volume.attachment
        attachments.append(
            {
                "id": volume.id,
                "attachment_id": att["attachment_id"],
                "volume_id": volume.id,
                "server_id": att["server_id"],
                "host_name": None,
                "device": att["device"],
                "attached_at": iso(att["attached_at"], "cinder"),
            }
        )
    return {
        "id": volume.id,
        "name": volume.name,
        "description": volume.description,
        "status": volume.status(now),
        "size": volume.size,
        "metadata": dict(volume.metadata),
        "attachments": attachments,
        "availability_zone": "nova",
        "bootable": "false",
        "encrypted": False,
        "multiattach": False,
        "volume_type": "lvmdriver-1",
        "snapshot_id": None,
        "source_volid": None,
        "replication_status": None,
        "consistencygroup_id": None,
        "group_id": None,
        "migration_status": None,
        "user_id": state.config.user_id,
        "shared_targets": False,
        "created_at": iso(volume.created, "cinder"),
        "updated_at": iso(max(volume.changed, min(volume.ready_at, now)), "cinder"),
        "links": [
            {"rel": "self", "href": f"{base}/volume/v3/{project}/volumes/{volume.id}"},
            {"rel": "bookmark", "href": f"{base}/volume/{project}/volumes/{volume.id}"},
        ],
    }


def _get(state: CloudState, volume_id: str) -> FakeVolume:
    volume = state.volumes.get(volume_id)
    if volume is None:
        raise nova_error(404, f"Volume {volume_id} could not be found.")
    return volume


def create_volume(state: CloudState, req: Request, base: str, project_id: str) -> Reply:
    """``POST /v3/{project}/volumes``: 202 with status ``creating``."""
    body = (req.get_json(silent=True) or {}).get("volume")
    if not isinstance(body, dict):
        raise nova_error(400, "Missing required element 'volume' in request body.")
    try:
        size = int(body.get("size"))
        assert size > 0
    except (TypeError, ValueError, AssertionError):
        raise nova_error(
            400, f"Invalid input received: 'size' must be an integer > 0, got {body.get('size')!r}"
        ) from None
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise nova_error(400, "Invalid input for field/attribute metadata.")
    now = state.now()
    volume = FakeVolume(
        id=str(uuid.uuid4()),
        name=body.get("name"),
        description=body.get("description"),
        size=size,
        metadata={str(k): str(v) for k, v in metadata.items()},
        created=now,
        ready_at=now + state.config.volume_time,
        changed=now,
    )
    state.volumes[volume.id] = volume
    view = volume_view(state, volume, base)
    view["status"] = "creating"
    return json_reply({"volume": view}, 202)


def show_volume(
    state: CloudState, req: Request, base: str, project_id: str, volume_id: str
) -> Reply:
    """``GET /v3/{project}/volumes/{id}``; 404 ``itemNotFound``."""
    return json_reply({"volume": volume_view(state, _get(state, volume_id), base)})


def list_volumes(state: CloudState, req: Request, base: str, project_id: str) -> Reply:
    """``GET /v3/{project}/volumes`` and ``/volumes/detail`` (no paging: a small fake)."""
    views = [volume_view(state, v, base) for v in state.volumes.values()]
    if not req.path.endswith("/detail"):
        views = [{"id": v["id"], "name": v["name"], "links": v["links"]} for v in views]
    return json_reply({"volumes": views})


def delete_volume(
    state: CloudState, req: Request, base: str, project_id: str, volume_id: str
) -> Reply:
    """``DELETE /v3/{project}/volumes/{id}``: 202; 400 while attached or creating."""
    volume = _get(state, volume_id)
    if volume.status(state.now()) not in ("available", "error"):
        raise nova_error(
            400,
            "Invalid volume: Volume status must be available or error or "
            "error_restoring or error_extending or error_managing and must "
            "not be migrating, attached, belong to a group, have snapshots, "
            "awaiting a transfer, or be disassociated from snapshots after "
            "volume transfer.",
        )
    del state.volumes[volume_id]
    return json_reply(None, 202)
