"""The proxy's routing table in Redis: machine → (owner, IDE address, IDE token).

Written when a student is handed their machine, removed when the machine is released, so
the proxy's auth check needs no SQL. Redis is a cache here too: a route lost with Redis is
written again by the next hand-over (`/machines/<id>/open`), which the proxy sends a browser
to when its check fails.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import redis

ROUTE_KEY = "labpool:route:{}"
ACTIVITY_KEY = "labpool:activity:{}"
# A route lives this long past the last request through it: a route left behind by a stop
# that raced a hand-over cannot outlive its machine for long, and a live machine's route is
# renewed by every request (and written again by the hand-over page after a pause).
ROUTE_TTL_S = 3600


def publish_route(
    conn: redis.Redis,
    machine_id: int,
    owner_id: int,
    address: str,
    token: str,
    ide_kind: str = "jupyterlab",
) -> None:
    key = ROUTE_KEY.format(machine_id)
    pipe = conn.pipeline()
    pipe.hset(
        key,
        mapping={
            "owner": owner_id,
            "address": address,
            "token": token,
            # code-server has no base URL: the proxy passes it the path below /ide/<id>.
            "strip": "1" if ide_kind == "code-server" else "0",
        },
    )
    pipe.expire(key, ROUTE_TTL_S)
    pipe.execute()


def withdraw_route(conn: redis.Redis, machine_id: int) -> None:
    # Nothing to withdraw from a Redis that is gone.
    with contextlib.suppress(redis.RedisError):
        conn.delete(ROUTE_KEY.format(machine_id))


def last_activity(conn: redis.Redis, machine_id: int) -> float | None:
    """When the proxy last let a request through to the machine (epoch seconds)."""
    raw = conn.get(ACTIVITY_KEY.format(machine_id))
    return float(raw) if raw else None


# Read the route and, only if the asker owns the machine, record the activity and renew the
# route: one round trip, and a refused request never counts as someone working.
_ROUTE_AND_TOUCH = """
local route = redis.call('HGETALL', KEYS[1])
if #route > 0 and redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', 604800)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return route
"""


@functools.lru_cache(maxsize=8)
def _route_script(conn: redis.Redis) -> Any:
    return conn.register_script(_ROUTE_AND_TOUCH)  # sent once, then run by its SHA


def route_for_owner(conn: redis.Redis, machine_id: int, owner_id: int) -> dict[bytes, bytes]:
    """The machine's route (empty if released); records activity when `owner_id` owns it."""
    script = _route_script(conn)
    flat = script(
        keys=[ROUTE_KEY.format(machine_id), ACTIVITY_KEY.format(machine_id)],
        args=[str(owner_id), int(time.time()), ROUTE_TTL_S],
    )
    return dict(zip(flat[::2], flat[1::2], strict=True))
