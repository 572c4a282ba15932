"""Placing an assignment's student version in a student's home, by nbgitpuller's rule: add
new files, update the ones the student left untouched, keep every file the student changed
(or made, where ours would go).

One rule, two transports: `decide` and `place_all` are the rule and the walk over the
release's files; this module's own transport writes into a home on this host (local
backend, below), `grading.contents_api` writes into a cloud machine through JupyterLab's
contents API.

"Untouched" means: the file's content is still exactly what Labpool released there last
time, by checksum. The checksums of the last release live on the tool's side (the returned
manifest, stored by the caller), never in the student's home, where the student could
change them.

The home belongs to the student's OS user, who may plant symlinks anywhere in it (pointing
at another home, the tool's data folder, /etc…). So the walk never follows one: every
folder is opened relative to its parent's descriptor with O_NOFOLLOW | O_DIRECTORY, every
file is opened with O_NOFOLLOW, and a symlink (or anything that is not a regular file or a
folder) where ours would go is left alone and reported. New files are written as the home's
owner (fchown on the open descriptor), mode 0600, folders 0700, through a temporary name
and an atomic rename, so a half-written file never replaces a student's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

FILE_MODE = 0o600
DIR_MODE = 0o700


class ReleaseError(Exception):
    """The release could not be placed (nothing of it was left half-written)."""


@dataclass
class ReleaseReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # the student's version stays
    refused: list[str] = field(default_factory=list)  # a symlink or a special file in the way
    manifest: dict[str, str] = field(default_factory=dict)  # path → sha256 released there


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_parts(relative: str) -> tuple[str, ...]:
    """A release path's parts; refuses absolute paths, `..`, empty and hidden-escape names."""
    path = PurePosixPath(relative)
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts):
        raise ReleaseError(f"unsafe path in the assignment: {relative!r}")
    return path.parts


def decide(current: str | None, wanted: str, released: str | None) -> str:
    """nbgitpuller's rule for one file, on checksums: `current` is what is there now (None:
    nothing), `wanted` what this release would leave there, `released` what the last release
    left there (None: never released). Returns "added", "unchanged", "kept" (the student
    changed it, or made it: theirs wins) or "updated" (untouched since our last release).
    "refused" (something that is not a file in the way) is the transport's to say."""
    if current is None:
        return "added"
    if current == wanted:
        return "unchanged"
    if released is None or current != released:
        return "kept"
    return "updated"


# One file's placement: (its path parts under the home, content, the checksum the last
# release left there) → (outcome, the checksum it leaves there, or None when it left nothing).
Place = Callable[[tuple[str, ...], bytes, str | None], tuple[str, str | None]]


def place_all(
    place: Place, folder: str, files: dict[str, bytes], previous: dict[str, str] | None = None
) -> ReleaseReport:
    """Place every file of the release through `place` (a transport), in a stable order,
    and gather the report and the new manifest."""
    previous = previous or {}
    report = ReleaseReport()
    safe_parts(folder)
    for relative in sorted(files):
        parts = safe_parts(relative)
        outcome, placed = place((folder, *parts), files[relative], previous.get(relative))
        getattr(report, outcome).append(relative)
        if outcome in ("added", "updated", "unchanged") and placed is not None:
            report.manifest[relative] = placed
        elif relative in previous:
            report.manifest[relative] = previous[relative]
    return report


def release_files(
    home: Path, folder: str, files: dict[str, bytes], previous: dict[str, str] | None = None
) -> ReleaseReport:
    """Place `files` (relative path → content) under `home/folder`, a home on this host.
    `previous` is the manifest the last release returned for this student (None: first
    release)."""
    owner = os.lstat(home)
    if not stat.S_ISDIR(owner.st_mode):
        raise ReleaseError(f"{home} is not a folder")
    home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return place_all(
            lambda parts, data, released: _place(
                home_fd, parts, data, released, owner.st_uid, owner.st_gid
            ),
            folder,
            files,
            previous,
        )
    finally:
        os.close(home_fd)


def _place(
    home_fd: int, parts: tuple[str, ...], data: bytes, released: str | None, uid: int, gid: int
) -> tuple[str, str | None]:
    dir_fd = _open_folders(home_fd, parts[:-1], uid, gid)
    if dir_fd is None:
        return "refused", None
    name, wanted = parts[-1], checksum(data)
    try:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
            present = True
        except FileNotFoundError:
            present = False
        current: str | None = None
        if present:
            if not stat.S_ISREG(st.st_mode):
                return "refused", None  # a symlink, a folder, a fifo…: the student's
            content = _read(dir_fd, name)
            if content is None:
                return "refused", None
            current = checksum(content)
        outcome = decide(current, wanted, released)
        if outcome in ("added", "updated"):
            _write_new(dir_fd, name, data, uid, gid)
        return outcome, wanted
    finally:
        os.close(dir_fd)


def _open_folders(home_fd: int, parts: tuple[str, ...], uid: int, gid: int) -> int | None:
    """The descriptor of home/parts…, made as the owner where missing; None when a part is
    not a real folder (a symlink is never followed)."""
    fd = os.dup(home_fd)
    for part in parts:
        try:
            os.mkdir(part, DIR_MODE, dir_fd=fd)
            os.chown(part, uid, gid, dir_fd=fd, follow_symlinks=False)
        except FileExistsError:
            pass
        try:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return None
            raise
        os.close(fd)
        fd = child
    return fd


def _read(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read()


def _write_new(dir_fd: int, name: str, data: bytes, uid: int, gid: int) -> None:
    """Write through a fresh temporary name (O_EXCL: never an existing file or symlink),
    owned by the home's owner, then rename it into place."""
    temporary = f".labpool-{secrets.token_hex(8)}"
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE, dir_fd=dir_fd
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchown(handle.fileno(), uid, gid)
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise
