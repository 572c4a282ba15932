"""Reaching a student's home on a cloud machine through JupyterLab's REST contents API
(https://jupyter-server.readthedocs.io/en/latest/developers/rest-api.html, `/api/contents`):
the cloud's transport of releases (grading.release's rule) and of submissions
(grading.collect_folder's limits and archive). Run by workers only, never by the web process.

The IDE is reached where the proxy reaches it (the machine's `address` and base URL
`/ide/<id>/`), with the machine's token. Labpool's Jupyter configuration on a machine
(provisioning/ide_config.py) accepts the token in `X-Labpool-Token` as a cookie-like login,
so Jupyter's XSRF check stays on for writes: each client sends a random `_xsrf` cookie and the
same value in `X-XSRFToken` (Tornado's double submit; a request without a browser sends no
`Origin`). `Authorization: token` is sent too, for a plain Jupyter that reads only that.

Every request has a timeout, and every answer is read with a cap: a machine is the student's
and may answer anything. A path in a listing is never taken from the answer: it is rebuilt
from the folder asked for and the entry's name, which must be one plain name.

Writes go through a temporary name in the same folder, then a rename (PATCH), so a
half-written file never replaces a student's: Jupyter refuses to rename onto an existing
file, so an update moves the old copy aside first, and back if the new one cannot take its
place. Notebooks are written as `type: notebook` (Jupyter validates and re-serialises them,
so the checksum kept in the manifest is that of the bytes read back, not of ours); other
files as base64. Files are read back as base64 bytes, whatever their type, so checksums are
of the bytes on the machine's disk.

The IDE runs as the student, on a machine holding only the student's files: anything the
contents API can reach there is theirs already, so following a link the student made there
exposes nothing of anyone else (unlike a home on the tool's host, grading.release). Jupyter
does not list hidden files (names starting with "."), so a submission leaves them out.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import secrets
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from grading.collect_folder import (
    SKIPPED_FOLDERS,
    Collected,
    FolderError,
    Limits,
    NoFolder,
    too_big,
    too_deep,
    too_many,
    too_much,
    write_archive,
    zip_entry,
)
from grading.release import ReleaseReport, checksum, decide, place_all
from provisioning.ide_http import TOKEN_HEADER, ide_status
from provisioning.models import (
    LIVE_STATES,
    Environment,
    IdeKind,
    Machine,
    MachineState,
    StudentVolume,
)

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
MAX_LISTING_BYTES = 8 * 1024 * 1024  # a folder of the limits' 500 entries is ~200 kB
MAX_WRITE_BYTES = 64 * 1024 * 1024  # a released file (publishing bounds them first)
CHUNK = 256 * 1024


class ContentsError(FolderError):
    """The machine's IDE could not be reached or refused a request; the message says which,
    names no token, and nothing was changed by the failed step."""


class MachineUnreachable(ContentsError):
    """No answer: the machine is stopping, gone, or its IDE is not up."""


class FileRefused(ContentsError):
    """Jupyter refused one file (a hidden name, a conflict): that file only."""


class IdeContents:
    """A client of one machine's contents API. `address` is `host:port` (or `[v6]:port`)."""

    def __init__(
        self,
        address: str,
        base_url: str,
        token: str,
        *,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    ):
        if not address or address.startswith("unix:"):
            raise ContentsError("This machine is not reached over the network.")
        self.root = f"http://{address}{base_url}api/contents"
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # never through a proxy from the environment
        xsrf = secrets.token_hex(16)
        self.session.headers.update(
            {
                TOKEN_HEADER: token,
                "Authorization": f"token {token}",
                "X-XSRFToken": xsrf,
                "Cookie": f"_xsrf={xsrf}",
            }
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> IdeContents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the requests ---------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        cap: int = MAX_LISTING_BYTES,
    ) -> tuple[int, Any]:
        """(status, parsed JSON answer or None). Raises MachineUnreachable, or ContentsError
        for a refused token, an error of the IDE, or an answer past `cap`."""
        url = f"{self.root}/{quote(path)}" if path else self.root
        try:
            response = self.session.request(
                method,
                url,
                params=params,
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=self.timeout,
                stream=True,
                allow_redirects=False,
            )
        except requests.RequestException:
            raise MachineUnreachable(
                "The machine's IDE did not answer (it may be stopping or gone); "
                "nothing was changed."
            ) from None
        with response:
            try:
                raw = _read_capped(response, cap)
            except requests.RequestException:
                raise MachineUnreachable(
                    "The machine's IDE stopped answering halfway; nothing was changed."
                ) from None
            if raw is None:
                raise ContentsError(
                    f"The machine's answer for {path or '/'!r} is larger than "
                    f"{cap // (1024 * 1024)} MB; nothing was changed."
                )
            status = response.status_code
        if status in (401, 403):
            raise ContentsError(
                "The machine refused Labpool's token (it may have been replaced); "
                "nothing was changed."
            )
        if status >= 500 or status in (301, 302, 303, 307, 308):
            raise ContentsError(
                f"The machine's IDE answered HTTP {status} for {path or '/'!r}; "
                "nothing was changed."
            )
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            if status < 300:
                raise ContentsError(
                    "The machine's IDE answered something that is not JSON."
                ) from None
            parsed = None  # an error page: the status says enough
        return status, parsed

    def _ok(self, status: int, parsed: Any, path: str, *allowed: int) -> Any:
        if status in allowed:
            return parsed
        reason = parsed.get("message") if isinstance(parsed, dict) else None
        text = (
            f"Jupyter refused {path!r} (HTTP {status}{': ' + str(reason)[:200] if reason else ''})"
        )
        if status in (400, 409):
            raise FileRefused(text)
        raise ContentsError(text + "; nothing was changed.")

    def model(self, path: str) -> dict[str, Any] | None:
        """The item's model without content (None: nothing there)."""
        status, parsed = self._request("GET", path, params={"content": "0"})
        if status == 404:
            return None
        return _model(self._ok(status, parsed, path, 200), path)

    def listing(self, path: str) -> list[dict[str, Any]]:
        """A folder's entries (models without content)."""
        status, parsed = self._request("GET", path, params={"content": "1", "type": "directory"})
        model = _model(self._ok(status, parsed, path, 200), path)
        entries = model.get("content")
        if model.get("type") != "directory" or not isinstance(entries, list):
            raise ContentsError(f"{path!r} on the machine is not a folder.")
        return [e for e in entries if isinstance(e, dict)]

    def read(self, path: str, cap: int) -> bytes | None:
        """A file's bytes as on the machine's disk (None: larger than `cap`)."""
        status, parsed = self._request(
            "GET",
            path,
            params={"content": "1", "type": "file", "format": "base64"},
            cap=cap * 4 // 3 + 64 * 1024,  # base64, and the model around it
        )
        model = _model(self._ok(status, parsed, path, 200), path)
        content = model.get("content")
        if model.get("format") != "base64" or not isinstance(content, str):
            raise ContentsError(f"{path!r} on the machine could not be read as a file.")
        try:
            data = base64.b64decode(content.replace("\n", ""), validate=True)  # encodebytes
        except (binascii.Error, ValueError):
            raise ContentsError(f"{path!r}: the machine's answer is not base64.") from None
        return None if len(data) > cap else data

    def make_folder(self, path: str) -> None:
        status, parsed = self._request("PUT", path, body={"type": "directory"})
        self._ok(status, parsed, path, 200, 201)

    def write(self, path: str, data: bytes) -> None:
        """Create or overwrite `path` (callers write only to fresh temporary names)."""
        if len(data) > MAX_WRITE_BYTES:
            raise FileRefused(f"{path!r} is larger than the largest file Labpool places.")
        notebook = _notebook(path, data)
        body: dict[str, Any] = (
            {"type": "notebook", "format": "json", "content": notebook}
            if notebook is not None
            else {"type": "file", "format": "base64", "content": base64.b64encode(data).decode()}
        )
        status, parsed = self._request("PUT", path, body=body)
        self._ok(status, parsed, path, 200, 201)

    def rename(self, old: str, new: str) -> None:
        """Jupyter refuses (409: FileRefused) when `new` exists."""
        status, parsed = self._request("PATCH", old, body={"path": new})
        self._ok(status, parsed, old, 200)

    def delete(self, path: str) -> None:
        status, parsed = self._request("DELETE", path)
        self._ok(status, parsed, path, 204, 404)


