"""Grades to the platform with LTI Assignment and Grade Services 2.0
(https://www.imsglobal.org/spec/lti-ags/v2p0): post a score to a line item (§3.4, Score
publish service) and find or create a line item in the activity's container (§3.2), on the
shared token connector (`lti_tool/services/connector.py`).

Moodle's rules (docs/moodle.md, "Grades"; `mod/lti/service/gradebookservices`):
- a line item's id carries a query string (`…/lineitem?type_id=1`): `/scores` goes into the
  path, the query string stays;
- a score needs `userId`, `timestamp`, `activityProgress` and `gradingProgress`, else 400;
- a timestamp not strictly newer than the stored grade's is a 409 (the caller picks a newer
  one; retrying unchanged cannot succeed);
- `lineitem.readonly` must be asked for explicitly, even next to `lineitem`, before Moodle
  answers GETs (hypothesis/lms's `_v13.py` does the same);
- Moodle's reason for a refusal is in the HTTP status line's reason phrase.

Nothing here touches the database: the caller (grading.outbox) decides what is owed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
from pylti1p3.exception import LtiServiceException

from lti_tool.services.connector import CachedTokenConnector

SCOPE = "https://purl.imsglobal.org/spec/lti-ags/scope/"
SCORE_SCOPE = SCOPE + "score"
LINEITEM_SCOPE = SCOPE + "lineitem"
LINEITEM_READONLY_SCOPE = SCOPE + "lineitem.readonly"
SCORE_TYPE = "application/vnd.ims.lis.v1.score+json"
LINEITEM_TYPE = "application/vnd.ims.lis.v2.lineitem+json"
LINEITEMS_TYPE = "application/vnd.ims.lis.v2.lineitemcontainer+json"
TIMEOUT_S = (5, 30)  # connect, read: a hung platform must not hold a worker


class AgsError(Exception):
    """The platform did not take the request. `status` is its HTTP status (None: no answer —
    network error or timeout); `retryable` says whether the same request may work later."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status >= 500 or self.status == 429

    @property
    def conflict(self) -> bool:
        return self.status == 409


@dataclass(frozen=True)
class Score:
    user_id: str  # the platform's user id (the launch's `sub`)
    score_given: float
    score_maximum: float
    comment: str
    timestamp: datetime  # whole seconds, timezone-aware


def score_body(score: Score) -> dict[str, Any]:
    """The score JSON Moodle takes: every required field, a graded result, the feedback."""
    body: dict[str, Any] = {
        "userId": score.user_id,
        "timestamp": score.timestamp.isoformat(timespec="seconds"),
        "activityProgress": "Completed",
        "gradingProgress": "FullyGraded",
        "scoreGiven": score.score_given,
        "scoreMaximum": score.score_maximum,
    }
    if score.comment:
        body["comment"] = score.comment
    return body


def scores_url(lineitem_url: str) -> str:
    """The line item's scores endpoint: `/scores` appended to the path, the query kept."""
    parts = urlsplit(lineitem_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/scores"))


def token_scopes(granted: list[str] | None) -> list[str]:
    """What to ask the token for: the AGS scopes the launch's claim granted, with
    `lineitem.readonly` added wherever `lineitem` is (Moodle answers GETs only then)."""
    granted = granted or []
    wanted = [s for s in (SCORE_SCOPE, LINEITEM_SCOPE, LINEITEM_READONLY_SCOPE) if s in granted]
    if LINEITEM_SCOPE in wanted and LINEITEM_READONLY_SCOPE not in wanted:
        wanted.append(LINEITEM_READONLY_SCOPE)
    return wanted


def _platform_message(response: requests.Response) -> str:
    """What the platform said: Moodle's services.php answers `{"status", "reason", …}` (and
    puts the reason in the status line); others, some text."""
    said = ""
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("reason"), str):
            said = body["reason"]
    except ValueError:
        pass
    said = said or (response.text or "").strip().replace("\n", " ") or (response.reason or "")
    return f"HTTP {response.status_code}" + (f": {said[:300]}" if said else "")


