"""Publishing an assignment: its student version, made once from the teacher's files and kept
apart from them (both on the tool's side, under `DATA_DIR/assignments/<id>/`).

A notebook in nbgrader's source format (a cell with `nbgrader` metadata) goes through
nbgrader's `generate_assignment` (nbgrader docs, "Creating and grading assignments": solution
regions between `### BEGIN SOLUTION` / `### END SOLUTION` replaced, hidden tests between
`### BEGIN HIDDEN TESTS` / `### END HIDDEN TESTS` removed, outputs cleared, cells locked). It
runs as a subprocess (a bounded time, a crash cannot take the web worker with it) in a
temporary nbgrader course folder; it never executes the notebook. Any other file is released
as it is. The source (with solutions, for the autograder) stays in `source-…`; students only
ever get files from `release-of-source-…`, which is checked for solution and hidden-test
markers before it is kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from grading.assignment_files import UploadRejected, read_folder, write_folder

GENERATE_TIMEOUT_S = 120
NBGRADER_ASSIGNMENT = "assignment"  # the temporary course's only assignment
# Text that must never reach a student (nbgrader's own delimiters).
SECRET_MARKERS = (
    "BEGIN SOLUTION",
    "END SOLUTION",
    "BEGIN HIDDEN TESTS",
    "END HIDDEN TESTS",
    "BEGIN MARK SCHEME",
    "END MARK SCHEME",
)


class PublishFailed(Exception):
    """The student version could not be made; the message says why (nothing was changed)."""


def is_nbgrader_source(content: bytes) -> bool:
    """A notebook with at least one cell carrying nbgrader's metadata."""
    try:
        notebook = json.loads(content)
    except ValueError:
        return False
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    return isinstance(cells, list) and any(
        isinstance(c, dict) and isinstance(c.get("metadata"), dict) and "nbgrader" in c["metadata"]
        for c in cells
    )


def nbgrader_notebooks(files: Mapping[str, bytes]) -> list[str]:
    return sorted(
        p for p, c in files.items() if p.lower().endswith(".ipynb") and is_nbgrader_source(c)
    )


def check_uploadable(files: Mapping[str, bytes]) -> None:
    """Upload-time rules of publishing: nbgrader notebooks sit at the top of the assignment
    (nbgrader's course layout has no subfolders of notebooks)."""
    for path in nbgrader_notebooks(files):
        if len(PurePosixPath(path).parts) > 1:
            raise UploadRejected(
                f"{path!r}: nbgrader source notebooks must be at the top of the zip, not in a folder."
            )


def student_version(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The files students get: nbgrader notebooks generated, everything else as it is."""
    generated = set(nbgrader_notebooks(files))
    released = {p: c for p, c in files.items() if p not in generated}
    if generated:
        released.update(_generate({p: files[p] for p in generated}))
    for path in generated:
        text = released[path].decode("utf-8", errors="replace")
        leaked = [m for m in SECRET_MARKERS if m in text]
        if leaked:  # never expected from nbgrader; never released either
            raise PublishFailed(f"{path}: the student version still holds {leaked[0]!r}.")
    return released


def _generate(notebooks: Mapping[str, bytes]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="labpool-nbgrader-") as tmp:
        course = Path(tmp) / "course"
        source = course / "source" / NBGRADER_ASSIGNMENT
        source.mkdir(parents=True)
        for path, content in notebooks.items():
            (source / path).write_bytes(content)
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
        # Only this course's configuration: none of the host's ~/.jupyter or a stray
        # nbgrader_config.py in the working folder.
        env.update(
            HOME=tmp,
            JUPYTER_CONFIG_DIR=str(Path(tmp) / "config"),
            JUPYTER_DATA_DIR=str(Path(tmp) / "data"),
        )
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "nbgrader",
                    "generate_assignment",
                    NBGRADER_ASSIGNMENT,
                    "--no-db",
                    "--force",
                    f"--CourseDirectory.root={course}",
                    "--log-level=ERROR",
                ],
                cwd=course,
                env=env,
                capture_output=True,
                text=True,
                timeout=GENERATE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PublishFailed(
                f"nbgrader's generate_assignment took longer than {GENERATE_TIMEOUT_S} s."
            ) from None
        release = course / "release" / NBGRADER_ASSIGNMENT
        generated = {p: (release / p).read_bytes() for p in notebooks if (release / p).is_file()}
        if done.returncode != 0 or len(generated) != len(notebooks):
            raise PublishFailed(
                "nbgrader could not make the student version: "
                + _nbgrader_reason(done.stdout + done.stderr)
            )
        return generated


def _nbgrader_reason(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return (errors or lines or ["no output"])[-1][:500]


def publish(folder: Path, source_path: Path) -> Path:
    """Make the student version of the source folder `source_path` and keep it in a new
    folder beside it (named after the source it came from); returns that folder."""
    released = student_version(read_folder(source_path))
    return write_folder(folder, f"release-of-{source_path.name}", released)


def is_current(source_path: str | None, release_path: str | None) -> bool:
    """Whether the published student version is made from the current upload."""
    return bool(
        source_path
        and release_path
        and Path(release_path).name.startswith(f"release-of-{Path(source_path).name}-")
    )
