"""Enqueueing provisioning work on RQ. Jobs are triggers only: the database holds what is
wanted, so a lost job is found again (see `nudge_if_stale` and, later, the reconciler)."""

from __future__ import annotations

import logging

import redis
from rq import Queue

log = logging.getLogger(__name__)

START_JOB = "provisioning.jobs.start_machine"
STOP_JOB = "provisioning.jobs.stop_machine"
RECONCILE_JOB = "provisioning.jobs.reconcile_pool_job"


def enqueue(conn: redis.Redis, queue_name: str, func: str, subject_id: int) -> bool:
    """Enqueue a job for a machine or a pool; False (and a log line) if Redis is
    unreachable: the periodic passes find the work anyway."""
    try:
        Queue(queue_name, connection=conn).enqueue(
            func, subject_id, job_timeout=600, result_ttl=60, failure_ttl=24 * 3600
        )
        return True
    except redis.RedisError as exc:
        log.warning("could not enqueue %s for %s: %s", func, subject_id, exc)
        return False