class AgsClient:
    """One platform registration's grade service, with the scopes its launch granted."""

    def __init__(self, connector: CachedTokenConnector, granted_scopes: list[str] | None):
        self.connector = connector
        self.scopes = token_scopes(granted_scopes)

    def _request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        content_type: str = "",
        accept: str = "application/json",
    ) -> requests.Response:
        """One call with a bearer token; a 401 drops the cached token and tries once more
        (the platform may have dropped it early: tool type re-saved)."""
        if SCORE_SCOPE not in self.scopes and LINEITEM_SCOPE not in self.scopes:
            raise AgsError(
                "the platform does not let Labpool send grades for this activity "
                "(no AGS score scope in the launch)",
                status=403,
            )
        for attempt in (1, 2):
            try:
                token = self.connector.get_access_token(self.scopes)
            except LtiServiceException as exc:
                status = exc.response.status_code
                raise AgsError(
                    "the platform refused Labpool an access token "
                    f"({_platform_message(exc.response)})",
                    status=status,
                ) from exc
            except (requests.RequestException, ValueError, KeyError) as exc:
                raise AgsError(
                    f"no answer from the platform's token endpoint: {type(exc).__name__}"
                ) from exc
            headers = {"Authorization": f"Bearer {token}", "Accept": accept}
            if content_type:
                headers["Content-Type"] = content_type
            try:
                response = self.connector.http.request(
                    method,
                    url,
                    headers=headers,
                    data=json.dumps(body) if body is not None else None,
                    timeout=TIMEOUT_S,
                )
            except requests.RequestException as exc:
                raise AgsError(f"no answer from the platform: {type(exc).__name__}") from exc
            if response.status_code == 401 and attempt == 1:
                self.connector.forget_access_token(self.scopes)
                continue
            if not response.ok:
                raise AgsError(
                    f"the platform refused: {_platform_message(response)}",
                    status=response.status_code,
                )
            return response
        raise AssertionError("unreachable")

    def post_score(self, lineitem_url: str, score: Score) -> None:
        """Publish one score (§3.4). Raises AgsError; `conflict` on Moodle's 409."""
        self._request(
            "POST", scores_url(lineitem_url), body=score_body(score), content_type=SCORE_TYPE
        )

    def can_manage_lineitems(self) -> bool:
        return LINEITEM_SCOPE in self.scopes

    def find_or_create_lineitem(
        self,
        lineitems_url: str,
        *,
        resource_id: str,
        label: str,
        score_maximum: float,
        resource_link_id: str | None,
    ) -> str:
        """The line item tagged `resource_id` in the container, created if missing (§3.2).
        Looking first makes a retry after a lost answer find the item it created."""
        parts = urlsplit(lineitems_url)
        query = parts.query + ("&" if parts.query else "") + urlencode({"resource_id": resource_id})
        found = self._request("GET", urlunsplit(parts._replace(query=query)), accept=LINEITEMS_TYPE)
        try:
            items = found.json()
        except ValueError as exc:
            raise AgsError("the platform's line items are not JSON", status=502) from exc
        for item in items if isinstance(items, list) else []:
            if (
                isinstance(item, dict)
                and item.get("resourceId") == resource_id
                and isinstance(item.get("id"), str)
            ):
                return item["id"]
        body: dict[str, Any] = {
            "scoreMaximum": score_maximum,
            "label": label[:255] or resource_id,
            "resourceId": resource_id,
            "tag": "labpool",
        }
        if resource_link_id:
            body["resourceLinkId"] = resource_link_id
        created = self._request(
            "POST", lineitems_url, body=body, content_type=LINEITEM_TYPE, accept=LINEITEM_TYPE
        )
        try:
            item_id = created.json().get("id")
        except (ValueError, AttributeError) as exc:
            raise AgsError("the platform's new line item is not JSON", status=502) from exc
        if not isinstance(item_id, str) or not item_id:
            raise AgsError("the platform's new line item has no id", status=502)
        return item_id
