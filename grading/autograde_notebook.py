"""The trusted half of autograding a notebook: what is sent into the sandbox, and how the
notebook that comes back is scored (nbgrader's rules, nbgrader's own code).

**What is executed.** The skeleton is the *student version* (the release, made at publish),
never the source: solutions never enter the sandbox. Into it go
- for each answer cell (nbgrader `solution`), the student's source for the same `grade_id`
  and cell type (their metadata is ignored; a missing answer keeps the release's stub);
- for each test cell (`grade` and not `solution`), the source version's cell, hidden tests
  restored — whatever the student's copy of it says: an edited test cell, or edited
  metadata (points, grade id, "locked"), changes nothing, and the feedback says it was
  ignored;
- the student's own extra cells (no nbgrader metadata), after the graded cell they followed.
  A student cell that carries nbgrader metadata the release does not have is dropped.

**How it is scored.** The executed notebook is untrusted (student code controls the kernel):
it is read with a byte bound, must have exactly the cells that were sent, each test cell with
the source that was sent; the metadata used for scoring is ours, only outputs and the
execution count are taken from it. A test cell that did not run scores 0; one that ran scores
with `nbgrader.utils.determine_grade` (full points unless an error or stderr output; a
number as its result gives partial credit). Answer cells that need a person to grade
(`solution` and `grade`) are listed as such and are not in the autograded total.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field

import nbformat
from nbformat import NotebookNode
from nbgrader.utils import compute_checksum, determine_grade, is_grade, is_solution

log = logging.getLogger(__name__)

MAX_NOTEBOOK_BYTES = 16 * 1024 * 1024
MAX_MESSAGE = 300
# Code that can rewrite or hide what the tests see (nbgrader's own known limit): the teacher
# is told to look at such a submission by hand.
TAMPERING = re.compile(
    r"input_transformers|ast_transformers|showtraceback|set_custom_exc|sys\.excepthook|"
    r"events\.register|__builtins__|import\s+builtins|from\s+builtins|settrace|setprofile|"
    r"AssertionError\s*=|\bassert\w*\s*=|_ih\b|In\s*\[|inspect\.stack"
)


class NotGradable(Exception):
    """The assignment cannot be autograded (no tests, unreadable source): the teacher's to fix."""


@dataclass
class Prepared:
    """The notebook to execute and what the scorer needs to know about it."""

    notebook: NotebookNode
    test_cells: dict[int, NotebookNode]  # index in `notebook` → our copy of the test cell
    manual_cells: list[tuple[str, float]]  # answer cells a person grades: (grade_id, points)
    notes: list[str] = field(default_factory=list)  # what the student should know
    tampering: list[str] = field(default_factory=list)


@dataclass
class CellScore:
    grade_id: str
    score: float
    max_score: float
    passed: bool
    message: str

    def as_dict(self) -> dict:
        return {
            "grade_id": self.grade_id,
            "score": self.score,
            "max_score": self.max_score,
            "passed": self.passed,
            "message": self.message,
        }


def _read(text: str | bytes, what: str) -> NotebookNode:
    if len(text) > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"{what} is larger than {MAX_NOTEBOOK_BYTES} bytes")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    notebook = nbformat.reads(text, as_version=4)
    if not isinstance(notebook.get("cells"), list):
        raise ValueError(f"{what} has no cells")
    return notebook


def _nbgrader(cell: dict) -> dict:
    meta = cell.get("metadata") if isinstance(cell, dict) else None
    found = meta.get("nbgrader") if isinstance(meta, dict) else None
    return found if isinstance(found, dict) else {}


def _is_test(cell: NotebookNode) -> bool:
    data = _nbgrader(cell)
    return bool(data.get("grade")) and not data.get("solution") and cell.cell_type == "code"


