"""The proxy's routing table in Redis: machine → (owner, IDE address, IDE token).

Written when a student is handed their machine, removed when the machine is released, so
the proxy's auth check needs no SQL. Redis is a cache here too: a route lost with Redis is
written again by the next hand-over (`/machines/<id>/open`), which the proxy sends a browser
to when its check fails.
"""

from __future__ import annotations

import contextlib
import time

import redis

ROUTE_KEY = "labpool:route:{}"
ACTIVITY_KEY = "labpool:activity:{}"


def publish_route(conn: redis.Redis, machine_id: int, owner_id: int, address: str, token: str) -> None:
    conn.hset(ROUTE_KEY.format(machine_id),
              mapping={"owner": owner_id, "address": address, "token": token})


def withdraw_route(conn: redis.Redis, machine_id: int) -> None:
    # Nothing to withdraw from a Redis that is gone.
    with contextlib.suppress(redis.RedisError):
        conn.delete(ROUTE_KEY.format(machine_id))


def last_activity(conn: redis.Redis, machine_id: int) -> float | None:
    """When the proxy last let a request through to the machine (epoch seconds)."""
    raw = conn.get(ACTIVITY_KEY.format(machine_id))
    return float(raw) if raw else None


def route_and_touch(conn: redis.Redis, machine_id: int) -> dict[bytes, bytes]:
    """The machine's route, recording the request as activity (one round trip)."""
    pipe = conn.pipeline(transaction=False)
    pipe.hgetall(ROUTE_KEY.format(machine_id))
    pipe.set(ACTIVITY_KEY.format(machine_id), int(time.time()), ex=7 * 24 * 3600)
    route, _ = pipe.execute()
    return route
