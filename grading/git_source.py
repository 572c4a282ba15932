"""An assignment's files from a folder of a git repository (course content kept in git):
`git clone --depth 1 --single-branch` of one branch over https only, into a temporary folder,
then the folder's files read under the same rules as an upload (grading.assignment_files):
limits, no symlink (never followed: the walk uses lstat), no special file.

The clone is bounded (time; https only: no `file://`, `ssh://`, `ext::` or plain http, and no
redirect to them), reads none of the host's git configuration, never prompts for a password
(a private repository needs a URL the tool may read, e.g. a read-only deploy token), and
fetches no submodule or LFS object. The URL may name any https host the tool can reach, so
only the course's instructors may set it.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from grading.assignment_files import (
    MAX_FILES,
    MAX_TOTAL_BYTES,
    UploadRejected,
    check_files,
    checked_path,
)

CLONE_TIMEOUT_S = 60
BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
# Passed through to git: how to reach the host (proxies, CA bundle), nothing else.
PASSED_ENV = (
    "PATH",
    "GIT_SSL_CAINFO",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
)


def check_source(url: str, branch: str, folder: str) -> tuple[str, str, str]:
    """The checked (url, branch, folder), or UploadRejected."""
    url, branch, folder = url.strip(), branch.strip() or "main", folder.strip().strip("/")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or len(url) > 500:
        raise UploadRejected("The repository URL must be an https:// URL (at most 500 characters).")
    if not BRANCH.fullmatch(branch) or ".." in branch or branch.endswith((".lock", "/", ".")):
        raise UploadRejected(f"{branch!r} is not a branch name.")
    if folder:
        folder = checked_path(folder)
    return url, branch, folder


def fetch(url: str, branch: str, folder: str) -> dict[str, bytes]:
    """The files of `folder` in `branch` of the repository (relative path → content)."""
    with tempfile.TemporaryDirectory(prefix="labpool-git-") as tmp:
        checkout = Path(tmp) / "repo"
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(
            HOME=tmp,
            GIT_TERMINAL_PROMPT="0",
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_GLOBAL=os.devnull,
            GIT_ASKPASS="/bin/false",
            GIT_LFS_SKIP_SMUDGE="1",
        )
        command = [
            "git",
            "-c",
            "protocol.allow=never",
            "-c",
            "protocol.https.allow=always",
            "-c",
            "core.symlinks=true",
            "clone",
            "--quiet",
            "--depth",
            "1",
            "--single-branch",
            "--no-tags",
            "--branch",
            branch,
            "--",
            url,
            str(checkout),
        ]
        try:
            done = subprocess.run(
                command,
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=CLONE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise UploadRejected(
                f"The repository took longer than {CLONE_TIMEOUT_S} s to fetch."
            ) from None
        except FileNotFoundError:
            raise UploadRejected("git is not installed on the tool's host.") from None
        if done.returncode != 0:
            reason = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
            raise UploadRejected(f"The repository could not be fetched: {reason[-1][:300]}")
        return _read_tree(checkout, folder)


def _read_tree(checkout: Path, folder: str) -> dict[str, bytes]:
    top = checkout
    for part in Path(folder).parts if folder else ():
        top = top / part
        try:
            mode = os.lstat(top).st_mode
        except FileNotFoundError:
            raise UploadRejected(f"The branch has no folder {folder!r}.") from None
        if not stat.S_ISDIR(mode):
            raise UploadRejected(
                f"{folder!r} is not a folder in the repository (a link is not followed)."
            )
    files: dict[str, bytes] = {}
    total = 0
    for root, dirs, names in os.walk(top):  # os.walk never descends into a symlinked folder
        here = Path(root)
        if here == checkout:
            dirs[:] = [d for d in dirs if d != ".git"]
        for name in sorted([*dirs, *names]):
            path = here / name
            relative = str(path.relative_to(top))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise UploadRejected(f"{relative!r} is a symbolic link; links are not allowed.")
            if stat.S_ISDIR(mode):
                checked_path(relative)
                continue
            if not stat.S_ISREG(mode):
                raise UploadRejected(f"{relative!r} is not a regular file.")
            if len(files) >= MAX_FILES:
                raise UploadRejected(f"The folder holds more than {MAX_FILES} files.")
            total += os.lstat(path).st_size
            if total > MAX_TOTAL_BYTES:
                raise UploadRejected(f"The folder is larger than {MAX_TOTAL_BYTES // 2**20} MB.")
            files[checked_path(relative)] = path.read_bytes()
    if not files:
        raise UploadRejected("The folder holds no files.")
    check_files(files)
    return files
