"""An assignment's files on the web (issue 11, items 2 and 3): the teacher uploads them (with
the new assignment on the class page, or later on its page to replace them), publishes the
student version (nbgrader's generate_assignment for nbgrader source notebooks), and releases
it to the whole class; students also get it at each launch (grading.release_jobs).

Every route is the course's instructors' only (`taught_activity`) and carries the session's
CSRF token. An upload is checked whole before anything is written; a refusal is a 4xx with
the reason and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, flash, redirect, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge

from config.db import transaction, utcnow
from grading.assignment_files import (
    MAX_UPLOAD_BYTES,
    UploadRejected,
    assignments_root,
    read_upload,
    remove_folder,
    write_folder,
)
from grading.git_source import check_source, fetch
from grading.models import Assignment, AssignmentRelease, AssignmentSource
from grading.publish import PublishFailed, check_uploadable, is_current, nbgrader_notebooks, publish
from grading.release_jobs import RELEASE_TO_CLASS_JOB, enqueue_release
from lti_tool.models import Activity
from lti_tool.web.auth import check_csrf, runtime, taught_activity
from lti_tool.web.errors import WebError
from lti_tool.web.rate_limits import check_rate_limit

bp = Blueprint("release", __name__)
# Publishing runs nbgrader (seconds of CPU): counted with the other teacher actions.
bp.before_request(lambda: check_rate_limit("teacher", "teacher_action_rate_limit"))
FORM_ALLOWANCE = 64 * 1024  # the form's other fields and the multipart framing


def accept_upload_size() -> None:
    """Raise the request's size limit for an upload (the app's is 256 KB), and answer one that
    is too large with a readable 413. Call before anything reads the form."""
    request.max_content_length = MAX_UPLOAD_BYTES + FORM_ALLOWANCE
    try:
        request.form  # noqa: B018 - parses the body now, under the raised limit
    except RequestEntityTooLarge:
        raise WebError(f"The upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB.", 413) from None


@dataclass(frozen=True)
class NewFiles:
    """An assignment's files as the teacher sent them: an upload, or a git folder's."""

    files: dict[str, bytes]
    git: tuple[str, str, str] | None = None  # (url, branch, folder)


def incoming_files(required: bool) -> NewFiles | None:
    """The checked files of the form: its `files` upload or its `git_url` (+ `git_branch`,
    `git_folder`), not both (None when neither was sent and none is required); a refusal is
    a 400 with the reason. Call outside any transaction: a clone takes seconds."""
    upload = request.files.get("files")
    has_upload = upload is not None and bool(upload.filename)
    git_url = request.form.get("git_url", "").strip()
    if has_upload and git_url:
        raise WebError("Upload files or name a git repository, not both.")
    try:
        if git_url:
            git = check_source(
                git_url, request.form.get("git_branch", ""), request.form.get("git_folder", "")
            )
            new = NewFiles(fetch(*git), git)
        elif has_upload:
            assert upload is not None and upload.filename
            new = NewFiles(read_upload(upload.filename, upload.read(MAX_UPLOAD_BYTES + 1)))
        elif required:
            raise WebError("Choose a notebook (.ipynb) or a zip to upload.")
        else:
            return None
        check_uploadable(new.files)
    except UploadRejected as exc:
        raise WebError(f"The files were refused: {exc}") from None
    return new


def keep_source(data_dir: Path, assignment: Assignment, new: NewFiles) -> Path:
    """Write the files into the assignment's tool-side folder and point the row at it (the
    caller commits; on failure it removes the returned folder)."""
    folder = write_folder(assignments_root(data_dir) / str(assignment.id), "source", new.files)
    assignment.source_path = str(folder)
    assignment.source = (
        AssignmentSource.nbgrader if nbgrader_notebooks(new.files) else AssignmentSource.files
    )
    assignment.git_url, assignment.git_branch, assignment.git_folder = new.git or (None, None, None)
    return folder


def _replace_source(activity_id: int, assignment_id: int, new: NewFiles) -> None:
    rt = runtime()
    folder = None
    try:
        with transaction(rt.sessions) as session:
            _, assignment = _assignment(session, activity_id, assignment_id)
            old_source = assignment.source_path
            folder = keep_source(rt.settings.data_dir, assignment, new)
    except BaseException:
        remove_folder(folder)
        raise
    remove_folder(old_source)
    flash(f"{len(new.files)} files kept. Publish them to make the student version.")


def _assignment(
    session: Session, activity_id: int, assignment_id: int
) -> tuple[Activity, Assignment]:
    activity = taught_activity(session, activity_id)
    assignment = session.get(Assignment, assignment_id)
    if assignment is None or assignment.activity_id != activity.id:
        raise WebError("No such assignment in this activity.", 404)
    return activity, assignment


def _back(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    return redirect(
        url_for("grading.assignment_page", activity_id=activity_id, assignment_id=assignment_id),
        303,
    )


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/files")
def replace_files(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """New files for the assignment (a fixed typo), uploaded or from git: kept as the source;
    students get them once published."""
    accept_upload_size()
    check_csrf()
    with runtime().sessions() as session:
        _assignment(session, activity_id, assignment_id)  # who asks, before reading files
    new = incoming_files(required=True)
    assert new is not None
    _replace_source(activity_id, assignment_id, new)
    return _back(activity_id, assignment_id)


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/git")
def fetch_again(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """Fetch a git assignment's folder again (the teacher pushed a fix)."""
    check_csrf()
    with runtime().sessions() as session:
        _, assignment = _assignment(session, activity_id, assignment_id)
        if not assignment.git_url:
            raise WebError("This assignment's files were uploaded, not taken from git.", 409)
        git = (assignment.git_url, assignment.git_branch or "main", assignment.git_folder or "")
    try:
        new = NewFiles(fetch(*git), git)
        check_uploadable(new.files)
    except UploadRejected as exc:
        raise WebError(f"The files were refused: {exc}") from None
    _replace_source(activity_id, assignment_id, new)
    return _back(activity_id, assignment_id)


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/publish")
def publish_assignment(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """Make the student version of the current files (nbgrader's generate_assignment for
    nbgrader notebooks). Students get it at their next launch, or with "release to class"."""
    check_csrf()
    rt = runtime()
    with rt.sessions() as session:
        _, assignment = _assignment(session, activity_id, assignment_id)
        source_path, old_release = assignment.source_path, assignment.release_path
    if not source_path:
        raise WebError("Upload the assignment's files before publishing.", 409)
    source = Path(source_path)
    try:
        release = publish(source.parent, source)
    except PublishFailed as exc:
        raise WebError(f"Not published: {exc}", 422) from None
    except FileNotFoundError:
        raise WebError("The files changed while publishing; publish again.", 409) from None
    with transaction(rt.sessions) as session:
        assignment = session.get_one(Assignment, assignment_id, with_for_update=True)
        if assignment.source_path != source_path:
            remove_folder(release)
            raise WebError("The files changed while publishing; publish again.", 409)
        assignment.release_path = str(release)
        assignment.published_at = utcnow()
    # The release before the previous one can go: a release job still reading the previous
    # one (it read the row just before) finishes with it.
    for stale in source.parent.glob("release-of-*"):
        if str(stale) not in (str(release), old_release):
            remove_folder(stale)
    flash(
        "Published: students get it when they next open the activity, or press "
        '"Release to class" now.'
    )
    return _back(activity_id, assignment_id)


@bp.post("/activities/<int:activity_id>/assignments/<int:assignment_id>/release")
def release_to_class(activity_id: int, assignment_id: int):  # type: ignore[no-untyped-def]
    """Place the published student version in every learner's home (a job; the page shows
    who received it)."""
    check_csrf()
    rt = runtime()
    with rt.sessions() as session:
        _, assignment = _assignment(session, activity_id, assignment_id)
        if not assignment.published or not assignment.release_path:
            raise WebError("Publish the assignment before releasing it.", 409)
        current = is_current(assignment.source_path, assignment.release_path)
    if not enqueue_release(rt, RELEASE_TO_CLASS_JOB, assignment_id):
        raise WebError("The job queue is not reachable; try again in a minute.", 503)
    flash(
        "Releasing to the class: the table below fills in as homes receive it."
        + (
            ""
            if current
            else " (The newest upload is not published yet: this releases the published version.)"
        )
    )
    return _back(activity_id, assignment_id)


def release_overview(session: Session, assignment: Assignment) -> dict:
    """What the assignment page's release section shows."""
    rows = {
        r.user_id: r
        for r in session.scalars(
            select(AssignmentRelease).where(AssignmentRelease.assignment_id == assignment.id)
        )
    }
    return {
        "rows": rows,
        "version": Path(assignment.release_path).name if assignment.release_path else None,
        "current": is_current(assignment.source_path, assignment.release_path),
        "has_files": bool(assignment.source_path),
    }
