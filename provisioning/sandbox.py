"""The sandbox a student's IDE runs in on the tool's own host (the `local` backend).

Student code is hostile. Each machine's IDE runs
- as the student's own unprivileged OS user (`lp-<user id>`, created on first need; never
  root), so the kernel's file permissions and `RLIMIT_NPROC` apply to it;
- inside bubblewrap with every namespace unshared: it sees the system (`/usr`, `/etc`)
  read-only, its own home read-write, a private `/tmp`, its own PID namespace (no other
  process on the host is visible or signallable), no network but its own loopback (it cannot
  reach PostgreSQL or Redis on the host's loopback), and of the tool nothing: not the data
  folder, the database, the keys, the Redis socket, other homes or the tool's virtualenv.
  The IDE itself runs on its own Python environment (`provisioning/ide_env.py`), read-only;
- with per-process limits (`prlimit`): address space, processes, open files, file size and,
  if asked, CPU seconds. These machines have no cgroup v2 controllers (docs/isolation.md),
  so limits are rlimits; a whole-sandbox memory total would need cgroups.

The IDE listens on a unix socket in a folder bound into the sandbox; nginx (whose workers
are in the socket's group) is the only thing that connects to it. Facts this relies on were
checked on these machines: see docs/isolation.md.

The order matters: the worker (root) makes the account and the folders, then starts
`prlimit` *as the student* (Popen's user/group, no preexec hooks), which starts `bwrap`, which
starts JupyterLab. Unprivileged user namespaces let the student's own user build the sandbox,
so files it writes belong to that user on the host.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from provisioning.errors import BackendUnavailable

log = logging.getLogger(__name__)

SANDBOX_HOME = "/home/student"
SANDBOX_SOCKET_DIR = "/run/labpool"
SANDBOX_CONFIG_DIR = "/run/labpool-config"
ACCOUNT_PREFIX = "lp-"
# Hidden even though /etc is shown: where an admin keeps Labpool's and the cloud's settings.
HIDDEN_ETC = ("/etc/labpool", "/etc/openstack")


@dataclass(frozen=True)
class Limits:
    """Per-machine limits, from the machine's environment. 0 means "no limit"."""

    memory_mb: int = 2048  # address space of each process
    processes: int = 256  # tasks (processes and threads) of the student's user
    open_files: int = 1024
    file_size_mb: int = 1024  # the largest file a process may write
    cpu_seconds: int = 0  # CPU time of each process (0: none; a kernel may compute long)

    def prlimit_args(self) -> list[str]:
        # Plain byte counts: prlimit's size suffixes are not what they look like
        # (docs/isolation.md: `--as=2G` set a 2-byte limit).
        args = []
        if self.memory_mb:
            args.append(f"--as={self.memory_mb * 1024 * 1024}")
        if self.processes:
            args.append(f"--nproc={self.processes}")
        if self.open_files:
            args.append(f"--nofile={self.open_files}")
        if self.file_size_mb:
            args.append(f"--fsize={self.file_size_mb * 1024 * 1024}")
        if self.cpu_seconds:
            args.append(f"--cpu={self.cpu_seconds}")
        args.append("--core=0")
        return args


@dataclass(frozen=True)
class Isolation:
    """What this host lets the local backend do; `problems` say what is missing and why it
    matters, for the console and the teacher's page."""

    own_users: bool  # we are root: each student gets their own OS user
    sandbox: bool  # bubblewrap works here
    bwrap: str | None
    prlimit: str | None

    @property
    def complete(self) -> bool:
        return self.own_users and self.sandbox and self.prlimit is not None

    @property
    def problems(self) -> list[str]:
        found = []
        if not self.own_users:
            found.append(
                "Labpool is not running as root, so every student's IDE runs as "
                "Labpool's own OS user: students can read each other's files and "
                "signal the tool's processes."
            )
        if not self.sandbox:
            found.append(
                "bubblewrap is missing or cannot create namespaces here "
                "(apt-get install bubblewrap): students' code sees the whole host, "
                "its network (PostgreSQL, Redis) and the tool's files."
            )
        if self.prlimit is None:
            found.append("prlimit (util-linux) is missing: no memory or process limits.")
        return found