def _read_capped(response: requests.Response, cap: int) -> bytes | None:
    body = bytearray()
    for chunk in response.iter_content(CHUNK):
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _model(parsed: Any, path: str) -> dict[str, Any]:
    if not isinstance(parsed, dict) or parsed.get("type") not in ("directory", "file", "notebook"):
        raise ContentsError(f"The machine's answer for {path!r} is not a contents model.")
    return parsed


def _notebook(path: str, data: bytes) -> dict[str, Any] | None:
    """The notebook to send as `type: notebook`, or None to send the bytes as a file."""
    if not path.endswith(".ipynb"):
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("cells"), list):
        return None
    if parsed.get("nbformat") == 4 and (parsed.get("nbformat_minor") or 0) >= 5:
        # nbformat gives a cell without an id a random one when Jupyter saves it: the same
        # release would then leave different bytes each time. Ours are derived instead.
        for index, cell in enumerate(parsed["cells"]):
            if isinstance(cell, dict) and not cell.get("id"):
                cell["id"] = f"labpool-{index}"
    return parsed


def notebook_as_jupyter_writes(data: bytes) -> bytes | None:
    """The bytes Jupyter leaves on disk for a notebook sent as JSON (nbformat's writer), to
    recognise an unchanged copy; None when nbformat cannot read it."""
    import nbformat

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nbformat's advice on cell ids, as Jupyter's
            notebook = nbformat.from_dict(_notebook("x.ipynb", data))
            text = nbformat.writes(notebook, version=nbformat.NO_CONVERT)
    except Exception:  # nbformat raises many kinds for a malformed notebook
        return None
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


