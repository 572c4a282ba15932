"""The `local` backend: each machine is an IDE process on the tool's own host, like the
littlest JupyterHub. It listens on 127.0.0.1 on a free port, with its own random token and
base URL `/ide/<machine id>/`; the student's home folder (per student and course, under the
data folder) outlives the process.

The IDE process is started in its own session, so it outlives the RQ work horse that started
it; the pid and the process's start time are recorded so that a recycled pid is never
mistaken for the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import requests

from provisioning.backends.base import Backend, MachineSpec, Started
from provisioning.errors import BackendUnavailable
from provisioning.ide_config import jupyter_server_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalBackend(Backend):
    name = "local"

    def __init__(self, data_dir: Path, frame_ancestors: str = "'self'"):
        self.data_dir = data_dir.resolve()
        self.frame_ancestors = frame_ancestors

    def home_folder(self, machine: MachineSpec) -> Path:
        if machine.owner_id is None:
            return self.data_dir / "homes" / "unowned" / f"machine-{machine.id}"
        return self.data_dir / "homes" / f"course-{machine.course_id}" / f"user-{machine.owner_id}"

    def _command(self, machine: MachineSpec, port: int, home: Path) -> list[str]:
        if machine.ide_kind != "jupyterlab":
            raise BackendUnavailable(
                f"the local backend cannot run {machine.ide_kind!r} machines yet"
            )
        # Containers and CI run as root; JupyterLab refuses that unless told.
        as_root = ["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []
        return [
            sys.executable, "-m", "jupyterlab", *as_root,
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={machine.base_url}",
            f"--ServerApp.root_dir={home}",
            # Bound to 127.0.0.1 with a token: safe to accept the public Host the proxy
            # forwards (Jupyter refuses non-local Host names otherwise).
            "--ServerApp.allow_remote_access=True",
            "--ServerApp.trust_xheaders=True",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]

    def start(self, machine: MachineSpec) -> Started:
        home = self.home_folder(machine)
        home.mkdir(parents=True, exist_ok=True)
        machine_dir = self.data_dir / "machines" / str(machine.id)
        machine_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        token = secrets.token_urlsafe(32)
        env = {
            key: value
            for key, value in os.environ.items()
            # The IDE runs student code: it gets none of the tool's settings or secrets.
            if not key.startswith(("LABPOOL_", "OS_", "JUPYTER_"))
        }
        env.update(
            HOME=str(home),
            JUPYTER_TOKEN=token,  # the environment, not argv: argv is visible to `ps`
            JUPYTER_RUNTIME_DIR=str(machine_dir / "runtime"),
            JUPYTER_CONFIG_DIR=str(machine_dir / "config"),
        )
        config_dir = machine_dir / "config"
        config_dir.mkdir(exist_ok=True)
        (config_dir / "jupyter_server_config.py").write_text(
            jupyter_server_config(f"frame-ancestors {self.frame_ancestors}")
        )
        with (machine_dir / "ide.log").open("ab") as log:
            process = subprocess.Popen(
                self._command(machine, port, home),
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        create_time = psutil.Process(process.pid).create_time()
        return Started(
            ref={"pid": process.pid, "create_time": create_time, "port": port},
            address=f"127.0.0.1:{port}",
            ide_token=token,
        )

    def _process(self, machine: MachineSpec) -> psutil.Process | None:
        pid = machine.ref.get("pid")
        if not pid:
            return None
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - machine.ref.get("create_time", 0)) > 0.01:
                return None  # the pid was recycled: not our process
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.NoSuchProcess:
            return None

    def poll(self, machine: MachineSpec) -> bool:
        return self._process(machine) is not None

    def health(self, machine: MachineSpec) -> bool:
        if not machine.address or not machine.ide_token:
            return False
        try:
            resp = requests.get(
                f"http://{machine.address}{machine.base_url}api/status",
                headers={"Authorization": f"token {machine.ide_token}"},
                timeout=2,
            )
        except requests.RequestException:
            return False
        return resp.status_code == 200

    def stop(self, machine: MachineSpec) -> None:
        process = self._process(machine)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            _, alive = psutil.wait_procs([process], timeout=10)
            for survivor in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(survivor.pid, signal.SIGKILL)
        runtime = self.data_dir / "machines" / str(machine.id) / "runtime"
        shutil.rmtree(runtime, ignore_errors=True)
