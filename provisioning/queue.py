"""Enqueueing provisioning work on RQ. Jobs are triggers only: the database holds what is
wanted, so a lost job is found again (see `nudge_if_stale` and, later, the reconciler)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.job import Job

from config.logging import current_request_id, reset_request_id, set_request_id

log = logging.getLogger(__name__)

START_JOB = "provisioning.jobs.start_machine"
STOP_JOB = "provisioning.jobs.stop_machine"
RECONCILE_JOB = "provisioning.jobs.reconcile_pool_job"


def enqueue(conn: redis.Redis, queue_name: str, func: str, subject_id: int) -> bool:
    """Enqueue a job for a machine or a pool; False (and a log line) if Redis is
    unreachable: the periodic passes find the work anyway."""
    try:
        enqueue_in_one_trip(
            conn,
            queue_name,
            func,
            subject_id,
            job_timeout=600,
            result_ttl=60,
            failure_ttl=24 * 3600,
            meta=job_meta(),
        )
        return True
    except redis.RedisError as exc:
        log.warning("could not enqueue %s for %s: %s", func, subject_id, exc)
        return False


def enqueue_in_one_trip(
    conn: redis.Redis, queue_name: str, func: str, *args: Any, **options: Any
) -> Job:
    """RQ's `Queue.enqueue` in one Redis round trip: left alone it sends the queue's
    registration and the job in two pipelines; given ours, both go in one MULTI/EXEC (a
    launch enqueues, so each round trip is CPU on the hot path)."""
    with conn.pipeline() as pipe:
        job = Queue(queue_name, connection=conn).enqueue(func, *args, pipeline=pipe, **options)
        pipe.execute()
    return job


def job_meta() -> dict[str, str]:
    """What a job carries from the request that enqueued it: its request id (logs)."""
    request_id = current_request_id()
    return {"request_id": request_id} if request_id else {}


class LabpoolWorker(SimpleWorker):
    """RQ's SimpleWorker that puts back, while a job runs, the request id of the web request
    that enqueued it, so that the job's log lines carry it."""

    def perform_job(self, job: Any, queue: Any, *args: Any, **kwargs: Any) -> bool:
        token = set_request_id((job.meta or {}).get("request_id"))
        try:
            return super().perform_job(job, queue, *args, **kwargs)
        finally:
            reset_request_id(token)