# ------------------------------------------------------------- the student's cloud home
@dataclass(frozen=True)
class CloudHome:
    """A student's running cloud machine whose home (their volume) is in place."""

    machine_id: int
    address: str
    token: str = field(repr=False)  # reprs end up in logs

    def contents(self) -> IdeContents:
        return IdeContents(self.address, f"/ide/{self.machine_id}/", self.token)

    def answers(self) -> bool:
        return ide_status(self.address, f"/ide/{self.machine_id}/", self.token) is not None


def cloud_home(session: Session, course_id: int, user_id: int) -> CloudHome | str:
    """The student's machine in the course, handed over, with their volume attached where
    the backend has volumes (before that, the home the IDE shows is the machine's own, which
    the volume's mount hides); else a short reason, "no machine" when none is live."""
    from provisioning.backends import capabilities

    machine = session.scalars(
        select(Machine)
        .where(
            Machine.owner_id == user_id,
            Machine.course_id == course_id,
            Machine.state.in_(LIVE_STATES),
        )
        .order_by(Machine.id.desc())
        .limit(1)
    ).first()
    if machine is None:
        return "no machine"
    if machine.state is not MachineState.assigned or not machine.address or not machine.ide_token:
        return "the machine is starting"
    environment = session.get_one(Environment, machine.environment_id)
    if environment.ide_kind not in (IdeKind.jupyterlab, IdeKind.terminal):
        return f"{environment.ide_kind.value} has no Jupyter contents API (not built)"
    if capabilities(machine.backend).volumes:
        volume = session.scalars(
            select(StudentVolume).where(
                StudentVolume.owner_id == user_id, StudentVolume.course_id == course_id
            )
        ).first()
        if volume is None or volume.status != "in-use" or volume.machine_id != machine.id:
            return "the student's volume is not attached yet"
    return CloudHome(machine.id, machine.address, machine.ide_token)


# ---------------------------------------------------------------------------- release
def release_to_machine(
    ide: IdeContents, folder: str, files: dict[str, bytes], previous: dict[str, str] | None = None
) -> ReleaseReport:
    """grading.release's rule, placed through the contents API under `folder` (relative to
    the IDE's root, the student's home)."""
    folders: dict[str, bool] = {}  # folder path → usable (a real folder, made if missing)

    def usable(parts: tuple[str, ...]) -> bool:
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in folders:
                model = ide.model(path)
                if model is None:
                    ide.make_folder(path)
                    folders[path] = True
                else:
                    folders[path] = model["type"] == "directory"
            if not folders[path]:
                return False
        return True

    def place(parts: tuple[str, ...], data: bytes, released: str | None) -> tuple[str, str | None]:
        if not usable(parts[:-1]):
            return "refused", None  # a file where a folder of ours would go
        path = "/".join(parts)
        model = ide.model(path)
        current: str | None = None
        if model is not None:
            if model["type"] == "directory":
                return "refused", None  # a folder where a file of ours would go
            content = ide.read(path, MAX_WRITE_BYTES)
            if content is None:
                return "kept", None  # far larger than anything we place: the student's
            current = checksum(content)
        written = notebook_as_jupyter_writes(data) if _notebook(path, data) is not None else None
        outcome = decide(current, checksum(written or data), released)
        if outcome not in ("added", "updated"):
            return outcome, current
        try:
            return outcome, _replace(ide, parts, data, current)
        except FileRefused:
            return "refused", None

    return place_all(place, folder, files, previous)


