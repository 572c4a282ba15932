"""Every test of the fault suite is `slow` (`.ci/run` runs them; deselect with -m "not slow"),
and gets the fleet runtime (`crt`), a `fleet` of real processes, stopped after the test, and
a `class_start` (harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import ClassStart, Fleet
from tests.test_fleet import crt  # noqa: F401  (the fixture: the runtime on the fake cloud)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Fleet(logs)
    yield running
    running.stop_all()


@pytest.fixture
def class_start(crt, tool, platform, cloud) -> Iterator[ClassStart]:  # type: ignore[no-untyped-def]  # noqa: F811
    start = ClassStart(crt, tool, platform, cloud).prepare()
    yield start
    start.stop()
