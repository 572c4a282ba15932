"""The one program the autograder runs inside its sandbox (grading.grader_sandbox): execute a
notebook and print it back. Standalone (stdlib, nbformat and nbclient only): it runs on the
IDE environment's Python, where none of Labpool is importable, passed as `python -c`.

Input on stdin (JSON): the notebook to execute (student's answers with the tests restored),
the files to place in the kernel's working folder, and the limits. The notebook is never
written to a file: it lives only in this process, which makes itself non-dumpable before
any student code runs, so the kernel (same uid) cannot read its memory or its file
descriptors through /proc, nor ptrace it. The result goes to a private duplicate of stdout;
the kernel's stdin, stdout and stderr are /dev/null.

Output: the executed notebook, every cell's outputs capped in bytes (nbgrader caps lines;
100 lines of 1 MiB would all be kept). Its author cannot trust it — student code controls the
kernel — and does not: see grading.autograde.
"""

import base64
import ctypes
import json
import os
import sys
import time

PR_SET_DUMPABLE = 4
KERNEL_NAME = "python3-grading"  # its spec is in the sandbox: no "labpool" in paths it sees
# The kernel: ipykernel_launcher's own start (the working folder out of sys.path while
# ipykernel loads), with ipykernel's debugger left off — importing debugpy costs 0.15 s of
# each kernel's start and grading never debugs; `import debugpy` still works in the kernel —
# and no IPython history database.
KERNEL_START = """
import sys
from pathlib import Path
if sys.path[0] == "" or Path(sys.path[0]) == Path.cwd():
    del sys.path[0]
sys.modules["debugpy"] = None
import ipykernel.debugger
del sys.modules["debugpy"]
from ipykernel import kernelapp
kernelapp.launch_new_instance()
"""


def kernel_spec() -> None:
    """The kernel spec above, in the sandbox's private JUPYTER_DATA_DIR (a RAM disk)."""
    folder = os.path.join(os.environ["JUPYTER_DATA_DIR"], "kernels", KERNEL_NAME)
    os.makedirs(folder, exist_ok=True)
    argv = [sys.executable, "-c", KERNEL_START, "-f", "{connection_file}"]
    argv.append("--HistoryManager.enabled=False")
    with open(os.path.join(folder, "kernel.json"), "w") as handle:
        json.dump({"argv": argv, "display_name": "Python 3", "language": "python"}, handle)


def main() -> int:
    payload = json.loads(sys.stdin.buffer.read())
    result = os.fdopen(os.dup(1), "w", encoding="utf-8")  # not inherited (O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        print("cannot make the executor non-dumpable", file=sys.stderr)
        return 3
    # stderr (kept for our own messages) is bounded by the caller; the kernel gets /dev/null.
    err = os.dup(2)
    os.dup2(devnull, 2)
    sys.stderr = os.fdopen(err, "w")

    workdir = payload["workdir"]
    for relative, content in payload["files"].items():
        target = os.path.join(workdir, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(base64.b64decode(content))

    # jsonschema (under nbformat) imports rfc3987_syntax when it is installed, which builds a
    # grammar at import: 0.7 s of every job on these hosts, for a string format (IRI) that no
    # notebook schema uses. Without it, jsonschema skips that format check.
    sys.modules.setdefault("rfc3987_syntax", None)
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    notebook = nbformat.reads(payload["notebook"], as_version=4)
    cap = int(payload["max_cell_output_bytes"])

    class BoundedClient(NotebookClient):
        """Drops a cell's outputs past its byte budget, with one note saying so."""

        spent: dict = {}

        def output(self, outs, msg, display_id, cell_index):  # type: ignore[no-untyped-def]
            size = len(json.dumps(msg.get("content", {})))
            used = self.spent.get(cell_index, 0)
            self.spent[cell_index] = used + size
            if used + size > cap:
                if used <= cap:
                    outs.append(
                        nbformat.v4.new_output(
                            "stream",
                            name="stderr",
                            text=f"[Labpool: output past {cap} bytes was dropped]\n",
                        )
                    )
                    self.spent[cell_index] = cap + 1
                return None
            return super().output(outs, msg, display_id, cell_index)

    kernel_spec()
    deadline = time.monotonic() + float(payload["timeout_s"])
    client = BoundedClient(
        notebook,
        timeout=int(payload["timeout_s"]),
        startup_timeout=int(payload["timeout_s"]),
        kernel_name=KERNEL_NAME,
        allow_errors=True,
        record_timing=False,
        resources={"metadata": {"path": workdir}},
    )
    stopped = ""
    with client.setup_kernel(cwd=workdir):
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            client.timeout = max(1, int(deadline - time.monotonic()))
            try:
                client.execute_cell(cell, index)
            except CellTimeoutError:
                stopped = f"the time limit ({payload['timeout_s']} s) ran out in this cell"
            except DeadKernelError:
                stopped = "the kernel died in this cell (a limit was hit, or it was killed)"
            except Exception as exc:  # noqa: BLE001 - any failure stops the run, reported
                stopped = f"execution stopped: {exc.__class__.__name__}"
            if stopped:
                cell.outputs.append(
                    nbformat.v4.new_output(
                        "error", ename="LabpoolStopped", evalue=stopped, traceback=[stopped]
                    )
                )
                break
        # Sent before the kernel is stopped: the sandbox is discarded, kernel and all, once
        # this process ends (its PID namespace goes with it), so no graceful shutdown.
        result.write(nbformat.writes(notebook))
        result.close()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
