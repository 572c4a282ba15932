"""Deep linking: a teacher adds a Labpool activity from Moodle's "Select content".

LTI Deep Linking 2.0 (https://www.imsglobal.org/spec/lti-dl/v2p0):
- §4.4 the request's `deep_linking_settings` claim (`accept_types`, `deep_link_return_url`,
  `data`), read and checked by `read_request` before anything is written;
- §4.2 the `LtiDeepLinkingResponse` the tool POSTs back as form field `JWT`, signed with the
  tool's active key (`kid` in the header), `iss` = our client id, `aud` = the platform's
  issuer, the request's `data` echoed unchanged, and the content items (§3.1 `ltiResourceLink`
  with a §3.1.1 `lineItem`, so Moodle creates the activity's grade item);
- a cancelled selection is a response with no content items (§4.2: "may be empty").

The response is built on pylti1p3's `DeepLink` (claims, signing). Where it falls short, this
module closes the gap: its resource has no `text` (`LabpoolResource` adds it), it sends
`"data": null` when the request had none (dropped here: §4.2 echoes `data` only "if present"),
and its auto-submit form puts the return URL into HTML unescaped (the web edge renders its
own, escaped, form).

The chosen environment travels in the content item's `custom` parameters and comes back in
every resource-link launch of the new activity (LTI Core §5.4.6, read by
`lti_tool.launches.record_launch`). Moodle lower-cases custom parameter names and turns
anything but letters and digits into `_` (mod/lti/locallib.php `lti_map_keyname`), so the
names here are already in that form.

No Flask here: the web edge (`lti_tool/web/deep_link_routes.py`) drives it.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis
from pylti1p3.deep_link import DeepLink
from pylti1p3.deep_link_resource import DeepLinkResource
from pylti1p3.lineitem import LineItem
from sqlalchemy.orm import Session

from config.db import upsert, utcnow
from jwks.keys import SigningKey
from lti_tool.framing import origin_of
from lti_tool.models import Course, Enrolment, User
from lti_tool.services.connector import ServiceRegistration

CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
DL_SETTINGS = "https://purl.imsglobal.org/spec/lti-dl/claim/deep_linking_settings"
DL_DATA = "https://purl.imsglobal.org/spec/lti-dl/claim/data"
DL_CONTENT_ITEMS = "https://purl.imsglobal.org/spec/lti-dl/claim/content_items"
RESOURCE_LINK_TYPE = "ltiResourceLink"

# Custom parameter names, already as Moodle stores them (lower case, `_` only).
CUSTOM_ENVIRONMENT = "labpool_environment"
CUSTOM_ASSIGNMENT = "labpool_assignment"
LINE_ITEM_TAG = "labpool"

# How long a teacher may take on the selection page before the request is forgotten.
PENDING_LIFETIME_S = 3600
PENDING_KEY = "labpool:deep-link:"
MAX_SCORE = 10_000.0


class DeepLinkingRefused(Exception):
    """The request or the teacher's choice cannot be answered; the message says why."""


@dataclass(frozen=True)
class DeepLinkingRequest:
    """What the response needs of a validated `LtiDeepLinkingRequest`, kept (in Redis) while
    the teacher chooses. `has_data` tells an absent `data` from one that is JSON null."""

    platform_id: int
    issuer: str
    client_id: str
    deployment_id: str
    return_url: str
    has_data: bool
    data: Any
    user_id: int
    course_id: int
    title: str
    text: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeepLinkingRequest:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class DeepLinkSettings:
    """The parts of §4.4's settings claim the tool acts on."""

    return_url: str
    has_data: bool
    data: Any
    title: str
    text: str


def read_settings(claims: Mapping[str, Any], issuer: str) -> DeepLinkSettings:
    """Check the request's deep-linking settings (§4.4) or raise DeepLinkingRefused.

    Labpool answers with one `ltiResourceLink`, so `accept_types` must include it; the return
    URL must be an http(s) URL on the platform's own origin (the issuer is its wwwroot), so
    a forged request cannot make the tool post a signed response to a third party."""
    settings = claims.get(DL_SETTINGS)
    if not isinstance(settings, dict):
        raise DeepLinkingRefused("The deep linking request has no deep_linking_settings claim.")
    accept_types = settings.get("accept_types")
    if not isinstance(accept_types, list) or RESOURCE_LINK_TYPE not in accept_types:
        raise DeepLinkingRefused(
            "The platform does not accept LTI resource links (accept_types must include "
            f"{RESOURCE_LINK_TYPE!r}), which is the only content Labpool offers."
        )
    return_url = settings.get("deep_link_return_url")
    platform_origin = origin_of(issuer)
    if not isinstance(return_url, str) or origin_of(return_url) is None:
        raise DeepLinkingRefused(
            "The deep linking request's deep_link_return_url is not an http(s) URL."
        )
    if origin_of(return_url) != platform_origin:
        raise DeepLinkingRefused(
            "The deep linking request's deep_link_return_url is not on the platform's own "
            f"site (expected an address under {platform_origin})."
        )
    title, text = settings.get("title"), settings.get("text")
    return DeepLinkSettings(
        return_url=return_url,
        has_data="data" in settings,
        data=settings.get("data"),
        title=title[:255] if isinstance(title, str) else "",
        text=text[:2000] if isinstance(text, str) else "",
    )


