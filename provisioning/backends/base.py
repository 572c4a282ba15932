"""The backend interface, small on purpose (after JupyterHub's Spawner): start, stop, poll,
health. A backend knows nothing of the database: it gets a snapshot of the machine and
returns what must be remembered to find the machine again."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from provisioning.sandbox import Limits


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

    @property
    def base_url(self) -> str:
        return f"/ide/{self.id}/"


@dataclass(frozen=True)
class Started:
    """A machine the backend has set going (its IDE may not answer yet)."""

    ref: dict[str, Any]
    address: str  # host:port where the IDE listens
    ide_token: str


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def start(self, machine: MachineSpec) -> Started:
        """Set the machine going. Must not wait for the IDE; `health` tells when it answers."""

    @abc.abstractmethod
    def stop(self, machine: MachineSpec) -> None:
        """Stop the machine; a machine that is already gone is not an error."""

    @abc.abstractmethod
    def poll(self, machine: MachineSpec) -> bool:
        """Is the machine still there (running or booting)?"""

    @abc.abstractmethod
    def health(self, machine: MachineSpec) -> bool:
        """Does the machine's IDE answer, with its token, at its base URL?"""
