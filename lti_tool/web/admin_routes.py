"""The admin page (/admin): platforms and deployments, tool keys, environments and pools,
machines in error, failed scores and roster syncs. Open to a session that an admin launch
(institution or system Administrator role) or an admin token (`labpool admin-token`)
started; every route checks it on the server (`require_admin`) and every POST carries the
session's CSRF token. Each action calls the service code its CLI twin calls (named on each
route); what the page shows comes from lti_tool.admin."""

from __future__ import annotations

import logging
from datetime import timedelta

from flask import Blueprint, flash, redirect, render_template, request, url_for
from sqlalchemy import select

from config.db import transaction
from jwks.keys import rotate_keys
from lti_tool.admin import (
    AdminTokenRefused,
    ScoreNotResendable,
    course_rows,
    overview,
    redeem_admin_token,
    send_failed_score_again,
)
from lti_tool.models import Platform
from lti_tool.registration_links import RegistrationLinks
from lti_tool.registrations import (
    RegistrationError,
    removal_preview,
    remove_platform,
    set_platform_disabled,
    stop_removed_machines,
)
from lti_tool.web.app import ROW_ID_MAX
from lti_tool.web.auth import check_csrf, csrf_token, require_admin, runtime, sign_in_admin
from lti_tool.web.errors import WebError
from provisioning.backends import BACKENDS
from provisioning.course_access import set_environment_courses
from provisioning.environments import (
    LIMIT_FIELDS,
    EnvironmentRejected,
    add_secured_environment,
    edit_environment,
    retire_environment,
)
from provisioning.models import Environment
from provisioning.queue import enqueue
from provisioning.triggers import reconcile_soon

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__)

REGISTRATION_LINK_S = 24 * 3600


def _int(name: str, *, required: bool = False) -> int | None:
    """An integer field of the form; empty: None (left as it is)."""
    raw = request.form.get(name, "").strip()
    if not raw:
        if required:
            raise WebError(f"{name.replace('_', ' ')} is needed.")
        return None
    try:
        value = int(raw)
    except ValueError:
        raise WebError(f"{name.replace('_', ' ')} must be a whole number, not {raw!r}.") from None
    if abs(value) > ROW_ID_MAX:  # an INTEGER column holds no more
        raise WebError(f"{name.replace('_', ' ')} must be at most {ROW_ID_MAX}, not {raw!r}.")
    return value


def _text(name: str) -> str | None:
    return request.form.get(name, "").strip() or None


def _platform(platform_id: int) -> tuple[str, str]:
    with runtime().sessions() as session:
        platform = session.get(Platform, platform_id)
        if platform is None:
            raise WebError("No such platform (removed meanwhile?).", 404)
        return platform.issuer, platform.client_id


def _back() -> object:
    return redirect(url_for("admin.page"), 303)


@bp.get("/admin")
def page():  # type: ignore[no-untyped-def]
    require_admin()
    return _render()


def _render(link: str | None = None) -> str:
    with runtime().sessions() as session:
        view = overview(session)
    return render_template(
        "admin.html", view=view, csrf=csrf_token(), backends=sorted(BACKENDS), link=link
    )


@bp.get("/admin/token/<token>")
def open_token(token: str):  # type: ignore[no-untyped-def]
    """The link `labpool admin-token` prints: once, then an admin session in this browser."""
    rt = runtime()
    try:
        redeem_admin_token(rt.settings, rt.redis, token)
    except AdminTokenRefused as exc:
        raise WebError(str(exc), 403) from None
    sign_in_admin()
    log.info("admin session opened with an admin token")
    return _back()


@bp.post("/admin/platforms/<int:platform_id>/disable")
def disable_platform(platform_id: int):  # type: ignore[no-untyped-def]
    """Twin: `labpool platform disable`."""
    return _set_disabled(platform_id, disabled=True)


@bp.post("/admin/platforms/<int:platform_id>/enable")
def enable_platform(platform_id: int):  # type: ignore[no-untyped-def]
    """Twin: `labpool platform enable`."""
    return _set_disabled(platform_id, disabled=False)