@functools.lru_cache(maxsize=1)
def host_isolation() -> Isolation:
    """Probe once per process what isolation this host supports."""
    bwrap = shutil.which("bwrap")
    works = False
    if bwrap:
        probe = subprocess.run(
            [bwrap, "--ro-bind", "/", "/", "--unshare-all", "--new-session", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        works = probe.returncode == 0
        if not works:
            log.warning(
                "bubblewrap cannot create a sandbox here: %s",
                probe.stderr.decode(errors="replace").strip(),
            )
    return Isolation(
        own_users=os.geteuid() == 0, sandbox=works, bwrap=bwrap, prlimit=shutil.which("prlimit")
    )


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def student_account(key: str) -> Account:
    """The OS user a student's IDE runs as (`lp-<user id>`), created on first need (root
    only). System users with no login shell and no password: nobody logs in as them."""
    return system_account(f"{ACCOUNT_PREFIX}{key}", "Labpool student")


def system_account(name: str, comment: str) -> Account:
    """An unprivileged system user (no shell, no password, no home), created on first need
    (root only): what sandboxed code runs as (`RLIMIT_NPROC` does not bind root)."""
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(name)
        return Account(name, entry.pw_uid, entry.pw_gid)
    done = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            comment,
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # another worker may have created it a moment ago: that is fine
        entry = pwd.getpwnam(name)
    except KeyError:
        raise BackendUnavailable(
            f"cannot create the OS user {name} ({done.stderr.strip()})"
        ) from None
    return Account(name, entry.pw_uid, entry.pw_gid)


def proxy_gid(group: str) -> int | None:
    """The group nginx's workers run in (they connect to the IDEs' sockets)."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def python_prefixes(python: Path) -> list[Path]:
    """Folders the IDE's interpreter needs that /usr does not cover: its environment and,
    for a virtualenv, the base installation it was made from (pyenv keeps it elsewhere)."""
    env = python.parent.parent
    found = [env]
    cfg = env / "pyvenv.cfg"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                base = Path(value.strip()).parent
                if not base.is_relative_to("/usr"):
                    found.append(base)
    return found


def system_view_args() -> list[str]:
    """bubblewrap's arguments shared by every sandbox (the IDE's and the autograder's): every
    namespace unshared (own PID namespace, no network but its own loopback), dies with its
    parent, a new session (no TIOCSTI into the caller's terminal), the system (`/usr`, `/etc`
    but Labpool's and the cloud's settings) read-only, a fresh `/dev` and `/proc`. Writable
    folders are the caller's to add."""
    args = [
        "--die-with-parent",
        "--unshare-all",
        "--new-session",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: keep the symlink
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind", "/etc", "/etc"]
    for hidden in HIDDEN_ETC:
        if os.path.isdir(hidden):
            args += ["--tmpfs", hidden]
    args += ["--dev", "/dev", "--proc", "/proc"]
    return args


def bwrap_command(
    bwrap: str,
    *,
    home: Path,
    socket_dir: Path,
    config_dir: Path,
    python: Path,
    share_network: bool,
) -> list[str]:
    """bubblewrap's arguments for one IDE (the command to run inside follows them).

    bwrap runs under `setsid --fork --wait`, with `--die-with-parent`: the sandbox then lives
    exactly as long as that one waiting process (the machine's recorded pid). Killing it, or
    it dying for any reason, takes bwrap and everything in the sandbox with it, and the RQ
    worker that started it may come and go (bwrap's parent is not the worker)."""
    args = [bwrap, *system_view_args()]
    setsid = shutil.which("setsid")
    if setsid:
        args = [setsid, "--fork", "--wait", *args]
    args += [
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/var",
        "--dir",
        "/var/tmp",
        "--bind",
        str(home),
        SANDBOX_HOME,
        "--bind",
        str(socket_dir),
        SANDBOX_SOCKET_DIR,
        "--ro-bind",
        str(config_dir),
        SANDBOX_CONFIG_DIR,
    ]
    for prefix in python_prefixes(python):
        args += ["--ro-bind", str(prefix), str(prefix)]
    if share_network:
        # Direct mode (no nginx): the browser must reach a TCP port on the host's loopback,
        # so the sandbox keeps the host's network. Loopback trials only (the runner says so).
        args.append("--share-net")
    args += ["--chdir", SANDBOX_HOME, "--"]
    return args


def prepare_home(home: Path, account: Account | None) -> None:
    """The student's home: theirs, mode 0700. A home made by an older Labpool (owned by
    the tool) is handed over once."""
    home.mkdir(parents=True, exist_ok=True)
    for parent in home.parents:  # the folders above it: passable, not listable
        if parent == home.parents[2]:
            break
        parent.chmod(0o711)
    if account is not None and home.stat().st_uid != account.uid:
        for root, dirs, files in os.walk(home):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), account.uid, account.gid)
        os.chown(home, account.uid, account.gid)
    home.chmod(0o700)


def prepare_socket_dir(path: Path, account: Account | None, group_id: int | None) -> None:
    """A folder only the student (who creates the socket) and nginx's group can enter;
    setgid, so the socket inherits the group."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.iterdir():
        stale.unlink(missing_ok=True)
    if account is not None:
        os.chown(path, account.uid, group_id if group_id is not None else account.gid)
        path.chmod(0o2750 if group_id is not None else 0o700)
    else:
        path.chmod(0o700 if group_id is None else 0o2750)
        if group_id is not None:
            with contextlib.suppress(PermissionError):
                os.chown(path, -1, group_id)


def python_for_ide(ide_env: Path) -> Path:
    python = ide_env / "bin" / "python"
    if not python.exists():
        raise BackendUnavailable(
            f"the IDE environment {ide_env} is missing: run `labpool ide-env` (it installs "
            "JupyterLab there, apart from the tool's own packages)"
        )
    return python
