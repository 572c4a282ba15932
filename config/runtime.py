"""The per-process runtime: settings, database sessions and Redis, built once.

Web processes, RQ work horses and the CLI all get theirs here, so a forked worker builds its
own connections after the fork instead of sharing its parent's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session, sessionmaker

from config.db import session_factory
from config.redis import redis_for
from config.settings import Settings, load_settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis


def runtime_for(settings: Settings) -> Runtime:
    return Runtime(
        settings=settings,
        sessions=session_factory(settings.database_url),
        redis=redis_for(settings.effective_redis_url),
    )


@functools.cache
def _cached(pid: int) -> Runtime:
    return runtime_for(load_settings())


def current_runtime() -> Runtime:
    """This process's runtime, from the environment (rebuilt after a fork)."""
    return _cached(os.getpid())
