"""gunicorn's configuration from Labpool's settings: `gunicorn -c python:lti_tool.gunicorn_conf
wsgi:app` (deploy/Procfile, the systemd unit, the container) binds `LABPOOL_LISTEN` (default:
the public URL's host and port) with `LABPOOL_WEB_WORKERS` workers, and tells
prometheus_client when a worker dies. Command-line flags still win over these."""

from __future__ import annotations

import gc
from typing import Any

from config.settings import load_settings
from lti_tool.metrics import mark_process_dead

_settings = load_settings()

bind = [f"{_settings.listen_host}:{_settings.listen_port}"]
workers = _settings.web_workers
threads = 4
# The tool writes its own access line per request (lti_tool/web/ops_routes.py), without the
# query string: gunicorn's would carry registration links and tokens.
accesslog = None
loglevel = "warning"
# Workers are recycled now and then: a slow leak in a dependency never grows for weeks.
max_requests = 5000
max_requests_jitter = 500
timeout = 60
graceful_timeout = 30


def post_worker_init(_worker: Any) -> None:
    """The app and its libraries, loaded by now, live as long as the worker: frozen, the
    garbage collector stops walking them in every full collection (0.6 ms of a launch's CPU
    before, 0.02 after: bench/launch_profile.py's "garbage collector" row)."""
    gc.collect()
    gc.freeze()


def child_exit(_server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)
