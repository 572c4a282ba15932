"""Backends that run machines, by name, with what each can do.

The registry maps a backend's name (what `Environment.backend` and `Machine.backend` hold)
to its class and its declared `Capabilities`. Callers ask `capabilities(name)` (pooled?
volumes? on this host? which IDEs?) and never compare names, as JupyterHub's hub never
branches on the kind of Spawner it runs.

The capabilities are declared here, with the class named as a string and imported only when
a machine is driven: the web edge asks what a cloud machine can do on every status poll, and
must not pay for openstacksdk (0.6 s and tens of MB per process) to learn it. Each backend
class points its `capabilities` at its entry, and a test checks the two agree with what the
class really runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.settings import Settings
from provisioning.backends.base import (
    Backend,
    Capabilities,
    MachineSpec,
    OnDemandBackend,
    PooledBackend,
    ServerView,
    Started,
    StudentVolumes,
)
from provisioning.errors import BackendUnavailable

if TYPE_CHECKING:
    from provisioning.models import Environment

__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "MachineSpec",
    "OnDemandBackend",
    "PooledBackend",
    "ServerView",
    "Started",
    "StudentVolumes",
    "backend_for",
    "backends_that",
    "capabilities",
    "on_demand_backend_for",
    "pooled_backend_for",
    "volumes_backend_for",
]


@dataclass(frozen=True)
class Registered:
    """A backend as the registry knows it: where its class lives, and what it can do."""

    load: str  # "module:Class"
    capabilities: Capabilities


# The IDE kinds a cloud image runs (mirrors `provisioning.cloud_init.IDE_KINDS`, which the
# registry does not import: it reads files and loads YAML).
_CLOUD_IDES = frozenset({"jupyterlab", "code-server", "terminal"})

BACKENDS: dict[str, Registered] = {
    "local": Registered(
        "provisioning.backends.local:LocalBackend",
        Capabilities(
            ide_kinds=frozenset({"jupyterlab"}), pooled=False, volumes=False, on_host=True
        ),
    ),
    "openstack": Registered(
        "provisioning.backends.openstack:OpenStackBackend",
        Capabilities(
            ide_kinds=_CLOUD_IDES,
            pooled=True,
            volumes=True,
            on_host=False,
            needs=(("image_id", "--image"), ("flavor_id", "--flavor"), ("network_id", "--network")),
            security_groups=True,
        ),
    ),
}


def capabilities(name: str) -> Capabilities:
    """What the backend called `name` can do."""
    try:
        return BACKENDS[name].capabilities
    except KeyError:
        raise BackendUnavailable(f"backend {name!r} is not available here") from None


def backends_that(wanted: Callable[[Capabilities], bool]) -> list[str]:
    """The names of the backends whose capabilities satisfy `wanted` (for SQL filters such
    as `Machine.backend.in_(backends_that(lambda c: c.on_host))`)."""
    return sorted(name for name, entry in BACKENDS.items() if wanted(entry.capabilities))


def backend_class(name: str) -> type[Backend]:
    module, _, attribute = BACKENDS[name].load.partition(":") if name in BACKENDS else ("", "", "")
    if not module:
        raise BackendUnavailable(f"backend {name!r} is not available here")
    cls: type[Backend] = getattr(importlib.import_module(module), attribute)
    return cls


def backend_for(name: str, settings: Settings, environment: Environment | None = None) -> Backend:
    """The backend that drives machines of `name` (a cloud backend needs the environment:
    its image, flavor and network)."""
    return backend_class(name).for_environment(settings, environment)


def on_demand_backend_for(name: str, settings: Settings) -> OnDemandBackend:
    """A backend whose machines a job starts one at a time."""
    cls = backend_class(name)
    if not issubclass(cls, OnDemandBackend):
        raise BackendUnavailable(f"backend {name!r} does not start machines on demand")
    return cls.for_environment(settings, None)


def pooled_backend_for(environment: Environment, settings: Settings) -> PooledBackend:
    """The backend the reconciler drives an environment's pool with."""
    cls = backend_class(environment.backend)
    if not issubclass(cls, PooledBackend):
        raise BackendUnavailable(f"backend {environment.backend!r} keeps no pools")
    return cls.for_environment(settings, environment)


def volumes_backend_for(environment: Environment, settings: Settings) -> StudentVolumes:
    """The backend that keeps an environment's students' volumes."""
    cls = backend_class(environment.backend)
    if not issubclass(cls, StudentVolumes):
        raise BackendUnavailable(f"backend {environment.backend!r} keeps no volumes")
    return cls.for_environment(settings, environment)


def ide_frame_ancestors(settings: Settings) -> str:
    """Who may frame an IDE: the tool and every registered platform (Moodle embeds the
    activity, and the status page moves that same frame on to the IDE)."""
    from lti_tool.framing import frame_ancestors

    return frame_ancestors(settings)
