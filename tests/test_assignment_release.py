"""Assignments from uploaded files, published (nbgrader's generate_assignment for nbgrader
source notebooks) and released into students' homes (issue 11, items 2 and 3): bad uploads are
refused and change nothing, solutions and hidden tests never reach a student, a launch places
the student version in the home as the student's own files, a re-release keeps a student's
edit and updates an untouched file, and only teachers create, publish or release."""

from __future__ import annotations

import http.server
import io
import json
import os
import pwd
import ssl
import stat
import subprocess
import threading
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from sqlalchemy import func, select

from grading.assignment_files import MAX_DEPTH, MAX_FILES
from grading.models import Assignment, AssignmentRelease, AssignmentSource
from tests.conftest import run_worker_burst
from tests.test_grades import csrf_of, launch_student, launch_teacher, session_csrf, user_id_of

PLAIN = nbformat.writes(new_notebook(cells=[new_markdown_cell("Read the data.")])).encode()


def nbgrader_source(typo: str = "Write `square`.") -> bytes:
    def meta(**kw):  # type: ignore[no-untyped-def]
        return {
            "nbgrader": {
                "schema_version": 3,
                "locked": False,
                "solution": False,
                "grade": False,
                "task": False,
                **kw,
            }
        }

    notebook = new_notebook(
        cells=[
            new_markdown_cell(f"# Lab\n{typo}", metadata=meta(grade_id="intro", locked=True)),
            new_code_cell(
                "def square(x):\n    ### BEGIN SOLUTION\n    return x * x  # secret-answer\n"
                "    ### END SOLUTION",
                metadata=meta(grade_id="square", solution=True),
            ),
            new_code_cell(
                "assert square(2) == 4\n### BEGIN HIDDEN TESTS\n"
                "assert square(7) == 49  # hidden-check\n### END HIDDEN TESTS",
                metadata=meta(grade_id="test_square", grade=True, points=2, locked=True),
            ),
        ]
    )
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nbformat.writes(notebook).encode()


