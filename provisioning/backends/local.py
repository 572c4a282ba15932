"""The `local` backend: each machine is an IDE process on the tool's own host, like the
littlest JupyterHub, but each in a sandbox of its own (`provisioning/sandbox.py`): the
student's own OS user, bubblewrap with no network, the system read-only, only their home
writable, resource limits. The home folder (per student and course, under the data folder)
outlives the process.

Behind the proxy (`IDE_PROXY`, which `labpool run` turns on when it starts nginx) the IDE
listens on a unix socket that only nginx's workers can open. In direct mode (no nginx; the
runner allows it for a loopback public URL only) it listens on a loopback TCP port, so the
sandbox keeps the host's network.

The IDE process is started in its own session, so it outlives the RQ worker that started it;
the pid and the process's start time are recorded so that a recycled pid is never mistaken
for the machine.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from config.settings import Settings
from provisioning import sandbox
from provisioning.backends import BACKENDS
from provisioning.backends.base import MachineSpec, OnDemandBackend, Started
from provisioning.errors import BackendUnavailable
from provisioning.ide_config import jupyter_server_config
from provisioning.ide_http import UNIX, ide_get

if TYPE_CHECKING:
    from provisioning.models import Environment

log = logging.getLogger(__name__)
SOCKET_NAME = "ide.sock"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalBackend(OnDemandBackend):
    name = "local"
    capabilities = BACKENDS[name].capabilities

    def __init__(
        self,
        data_dir: Path,
        frame_ancestors: str = "'self'",
        *,
        settings: Settings | None = None,
    ):
        self.data_dir = data_dir.resolve()
        self.frame_ancestors = frame_ancestors
        self.ide_env = settings.ide_env_dir if settings else self.data_dir / "ide-env"
        self.use_socket = bool(settings and settings.ide_proxy)
        self.proxy_group = settings.proxy_group if settings else "www-data"

    @classmethod
    def for_environment(
        cls, settings: Settings, environment: Environment | None = None
    ) -> LocalBackend:
        """Every local environment's machines run alike; the environment's limits come with
        each machine (`MachineSpec.limits`)."""
        from provisioning.backends import ide_frame_ancestors

        return cls(
            settings.data_dir, frame_ancestors=ide_frame_ancestors(settings), settings=settings
        )

    def home_folder(self, machine: MachineSpec) -> Path:
        if machine.owner_id is None:
            return self.data_dir / "homes" / "unowned" / f"machine-{machine.id}"
        return self.data_dir / "homes" / f"course-{machine.course_id}" / f"user-{machine.owner_id}"

    def machine_dir(self, machine_id: int) -> Path:
        return self.data_dir / "machines" / str(machine_id)

    def _command(self, machine: MachineSpec, python: Path, listen: list[str]) -> list[str]:
        if machine.ide_kind not in self.capabilities.ide_kinds:
            raise BackendUnavailable(
                f"the local backend cannot run {machine.ide_kind!r} machines yet"
            )
        return [
            str(python),
            "-m",
            "jupyterlab",
            "--no-browser",
            *listen,
            f"--ServerApp.base_url={machine.base_url}",
            f"--ServerApp.root_dir={sandbox.SANDBOX_HOME}",
            # Reached only through the proxy (or loopback in direct mode), with a token:
            # safe to accept the public Host the proxy forwards.
            "--ServerApp.allow_remote_access=True",
            "--ServerApp.trust_xheaders=True",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]

    def start(self, machine: MachineSpec) -> Started:
        isolation = sandbox.host_isolation()
        python = sandbox.python_for_ide(self.ide_env)
        # The data folder stays closed: passable (the sandbox's folders are bound from
        # inside it) but never listable.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o711)
        account = None
        if isolation.own_users:
            account = sandbox.student_account(
                f"{machine.owner_id}" if machine.owner_id is not None else f"m{machine.id}"
            )
        home = self.home_folder(machine)
        sandbox.prepare_home(home, account)

        machine_dir = self.machine_dir(machine.id)
        machine_dir.mkdir(parents=True, exist_ok=True)
        machine_dir.parent.chmod(0o711)
        machine_dir.chmod(0o711)
        config_dir = machine_dir / "config"
        config_dir.mkdir(exist_ok=True)
        config_dir.chmod(0o755)
        config = config_dir / "jupyter_server_config.py"
        config.write_text(
            jupyter_server_config(f"frame-ancestors {self.frame_ancestors}", machine.title)
        )
        config.chmod(0o644)  # the student reads it, only the tool writes it
        # jupyter_core would try to write this marker into the (read-only) config folder
        # when it finds an old ~/.ipython in the home.
        (config_dir / "migrated").touch(mode=0o644)
        socket_dir = machine_dir / "socket"
        sandbox.prepare_socket_dir(socket_dir, account, sandbox.proxy_gid(self.proxy_group))

        token = secrets.token_urlsafe(32)
        if self.use_socket:
            inside = (
                f"{sandbox.SANDBOX_SOCKET_DIR}/{SOCKET_NAME}"
                if isolation.sandbox
                else str(socket_dir / SOCKET_NAME)
            )
            listen = [f"--ServerApp.sock={inside}", "--ServerApp.sock_mode=0660"]
            address = f"{UNIX}{socket_dir / SOCKET_NAME}"
            port = None
        else:
            port = free_port()
            listen = [
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
            ]
            address = f"127.0.0.1:{port}"

        command = self._command(machine, python, listen)
        if isolation.sandbox:
            assert isolation.bwrap is not None
            command = (
                sandbox.bwrap_command(
                    isolation.bwrap,
                    home=home,
                    socket_dir=socket_dir,
                    config_dir=config_dir,
                    python=python,
                    share_network=not self.use_socket,
                )
                + command
            )
            home_inside, config_inside = sandbox.SANDBOX_HOME, sandbox.SANDBOX_CONFIG_DIR
        else:
            command = [c.replace(sandbox.SANDBOX_HOME, str(home)) for c in command]
            home_inside, config_inside = str(home), str(config_dir)
        if isolation.prlimit:
            command = [
                isolation.prlimit,
                *(machine.limits or sandbox.Limits()).prlimit_args(),
                "--",
                *command,
            ]
        # The IDE runs student code: it gets none of the tool's environment, only this.
        env = {
            "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": home_inside,
            "USER": account.name if account else "student",
            "LANG": "C.UTF-8",
            "SHELL": "/bin/bash",
            "JUPYTER_TOKEN": token,  # the environment, not argv: argv is visible to `ps`
            "JUPYTER_CONFIG_DIR": config_inside,
            "JUPYTER_RUNTIME_DIR": "/tmp/jupyter-runtime"
            if isolation.sandbox
            else str(machine_dir / "runtime"),
            "PYTHONUSERBASE": f"{home_inside}/.local",
            # What JupyterLab writes goes to the home (the config folder is read-only).
            "JUPYTERLAB_SETTINGS_DIR": f"{home_inside}/.jupyter/lab/user-settings",
            "JUPYTERLAB_WORKSPACES_DIR": f"{home_inside}/.jupyter/lab/workspaces",
        }
        log_path = machine_dir / "ide.log"
        with log_path.open("ab") as log_file:
            try:
                process = subprocess.Popen(
                    command,
                    cwd=home,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    user=account.uid if account else None,
                    group=account.gid if account else None,
                    extra_groups=[] if account else None,
                    umask=0o077,
                )
            except OSError as exc:
                raise BackendUnavailable(f"cannot start the IDE: {exc}") from exc
        create_time = psutil.Process(process.pid).create_time()
        return Started(
            ref={
                "pid": process.pid,
                "create_time": create_time,
                "port": port,
                "uid": account.uid if account else None,
            },
            address=address,
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
        status, _ = ide_get(machine.address, f"{machine.base_url}api/status", machine.ide_token)
        return status == 200

    def stop(self, machine: MachineSpec) -> None:
        process = self._process(machine)
        if process is not None:
            # bubblewrap, and everything below it: the sandbox's own init and whatever the
            # student started, daemons included (they stay below the sandbox's init, and
            # the PID namespace dies with it).
            with contextlib.suppress(psutil.NoSuchProcess):
                family = [process, *process.children(recursive=True)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(family, timeout=10)
            for survivor in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    survivor.kill()
            psutil.wait_procs(alive, timeout=5)
        machine_dir = self.machine_dir(machine.id)
        shutil.rmtree(machine_dir / "runtime", ignore_errors=True)
        shutil.rmtree(machine_dir / "socket", ignore_errors=True)
