"""An assignment's files as the teacher uploads them (a single `.ipynb`, or a `.zip`), checked
before anything is kept, and kept on the tool's side: `DATA_DIR/assignments/<id>/`, mode 0700,
which no student's OS user can enter.

An upload is read whole into memory and checked first (size, file count, folder depth, every
path relative and inside, no symlink, device or other special entry, no encrypted entry, a
`.ipynb` is a notebook nbformat can read); only a fully accepted upload is written, into a
new folder, so a refusal leaves nothing behind. The zip's declared sizes are not trusted: each
entry is read with a bound.

Each upload gets its own folder (`source-<token>`); the assignment row names the current one.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import nbformat

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # the upload itself (a zip is compressed)
MAX_TOTAL_BYTES = 50 * 1024 * 1024  # all files once unpacked
MAX_FILES = 200
MAX_DEPTH = 6  # folders above a file, inside the assignment's folder
DIR_MODE = 0o700
FILE_MODE = 0o600
_SKIPPED = ("__MACOSX/",)  # macOS Finder's resource forks in zips: never the teacher's files


class UploadRejected(Exception):
    """The upload is refused, with a message the teacher can act on (nothing was kept)."""


def assignments_root(data_dir: Path) -> Path:
    root = data_dir / "assignments"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(DIR_MODE)
    return root


def read_upload(filename: str, data: bytes) -> dict[str, bytes]:
    """The files of an upload (relative path → content), or UploadRejected."""
    if not data:
        raise UploadRejected("The uploaded file is empty.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadRejected(f"The upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
    name = PurePosixPath(filename.replace("\\", "/")).name
    if name.lower().endswith(".ipynb"):
        files = {checked_path(name): data}
    elif name.lower().endswith(".zip"):
        files = _read_zip(data)
    else:
        raise UploadRejected(
            "Upload a notebook (.ipynb) or a zip of the assignment's files (.zip)."
        )
    check_files(files)
    return files


def check_files(files: Mapping[str, bytes]) -> None:
    """Every `.ipynb` is a notebook nbformat can read."""
    for path, content in files.items():
        if path.lower().endswith(".ipynb"):
            _check_notebook(path, content)


def checked_path(raw: str) -> str:
    """A relative path inside the assignment's folder, or UploadRejected."""
    if "\\" in raw or "\x00" in raw:
        raise UploadRejected(f"{raw!r}: backslashes and NUL are not allowed in file names.")
    path = PurePosixPath(raw)
    if raw.startswith("/") or path.is_absolute() or (len(raw) > 1 and raw[1] == ":"):
        raise UploadRejected(f"{raw!r}: absolute paths are not allowed.")
    parts = path.parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise UploadRejected(f"{raw!r}: a path leaving the assignment's folder is not allowed.")
    if len(parts) - 1 > MAX_DEPTH:
        raise UploadRejected(f"{raw!r}: folders nest more than {MAX_DEPTH} deep.")
    if any(len(p.encode()) > 255 for p in parts):
        raise UploadRejected(f"{raw!r}: a file name is longer than 255 bytes.")
    return str(path)


def _read_zip(data: bytes) -> dict[str, bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise UploadRejected(f"The zip cannot be read ({exc}).") from None
    files: dict[str, bytes] = {}
    total = 0
    for info in entries:
        raw = info.filename
        if raw.startswith(_SKIPPED):
            continue
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise UploadRejected(f"{raw!r} is a symbolic link; links are not allowed.")
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise UploadRejected(f"{raw!r} is a device, pipe or socket; only files are allowed.")
        if info.flag_bits & 0x1:
            raise UploadRejected(f"{raw!r} is encrypted; upload a zip without a password.")
        if info.is_dir():
            checked_path(raw.rstrip("/"))
            continue
        path = checked_path(raw)
        if path in files:
            raise UploadRejected(f"{raw!r} is in the zip twice.")
        if len(files) >= MAX_FILES:
            raise UploadRejected(f"The zip holds more than {MAX_FILES} files.")
        budget = MAX_TOTAL_BYTES - total
        try:
            with archive.open(info) as entry:
                content = entry.read(budget + 1)  # the declared size may lie
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as exc:
            raise UploadRejected(f"{raw!r} cannot be unpacked ({exc}).") from None
        total += len(content)
        if total > MAX_TOTAL_BYTES:
            raise UploadRejected(f"Unpacked, the zip is larger than {MAX_TOTAL_BYTES // 2**20} MB.")
        files[path] = content
    if not files:
        raise UploadRejected("The zip holds no files.")
    return _without_common_folder(files)


def _without_common_folder(files: dict[str, bytes]) -> dict[str, bytes]:
    """A zip of a folder (`lab1/…` only) gives that folder's content: it lands in the
    assignment's folder, not in a folder inside it."""
    tops = {PurePosixPath(p).parts[0] for p in files}
    if len(tops) != 1 or any(len(PurePosixPath(p).parts) == 1 for p in files):
        return files
    return {str(PurePosixPath(*PurePosixPath(p).parts[1:])): c for p, c in files.items()}


def _check_notebook(path: str, content: bytes) -> None:
    try:
        nbformat.reads(content.decode("utf-8"), as_version=4)
    except (
        UnicodeDecodeError,
        json.JSONDecodeError,
        nbformat.reader.NotJSONError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        raise UploadRejected(
            f"{path!r} is not a Jupyter notebook nbformat can read ({exc})."
        ) from None


def write_folder(parent: Path, prefix: str, files: Mapping[str, bytes]) -> Path:
    """Write `files` into a new folder `parent/<prefix>-<token>` (tool-private), and return it.
    A failure removes the half-written folder."""
    parent.mkdir(parents=True, exist_ok=True)
    parent.chmod(DIR_MODE)
    folder = parent / f"{prefix}-{secrets.token_hex(6)}"
    folder.mkdir(mode=DIR_MODE)
    try:
        for relative, content in files.items():
            target = folder / relative
            target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(FILE_MODE)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def read_folder(folder: Path) -> dict[str, bytes]:
    """Every regular file under a tool-side folder (relative path → content)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def remove_folder(folder: Path | str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
