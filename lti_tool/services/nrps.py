"""Roster sync with LTI Names and Role Provisioning Services 2.0
(https://www.imsglobal.org/spec/lti-nrps/v2p0), through pylti1p3, from the stored
registration, so it runs in a worker with no launch at hand.

Moodle pages only when `limit` is given and lists current members only (all `Active`):
someone absent from the roster has left, and their enrolment is ended — except a user whose
launch into the course carried a staff role within a launch session (Moodle's site admins
and category managers launch as Administrator without being enrolled): the roster never
takes away what their launch granted, nor counts them as students. The whole roster is
fetched before anything is written: a failed page changes nothing, and the failure is kept
on the course (what failed, when, what to do) for the teacher's class page; the next
success clears it. Names and emails are stored on the enrolment as the roster carries them.

The platform's access token comes from the shared connector (`lti_tool/services/connector.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypedDict
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from pylti1p3.exception import LtiException, LtiServiceException
from pylti1p3.names_roles import NamesRolesProvisioningService
from pylti1p3.service_connector import ServiceConnector
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config.db import transaction, upsert_many, utcnow
from config.runtime import Runtime, current_runtime
from lti_tool import metrics
from lti_tool.launches import LAUNCH_SESSION_S, staff_launches
from lti_tool.models import Course, Enrolment, Platform, User
from lti_tool.roles import is_staff
from lti_tool.services.connector import CachedTokenConnector, connector_for

log = logging.getLogger(__name__)

NRPS_SCOPE = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"
PAGE_SIZE = 100
MAX_PAGES = 1000  # a platform whose "next" never ends does not hold a worker forever


class RosterError(Exception):
    """The roster could not be read; nothing was changed. `advice` tells a teacher what to do."""

    def __init__(self, message: str, advice: str = ""):
        super().__init__(message)
        self.advice = advice

    def for_teacher(self) -> str:
        return f"{self}. {self.advice}".strip() if self.advice else f"{self}."


class Member(TypedDict, total=False):
    user_id: str
    roles: list[str]
    status: str
    name: str
    email: str


@dataclass(frozen=True)
class SyncReport:
    members: int
    ended: int
    pages: int


def with_limit(url: str, limit: int) -> str:
    """The memberships URL asking for pages of `limit` (Moodle pages only when asked)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "limit"]
    query.append(("limit", str(limit)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def fetch_roster(
    connector: ServiceConnector, memberships_url: str, page_size: int = PAGE_SIZE
) -> tuple[list[Member], int]:
    """Every member, all pages or none (RosterError)."""
    service = NamesRolesProvisioningService(connector, {"context_memberships_url": memberships_url})
    url: str | None = with_limit(memberships_url, page_size)
    seen: set[str] = set()
    members: list[Member] = []
    pages = 0
    retried = False
    while url:
        if url in seen or pages >= MAX_PAGES:
            raise RosterError(
                f"the platform's roster pages do not end (at page {pages})",
                "Tell the site administrator: the platform's roster paging is broken.",
            )
        try:
            page, next_url = service.get_members_page(url)
        except LtiServiceException as exc:
            status = exc.response.status_code
            if status == 401 and not retried and isinstance(connector, CachedTokenConnector):
                # A cached token the platform dropped early (tool type re-saved): ask once more.
                connector.forget_access_token([NRPS_SCOPE])
                retried = True
                continue
            raise _refusal(exc, pages + 1) from exc
        except (LtiException, requests.RequestException, ValueError) as exc:
            raise RosterError(
                f"the platform did not answer the roster request (page {pages + 1}): {exc}",
                "Labpool tries again at the next hourly sync, or press “Sync roster now”.",
            ) from exc
        seen.add(url)
        url = next_url
        pages += 1
        if not isinstance(page, list):
            raise RosterError(f"roster page {pages} is not a list of members")
        members.extend(_valid_member(m, pages) for m in page)
    return [m for m in members if m.get("status", "Active") == "Active"], pages


def _refusal(exc: LtiServiceException, page: int) -> RosterError:
    """A refusal by the platform, said so that a teacher (or the admin they ask) can act."""
    status = exc.response.status_code
    if "access token" in str(exc):
        return RosterError(
            f"the platform refused Labpool an access token (HTTP {status})",
            "Ask the site administrator to check, in Moodle's “Manage tools”, that this tool "
            "is active and its “Public keyset” URL is Labpool's /lti/jwks.json.",
        )
    if status in (401, 403):
        return RosterError(
            f"the platform refused the roster request (HTTP {status}, page {page})",
            "Ask the site administrator to turn on “IMS LTI Names and Role Provisioning” for "
            "this tool in Moodle; Labpool tries again at the next sync.",
        )
    if status == 404:
        return RosterError(
            f"the platform no longer knows this course's roster (HTTP 404, page {page})",
            "Open the activity again from the course page: the launch brings the current "
            "roster address.",
        )
    return RosterError(
        f"the platform failed to answer the roster request (HTTP {status}, page {page})",
        "Labpool tries again at the next hourly sync, or press “Sync roster now”.",
    )


def _valid_member(raw: Any, page: int) -> Member:
    if not isinstance(raw, dict) or not isinstance(raw.get("user_id"), str) or not raw["user_id"]:
        raise RosterError(f"roster page {page} has a member without a user_id")
    roles = raw.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise RosterError(f"roster page {page}: member {raw['user_id']!r} has malformed roles")
    member: Member = {
        "user_id": raw["user_id"],
        "roles": roles,
        "status": raw.get("status", "Active"),
    }
    for name in ("name", "email"):
        if isinstance(raw.get(name), str) and raw[name]:
            member[name] = raw[name][:255]  # type: ignore[literal-required]
    return member


def apply_roster(session: Session, course: Course, issuer: str, members: list[Member]) -> int:
    """Upsert users and enrolments; end the enrolments of those no longer listed, except
    staff whose launch session is still running. Returns how many enrolments ended."""
    now = utcnow()
    members = list({m["user_id"]: m for m in members}.values())  # a platform may repeat one
    user_ids = upsert_many(
        session,
        User,
        ("issuer", "sub"),
        [
            {
                "issuer": issuer,
                "sub": m["user_id"],
                "name": m.get("name"),
                "email": m.get("email"),
                "last_seen_at": now,
            }
            for m in members
        ],
        update_columns=("name", "email"),
        keep_if_null=("name", "email"),
    )
    staff = staff_launches(session, course.id, now - timedelta(seconds=LAUNCH_SESSION_S))
    upsert_many(
        session,
        Enrolment,
        ("course_id", "user_id"),
        # The roster is this registration's word on names now: a name it no longer shares
        # is cleared. A staff launcher listed as a learner keeps the launch's roles.
        [
            {
                "course_id": course.id,
                "user_id": uid,
                "ended_at": None,
                "started_at": now,
                "roles": m["roles"] if is_staff(m["roles"]) or uid not in staff else staff[uid],
                "name": m.get("name"),
                "email": m.get("email"),
            }
            for uid, m in zip(user_ids, members, strict=True)
        ],
        update_columns=("roles", "ended_at", "name", "email"),
    )
    kept = set(user_ids) | set(staff)
    ended = session.execute(
        update(Enrolment)
        .where(
            Enrolment.course_id == course.id,
            Enrolment.ended_at.is_(None),
            Enrolment.user_id.notin_(kept) if kept else True,
        )
        .values(ended_at=now)
        .execution_options(synchronize_session=False)
    )
    return ended.rowcount


def record_platform_error(rt: Runtime, course_id: int, message: str) -> None:
    """Keep a failed platform call on the course, for the teacher's class page."""
    with transaction(rt.sessions) as session:
        course = session.get(Course, course_id)
        if course is not None:
            course.platform_error = message[:2000]
            course.platform_error_at = utcnow()


@metrics.counted(metrics.ROSTER_SYNCS, lambda _report: "ok")
def sync_course(rt: Runtime, course_id: int, page_size: int = PAGE_SIZE) -> SyncReport:
    """Read the whole roster and apply it; a failure is recorded on the course and raised."""
    try:
        with rt.sessions() as session:
            course = session.get(Course, course_id)
            if course is None:
                raise RosterError("the course no longer exists")
            if not course.memberships_url:
                raise RosterError(
                    "the platform does not share this course's roster with Labpool",
                    "Ask the site administrator to turn on “IMS LTI Names and Role "
                    "Provisioning” for this tool in Moodle, then open the activity again.",
                )
            platform = session.get_one(Platform, course.platform_id)
            connector = connector_for(session, rt, platform)
            url, issuer = course.memberships_url, platform.issuer
        members, pages = fetch_roster(connector, url, page_size)
    except RosterError as exc:
        log.warning("course %s roster sync failed: %s", course_id, exc)
        record_platform_error(rt, course_id, f"Roster sync failed: {exc.for_teacher()}")
        raise
    with transaction(rt.sessions) as session:
        course = session.get_one(Course, course_id)
        ended = apply_roster(session, course, issuer, members)
        course.roster_synced_at = utcnow()
        course.platform_error = course.platform_error_at = None
    report = SyncReport(members=len(members), ended=ended, pages=pages)
    log.info("course %s roster synced: %s", course_id, report)
    return report


def sync_course_job(course_id: int) -> str:
    """RQ job: sync one course's roster."""
    return str(sync_course(current_runtime(), course_id))


def sync_all_courses_job() -> int:
    """RQ cron job: queue a sync for every course with a roster service."""
    from provisioning.queue import enqueue

    rt = current_runtime()
    with rt.sessions() as session:
        ids = session.scalars(select(Course.id).where(Course.memberships_url.is_not(None))).all()
    for course_id in ids:
        enqueue(rt.redis, rt.settings.queue_name, SYNC_JOB, course_id)
    return len(ids)


SYNC_JOB = "lti_tool.services.nrps.sync_course_job"