def record_request_context(
    session: Session, platform_id: int, claims: Mapping[str, Any]
) -> tuple[int, int]:
    """Upsert the teacher, the course and the enrolment of a deep-linking request (there is
    no resource link yet: Moodle creates the activity after the response). Returns
    (user id, course id). Not the hot path: one statement per row."""
    # Imported here: `launches` imports this module for the custom parameters' names.
    from lti_tool.launches import NO_CONTEXT, _text, claim_id, claim_object, claim_roles

    roles = claim_roles(claims)
    context = claim_object(claims, CLAIM + "context")
    name, email = _text(claims.get("name")), _text(claims.get("email"))
    user_id = upsert(
        session,
        User,
        keys={"issuer": claims["iss"], "sub": claim_id(claims.get("sub"), "user id (sub)")},
        values={"name": name, "email": email, "last_seen_at": utcnow()},
        keep_if_null=("name", "email"),
    )
    course_id = upsert(
        session,
        Course,
        keys={
            "platform_id": platform_id,
            "context_id": claim_id(context.get("id", NO_CONTEXT), "context id"),
        },
        values={
            "label": _text(context.get("label")) or "",
            "title": _text(context.get("title"), 1000) or "",
        },
    )
    upsert(
        session,
        Enrolment,
        keys={"course_id": course_id, "user_id": user_id},
        values={"roles": roles, "ended_at": None, "name": name, "email": email},
    )
    return user_id, course_id


# --------------------------------------------------------------------------- pending requests


def save_pending(conn: redis.Redis, request: DeepLinkingRequest) -> str:
    """Keep the request while the teacher chooses; returns the unguessable id of its page."""
    token = secrets.token_urlsafe(24)
    conn.set(PENDING_KEY + token, request.to_json(), ex=PENDING_LIFETIME_S)
    return token


def load_pending(conn: redis.Redis, token: str) -> DeepLinkingRequest | None:
    raw = conn.get(PENDING_KEY + token)
    return None if raw is None else DeepLinkingRequest.from_json(raw)


def consume_pending(conn: redis.Redis, token: str) -> bool:
    """Forget the request; True for the one caller that removed it (one response each)."""
    return conn.delete(PENDING_KEY + token) == 1


# --------------------------------------------------------------------------- the response


class LabpoolResource(DeepLinkResource):
    """pylti1p3's resource link with §3.1's `text` (its own has no description)."""

    def __init__(self) -> None:
        self._text: str | None = None

    def set_text(self, value: str) -> LabpoolResource:
        self._text = value
        return self

    def to_dict(self) -> dict[str, object]:
        item = super().to_dict()
        if self._text:
            item["text"] = self._text
        return item


def score_maximum(raw: str) -> float:
    """The grade item's maximum as the teacher typed it: a positive number (§3.1.1)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DeepLinkingRefused("The maximum grade must be a number.") from None
    if not math.isfinite(value) or not 0 < value <= MAX_SCORE:
        raise DeepLinkingRefused(f"The maximum grade must be above 0 and at most {MAX_SCORE:g}.")
    return int(value) if value.is_integer() else value


def assignment_resource_id(assignment_id: int) -> str:
    """The `resourceId` of an assignment's grade item, wherever it is made: in a deep-linking
    answer's `lineItem` (Moodle makes the activity's grade item from it) or by
    grading.lineitems in the course's container. One name, so finding an assignment's item by
    `resourceId` finds the deep-linked one too."""
    return f"labpool-assignment-{assignment_id}"


def resource_link(
    *,
    launch_url: str,
    title: str,
    text: str,
    environment_id: int,
    score_max: float,
    assignment_id: int | None = None,
) -> LabpoolResource:
    """The one content item: a resource link to the tool's launch URL whose custom parameters
    name the environment (and assignment) by id, with the line item Moodle turns into the
    activity's grade item (§3.1.1: `scoreMaximum`, `label`, `resourceId`, `tag`)."""
    custom = {CUSTOM_ENVIRONMENT: str(environment_id)}
    resource_id = f"environment-{environment_id}"
    if assignment_id is not None:
        custom[CUSTOM_ASSIGNMENT] = str(assignment_id)
        resource_id = assignment_resource_id(assignment_id)
    line_item = (
        LineItem()
        .set_score_maximum(score_max)
        .set_label(title)
        .set_resource_id(resource_id)
        .set_tag(LINE_ITEM_TAG)
    )
    resource = LabpoolResource().set_text(text)
    resource.set_title(title).set_url(launch_url).set_custom_params(custom).set_lineitem(line_item)
    return resource


def response_jwt(
    request: DeepLinkingRequest, key: SigningKey, items: list[DeepLinkResource]
) -> str:
    """The signed `LtiDeepLinkingResponse` (§4.2) for `items` (none: the teacher cancelled)."""
    registration = (
        ServiceRegistration(key.kid)
        .set_issuer(request.issuer)
        .set_client_id(request.client_id)
        .set_tool_private_key(key.private_pem)
    )
    settings: dict[str, Any] = {
        "deep_link_return_url": request.return_url,
        "accept_types": [RESOURCE_LINK_TYPE],
        "accept_presentation_document_targets": [],
    }
    if request.has_data:
        settings["data"] = request.data
    deep_link = DeepLink(registration, request.deployment_id, settings)  # type: ignore[arg-type]
    message = deep_link.get_message_jwt(items)
    if not request.has_data:
        message.pop(DL_DATA, None)
    return deep_link.encode_jwt(message)


# --------------------------------------------------------------------------- the launches after


def id_in_custom(claims: Mapping[str, Any], name: str) -> int | None:
    """The id a deep-linked activity's custom parameter `name` carries (LTI Core §5.4.6), or
    None when it is absent or not a plain id (ignored: the activity keeps its default). At
    most 9 digits, so it always fits the database's integer columns."""
    custom = claims.get(CLAIM + "custom")
    value = custom.get(name) if isinstance(custom, dict) else None
    if isinstance(value, str) and 0 < len(value) <= 9 and value.isascii() and value.isdigit():
        return int(value)
    return None
