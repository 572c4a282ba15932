"""The backend interface, small on purpose (after JupyterHub's Spawner): every backend can
stop a machine and tell whether its IDE answers, and declares what else it can do in its
`Capabilities`. Callers ask the capabilities (or the registry in `provisioning.backends`),
never the backend's name, and drive the backend through the interface its capabilities
promise:

- on demand (`OnDemandBackend`: start, poll) — a job starts one machine and waits for it;
- pooled (`PooledBackend`: create, list_pool_servers, quota_headroom) — the reconciler keeps
  a warm pool, seeing the whole pool in one paged list and creating in batches;
- students' volumes (`StudentVolumes`) — files that follow the student from machine to
  machine.

A backend knows nothing of the database: it gets a snapshot of the machine and returns what
must be remembered to find the machine again."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from provisioning.sandbox import Limits

if TYPE_CHECKING:
    from config.settings import Settings
    from provisioning.models import Environment


@dataclass(frozen=True)
class MachineSpec:
    """What a backend needs to know about one machine."""

    id: int
    ide_kind: str
    owner_id: int | None
    course_id: int | None
    ref: dict[str, Any] = field(default_factory=dict)
    address: str | None = None
    ide_token: str | None = None
    limits: Limits | None = None  # the sandbox's (local backend)
    title: str = ""  # the IDE's page title: the activity (or course) it was started for

    @property
    def base_url(self) -> str:
        return f"/ide/{self.id}/"


@dataclass(frozen=True)
class Started:
    """A machine the backend has set going (its IDE may not answer yet)."""

    ref: dict[str, Any]
    address: str  # host:port where the IDE listens
    ide_token: str


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared once (see `provisioning.backends.BACKENDS`)."""

    ide_kinds: frozenset[str]  # the IDEs it can run; an environment asking another is refused
    # Machines kept warm in a pool by the reconciler (`PooledBackend`); otherwise a job
    # starts each machine when a student asks (`OnDemandBackend`).
    pooled: bool
    # Students' files live on volumes that follow them (`StudentVolumes`); otherwise in a
    # home folder on the tool's host.
    volumes: bool
    # Machines are processes on the tool's own host: the host's sandbox and the IDE
    # environment (`labpool ide-env`) matter, and `labpool run` stops them when it exits.
    on_host: bool
    # Environment fields it cannot boot without, with the `labpool env add` flag for each.
    needs: tuple[tuple[str, str], ...] = ()
    # The IDE port is reachable over a cloud network: `env add` creates or checks the
    # security groups that admit the proxy alone.
    security_groups: bool = False


@dataclass(frozen=True)
class ServerView:
    """One server of a pool as the reconciler sees it."""

    server_id: str
    machine_id: int | None  # from the `machine-<id>` tag; None if the tag is missing
    status: str  # ACTIVE, BUILD, ERROR, … (Nova's words)
    address: str | None
    fault: str | None
    created: datetime | None


class Backend(abc.ABC):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @classmethod
    @abc.abstractmethod
    def for_environment(cls, settings: Settings, environment: Environment | None) -> Backend:
        """The backend configured for `environment`'s machines (from the registry)."""

    @abc.abstractmethod
    def stop(self, machine: MachineSpec) -> None:
        """Stop the machine; a machine that is already gone is not an error."""

    @abc.abstractmethod
    def health(self, machine: MachineSpec) -> bool:
        """Does the machine's IDE answer, with its token, at its base URL?"""


class OnDemandBackend(Backend):
    """A backend whose machines a job starts one at a time (`provisioning.jobs.start_machine`)."""

    @abc.abstractmethod
    def start(self, machine: MachineSpec) -> Started:
        """Set the machine going. Must not wait for the IDE; `health` tells when it answers."""

    @abc.abstractmethod
    def poll(self, machine: MachineSpec) -> bool:
        """Is the machine still there (running or booting)?"""


class PooledBackend(Backend):
    """A backend whose machines the reconciler keeps, a whole pool per pass."""

    @abc.abstractmethod
    def create(self, machine: MachineSpec) -> str:
        """Create a machine the caller knows has none (it has just listed the pool), with
        `machine.ide_token` baked in; returns the server id. Must not wait for it."""

    @abc.abstractmethod
    def list_pool_servers(self, pool_id: int) -> list[ServerView]:
        """Every server of the pool, in a few paged calls (never one call per machine)."""

    @abc.abstractmethod
    def quota_headroom(self) -> int | None:
        """How many more servers the cloud allows; None when unlimited."""


class StudentVolumes(abc.ABC):
    """Students' volumes, attached to whichever machine the student holds."""

    @abc.abstractmethod
    def create_volume(self, name: str, size_gb: int, metadata: dict[str, str]) -> str:
        """Create a volume; returns its id."""

    @abc.abstractmethod
    def volume_status(self, volume_id: str) -> str:
        """creating, available, in-use, error, … or `gone`."""

    @abc.abstractmethod
    def find_volume(self, name: str) -> str | None:
        """The id of a volume with this name, if the cloud has one (a create whose worker died
        before it recorded the id)."""

    @abc.abstractmethod
    def volume_servers(self, volume_id: str) -> list[str]:
        """The servers the volume is attached to."""

    @abc.abstractmethod
    def attach_volume(self, server_id: str, volume_id: str) -> None:
        """Attach the volume to the server (the machine mounts it as the student's home)."""

    @abc.abstractmethod
    def delete_volume(self, volume_id: str) -> None:
        """Delete the volume, and the student's files with it."""