def prepare(source: bytes, release: bytes, student: bytes | None) -> Prepared:
    """The notebook to execute for one student's copy (None: they did not hand it in)."""
    try:
        source_nb = _read(source, "the source notebook")
        release_nb = _read(release, "the student version")
    except ValueError as exc:
        raise NotGradable(str(exc)) from None
    tests = {_nbgrader(c).get("grade_id"): c for c in source_nb.cells if _is_test(c)}
    if not tests:
        raise NotGradable("the notebook has no autograded test cells")
    notes: list[str] = []
    answers: dict[str, str] = {}
    extras: dict[str | None, list[NotebookNode]] = {}
    student_tests: dict[str, NotebookNode] = {}
    release_ids = {_nbgrader(c).get("grade_id"): c for c in release_nb.cells if _nbgrader(c)}
    if student is None:
        notes.append("This notebook was not in the submission: nothing of yours ran.")
    else:
        try:
            student_nb = _read(student, "your notebook")
        except (ValueError, UnicodeDecodeError) as exc:
            notes.append(f"Your notebook could not be read ({exc}): nothing of yours ran.")
            student_nb = None
        anchor: str | None = None
        for cell in student_nb.cells if student_nb else []:
            if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown"):
                continue
            data = _nbgrader(cell)
            grade_id = data.get("grade_id") if isinstance(data.get("grade_id"), str) else None
            ours = release_ids.get(grade_id)
            if not data:
                if cell.cell_type == "code":
                    extras.setdefault(anchor, []).append(
                        nbformat.v4.new_code_cell(str(cell.get("source", "")))
                    )
                continue
            if ours is None:
                notes.append(
                    f"A cell claiming to be {grade_id!r} is not in the assignment: ignored."
                )
                continue
            anchor = grade_id
            if _nbgrader(ours).get("solution") and cell.cell_type == ours.cell_type:
                answers[grade_id] = str(cell.get("source", ""))
            elif grade_id in tests:
                student_tests[grade_id] = cell
    notebook = copy.deepcopy(release_nb)
    cells: list[NotebookNode] = list(extras.get(None, []))
    test_cells: dict[int, NotebookNode] = {}
    manual: list[tuple[str, float]] = []
    for cell in release_nb.cells:
        data = _nbgrader(cell)
        grade_id = data.get("grade_id")
        cell = copy.deepcopy(cell)
        if grade_id in tests:
            cell = copy.deepcopy(tests[grade_id])
            cell.outputs, cell.execution_count = [], None
            mine = student_tests.get(grade_id)
            if mine is not None and _changed(mine, release_ids[grade_id]):
                notes.append(f"You changed the test cell {grade_id!r}; the original was run.")
            test_cells[len(cells)] = cell
        elif data.get("solution") and grade_id in answers:
            cell.source = answers[grade_id]
        if data.get("solution") and data.get("grade"):
            manual.append((grade_id, float(data.get("points", 0))))
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
        cells.extend(extras.get(grade_id, []) if grade_id else [])
    notebook.cells = cells
    found = sorted({m.group(0) for m in TAMPERING.finditer("\n".join(answers.values()))})
    for extra in extras.values():
        found += [m.group(0) for c in extra for m in TAMPERING.finditer(c.source)]
    return Prepared(notebook, test_cells, manual, notes, sorted(set(found)))


def _changed(student_cell: dict, release_cell: NotebookNode) -> bool:
    try:
        mine = nbformat.from_dict(copy.deepcopy(student_cell))
        return compute_checksum(mine) != compute_checksum(release_cell) or str(
            student_cell.get("source", "")
        ) != str(release_cell.source)
    except Exception:  # noqa: BLE001 - metadata too broken to checksum: it was changed
        return True


def score(prepared: Prepared, executed_text: str | None, problem: str) -> list[CellScore]:
    """Each test cell's score from the executed notebook (zero where nothing ran)."""
    executed = None
    why = problem
    if executed_text is not None:
        try:
            executed = _read(executed_text, "the executed notebook")
            if len(executed.cells) != len(prepared.notebook.cells):
                raise ValueError("the executed notebook does not have the cells that were sent")
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            executed, why = None, f"the executed notebook was unusable ({exc})"
    scores = []
    for index, ours in prepared.test_cells.items():
        data = _nbgrader(ours)
        grade_id, points = str(data.get("grade_id")), float(data.get("points", 0))
        ran = executed.cells[index] if executed is not None else None
        if ran is None:
            scores.append(CellScore(grade_id, 0.0, points, False, why or "not run"))
            continue
        if ran.get("source") != ours.source or not isinstance(ran.get("execution_count"), int):
            scores.append(CellScore(grade_id, 0.0, points, False, _not_run(ran)))
            continue
        judged = copy.deepcopy(ours)
        judged.outputs = [o for o in ran.get("outputs", []) if isinstance(o, dict)]
        try:
            got, _ = determine_grade(nbformat.from_dict(judged), log)
        except Exception as exc:  # noqa: BLE001 - malformed outputs: no points
            got, judged.outputs = 0.0, []
            scores.append(CellScore(grade_id, 0.0, points, False, f"unreadable ({exc})"))
            continue
        got = min(max(float(got or 0.0), 0.0), points)
        scores.append(CellScore(grade_id, got, points, got >= points, _message(judged.outputs)))
    return scores


def _not_run(cell: NotebookNode) -> str:
    for output in cell.get("outputs", []):
        if isinstance(output, dict) and output.get("ename") == "LabpoolStopped":
            return str(output.get("evalue", ""))[:MAX_MESSAGE]
    return "did not run (an earlier cell stopped the notebook)"


def _message(outputs: list) -> str:
    for output in outputs:
        if output.get("output_type") == "error":
            return f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"[:MAX_MESSAGE]
        if output.get("output_type") == "stream" and output.get("name") == "stderr":
            return "wrote to stderr: " + str(output.get("text", ""))[:MAX_MESSAGE]
    return ""


def is_answer_or_test(cell: NotebookNode) -> bool:
    return is_grade(cell) or is_solution(cell)
