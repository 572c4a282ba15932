"""Small helpers to build JSON answers."""

from __future__ import annotations

import json
from typing import Any

from werkzeug.wrappers import Response

Reply = Response


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response; ``body=None`` gives an empty body (for 202/204)."""
    if body is None:
        return Response(b"", status=status, headers=headers or {})
    return Response(
        json.dumps(body), status=status, headers=headers or {}, content_type="application/json"
    )
