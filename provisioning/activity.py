"""When a machine was last used: one rule for the idle release (`provisioning/idle.py`),
the teacher's "stop idle" action and the class page, so that what the class page shows is
what the idle rules act on.

The signals, cheapest first:

- the database: when the machine was handed to its student (`assigned_at`), and
  `last_activity_at` (set by a claim and by the hand-over to the IDE);
- the proxy: its Redis activity key, written by every request it lets through to the
  machine's owner (`provisioning/proxy_table.py`);
- the IDE itself: Jupyter's `/api/status` (`last_activity`; a connected browser counts as
  now). It sees what the proxy cannot — a kernel computing, a terminal running — but costs a
  network call, so it is asked only when the cheap signals already say idle, before a machine
  is taken away; never to draw the class page.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import redis

from provisioning.ide_http import ide_status
from provisioning.models import Machine, MachineState
from provisioning.proxy_table import last_activity as proxied_activity

PARALLEL_IDE_CALLS = 16  # a class of 300 idle machines: seconds, not minutes, of 2 s probes


def recorded_activity(machine: Machine, proxied: float | None) -> datetime | None:
    """The latest of the database's signals and the proxy's (epoch seconds, or None)."""
    handed = machine.assigned_at or (
        machine.state_changed_at if machine.state is MachineState.assigned else None
    )
    seen = [t for t in (handed, machine.last_activity_at) if t is not None]
    if proxied:
        seen.append(datetime.fromtimestamp(proxied, UTC))
    return max(seen, default=None)


def last_activity(conn: redis.Redis, machine: Machine) -> datetime | None:
    """When the machine was last used, as far as the database and the proxy know."""
    return recorded_activity(machine, proxied_activity(conn, machine.id))


def ide_activity(machine: Machine, now: datetime) -> datetime | None:
    """When the IDE last saw its user, by its own report; `now` while a browser is
    connected; None if it does not answer with a report (a code-server has none)."""
    if not machine.address or not machine.ide_token:
        return None
    status = ide_status(machine.address, f"/ide/{machine.id}/", machine.ide_token)
    if status is None:
        return None
    if status.get("connections"):
        return now
    try:
        reported = datetime.fromisoformat(str(status.get("last_activity")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return reported if reported.tzinfo else reported.replace(tzinfo=UTC)


def is_idle(conn: redis.Redis, machine: Machine, now: datetime, idle_for: timedelta) -> bool:
    """Nothing happened on the machine for longer than `idle_for`: the cheap signals say so,
    and the IDE, asked last, does not say otherwise."""
    seen = last_activity(conn, machine)
    if seen is not None and now - seen <= idle_for:
        return False
    reported = ide_activity(machine, now)
    return reported is None or now - reported > idle_for


def idle_among(
    conn: redis.Redis,
    machines: Sequence[Machine],
    now: datetime,
    idle_for: dict[int, timedelta] | timedelta,
) -> list[Machine]:
    """The machines that are idle (`is_idle`), asking their IDEs in parallel. `idle_for`
    is one timeout, or one per machine id."""

    def idle(machine: Machine) -> bool:
        limit = idle_for if isinstance(idle_for, timedelta) else idle_for[machine.id]
        return is_idle(conn, machine, now, limit)

    if not machines:
        return []
    with ThreadPoolExecutor(min(PARALLEL_IDE_CALLS, len(machines))) as pool:
        verdicts = list(pool.map(idle, machines))
    return [m for m, verdict in zip(machines, verdicts, strict=True) if verdict]
