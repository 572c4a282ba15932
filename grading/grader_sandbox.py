"""The autograder's sandbox: execute one submission's notebook, with the hidden tests restored,
where student code can reach nothing it should not.

It reuses the IDE sandbox's view of the system (provisioning.sandbox.system_view_args: every
namespace unshared — own PID namespace, no network but its own loopback —, the system
read-only, Labpool's settings hidden) and adds:

- **its own unprivileged uid**, `lp-grader` (a system user created on first need; never root,
  since `RLIMIT_NPROC` does not bind root, docs/isolation.md), which owns nothing on the host:
  the sandbox has no host folder bound writable at all. Each grading process of the host has
  its own (`lp-grader`, `lp-grader-1`, …: `grading_slot`), so parallel grading workers do not
  share a task limit;
- **writable places that are sized RAM disks only**: the kernel's working folder
  (`/home/student`), `/tmp` and `/dev/shm` are `--size`d tmpfs, so the disk the whole sandbox
  can fill is bounded (an unsized `--tmpfs` is a RAM disk without bound);
- **the notebook with hidden tests never as a file**: the trusted side (grading.autograde)
  sends it on stdin to the executor (grading.autograde_executor), which keeps it in memory
  and makes itself non-dumpable before any student code runs; the working folder holds only
  the student's files and the assignment's released data files;
- **limits**: per process through `prlimit` (address space, CPU seconds, file size, open
  files, and the uid's tasks — a whole-sandbox total, since the uid is the sandbox's own);
  the memory of all its processes together is watched by this process and the sandbox is
  killed past `memory_total_mb` (no cgroups on these hosts); a wall-clock timeout; the
  executed notebook read back with a byte bound (and each cell's outputs bounded in bytes by
  the executor).

Only the executed notebook comes back. Nothing the sandbox writes survives it: its RAM disks
go with its mount namespace, and its processes with its PID namespace (`--die-with-parent`,
then the kernel kills every process of the namespace when its first one ends).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from provisioning import sandbox

GRADER_ACCOUNT = "lp-grader"
SLOT_DIR = "/run/labpool-grading"  # one lock per grading process: its own uid (grading_slot)
MAX_SLOTS = 64
WORKDIR = sandbox.SANDBOX_HOME
EXECUTOR = Path(__file__).with_name("autograde_executor.py")
WATCH_INTERVAL_S = 0.05


@dataclass(frozen=True)
class GradingLimits:
    timeout_s: int = 60  # wall clock, the whole run (kernel start included)
    cpu_seconds: int = 60  # per process
    memory_mb: int = 1024  # address space of each process
    memory_total_mb: int = 1536  # resident memory of all the sandbox's processes together
    processes: int = 64  # tasks (processes and threads) of the grader's uid
    file_size_mb: int = 32  # the largest file
    disk_mb: int = 64  # each of the working folder, /tmp, /dev/shm (sized RAM disks)
    open_files: int = 256
    cell_output_bytes: int = 256 * 1024  # outputs kept per cell
    notebook_bytes: int = 16 * 1024 * 1024  # the executed notebook read back

    def prlimit(self) -> sandbox.Limits:
        return sandbox.Limits(
            memory_mb=self.memory_mb,
            processes=self.processes,
            open_files=self.open_files,
            file_size_mb=self.file_size_mb,
            cpu_seconds=self.cpu_seconds,
        )


@dataclass
class Execution:
    """What came back. `notebook` is the executed notebook's text (untrusted: parse it with a
    bound) or None; `problem` says why there is none, for the feedback."""

    notebook: str | None
    problem: str = ""
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    log: str = field(default="", repr=False)


class SandboxUnavailable(RuntimeError):
    """This host cannot run the autograder's sandbox (no root, no bwrap, no prlimit)."""


def grader_account() -> sandbox.Account:
    """This process's grader uid: `lp-grader` for the first grading process of the host,
    `lp-grader-<n>` for the n-th one running beside it (its slot, see `grading_slot`)."""
    slot = grading_slot()
    name = GRADER_ACCOUNT if slot == 0 else f"{GRADER_ACCOUNT}-{slot}"
    return sandbox.system_account(name, "Labpool autograder")


_slot: tuple[int, int] | None = None  # (slot, the locked file's descriptor), for the process


