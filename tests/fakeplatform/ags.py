"""Moodle's Assignment and Grade Services (``mod/lti/service/gradebookservices``) for the
fake platform: line items and scores, behaving as Moodle 4.3 does (docs/moodle.md, "Grades").

* ``GET|POST …/services.php/<course>/lineitems?type_id=<id>`` — the line items container:
  GET (Accept ``…lineitemcontainer+json``, scope ``lineitem.readonly`` — Moodle does not let
  ``lineitem`` alone read) filters by ``resource_id`` / ``resource_link_id`` / ``tag``; POST
  (Content-Type ``…lineitem+json``, scope ``lineitem``) needs ``label`` and ``scoreMaximum``.
* ``POST …/lineitems/<item>/lineitem/scores?type_id=<id>`` — Content-Type
  ``…score+json``, scope ``score``: 400 without ``userId``, ``timestamp``,
  ``activityProgress`` or ``gradingProgress``; 409 when the timestamp is not strictly newer
  than the stored grade's; ``scoreGiven`` only counts with ``FullyGraded`` and is rescaled to
  the item's maximum; ``comment`` becomes the feedback.

A test reads the gradebook (``grade(user)``, ``accepted`` — every score taken, in order) and
breaks the platform: ``down(status)`` answers every AGS call with that status until ``up()``;
``lose_answers(n)`` stores the next n scores and then answers 502, as a proxy that lost
Moodle's answer would (the tool never learns it worked); ``on_score`` is called with each score before it is stored (a test may
block it to kill a worker mid-POST).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Request, Response

from .claims import SCOPE_AGS_LINEITEM, SCOPE_AGS_LINEITEM_READONLY, SCOPE_AGS_SCORE

if TYPE_CHECKING:
    from .platform import FakePlatform

SCORE_TYPE = "application/vnd.ims.lis.v1.score+json"
LINEITEM_TYPE = "application/vnd.ims.lis.v2.lineitem+json"
LINEITEMS_TYPE = "application/vnd.ims.lis.v2.lineitemcontainer+json"
REQUIRED = ("userId", "timestamp", "activityProgress", "gradingProgress")

_LINEITEMS = re.compile(r"/([^/]+)/lineitems")
_LINEITEM = re.compile(r"/([^/]+)/lineitems/([^/]+)/lineitem")
_SCORES = re.compile(r"/([^/]+)/lineitems/([^/]+)/lineitem/scores")


class FakeGradebook:
    def __init__(self, platform: FakePlatform) -> None:
        self._platform = platform
        self._lock = threading.RLock()
        self._next_id = 100
        #: (course, item id) → the line item as Moodle shows it (without ``id``).
        self.lineitems: dict[tuple[str, str], dict[str, Any]] = {}
        #: (course, item id, user id) → the stored grade: score, timestamp, comment, grade.
        self.grades: dict[tuple[str, str, str], dict[str, Any]] = {}
        #: Every score taken, in order: the posted body plus ``course`` and ``item``.
        self.accepted: list[dict[str, Any]] = []
        #: Every score POST, whatever came of it: ``(status, body)``.
        self.score_posts: list[tuple[int, dict[str, Any]]] = []
        self.on_score: Callable[[dict[str, Any]], None] | None = None
        self._down: int | None = None
        self._lose = 0
        # The captured launches' grade item (course 2, item 2), maximum 100 as Moodle's default.
        self.lineitems[("2", "2")] = {
            "label": "LTI 1.3 Test Activity",
            "scoreMaximum": 100,
            "resourceId": "",
            "resourceLinkId": "",
            "tag": "",
        }

    # ----------------------------------------------------------------- test controls

    def add_lineitem(
        self,
        course: str,
        item_id: str,
        *,
        label: str = "Item",
        score_maximum: float = 100,
        resource_id: str = "",
        resource_link_id: str = "",
        tag: str = "",
    ) -> str:
        with self._lock:
            self.lineitems[(str(course), str(item_id))] = {
                "label": label,
                "scoreMaximum": score_maximum,
                "resourceId": resource_id,
                "resourceLinkId": resource_link_id,
                "tag": tag,
            }
        return self.lineitem_url(course, item_id)

    def lineitem_url(self, course: str, item_id: str, type_id: str = "1") -> str:
        return (
            f"{self._platform.url}{self._platform.SERVICES_PATH}/{course}/lineitems/"
            f"{item_id}/lineitem?type_id={type_id}"
        )

    def grade(self, user_id: str, course: str = "2", item_id: str = "2") -> dict[str, Any] | None:
        with self._lock:
            return self.grades.get((str(course), str(item_id), str(user_id)))

    def down(self, status: int = 503) -> None:
        with self._lock:
            self._down = status

    def up(self) -> None:
        with self._lock:
            self._down = None

    def lose_answers(self, n: int = 1) -> None:
        with self._lock:
            self._lose = n

    # ----------------------------------------------------------------- services.php

    def handles(self, path: str) -> bool:
        return any(p.fullmatch(path) for p in (_LINEITEMS, _LINEITEM, _SCORES))

    def endpoint(
        self,
        request: Request,
        path: str,
        error: Callable[..., Response],
        allows: Callable[[Request, str, str], bool],
    ) -> Response:
        type_id = request.args.get("type_id", "")
        with self._lock:
            down = self._down
        if down is not None:
            return error(request, down, "injected by FakeGradebook.down")
        if (m := _SCORES.fullmatch(path)) is not None:
            if request.method != "POST" or request.headers.get("Content-Type", "") != SCORE_TYPE:
                return error(request, 400, f"No handler found for {path}")
            if not allows(request, type_id, SCOPE_AGS_SCORE):
                return error(request, 401)
            return self._score(request, m.group(1), m.group(2))
        if (m := _LINEITEMS.fullmatch(path)) is not None:
            if request.method == "GET":
                if request.headers.get("Accept", "") not in (LINEITEMS_TYPE, "*/*", ""):
                    return error(request, 400, f"No handler found for {path}")
                if not allows(request, type_id, SCOPE_AGS_LINEITEM_READONLY):
                    return error(request, 401)
                return self._list(request, m.group(1), type_id)
            if request.method == "POST":
                if request.headers.get("Content-Type", "") != LINEITEM_TYPE:
                    return error(request, 400, f"No handler found for {path}")
                if not allows(request, type_id, SCOPE_AGS_LINEITEM):
                    return error(request, 401)
                return self._create(request, m.group(1), type_id, error)
            return error(request, 405)
        if (m := _LINEITEM.fullmatch(path)) is not None and request.method == "GET":
            if not allows(request, type_id, SCOPE_AGS_LINEITEM_READONLY):
                return error(request, 401)
            with self._lock:
                item = self.lineitems.get((m.group(1), m.group(2)))
            if item is None:
                return error(request, 404)
            return _json(
                {"id": self.lineitem_url(m.group(1), m.group(2), type_id), **item}, LINEITEM_TYPE
            )
        return error(request, 400, f"No handler found for {path}")

    def _list(self, request: Request, course: str, type_id: str) -> Response:
        wanted = {
            "resourceId": request.args.get("resource_id"),
            "resourceLinkId": request.args.get("resource_link_id"),
            "tag": request.args.get("tag"),
        }
        with self._lock:
            items = [
                {"id": self.lineitem_url(c, i, type_id), **item}
                for (c, i), item in self.lineitems.items()
                if c == course and all(v is None or item.get(k) == v for k, v in wanted.items())
            ]
        return _json(items, LINEITEMS_TYPE)

    def _create(
        self, request: Request, course: str, type_id: str, error: Callable[..., Response]
    ) -> Response:
        try:
            body = json.loads(request.get_data(as_text=True))
        except ValueError:
            return error(request, 400, "Incorrect format")
        if (
            not isinstance(body, dict)
            or not body.get("label")
            or not isinstance(body.get("scoreMaximum"), (int, float))
        ):
            return error(request, 400, "Incorrect format")
        with self._lock:
            self._next_id += 1
            item_id = str(self._next_id)
        self.add_lineitem(
            course,
            item_id,
            label=body["label"],
            score_maximum=body["scoreMaximum"],
            resource_id=str(body.get("resourceId", "")),
            resource_link_id=str(body.get("resourceLinkId", "")),
            tag=str(body.get("tag", "")),
        )
        with self._lock:
            item = self.lineitems[(course, item_id)]
        return _json(
            {"id": self.lineitem_url(course, item_id, type_id), **item}, LINEITEM_TYPE, status=201
        )

    def _score(self, request: Request, course: str, item_id: str) -> Response:
        from .platform import _service_error as error

        try:
            body = json.loads(request.get_data(as_text=True))
        except ValueError:
            body = None
        if not isinstance(body, dict) or any(k not in body for k in REQUIRED):
            self._log(400, body)
            return error(request, 400, "Incorrect score received")
        try:
            stamp = datetime.fromisoformat(str(body["timestamp"]).replace("Z", "+00:00"))
            if stamp.tzinfo is None:
                raise ValueError("no time zone")
        except ValueError:
            self._log(400, body)
            return error(request, 400, "Incorrect score received")
        with self._lock:
            item = self.lineitems.get((course, item_id))
        if item is None:
            self._log(404, body)
            return error(request, 404)
        if self.on_score is not None:
            self.on_score(body)
        user = str(body["userId"])
        with self._lock:
            stored = self.grades.get((course, item_id, user))
            # Moodle compares whole seconds (timemodified is an integer).
            if stored is not None and int(stored["timestamp"].timestamp()) >= int(
                stamp.timestamp()
            ):
                self._log(409, body)
                return error(
                    request,
                    409,
                    f"Refusing score with an earlier timestamp for item {item_id} and user {user}",
                )
            graded = body["gradingProgress"] == "FullyGraded" and "scoreGiven" in body
            maximum = float(body.get("scoreMaximum", 1) or 1)
            self.grades[(course, item_id, user)] = {
                "timestamp": stamp,
                "comment": body.get("comment", ""),
                "score_given": body.get("scoreGiven") if graded else None,
                "grade": float(body["scoreGiven"]) / maximum * item["scoreMaximum"]
                if graded
                else None,
            }
            self.accepted.append({**body, "course": course, "item": item_id})
            self._log(200, body)
            lose, self._lose = self._lose > 0, max(self._lose - 1, 0)
        if lose:
            return error(request, 502, "Bad Gateway (answer lost after the score was stored)")
        return Response("", 200)

    def _log(self, status: int, body: Any) -> None:
        with self._lock:
            self.score_posts.append((status, body if isinstance(body, dict) else {}))


def _json(body: Any, content_type: str, status: int = 200) -> Response:
    return Response(json.dumps(body), status, content_type=f"{content_type}; charset=utf-8")
