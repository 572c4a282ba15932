"""Logging for every Labpool process: one line per event, level from the settings.

`LOG_FORMAT=json` (the default when the public URL is https, and in the systemd units and
the compose file) writes one JSON object per line: `time`, `level`, `logger`, `message`,
`process`, and `request_id` when the event belongs to a web request or to a job that request
enqueued (the web edge takes a client's `X-Request-ID` or makes one; `provisioning.queue`
carries it into the job's meta; the worker puts it back while the job runs). `text` is the
readable one-line format of `./dev run`.

Either way every line goes through `redact`: JWTs (a launch's id_token, client assertions),
`token=`/`code=`/`state=`-like query parameters, bearer and basic credentials, and the
password of a URL become `[redacted]`. That is a net under the rule, not the rule: Labpool's
own log calls never pass a token, a cookie or a key.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime

from config.settings import Settings

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "labpool_request_id", default=None
)

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")

_SECRETS = [
    # a JWT (header.payload.signature, base64url): id_tokens, client assertions
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),
    # credentials in query strings and form bodies
    (
        re.compile(
            r"(?i)\b((?:id_|access_|refresh_|registration_|ide_)?token|code|state|nonce|"
            r"password|passwd|secret|client_assertion|lti_storage_target|_xsrf)"
            r"(=|%3D|\"?\s*:\s*\"?)([^&\s\"',;]+)"
        ),
        r"\1\2[redacted]",
    ),
    # Authorization headers
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 [redacted]"),
    # user:password@ in URLs
    (re.compile(r"(://[^/\s:@]+):[^@\s/]+@"), r"\1:[redacted]@"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def new_request_id(offered: str | None = None) -> str:
    """The client's X-Request-ID when it looks like one, else a fresh one."""
    if offered and _VALID_ID.match(offered):
        return offered
    return uuid.uuid4().hex


def set_request_id(value: str | None) -> contextvars.Token[str | None]:
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "process": record.process,
        }
        request_id = getattr(record, "request_id", None) or _request_id.get()
        if request_id:
            entry["request_id"] = request_id
        job = getattr(record, "job", None)
        if job:
            entry["job"] = job
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return redact(f"{line} [{request_id}]" if request_id else line)


def log_format(settings: Settings) -> str:
    return settings.log_format or ("json" if settings.is_production else "text")


def formatter_for(settings: Settings) -> logging.Formatter:
    return JsonFormatter() if log_format(settings) == "json" else TextFormatter()


def configure_logging(settings: Settings) -> None:
    """Root logging for this process: one handler on stderr in the chosen format (set up
    again, not added twice, when called again)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(settings))
    handler.addFilter(_RequestIdFilter())
    handler._labpool = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_labpool", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def request_id_filter() -> logging.Filter:
    """The filter that puts the current request id on each record (for other handlers)."""
    return _RequestIdFilter()
