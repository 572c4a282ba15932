"""The Python environment students' IDEs run on (the `local` backend), apart from the tool's.

The tool's virtualenv holds its secrets' code paths and must not change under it: a
student's `pip install` would otherwise change the tool. So JupyterLab runs from its own
virtualenv (`LABPOOL_IDE_ENV`, default `<data folder>/ide-env`), owned by the tool's user and
read-only in every sandbox; students install packages with `pip install --user` into their
own home.

It is made from the system's Python (`/usr/bin/python3`, which every sandbox sees under
`/usr`) when there is one, else from the interpreter running Labpool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

IDE_PACKAGES = ("jupyterlab>=4.2", "ipykernel")
SYSTEM_PYTHON = Path("/usr/bin/python3")


class IdeEnvError(Exception):
    """The IDE environment could not be made; the message says what failed."""


def base_python() -> str:
    if (
        SYSTEM_PYTHON.exists()
        and subprocess.run(
            [str(SYSTEM_PYTHON), "-c", "import venv, ensurepip"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    ):
        return str(SYSTEM_PYTHON)
    return getattr(sys, "_base_executable", sys.executable)


def ide_env_ready(path: Path) -> bool:
    python = path / "bin" / "python"
    return (
        python.exists()
        and subprocess.run(
            [str(python), "-c", "import jupyterlab, ipykernel"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


def make_ide_env(path: Path, packages: tuple[str, ...] = IDE_PACKAGES, echo=print) -> Path:
    """Create (or complete) the IDE environment at `path`; returns its interpreter."""
    path = path.resolve()
    if ide_env_ready(path):
        return path / "bin" / "python"
    echo(f"Making the IDE environment in {path} (JupyterLab, once; about a minute)…")
    old_umask = os.umask(0o022)  # readable by the students' users, writable by the tool only
    try:
        if not (path / "bin" / "python").exists():
            shutil.rmtree(path, ignore_errors=True)
            # System site packages on: that is what lets `pip install --user` work in it
            # (a plain venv disables the user site).
            run([base_python(), "-m", "venv", "--system-site-packages", str(path)])
        run(
            [
                str(path / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *packages,
            ]
        )
    finally:
        os.umask(old_umask)
    if not ide_env_ready(path):
        raise IdeEnvError(f"{path} was made but cannot import JupyterLab")
    return path / "bin" / "python"


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise IdeEnvError(f"{' '.join(command[:4])}… failed: {done.stderr.strip()[-2000:]}")
