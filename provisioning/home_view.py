"""A teacher's read-only look at a student's home (issue 13, "over the student's shoulder").

The home belongs to the student's OS user, who may plant symlinks, fifos or device nodes
anywhere in it, pointing at another home or the tool's secrets. So nothing here follows a
link: each folder of the path is opened relative to its parent's descriptor with
O_NOFOLLOW | O_DIRECTORY, the file with O_NOFOLLOW | O_NONBLOCK (a fifo never blocks the
page), and only a regular file is read, at most `MAX_READ` bytes of it. Nothing is ever
opened for writing: the look cannot change a byte of the student's work.

Notebooks are rendered to HTML by nbconvert (its "basic" template: no scripts of its own).
Student outputs may hold any HTML, so the web layer serves the rendering under a CSP with
`sandbox` and `script-src 'none'`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_READ = 5 * 1024 * 1024  # bytes of one file shown; more is refused, not cut
MAX_ENTRIES = 500  # entries of one folder listed
TEXT_SUFFIXES = {".py", ".txt", ".md", ".csv", ".json", ".r", ".sql", ".sh", ".yml", ".yaml"}


class HomeViewError(Exception):
    """The path cannot be shown; the message says why, in the teacher's words."""


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "folder" | "file" | "link" | "other"
    size: int
    mtime: float


def _parts(relative: str) -> tuple[str, ...]:
    path = PurePosixPath(relative or ".")
    if path.is_absolute() or any(p == ".." for p in path.parts):
        raise HomeViewError("That path is outside the student's home.")
    return tuple(p for p in path.parts if p not in ("", "."))


@contextlib.contextmanager
def _folder_fd(home: Path, parts: tuple[str, ...]) -> Iterator[int]:
    """A descriptor of home/parts, every step opened without following a link."""
    try:
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise HomeViewError("This student has no files here yet.") from None
    try:
        for part in parts:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise HomeViewError("That folder does not exist (any more).") from None
            except OSError:  # ELOOP (a link), ENOTDIR
                raise HomeViewError("That is not a folder Labpool opens (a link?).") from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def list_folder(home: Path, relative: str) -> list[Entry]:
    """The folder's entries (folders first, then by name); links are listed, never followed."""
    with _folder_fd(home, _parts(relative)) as fd:
        entries = []
        for name in sorted(os.listdir(fd))[:MAX_ENTRIES]:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone while listing
            entries.append(Entry(name, _kind(st.st_mode), st.st_size, st.st_mtime))
    return sorted(entries, key=lambda e: (e.kind != "folder", e.name.lower()))


def read_file(home: Path, relative: str, limit: int = MAX_READ) -> bytes:
    """A regular file's bytes (at most `limit`), read without following any link."""
    parts = _parts(relative)
    if not parts:
        raise HomeViewError("That is a folder, not a file.")
    with _folder_fd(home, parts[:-1]) as dir_fd:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            raise HomeViewError("That file does not exist (any more).") from None
        except OSError:
            raise HomeViewError("That is a link; Labpool does not follow links.") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise HomeViewError("That is not a regular file.")
            if st.st_size > limit:
                raise HomeViewError(f"That file is over {limit // (1024 * 1024)} MB: not shown.")
            data = os.read(fd, limit + 1)
            if len(data) > limit:  # grew while reading
                raise HomeViewError(f"That file is over {limit // (1024 * 1024)} MB: not shown.")
            return data
        finally:
            os.close(fd)


def render_notebook(data: bytes) -> str:
    """The notebook as HTML (nbconvert's basic template), or a HomeViewError if it is not
    a notebook nbformat can read."""
    import nbformat
    from nbconvert import HTMLExporter

    try:
        notebook = nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception:  # noqa: BLE001 - whatever a student's file holds, the answer is the same
        raise HomeViewError(
            "That notebook cannot be read (it is not valid notebook JSON)."
        ) from None
    body, _ = HTMLExporter(template_name="basic").from_notebook_node(notebook)
    return body


def is_text(name: str, data: bytes) -> bool:
    if PurePosixPath(name).suffix.lower() in TEXT_SUFFIXES:
        return True
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data[:4096]
