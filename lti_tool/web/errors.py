"""The web edge's errors, turned into short pages (or JSON) once, in `app.py`."""

from __future__ import annotations


class WebError(Exception):
    status = 400
    title = "Something is wrong with this request"

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class LaunchRejected(WebError):
    """An LTI message was refused; nothing was written."""

    title = "This launch was refused"


class NotSignedIn(WebError):
    status = 401
    title = "Open this activity from your course"


class Forbidden(WebError):
    status = 403
    title = "Not allowed"