def _set_disabled(platform_id: int, *, disabled: bool):  # type: ignore[no-untyped-def]
    require_admin()
    check_csrf()
    issuer, client_id = _platform(platform_id)
    try:
        with transaction(runtime().sessions) as session:
            set_platform_disabled(session, issuer=issuer, client_id=client_id, disabled=disabled)
    except RegistrationError as exc:
        raise WebError(str(exc)) from None
    flash(
        f"{issuer} (client {client_id}) {'disabled' if disabled else 'enabled'}: "
        "web processes take it within 30 s."
    )
    return _back()


@bp.get("/admin/platforms/<int:platform_id>/remove")
def confirm_removal(platform_id: int):  # type: ignore[no-untyped-def]
    """The confirmation: what the removal takes, counted (nothing changes here)."""
    require_admin()
    issuer, client_id = _platform(platform_id)
    with runtime().sessions() as session:
        try:
            removal, live = removal_preview(session, issuer=issuer, client_id=client_id)
        except RegistrationError as exc:
            raise WebError(str(exc)) from None
    return render_template(
        "admin_remove.html", platform_id=platform_id, removal=removal, live=live, csrf=csrf_token()
    )


@bp.post("/admin/platforms/<int:platform_id>/remove")
def remove(platform_id: int):  # type: ignore[no-untyped-def]
    """Twin: `labpool platform remove [--force]`."""
    require_admin()
    check_csrf()
    if request.form.get("confirm") != "remove":
        raise WebError("Tick the confirmation to remove the platform.")
    issuer, client_id = _platform(platform_id)
    rt = runtime()
    try:
        with transaction(rt.sessions) as session:
            removal = remove_platform(
                session,
                issuer=issuer,
                client_id=client_id,
                force=request.form.get("force") == "1",
            )
    except RegistrationError as exc:
        raise WebError(str(exc), 409) from None
    stop_removed_machines(rt, removal)
    flash(f"Removed {removal.issuer} (client {removal.client_id}): {removal.summary()}.")
    return _back()


@bp.post("/admin/keys/rotate")
def rotate():  # type: ignore[no-untyped-def]
    """Twin: `labpool keys rotate` (the default grace, KEY_GRACE_S)."""
    require_admin()
    check_csrf()
    rt = runtime()
    grace = timedelta(seconds=rt.settings.key_grace_s)
    with transaction(rt.sessions) as session:
        key = rotate_keys(session, rt.settings.secret_key, grace)
        kid = key.kid
    flash(f"The active key is now {kid}; the old one stays published for {grace}.")
    return _back()


@bp.post("/admin/registration-link")
def registration_link():  # type: ignore[no-untyped-def]
    """Twin: `labpool registration-link` (24 h)."""
    require_admin()
    check_csrf()
    rt = runtime()
    link = RegistrationLinks(rt.redis).create(REGISTRATION_LINK_S)
    # Shown once, in this answer (not in a redirect's URL, which access logs keep).
    return _render(link=rt.settings.url(f"/lti/register/{link.token}"))


@bp.post("/admin/environments")
def add_environment():  # type: ignore[no-untyped-def]
    """Twin: `labpool env add`."""
    require_admin()
    check_csrf()
    rt = runtime()
    name = (_text("name") or "").strip()
    options: dict[str, object] = {
        "backend": _text("backend") or rt.settings.backend,
        "ide_kind": _text("ide_kind") or "jupyterlab",
        "image_id": _text("image_id"),
        "flavor_id": _text("flavor_id"),
        "network_id": _text("network_id"),
        "security_groups": [],
    }
    for field in ("idle_timeout_s", "warm_target", "max_size", *LIMIT_FIELDS):
        value = _int(field)
        if value is not None:
            options[field] = value
    try:
        added, backend, _ = add_secured_environment(rt.sessions, rt.settings, name=name, **options)
    except EnvironmentRejected as exc:
        raise WebError(str(exc)) from None
    flash(f"Environment {added} ({backend}) added.")
    return _back()


