"""Backends by capability: the registry's declarations agree with what each backend really
runs, callers get the interface a capability promises, an environment whose IDE its backend
cannot run is refused at `labpool env add`, and nothing outside the backends compares a
backend's name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from config.runtime import Runtime
from lti_tool.cli import main
from provisioning import cloud_init
from provisioning.backends import (
    BACKENDS,
    OnDemandBackend,
    PooledBackend,
    StudentVolumes,
    backend_class,
    backends_that,
    capabilities,
    on_demand_backend_for,
)
from provisioning.errors import BackendUnavailable
from provisioning.models import Environment

ROOT = Path(__file__).resolve().parent.parent


def test_each_backend_class_runs_what_the_registry_declares() -> None:
    for name, entry in BACKENDS.items():
        cls = backend_class(name)
        assert cls.name == name and cls.capabilities is entry.capabilities
        can = entry.capabilities
        # The interface each capability promises is the one the class implements.
        assert issubclass(cls, PooledBackend) is can.pooled
        assert issubclass(cls, OnDemandBackend) is (not can.pooled)
        assert issubclass(cls, StudentVolumes) is can.volumes
    assert capabilities("openstack").ide_kinds == frozenset(cloud_init.IDE_KINDS)
    assert capabilities("local").ide_kinds == {"jupyterlab"}


def test_callers_select_backends_by_what_they_can_do() -> None:
    assert backends_that(lambda can: can.on_host) == ["local"]
    assert backends_that(lambda can: can.pooled) == ["openstack"]
    with pytest.raises(BackendUnavailable, match="'kubernetes' is not available"):
        capabilities("kubernetes")


def test_a_pooled_backend_is_never_started_on_demand(rt: Runtime) -> None:
    with pytest.raises(BackendUnavailable, match="does not start machines on demand"):
        on_demand_backend_for("openstack", rt.settings)


def test_the_web_edge_asks_what_a_cloud_machine_can_do_without_loading_openstacksdk() -> None:
    code = (
        "import sys, lti_tool.web.app; from provisioning.backends import capabilities; "
        "assert capabilities('openstack').pooled; print('openstack' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def env_add(*args: str) -> object:
    return CliRunner().invoke(main, ["env", "add", *args])


def test_env_add_refuses_an_ide_the_backend_cannot_run_and_stores_nothing(rt: Runtime) -> None:
    result = env_add("cs-here", "--backend", "local", "--ide", "code-server")
    assert result.exit_code != 0  # type: ignore[attr-defined]
    assert "the local backend cannot run code-server; it runs jupyterlab" in (result.output)  # type: ignore[attr-defined]
    with rt.sessions() as session:
        assert session.scalar(select(Environment).where(Environment.name == "cs-here")) is None

    result = env_add("lab-here", "--backend", "local", "--ide", "jupyterlab")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]


def test_env_add_names_what_a_cloud_environment_lacks(rt: Runtime) -> None:
    result = env_add("cloudy", "--backend", "openstack", "--ide", "code-server", "--image", "i")
    assert result.exit_code != 0  # type: ignore[attr-defined]
    assert "an openstack environment needs --flavor, --network" in result.output  # type: ignore[attr-defined]


NAME_TEST = re.compile(
    r"""(==|!=)\s*["'](local|openstack)["']|["'](local|openstack)["']\s*(==|!=)"""
)


def test_nothing_outside_the_backends_compares_a_backend_name() -> None:
    offenders = []
    for folder in ("provisioning", "lti_tool", "grading", "config"):
        for path in (ROOT / folder).rglob("*.py"):
            if (ROOT / "provisioning" / "backends") in path.parents:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if NAME_TEST.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
