"""Backends that run machines: `local` (processes on this host) and, later, `openstack`."""

from __future__ import annotations

from config.settings import Settings
from provisioning.backends.base import Backend, MachineSpec, Started
from provisioning.errors import BackendUnavailable

__all__ = ["Backend", "MachineSpec", "Started", "backend_for"]


def backend_for(name: str, settings: Settings) -> Backend:
    if name == "local":
        from provisioning.backends.local import LocalBackend

        return LocalBackend(settings.data_dir)
    raise BackendUnavailable(f"backend {name!r} is not available in this build")
