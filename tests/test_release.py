"""Releasing an assignment into a student's home (grading.release): nbgitpuller's rule (new
files added, untouched ones updated, the student's changes kept) and the home's owner's
files, written without ever following a symlink the student planted."""

from __future__ import annotations

import os
import stat

import pytest

from grading.release import ReleaseError, release_files

NOTEBOOK_V1 = b'{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}'
NOTEBOOK_V2 = b'{"cells": [{"cell_type": "markdown", "metadata": {}, "source": "fixed typo"}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}'


@pytest.fixture
def home(tmp_path):  # type: ignore[no-untyped-def]
    folder = tmp_path / "home"
    folder.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)  # a student's OS user (nobody), as on the local backend
    return folder


def test_first_release_adds_the_files_as_the_homes_owner_private(home):
    report = release_files(home, "lab1", {"lab1.ipynb": NOTEBOOK_V1, "data/points.csv": b"1,2\n"})
    assert sorted(report.added) == ["data/points.csv", "lab1.ipynb"]
    notebook = home / "lab1" / "lab1.ipynb"
    assert notebook.read_bytes() == NOTEBOOK_V1
    owner = home.stat().st_uid
    for path in (notebook, home / "lab1" / "data" / "points.csv"):
        assert path.stat().st_uid == owner and stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (home / "lab1", home / "lab1" / "data"):
        assert folder.stat().st_uid == owner and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not [p for p in (home / "lab1").iterdir() if p.name.startswith(".labpool-")]


def test_rerelease_updates_untouched_copies_and_keeps_edited_ones(home):
    first = release_files(home, "lab1", {"a.ipynb": NOTEBOOK_V1, "b.ipynb": NOTEBOOK_V1})
    (home / "lab1" / "b.ipynb").write_bytes(b"my answers")  # the student worked on b
    second = release_files(
        home,
        "lab1",
        {"a.ipynb": NOTEBOOK_V2, "b.ipynb": NOTEBOOK_V2, "c.ipynb": NOTEBOOK_V1},
        first.manifest,
    )
    assert second.updated == ["a.ipynb"] and second.kept == ["b.ipynb"]
    assert second.added == ["c.ipynb"]
    assert (home / "lab1" / "a.ipynb").read_bytes() == NOTEBOOK_V2
    assert (home / "lab1" / "b.ipynb").read_bytes() == b"my answers"
    # b stays "the student's" for the next release too: its manifest entry is the old release.
    third = release_files(home, "lab1", {"b.ipynb": NOTEBOOK_V1}, second.manifest)
    assert third.kept == ["b.ipynb"]


def test_a_file_the_student_made_where_ours_would_go_is_kept(home):
    (home / "lab1").mkdir()
    (home / "lab1" / "a.ipynb").write_bytes(b"mine")
    report = release_files(home, "lab1", {"a.ipynb": NOTEBOOK_V1})
    assert report.kept == ["a.ipynb"]
    assert (home / "lab1" / "a.ipynb").read_bytes() == b"mine"


def test_symlinks_the_student_planted_are_never_followed(home, tmp_path):
    outside = tmp_path / "tool-secret"
    outside.mkdir()
    (outside / "key.pem").write_bytes(b"SECRET")
    # The assignment folder itself is a symlink to a folder outside the home...
    os.symlink(outside, home / "lab1")
    report = release_files(home, "lab1", {"key.pem": NOTEBOOK_V1, "new.ipynb": NOTEBOOK_V1})
    assert sorted(report.refused) == ["key.pem", "new.ipynb"]
    assert (outside / "key.pem").read_bytes() == b"SECRET"
    assert not (outside / "new.ipynb").exists()
    # ... or a file in it is a symlink to a file outside.
    (home / "lab2").mkdir()
    os.symlink(outside / "key.pem", home / "lab2" / "a.ipynb")
    first = {"a.ipynb": "0" * 64}
    report = release_files(home, "lab2", {"a.ipynb": NOTEBOOK_V1}, first)
    assert report.refused == ["a.ipynb"]
    assert (outside / "key.pem").read_bytes() == b"SECRET"
    assert (home / "lab2" / "a.ipynb").is_symlink()


@pytest.mark.parametrize("bad", ["../escape.ipynb", "/etc/passwd", "a/../../b", ""])
def test_paths_leaving_the_folder_are_refused(home, bad):
    with pytest.raises(ReleaseError):
        release_files(home, "lab1", {bad: b"x"})
    assert not (home.parent / "escape.ipynb").exists()