def zip_of(entries: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = ((modes or {}).get(name, stat.S_IFREG | 0o644)) << 16
            archive.writestr(info, content)
    return buffer.getvalue()


def class_url(tool, activity_id: int) -> str:  # type: ignore[no-untyped-def]
    return f"{tool.url}/activities/{activity_id}/class"


def create(tool, browser, activity_id, filename, content, name="lab1"):  # type: ignore[no-untyped-def]
    return browser.post(
        f"{tool.url}/activities/{activity_id}/assignments",
        data={
            "csrf": csrf_of(browser, class_url(tool, activity_id)),
            "name": name,
            "title": f"Lab {name}",
            "max_score": "10",
        },
        files={"files": (filename, content)},
        allow_redirects=False,
    )


def assignment_of(rt, name: str) -> Assignment:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return session.scalars(select(Assignment).where(Assignment.name == name)).one()


def post(tool, browser, activity_id, assignment_id, action, **files):  # type: ignore[no-untyped-def]
    page = f"{tool.url}/activities/{activity_id}/assignments/{assignment_id}"
    return browser.post(
        f"{page}/{action}",
        data={"csrf": csrf_of(browser, page)},
        files=files or None,
        allow_redirects=False,
    )


def stored(rt) -> set[Path]:  # type: ignore[no-untyped-def]
    root = rt.settings.data_dir / "assignments"
    return set(root.rglob("*")) if root.exists() else set()


def home_of(rt, activity_id: int, sub: str) -> Path:  # type: ignore[no-untyped-def]
    from lti_tool.models import Activity

    with rt.sessions() as session:
        course_id = session.get_one(Activity, activity_id).course_id
    return rt.settings.data_dir / "homes" / f"course-{course_id}" / f"user-{user_id_of(rt, sub)}"


def published(tool, browser, rt, activity_id, name, filename, content) -> Assignment:  # type: ignore[no-untyped-def]
    response = create(tool, browser, activity_id, filename, content, name=name)
    assert response.status_code == 303, response.text[:500]
    assignment = assignment_of(rt, name)
    response = post(tool, browser, activity_id, assignment.id, "publish")
    assert response.status_code == 303, response.text[:500]
    return assignment_of(rt, name)


# -------------------------------------------------------------------------------- tests

BAD_UPLOADS = {
    "zip-slip": ("lab.zip", zip_of({"ok.ipynb": PLAIN, "../escape.py": b"x"}), 400, "leaving"),
    "absolute path": ("lab.zip", zip_of({"/etc/cron.d/evil": b"x"}), 400, "absolute"),
    "symlink": (
        "lab.zip",
        zip_of({"link": b"/etc/passwd"}, {"link": stat.S_IFLNK | 0o777}),
        400,
        "symbolic link",
    ),
    "device": ("lab.zip", zip_of({"dev": b""}, {"dev": stat.S_IFCHR | 0o644}), 400, "device"),
    "too many files": (
        "lab.zip",
        zip_of({f"f{i}.txt": b"x" for i in range(MAX_FILES + 1)}),
        400,
        "more than",
    ),
    "too deep": (
        "lab.zip",
        zip_of({"/".join(["d"] * (MAX_DEPTH + 1)) + "/f.txt": b"x", "top.txt": b"x"}),
        400,
        "deep",
    ),
    "zip bomb": ("lab.zip", zip_of({"zeros.bin": bytes(51 * 2**20)}), 400, "larger than"),
    "not a notebook": ("lab1.ipynb", b"{not json", 400, "not a Jupyter notebook"),
    "not a zip": ("lab.zip", b"PK\x03\x04 broken", 400, "cannot be read"),
    "other kind": ("lab.txt", b"hello", 400, ".ipynb"),
    "nbgrader notebook in a folder": (
        "lab.zip",
        zip_of({"a/lab.ipynb": nbgrader_source(), "b.txt": b"x"}),
        400,
        "top of the zip",
    ),
    "upload too large": ("lab.zip", bytes(21 * 2**20), 413, "larger than"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_a_refused_upload_changes_nothing(tool, platform, rt, browser, case):
    filename, content, status, reason = BAD_UPLOADS[case]
    _, activity_id = launch_teacher(platform, tool, browser)
    before = stored(rt)
    response = create(tool, browser, activity_id, filename, content, name="refused")
    assert response.status_code == status, response.text[:300]
    assert reason in response.text
    with rt.sessions() as session:
        assert session.scalar(select(func.count(Assignment.id))) == 0
    assert stored(rt) == before

    # Replacing an existing assignment's files with a bad upload keeps the old ones.
    good = create(tool, browser, activity_id, "lab1.ipynb", PLAIN, name="kept")
    assert good.status_code == 303, good.text[:300]
    kept = assignment_of(rt, "kept")
    before = stored(rt)
    response = post(tool, browser, activity_id, kept.id, "files", files=(filename, content))
    assert response.status_code == status and reason in response.text
    assert assignment_of(rt, "kept").source_path == kept.source_path
    assert stored(rt) == before


def test_nbgrader_source_is_published_without_solutions_or_hidden_tests(
    tool, platform, rt, browser
):
    _, activity_id = launch_teacher(platform, tool, browser)
    upload = zip_of(
        {
            "lab/square.ipynb": nbgrader_source(),
            "lab/data/points.csv": b"1,2\n",
            "lab/notes.ipynb": PLAIN,
        }
    )  # one folder: its content is the assignment
    assignment = published(tool, browser, rt, activity_id, "squares", "lab.zip", upload)
    assert assignment.source is AssignmentSource.nbgrader and assignment.published

    source, release = Path(assignment.source_path), Path(assignment.release_path)
    assert (
        source.parent == release.parent == rt.settings.data_dir / "assignments" / str(assignment.id)
    )
    assert stat.S_IMODE((rt.settings.data_dir / "assignments").stat().st_mode) == 0o700
    assert stat.S_IMODE(source.parent.stat().st_mode) == 0o700
    # The source keeps the solution (for the autograder); the student version does not.
    assert b"secret-answer" in (source / "square.ipynb").read_bytes()
    student = (release / "square.ipynb").read_text()
    for secret in ("BEGIN SOLUTION", "secret-answer", "BEGIN HIDDEN TESTS", "hidden-check"):
        assert secret not in student
    cells = json.loads(student)["cells"]
    assert "assert square(2) == 4" in "".join(cells[2]["source"])  # visible test kept
    assert "YOUR CODE HERE" in "".join(cells[1]["source"])
    # Other files go as they are.
    assert (release / "notes.ipynb").read_bytes() == PLAIN
    assert (release / "data" / "points.csv").read_bytes() == b"1,2\n"
    assert sorted(str(p.relative_to(release)) for p in release.rglob("*") if p.is_file()) == [
        "data/points.csv",
        "notes.ipynb",
        "square.ipynb",
    ]
    page = browser.get(f"{tool.url}/activities/{activity_id}/assignments/{assignment.id}").text
    assert "Release to class" in page and "Solutions and hidden tests stay" in page


def test_a_launch_puts_the_student_version_in_the_home_owned_by_the_student(
    tool, platform, rt, browser
):
    _, activity_id = launch_teacher(platform, tool, browser)
    assignment = published(
        tool, browser, rt, activity_id, "lab-launch", "square.ipynb", nbgrader_source()
    )
    launch_student(platform, tool, "4")
    run_worker_burst(rt.settings)  # the machine's start, then the release

    home = home_of(rt, activity_id, "4")
    notebook = home / "lab-launch" / "square.ipynb"
    assert notebook.is_file()
    text = notebook.read_text()
    assert "secret-answer" not in text and "hidden-check" not in text
    assert notebook.stat().st_uid == home.stat().st_uid
    assert notebook.parent.stat().st_uid == home.stat().st_uid
    if os.geteuid() == 0:  # as root, each student's IDE and home are their own OS user's
        assert pwd.getpwuid(home.stat().st_uid).pw_name == f"lp-{user_id_of(rt, '4')}"
    assert stat.S_IMODE(notebook.stat().st_mode) == 0o600
    with rt.sessions() as session:
        record = session.scalars(select(AssignmentRelease)).one()
        assert record.version == Path(assignment.release_path).name
        assert record.manifest.keys() == {"square.ipynb"}
    page = browser.get(f"{tool.url}/activities/{activity_id}/assignments/{assignment.id}").text
    received = page.split('id="received"')[1]
    assert "this version" in received and "1 added" in received


def test_rerelease_keeps_the_students_edit_and_updates_an_untouched_file(
    tool, platform, rt, browser
):
    _, activity_id = launch_teacher(platform, tool, browser)
    first = zip_of({"square.ipynb": nbgrader_source("Write `sqare`."), "notes.md": b"v1 typo\n"})
    assignment = published(tool, browser, rt, activity_id, "lab-typo", "lab.zip", first)
    launch_student(platform, tool, "5")
    run_worker_burst(rt.settings)
    folder = home_of(rt, activity_id, "5") / "lab-typo"
    assert (folder / "notes.md").read_bytes() == b"v1 typo\n"
    edited = (folder / "square.ipynb").read_text().replace("YOUR CODE HERE", "return x ** 2")
    (folder / "square.ipynb").write_text(edited)  # the student's work

    # The teacher fixes the typo in both files, publishes and releases to the class.
    fixed = zip_of(
        {
            "square.ipynb": nbgrader_source("Write `square`."),
            "notes.md": b"v2 fixed\n",
            "hints.md": b"new\n",
        }
    )
    assert (
        post(
            tool, browser, activity_id, assignment.id, "files", files=("lab.zip", fixed)
        ).status_code
        == 303
    )
    assert post(tool, browser, activity_id, assignment.id, "publish").status_code == 303
    assert post(tool, browser, activity_id, assignment.id, "release").status_code == 303
    run_worker_burst(rt.settings)

    assert (folder / "square.ipynb").read_text() == edited  # kept
    assert (folder / "notes.md").read_bytes() == b"v2 fixed\n"  # untouched: updated
    assert (folder / "hints.md").read_bytes() == b"new\n"  # added
    page = browser.get(f"{tool.url}/activities/{activity_id}/assignments/{assignment.id}").text
    received = page.split('id="received"')[1]
    assert "this version" in received
    assert "1 added, 1 updated, 1 kept as the student changed them" in received
    # The old student version is gone from the tool's side only after a later publish; the
    # source of the first upload is replaced.
    assert not Path(assignment.source_path).exists()


def test_a_learner_cannot_create_publish_or_release(tool, platform, rt, browser):
    teacher = browser
    _, activity_id = launch_teacher(platform, tool, teacher)
    assignment = published(tool, teacher, rt, activity_id, "lab1", "lab1.ipynb", PLAIN)
    student = launch_student(platform, tool, "4")
    token = session_csrf(student, rt.settings)
    base = f"{tool.url}/activities/{activity_id}/assignments"
    before = stored(rt)
    queued = rt.redis.llen(f"rq:queue:{rt.settings.queue_name}")
    answers = [
        student.post(
            base,
            data={"csrf": token, "name": "mine", "max_score": "10"},
            files={"files": ("x.ipynb", PLAIN)},
            allow_redirects=False,
        ),
        student.post(
            f"{base}/{assignment.id}/files",
            data={"csrf": token},
            files={"files": ("x.ipynb", PLAIN)},
            allow_redirects=False,
        ),
        student.post(
            f"{base}/{assignment.id}/publish", data={"csrf": token}, allow_redirects=False
        ),
        student.post(
            f"{base}/{assignment.id}/release", data={"csrf": token}, allow_redirects=False
        ),
        student.get(f"{base}/{assignment.id}", allow_redirects=False),
    ]
    assert [a.status_code for a in answers] == [403] * 5
    assert assignment_of(rt, "lab1").source_path == assignment.source_path
    assert assignment_of(rt, "lab1").release_path == assignment.release_path
    with rt.sessions() as session:
        assert session.scalar(select(func.count(Assignment.id))) == 1
        assert session.scalar(select(func.count(AssignmentRelease.id))) == 0
    assert stored(rt) == before
    assert rt.redis.llen(f"rq:queue:{rt.settings.queue_name}") == queued


def test_a_notebook_nbgrader_refuses_is_not_published_and_nothing_changes(
    tool, platform, rt, browser
):
    _, activity_id = launch_teacher(platform, tool, browser)
    good = published(tool, browser, rt, activity_id, "lab1", "square.ipynb", nbgrader_source())
    broken = json.loads(nbgrader_source())
    broken["cells"][2]["metadata"]["nbgrader"]["grade_id"] = "square"  # a duplicate id
    assert (
        post(
            tool,
            browser,
            activity_id,
            good.id,
            "files",
            files=("square.ipynb", json.dumps(broken).encode()),
        ).status_code
        == 303
    )
    before = stored(rt)
    response = post(tool, browser, activity_id, good.id, "publish")
    assert response.status_code == 422, response.text[:300]
    assert "nbgrader could not make the student version" in response.text
    after = assignment_of(rt, "lab1")
    assert (after.release_path, after.published_at) == (good.release_path, good.published_at)
    assert stored(rt) == before


# ------------------------------------------------------------------ git sources (https)


class _GitHost(http.server.BaseHTTPRequestHandler):
    """A git host at the process boundary: git's own smart-HTTP server (`git http-backend`,
    CGI) behind TLS."""

    root = ""

    def _serve(self) -> None:
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "PATH": os.environ["PATH"],
        }
        for name, value in self.headers.items():
            env["HTTP_" + name.upper().replace("-", "_")] = value
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=True
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        headers = [line.split(": ", 1) for line in head.decode().split("\r\n") if line]
        status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
        self.send_response(status)
        for key, value in headers:
            if key.lower() != "status":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def git_host(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A served folder of bare repositories; yields (base https URL, folder)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "host.pem", tmp_path / "host.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    repos = tmp_path / "repos"
    repos.mkdir()
    handler = type("Host", (_GitHost,), {"root": str(repos)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(
        "GIT_SSL_CAINFO", str(cert_file)
    )  # git trusts this host, as a CA bundle would
    yield f"https://127.0.0.1:{server.server_address[1]}", repos
    server.shutdown()
    server.server_close()


def push_repo(
    repos: Path, tmp_path: Path, files: dict[str, bytes], links: dict[str, str] | None = None
) -> None:
    """(Re)write course.git's branch `main` with `files` (and symlinks `links`)."""
    work = tmp_path / "work"
    if not work.exists():
        subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
        subprocess.run(["git", "init", "-q", "--bare", str(repos / "course.git")], check=True)
    for path, content in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(content)
    for path, target in (links or {}).items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, work / path)
    git = ["git", "-C", str(work), "-c", "user.name=T", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "content"], check=True)
    subprocess.run([*git, "push", "-q", "--force", str(repos / "course.git"), "main"], check=True)


def test_an_assignment_from_a_git_folder_is_published_and_fetched_again(
    tool, platform, rt, browser, git_host, tmp_path
):
    base, repos = git_host
    push_repo(
        repos,
        tmp_path,
        {
            "week1/square.ipynb": nbgrader_source("Write `sqare`."),
            "week1/data.csv": b"1\n",
            "week2/other.txt": b"not ours",
        },
    )
    _, activity_id = launch_teacher(platform, tool, browser)
    response = browser.post(
        f"{tool.url}/activities/{activity_id}/assignments",
        data={
            "csrf": csrf_of(browser, class_url(tool, activity_id)),
            "name": "week1",
            "max_score": "10",
            "git_url": f"{base}/course.git",
            "git_branch": "main",
            "git_folder": "week1",
        },
        allow_redirects=False,
    )
    assert response.status_code == 303, response.text[:500]
    assignment = assignment_of(rt, "week1")
    assert (assignment.git_url, assignment.git_branch, assignment.git_folder) == (
        f"{base}/course.git",
        "main",
        "week1",
    )
    assert sorted(p.name for p in Path(assignment.source_path).iterdir()) == [
        "data.csv",
        "square.ipynb",
    ]
    assert post(tool, browser, activity_id, assignment.id, "publish").status_code == 303
    release = Path(assignment_of(rt, "week1").release_path)
    assert "secret-answer" not in (release / "square.ipynb").read_text()

    # The teacher pushes a fix, then "Fetch again" takes it as the new source.
    push_repo(repos, tmp_path, {"week1/data.csv": b"1\n2\n"})
    assert post(tool, browser, activity_id, assignment.id, "git").status_code == 303
    assert (Path(assignment_of(rt, "week1").source_path) / "data.csv").read_bytes() == b"1\n2\n"

    # A link in the folder is refused, and the kept source does not change.
    push_repo(repos, tmp_path, {}, links={"week1/passwd": "/etc/passwd"})
    before = assignment_of(rt, "week1").source_path
    response = post(tool, browser, activity_id, assignment.id, "git")
    assert response.status_code == 400 and "symbolic link" in response.text
    assert assignment_of(rt, "week1").source_path == before


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"git_url": "file:///etc"}, "https://"),
        ({"git_url": "http://169.254.169.254/latest"}, "https://"),
        ({"git_url": "ext::sh -c touch% /tmp/pwned"}, "https://"),
        (
            {"git_url": "https://example.invalid/r.git", "git_branch": "--upload-pack=touch"},
            "branch",
        ),
        ({"git_url": "https://example.invalid/r.git", "git_folder": "../.."}, "leaving"),
    ],
)
def test_a_refused_git_source_changes_nothing(tool, platform, rt, browser, fields, reason):
    _, activity_id = launch_teacher(platform, tool, browser)
    before = stored(rt)
    response = browser.post(
        f"{tool.url}/activities/{activity_id}/assignments",
        data={
            "csrf": csrf_of(browser, class_url(tool, activity_id)),
            "name": "g",
            "max_score": "10",
            **fields,
        },
        allow_redirects=False,
    )
    assert response.status_code == 400 and reason in response.text, response.text[:300]
    with rt.sessions() as session:
        assert session.scalar(select(func.count(Assignment.id))) == 0
    assert stored(rt) == before