@bp.get("/admin/environments/<int:environment_id>")
def environment_form(environment_id: int):  # type: ignore[no-untyped-def]
    require_admin()
    with runtime().sessions() as session:
        view = overview(session)
    env = next((e for e in view.environments if e.id == environment_id), None)
    if env is None:
        raise WebError("No such environment.", 404)
    pool = next((p for p in view.pools if p.environment == env.name), None)
    with runtime().sessions() as session:
        courses = course_rows(session)
    return render_template(
        "admin_environment.html",
        env=env,
        pool=pool,
        courses=courses,
        chosen={c.id for c in env.courses or []},
        csrf=csrf_token(),
    )


@bp.post("/admin/environments/<int:environment_id>")
def edit(environment_id: int):  # type: ignore[no-untyped-def]
    """Twin: `labpool env edit`."""
    require_admin()
    check_csrf()
    rt = runtime()
    with rt.sessions() as session:
        name = session.scalar(select(Environment.name).where(Environment.id == environment_id))
    if name is None:
        raise WebError("No such environment.", 404)
    changes = {
        "idle_timeout_s": _int("idle_timeout_s"),
        "warm_target": _int("warm_target"),
        "max_size": _int("max_size"),
        "image_id": _text("image_id"),
        "flavor_id": _text("flavor_id"),
        **{field: _int(field) for field in LIMIT_FIELDS},
    }
    try:
        with transaction(rt.sessions) as session:
            result = edit_environment(session, name, **changes)  # type: ignore[arg-type]
    except EnvironmentRejected as exc:
        raise WebError(str(exc)) from None
    if result.pool_id is not None:
        reconcile_soon(rt, result.pool_id)
    flash(result.summary() + ".")
    return _back()


@bp.post("/admin/environments/<int:environment_id>/retire")
def retire(environment_id: int):  # type: ignore[no-untyped-def]
    """Twin: `labpool env retire` (retired=1) and `labpool env restore` (retired=0)."""
    require_admin()
    check_csrf()
    retired = request.form.get("retired") == "1"
    rt = runtime()
    with rt.sessions() as session:
        name = session.scalar(select(Environment.name).where(Environment.id == environment_id))
    if name is None:
        raise WebError("No such environment.", 404)
    try:
        with transaction(rt.sessions) as session:
            retire_environment(session, name, retired=retired)
    except EnvironmentRejected as exc:
        raise WebError(str(exc)) from None
    flash(f"environment {name} {'retired' if retired else 'back in use'}.")
    return _back()


@bp.post("/admin/environments/<int:environment_id>/courses")
def environment_courses(environment_id: int):  # type: ignore[no-untyped-def]
    """Twin: `labpool env courses NAME --all` (access=all) and `labpool env courses NAME
    COURSE_ID...` (access=listed, the ticked course_id boxes)."""
    require_admin()
    check_csrf()
    access = request.form.get("access")
    if access not in ("all", "listed"):
        raise WebError("Choose “every course” or “only the courses ticked”.")
    course_ids: list[int] | None = None
    if access == "listed":
        course_ids = []
        for raw in request.form.getlist("course_id"):
            raw = raw.strip()
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
                raise WebError(f"course id must be a course's number, not {raw[:40]!r}.")
            course_ids.append(int(raw))
    rt = runtime()
    with rt.sessions() as session:
        name = session.scalar(select(Environment.name).where(Environment.id == environment_id))
    if name is None:
        raise WebError("No such environment.", 404)
    try:
        with transaction(rt.sessions) as session:
            result = set_environment_courses(session, name, course_ids)
    except EnvironmentRejected as exc:
        raise WebError(str(exc)) from None
    flash(result.summary() + " (every web process within 10 s).")
    return _back()


@bp.post("/admin/scores/<int:row_id>/send")
def send_again(row_id: int):  # type: ignore[no-untyped-def]
    """Twin: `labpool scores send-again` (the teacher's "send again" underneath)."""
    from grading.outbox import SEND_JOB

    require_admin()
    check_csrf()
    rt = runtime()
    try:
        with transaction(rt.sessions) as session:
            new_id = send_failed_score_again(session, row_id)
    except ScoreNotResendable as exc:
        raise WebError(str(exc)) from None
    enqueue(rt.redis, rt.settings.queue_name, SEND_JOB, new_id)
    flash(f"Score {row_id} is owed again (as {new_id}); a worker sends it.")
    return _back()