def _replace(ide: IdeContents, parts: tuple[str, ...], data: bytes, current: str | None) -> str:
    """Write `data` at `parts` through a temporary name; `current`: the checksum of the file
    being replaced (None: there was none). Returns the checksum of the bytes now there."""
    folder, name = "/".join(parts[:-1]), parts[-1]
    path = f"{folder}/{name}"
    # Not hidden (Jupyter refuses hidden names), and the same suffix (so the same type).
    temporary = f"{folder}/labpool-part-{secrets.token_hex(6)}-{name}"
    aside: str | None = None
    try:
        ide.write(temporary, data)
        placed = ide.read(temporary, MAX_WRITE_BYTES)
        if placed is None or (_notebook(path, data) is None and placed != data):
            raise ContentsError(f"{path!r} was not written whole on the machine.")
        if current is not None:
            # Checked again just before: a student's save since our read wins.
            now = ide.read(path, MAX_WRITE_BYTES)
            if now is None or checksum(now) != current:
                raise FileRefused(f"{path!r} changed while it was being released.")
            aside = f"{folder}/labpool-old-{secrets.token_hex(6)}-{name}"
            ide.rename(path, aside)
        try:
            ide.rename(temporary, path)
        except ContentsError:
            if aside is not None:
                with contextlib.suppress(ContentsError):
                    ide.rename(aside, path)
                aside = None
            raise
        return checksum(placed)
    finally:
        with contextlib.suppress(ContentsError):
            ide.delete(temporary)  # gone already after a rename: 404 is fine
        if aside is not None:
            with contextlib.suppress(ContentsError):
                ide.delete(aside)


# --------------------------------------------------------------------------- collection
def collect_from_machine(ide: IdeContents, folder: str, archive: Path, limits: Limits) -> Collected:
    """Copy `folder` (relative to the IDE's root) into a new zip at `archive`, within
    `limits`, as grading.collect_folder does for a home on this host. Raises NoFolder,
    LimitExceeded or ContentsError; then no archive is left behind."""
    top = ide.model(folder)
    if top is None:
        raise NoFolder(f"There is no folder {folder!r} in your home.")
    if top["type"] != "directory":
        raise NoFolder(f"{folder!r} in your home is not a folder; nothing was submitted.")
    walk = _RemoteWalk(ide, limits)
    return write_archive(archive, folder, walk, lambda zf: walk.folder(folder, "", 0, zf))


class _RemoteWalk:
    def __init__(self, ide: IdeContents, limits: Limits):
        self.ide, self.limits = ide, limits
        self.files = self.entries = self.total = 0
        self.skipped: list[dict[str, str]] = []

    def count_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise too_many(self.limits)

    def folder(self, remote: str, prefix: str, depth: int, zf: zipfile.ZipFile) -> None:
        if depth > self.limits.max_depth:
            raise too_deep(self.limits, prefix)
        entries = self.ide.listing(remote)
        if len(entries) > self.limits.max_files:
            raise too_many(self.limits)
        for entry in sorted(entries, key=lambda e: str(e.get("name"))):
            name = entry.get("name")
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                self.skipped.append({"path": prefix + str(name)[:100], "why": "an odd name"})
                continue
            path = prefix + name
            if entry.get("type") == "directory":
                if name in SKIPPED_FOLDERS:
                    self.skipped.append({"path": path + "/", "why": "editor or Python cache"})
                    continue
                self.count_entry()
                self.folder(f"{remote}/{name}", path + "/", depth + 1, zf)
            elif entry.get("type") in ("file", "notebook"):
                self.count_entry()
                self.file(f"{remote}/{name}", path, entry, zf)
            else:
                self.skipped.append({"path": path, "why": "not a file or a folder"})

    def file(self, remote: str, path: str, entry: dict[str, Any], zf: zipfile.ZipFile) -> None:
        size = entry.get("size")
        if isinstance(size, int) and size > self.limits.max_file_bytes:
            raise too_big(self.limits, path)  # early: the read below is capped anyway
        data = self.ide.read(remote, self.limits.max_file_bytes)
        if data is None:
            raise too_big(self.limits, path)
        if self.total + len(data) > self.limits.max_total_bytes:
            raise too_much(self.limits)
        with zf.open(zip_entry(path, _mtime(entry)), "w", force_zip64=True) as out:
            out.write(data)
        self.total += len(data)
        self.files += 1


def _mtime(entry: dict[str, Any]) -> float:
    """The entry's `last_modified` (ISO 8601) as a timestamp; 0 (1980 in the zip) if odd."""
    value = entry.get("last_modified")
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
