"""Over the student's shoulder (issue 13, item 3): a teacher reads a student's files without
changing them, through no link the student planted, and the student is told; nobody else
gets in."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import requests
from sqlalchemy import select

from lti_tool.models import Activity, User
from provisioning.models import HomeView
from tests.test_class_aware import teacher_launch
from tests.test_launch import machine_id_of

NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "id": "answer",
            "execution_count": 1,
            "metadata": {},
            "source": "answer = 6 * 7  # the student's own line",
            "outputs": [
                {
                    "output_type": "display_data",
                    "metadata": {},
                    "data": {
                        "text/html": "<script>parent.document.title='owned'</script><b>42</b>"
                    },
                }
            ],
        }
    ],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def _setup(tool, platform, rt, browser):  # type: ignore[no-untyped-def]
    student = requests.Session()
    machine = machine_id_of(
        platform.launch(student, tool.url, platform.learner(sub="4")).launch_response
    )
    class_url = teacher_launch(platform, tool, browser)
    activity_id = int(class_url.split("/activities/")[1].split("/")[0])
    with rt.sessions() as session:
        user_id = session.scalars(select(User.id).where(User.sub == "4")).one()
        course_id = session.get_one(Activity, activity_id).course_id
    # Where the local backend keeps it (made here: no worker ran).
    home = rt.settings.data_dir / "homes" / f"course-{course_id}" / f"user-{user_id}"
    shutil.rmtree(home, ignore_errors=True)  # the data folder outlives a test's database
    (home / "lab1").mkdir(parents=True)
    (home / "lab1" / "hw.ipynb").write_text(json.dumps(NOTEBOOK))
    (home / "notes.txt").write_text("<b>my notes</b>")
    secret = rt.settings.data_dir / "decoy-secret"  # stands for the tool's secrets
    secret.write_text("TOOL-SECRET-VALUE")
    (home / "secret").symlink_to(secret)
    (home / "elsewhere").symlink_to(rt.settings.data_dir)
    os.mkfifo(home / "pipe")
    base = f"{tool.url}/activities/{activity_id}/students/{user_id}/files"
    return student, machine, base, home, user_id


def _fingerprint(home: Path) -> dict[str, str]:
    return {
        str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
        + str(p.lstat().st_mtime_ns)
        for p in sorted(home.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_teacher_reads_files_and_notebooks_without_changing_them(tool, platform, rt, browser):
    student, machine, base, home, user_id = _setup(tool, platform, rt, browser)
    before = _fingerprint(home)

    listing = browser.get(base)
    assert listing.status_code == 200
    assert "lab1/" in listing.text and "notes.txt" in listing.text
    assert "(link: not opened)" in listing.text and "(other: not opened)" in listing.text

    text = browser.get(base, params={"path": "notes.txt", "kind": "file"})
    assert "&lt;b&gt;my notes&lt;/b&gt;" in text.text  # shown as text, escaped

    page = browser.get(base, params={"path": "lab1/hw.ipynb", "kind": "file"})
    assert '<iframe id="notebook"' in page.text and "sandbox" in page.text
    rendered = browser.get(base + "/rendered", params={"path": "lab1/hw.ipynb"})
    assert rendered.status_code == 200
    assert (
        "the student&#39;s own line" in rendered.text or "the student's own line" in rendered.text
    )
    csp = rendered.headers["Content-Security-Policy"]
    assert "sandbox" in csp and "default-src 'none'" in csp and "script-src 'none'" in csp

    assert browser.post(base).status_code == 405  # nothing but reading exists
    assert _fingerprint(home) == before

    # The student's page tells them.
    status = student.get(f"{tool.url}/machines/{machine}").text
    assert 'id="viewed"' in status and "viewed your files at" in status
    with rt.sessions() as session:
        paths = session.scalars(
            select(HomeView.path).where(HomeView.student_id == user_id).order_by(HomeView.id)
        ).all()
    assert paths == [".", "notes.txt", "lab1/hw.ipynb"]


def test_links_fifos_and_escapes_are_refused(tool, platform, rt, browser):
    _, _, base, _, _ = _setup(tool, platform, rt, browser)
    secret = browser.get(base, params={"path": "secret", "kind": "file"})
    assert "TOOL-SECRET-VALUE" not in secret.text and "does not follow links" in secret.text
    rendered = browser.get(base + "/rendered", params={"path": "secret"})
    assert "TOOL-SECRET-VALUE" not in rendered.text
    into = browser.get(base, params={"path": "elsewhere"})
    assert "decoy-secret" not in into.text and "not a folder Labpool opens" in into.text
    up = browser.get(base, params={"path": "../../"})
    assert "outside the student" in up.text
    fifo = browser.get(base, params={"path": "pipe", "kind": "file"}, timeout=10)
    assert "not a regular file" in fifo.text


def test_only_the_courses_teachers_get_in(tool, platform, rt, browser):
    student, _, base, _, _ = _setup(tool, platform, rt, browser)
    assert student.get(base).status_code == 403  # the student themself (not a teacher)
    assert student.get(base + "/rendered", params={"path": "notes.txt"}).status_code == 403
    with requests.Session() as other_teacher:
        other = platform.launch(
            other_teacher, tool.url, platform.instructor(sub="9", context_id="other-course")
        ).launch_response
        assert other.status_code == 303
        assert other_teacher.get(base).status_code == 403
    # A teacher of the course asking for someone outside it.
    with rt.sessions() as session:
        outsider = User(issuer=platform.issuer, sub="outsider")
        session.add(outsider)
        session.commit()
        outsider_id = outsider.id
    stranger = base.rsplit("/students/", 1)[0] + f"/students/{outsider_id}/files"
    assert browser.get(stranger).status_code == 403
    with rt.sessions() as session:
        assert session.scalars(select(HomeView)).all() == []
