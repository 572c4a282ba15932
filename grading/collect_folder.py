"""Copying an assignment's folder out of a student's home into one zip archive (local
backend), for a submission. The limits, their messages and the archive's entries are shared
with the cloud's transport (`grading.contents_api`), so both refuse the same folders alike.

The home belongs to the student's OS user, who may plant anything in it: symlinks to another
student's files or to /etc/shadow, FIFOs that would block a reader forever, sparse files that
claim terabytes, a million empty folders. So, like grading.release, the walk never follows a
link: every folder is opened relative to its parent's descriptor with
O_NOFOLLOW | O_DIRECTORY, every file with O_NOFOLLOW | O_NONBLOCK (a FIFO swapped in after
the lstat opens without blocking and is then seen by fstat), and only regular files owned by
the home's owner are copied; everything else is skipped and listed. Sizes are counted from
the bytes actually read, with a cap: st_size is only used to refuse early.

A folder over a limit is refused as a whole (LimitExceeded), and the half-written archive is
removed: a submission is all of the folder or nothing.

The archive is deterministic (sorted names, each file's own mtime, fixed modes), so the same
folder gives the same sha256: that is how an unchanged resubmission is recognised.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

CHUNK = 1024 * 1024
SKIPPED_FOLDERS = frozenset({".ipynb_checkpoints", "__pycache__"})  # editor and Python noise


@dataclass(frozen=True)
class Limits:
    max_files: int = 500  # files and folders counted together
    max_file_bytes: int = 20 * 1024 * 1024
    max_total_bytes: int = 100 * 1024 * 1024
    max_depth: int = 16


class FolderError(Exception):
    """The folder cannot be submitted; nothing was stored. The message says why."""


class NoFolder(FolderError):
    pass


class LimitExceeded(FolderError):
    pass


@dataclass
class Collected:
    """A folder copied into `archive` (a file the caller owns and must move or remove)."""

    archive: Path
    checksum: str  # sha256 of the archive
    file_count: int
    size_bytes: int  # the files' bytes, uncompressed
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "why"}


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n} bytes"


def too_many(limits: Limits) -> LimitExceeded:
    return LimitExceeded(
        f"The folder has more than {limits.max_files} files and folders; "
        "remove some (data sets, outputs) and submit again. Nothing was submitted."
    )


def too_deep(limits: Limits, prefix: str) -> LimitExceeded:
    return LimitExceeded(
        f"Folders are nested more than {limits.max_depth} deep "
        f"at {prefix!r}. Nothing was submitted."
    )


def too_big(limits: Limits, path: str) -> LimitExceeded:
    return LimitExceeded(
        f"{path} is larger than {_mb(limits.max_file_bytes)} (the limit per file); "
        "remove it or make it smaller and submit again. Nothing was submitted."
    )


def too_much(limits: Limits) -> LimitExceeded:
    return LimitExceeded(
        f"The folder holds more than {_mb(limits.max_total_bytes)}; "
        "remove large files (data sets, outputs) and submit again. "
        "Nothing was submitted."
    )


def no_files(folder: str) -> NoFolder:
    return NoFolder(f"The folder {folder!r} has no files to submit.")


def zip_entry(path: str, mtime: float) -> zipfile.ZipInfo:
    """An archive entry as every submission has it: the file's own mtime, fixed mode."""
    info = zipfile.ZipInfo(path, date_time=_zip_time(mtime))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o600) << 16
    return info


def open_archive(archive: Path) -> int:
    """A new archive file (O_EXCL, mode 0600): the descriptor to write the zip to."""
    return os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)