def grading_slot() -> int:
    """The lowest slot no other process of this host holds, locked (flock) for the life of
    this process. Each grading worker grades one submission at a time, so one slot = one
    sandbox at a time = one uid: the uid's task limit (RLIMIT_NPROC counts every process of
    the uid, host-wide) is the sandbox's own, and a fork bomb in one worker's sandbox cannot
    starve another worker's. The locks live in /run (root's), and go with the process."""
    global _slot
    if _slot is not None:
        return _slot[0]
    import fcntl

    folder = Path(SLOT_DIR)
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SandboxUnavailable(f"the autograder needs root: {folder}: {exc}") from None
    for slot in range(MAX_SLOTS):
        fd = os.open(folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _slot = (slot, fd)
        return slot
    raise SandboxUnavailable(f"more than {MAX_SLOTS} grading processes on this host")


def command(ide_python: Path, limits: GradingLimits) -> list[str]:
    """prlimit, bwrap and the executor's interpreter, as run by the grader's user."""
    isolation = sandbox.host_isolation()
    if not isolation.complete or isolation.bwrap is None or isolation.prlimit is None:
        raise SandboxUnavailable(
            "the autograder needs root, a working bubblewrap and prlimit: "
            + " ".join(isolation.problems)
        )
    size = str(limits.disk_mb * 1024 * 1024)
    args = [isolation.prlimit, *limits.prlimit().prlimit_args(), "--", isolation.bwrap]
    args += sandbox.system_view_args()
    args += ["--size", size, "--tmpfs", "/dev/shm"]
    args += ["--size", size, "--tmpfs", "/tmp"]
    args += ["--size", size, "--perms", "0700", "--tmpfs", WORKDIR]
    args += ["--remount-ro", "/dev"]
    for prefix in sandbox.python_prefixes(ide_python):
        args += ["--ro-bind", str(prefix), str(prefix)]
    args += ["--chdir", WORKDIR, "--", str(ide_python), "-I", "-c", EXECUTOR.read_text()]
    return args


def sandbox_env(ide_python: Path) -> dict[str, str]:
    """A fresh environment: nothing of the tool's (no LABPOOL_*, no secrets) reaches it."""
    return {
        "PATH": f"{ide_python.parent}:/usr/bin:/bin",
        "HOME": WORKDIR,
        "LANG": "C.UTF-8",
        "JUPYTER_RUNTIME_DIR": "/tmp/jupyter-runtime",
        "JUPYTER_CONFIG_DIR": "/tmp/jupyter-config",
        "JUPYTER_DATA_DIR": "/tmp/jupyter-data",
        "IPYTHONDIR": "/tmp/ipython",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def execute(
    notebook: str, files: dict[str, bytes], ide_python: Path, limits: GradingLimits
) -> Execution:
    """Run the notebook in a fresh sandbox; return the executed notebook (or why not)."""
    account = grader_account()
    payload = json.dumps(
        {
            "notebook": notebook,
            "files": {p: base64.b64encode(c).decode() for p, c in files.items()},
            "workdir": WORKDIR,
            "timeout_s": limits.timeout_s,
            "max_cell_output_bytes": limits.cell_output_bytes,
        }
    ).encode()
    started = time.monotonic()
    process = subprocess.Popen(
        command(ide_python, limits),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=sandbox_env(ide_python),
        user=account.uid,
        group=account.gid,
        extra_groups=[],
        start_new_session=True,  # its own process group: it cannot signal ours
        cwd="/",
    )
    out = bytearray()
    err = bytearray()
    state = {"problem": "", "peak": 0.0}

    def kill(problem: str) -> None:
        if not state["problem"]:
            state["problem"] = problem
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def feed() -> None:
        try:
            assert process.stdin is not None
            process.stdin.write(payload)
            process.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def read(stream, into: bytearray, bound: int, what: str) -> None:  # type: ignore[no-untyped-def]
        while chunk := stream.read(65536):
            if len(into) + len(chunk) > bound:
                into += chunk[: bound - len(into)]
                kill(what)
                break
            into += chunk

    threads = [
        threading.Thread(target=feed, daemon=True),
        threading.Thread(
            target=read,
            args=(
                process.stdout,
                out,
                limits.notebook_bytes,
                f"the executed notebook is larger than {limits.notebook_bytes} bytes",
            ),
            daemon=True,
        ),
        threading.Thread(target=read, args=(process.stderr, err, 65536, ""), daemon=True),
    ]
    for thread in threads:
        thread.start()
    deadline = started + limits.timeout_s + 15  # the executor stops itself first, normally
    try:
        root = psutil.Process(process.pid)
    except psutil.NoSuchProcess:
        root = None
    while process.poll() is None:
        if time.monotonic() > deadline:
            kill(f"the time limit ({limits.timeout_s} s) ran out")
            break
        if root is not None:
            used = _resident_mb(root)
            state["peak"] = max(state["peak"], used)
            if used > limits.memory_total_mb:
                kill(f"the memory limit ({limits.memory_total_mb} MB in all) was reached")
                break
        time.sleep(WATCH_INTERVAL_S)
    process.wait()
    for thread in threads:
        thread.join(timeout=5)
    seconds = time.monotonic() - started
    log = err.decode(errors="replace")
    if state["problem"]:
        return Execution(None, state["problem"], seconds, state["peak"], log)
    if process.returncode != 0 or not out:
        why = "the grader's kernel was stopped before it finished"
        if process.returncode and process.returncode < 0:
            why += f" (signal {-process.returncode})"
        return Execution(None, why, seconds, state["peak"], log)
    return Execution(out.decode("utf-8", errors="replace"), "", seconds, state["peak"], log)


def _resident_mb(root: psutil.Process) -> float:
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20
