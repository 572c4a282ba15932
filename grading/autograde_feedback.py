"""The feedback page of an autograded submission, made by the tool from the scores and the
executed notebook: every piece of it is escaped text (no HTML, script or SVG of the
student's is ever rendered), and the web edge serves it with a CSP that allows no script at
all and `sandbox` (grading routes). Hidden tests are never shown: a test cell appears as its
grade id, its points and the error it raised.
"""

from __future__ import annotations

import html
import re

from grading.autograde_notebook import CellScore, Prepared

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_SHOWN = 4000  # characters of a cell's own output shown
STYLE = (
    "body{font-family:sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem}"
    "pre{background:#f6f6f6;padding:.5rem;white-space:pre-wrap;overflow-wrap:anywhere}"
    ".pass{color:#0a6b1f}.fail{color:#a01010}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.2rem .5rem}"
)


def summary(scores: list[CellScore], total: float, maximum: float, notes: list[str]) -> str:
    """One paragraph for the AGS comment: the total and each test."""
    parts = [f"Autograded: {total:g}/{maximum:g}."]
    for cell in scores:
        line = f"{cell.grade_id}: {cell.score:g}/{cell.max_score:g}"
        if not cell.passed and cell.message:
            line += f" ({cell.message[:120]})"
        parts.append(line + ".")
    parts += notes
    return " ".join(parts)[:3900]


def _text(value: object) -> str:
    if isinstance(value, list):
        value = "".join(str(v) for v in value)
    return html.escape(ANSI.sub("", str(value))[:MAX_SHOWN])


def _outputs(cell: dict) -> str:
    shown = []
    for output in cell.get("outputs", []) if isinstance(cell, dict) else []:
        if not isinstance(output, dict):
            continue
        kind = output.get("output_type")
        if kind == "stream":
            shown.append(_text(output.get("text", "")))
        elif kind in ("execute_result", "display_data"):
            data = output.get("data") if isinstance(output.get("data"), dict) else {}
            shown.append(_text(data.get("text/plain", "[output not shown]")))
        elif kind == "error":
            shown.append(_text(f"{output.get('ename', '')}: {output.get('evalue', '')}"))
    return "".join(f"<pre>{s}</pre>" for s in shown if s)


def page(
    title: str,
    prepared: Prepared | None,
    executed_cells: list | None,
    scores: list[CellScore],
    total: float,
    maximum: float,
    notes: list[str],
) -> str:
    """The whole page (a standalone document)."""
    rows = "".join(
        f"<tr><td>{html.escape(c.grade_id)}</td><td>{c.score:g} / {c.max_score:g}</td>"
        f"<td class={'pass' if c.passed else 'fail'}>{'passed' if c.passed else 'failed'}</td>"
        f"<td>{_text(c.message)}</td></tr>"
        for c in scores
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p><strong>Autograded score: {total:g} / {maximum:g}</strong></p>",
        "<table><tr><th>test</th><th>points</th><th></th><th>message</th></tr>" + rows + "</table>",
    ]
    body += [f"<p>{html.escape(n)}</p>" for n in notes]
    if prepared is not None:
        body.append("<h2>Your notebook as it ran</h2>")
        for index, cell in enumerate(prepared.notebook.cells):
            if index in prepared.test_cells:
                grade_id = prepared.test_cells[index].metadata.nbgrader.get("grade_id", "")
                body.append(f"<p><em>[test {html.escape(str(grade_id))}]</em></p>")
                continue
            if cell.cell_type == "markdown":
                body.append(f"<pre>{_text(cell.source)}</pre>")
                continue
            if cell.cell_type != "code":
                continue
            ran = (
                executed_cells[index]
                if executed_cells is not None and index < len(executed_cells)
                else {}
            )
            body.append(f"<pre>In: {_text(cell.source)}</pre>{_outputs(ran)}")
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>Feedback</title>"
        f"<style>{STYLE}</style></head><body>" + "".join(body) + "</body></html>"
    )