def collect_folder(home: Path, folder: str, archive: Path, limits: Limits) -> Collected:
    """Copy `home/folder` into a new zip at `archive` (created with O_EXCL, mode 0600).
    Raises NoFolder, LimitExceeded or FolderError; then no archive is left behind."""
    try:
        home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NoFolder("There is no home folder yet: open the activity once first.") from None
    except PermissionError:
        raise FolderError(
            "Labpool cannot read the students' homes on this host: in "
            "single-server mode it runs as root."
        ) from None
    try:
        owner = os.fstat(home_fd).st_uid
        try:
            top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home_fd)
        except FileNotFoundError:
            raise NoFolder(f"There is no folder {folder!r} in your home.") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise NoFolder(
                    f"{folder!r} in your home is not a folder (a link or a file); "
                    "nothing was submitted."
                ) from None
            raise
    finally:
        os.close(home_fd)
    walk = _Walk(owner, limits)
    try:
        return write_archive(archive, folder, walk, lambda zf: walk.folder(top, "", 0, zf))
    finally:
        os.close(top)


class Tally(Protocol):
    """What a walk counted while filling an archive."""

    files: int
    total: int
    skipped: list[dict[str, str]]


def write_archive(
    archive: Path, folder: str, walk: Tally, fill: Callable[[zipfile.ZipFile], None]
) -> Collected:
    """Create `archive` (O_EXCL, mode 0600), let `fill` write the zip (counting into
    `walk`), and return what was collected. Whatever fails, no archive is left behind; a
    folder without a file to keep is NoFolder."""
    fd = open_archive(archive)
    try:
        with (
            os.fdopen(fd, "wb") as handle,
            zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf,
        ):
            fill(zf)
        if walk.files == 0:
            raise no_files(folder)
        digest = sha256_of(archive)
    except BaseException:
        archive.unlink(missing_ok=True)
        raise
    return Collected(archive, digest, walk.files, walk.total, walk.skipped)


class _Walk:
    def __init__(self, owner: int, limits: Limits):
        self.owner, self.limits = owner, limits
        self.files = self.entries = self.total = 0
        self.skipped: list[dict[str, str]] = []

    def skip(self, path: str, why: str) -> None:
        self.skipped.append({"path": path, "why": why})

    def count_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise too_many(self.limits)

    def folder(self, dir_fd: int, prefix: str, depth: int, zf: zipfile.ZipFile) -> None:
        if depth > self.limits.max_depth:
            raise too_deep(self.limits, prefix)
        for name in sorted(os.listdir(dir_fd)):
            path = f"{prefix}{name}"
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                self.skip(path.encode("utf-8", "replace").decode(), "the name is not UTF-8")
                continue
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # removed while we walked
            if stat.S_ISDIR(st.st_mode):
                if name in SKIPPED_FOLDERS:
                    self.skip(path + "/", "editor or Python cache")
                    continue
                self.count_entry()
                try:
                    child = os.open(
                        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd
                    )
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        self.skip(path, "changed while it was read")
                        continue
                    raise
                try:
                    self.folder(child, path + "/", depth + 1, zf)
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                self.count_entry()
                self.file(dir_fd, name, path, st, zf)
            else:
                self.skip(path, _kind(st.st_mode) + ", not a regular file")

    def file(
        self, dir_fd: int, name: str, path: str, st: os.stat_result, zf: zipfile.ZipFile
    ) -> None:
        cap = self.limits.max_file_bytes
        if st.st_size > cap:  # early refusal only: the read below is capped anyway
            raise too_big(self.limits, path)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
                self.skip(path, "changed while it was read")
                return
            raise
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                self.skip(path, _kind(opened.st_mode) + ", not a regular file")
                return
            if opened.st_uid != self.owner:
                self.skip(path, "not the student's own file")
                return
            info = zip_entry(path, opened.st_mtime)
            read = 0
            with zf.open(info, "w", force_zip64=True) as entry:
                while chunk := os.read(fd, min(CHUNK, cap + 1 - read)):
                    read += len(chunk)
                    if read > cap:
                        raise too_big(self.limits, path)
                    if self.total + read > self.limits.max_total_bytes:
                        raise too_much(self.limits)
                    entry.write(chunk)
            self.total += read
            self.files += 1
        finally:
            os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link (never followed)"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    """The file's mtime in UTC, clamped to what a zip can hold (1980–2107)."""
    t = time.gmtime(min(max(mtime, 315532800), 4354819199))
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
