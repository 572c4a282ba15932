"""Backends that run machines: `local` (processes on this host) and `openstack` (servers
booted from an environment's golden image)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from config.settings import Settings
from provisioning.backends.base import Backend, MachineSpec, Started
from provisioning.errors import BackendUnavailable

if TYPE_CHECKING:
    from provisioning.backends.openstack import OpenStackBackend
    from provisioning.models import Environment

__all__ = ["Backend", "MachineSpec", "Started", "backend_for", "openstack_backend_for"]


def ide_frame_ancestors(settings: Settings) -> str:
    """Who may frame an IDE: the tool and every registered platform (Moodle embeds the
    activity, and the status page moves that same frame on to the IDE)."""
    from lti_tool.framing import frame_ancestors

    return frame_ancestors(settings)


def backend_for(name: str, settings: Settings, environment: Environment | None = None) -> Backend:
    if name == "local":
        from provisioning.backends.local import LocalBackend

        return LocalBackend(
            settings.data_dir, frame_ancestors=ide_frame_ancestors(settings), settings=settings
        )
    if name == "openstack" and environment is not None:
        return openstack_backend_for(environment, settings)
    raise BackendUnavailable(f"backend {name!r} is not available here")


def openstack_backend_for(environment: Environment, settings: Settings) -> OpenStackBackend:
    """The cloud backend for an environment: its image, flavor and network, on the cloud
    named by the settings."""
    from provisioning.backends.openstack import CloudSpec, OpenStackBackend

    missing = [name for name in ("image_id", "flavor_id", "network_id")
               if not getattr(environment, name)]
    if missing:
        raise BackendUnavailable(
            f"environment {environment.name!r} lacks {', '.join(missing)} for the openstack backend"
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
    return OpenStackBackend(
        settings.openstack_cloud, spec, api_timeout=settings.openstack_api_timeout_s,
        frame_ancestors=lambda: ide_frame_ancestors(settings),  # read when a server boots
    )
