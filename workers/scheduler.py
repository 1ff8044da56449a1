"""``metering worker``: the jobs of workers/jobs.py on APScheduler 3 (in-memory job store).

Schedule (times in the business time zone):

* fold deferred usage every 10 s, expire holds every minute;
* close days at 00:10, then write that night's exports; the same job runs once at start (the catch-up:
  every complete day not closed yet, oldest first, so three missed nights are three closes).

Every job has ``coalesce=True`` (runs that were missed are run once, not once per missed time),
``max_instances=1`` (a slow close is never overlapped by the next run) and a long misfire grace
(``MISFIRE_GRACE_SECONDS``). APScheduler 3's default grace is one second: a worker that was suspended
or paused, or a close still running at 00:10, would silently skip the night's close until the next
night. The catch-up at start covers a worker that was down; the grace covers one that was up but late.

Two workers on one database are safe: each day is claimed in ``day_closes`` with a lease and a fencing
token (workers/close/nightly.py); the scheduler itself needs no shared job store.

SIGTERM or SIGINT sets a stop event: the close checks it between batches (the current transaction
finishes), the scheduler shuts down waiting for running jobs, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from workers.jobs import Worker

log = logging.getLogger("metering.worker")

#: A run up to this late still runs (APScheduler 3's default is 1 s: a late close would skip the night).
MISFIRE_GRACE_SECONDS = 6 * 3600
FOLD_EVERY_SECONDS = 10
EXPIRE_EVERY_SECONDS = 60
#: The nightly close, in the business time zone (the default hold TTL is 10 minutes: the day is complete).
CLOSE_AT = {"hour": 0, "minute": 10}
JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_SECONDS}
#: How often the main thread looks at the stop event while the scheduler runs.
POLL_SECONDS = 0.2


def build_scheduler(worker: Worker, *, catch_up: bool = True) -> BackgroundScheduler:
    """A scheduler (not started) with the fold, expire and close jobs; the close also runs at once if ``catch_up``."""
    zone = worker.calendar.zone
    scheduler = BackgroundScheduler(
        jobstores={"default": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(max_workers=4)},
        job_defaults=dict(JOB_DEFAULTS),
        timezone=zone,
    )
    scheduler.add_job(worker.fold, IntervalTrigger(seconds=FOLD_EVERY_SECONDS, timezone=zone), id="fold",
                      name="fold deferred usage")
    scheduler.add_job(worker.expire, IntervalTrigger(seconds=EXPIRE_EVERY_SECONDS, timezone=zone), id="expire",
                      name="expire holds")
    # The catch-up is the close job's first run, at once: it can never overlap the nightly run (max_instances=1).
    first_run = {"next_run_time": datetime.now(zone)} if catch_up else {}
    scheduler.add_job(worker.close_and_export, CronTrigger(**CLOSE_AT, timezone=zone), id="close",
                      name="close days and export", **first_run)
    scheduler.add_listener(_job_failed, EVENT_JOB_ERROR)
    return scheduler


def _job_failed(event: JobExecutionEvent) -> None:
    """A job raised: APScheduler already logged the traceback; the worker goes on (the next run retries)."""
    log.error("job %s failed (%s: %s); the worker keeps running", event.job_id, type(event.exception).__name__,
              event.exception)


def install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM and SIGINT set ``stop``; returns the previous handlers."""

    def handle(signum: int, frame: Any) -> None:
        log.info("%s received: finishing the current transaction, then stopping", signal.Signals(signum).name)
        stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


def serve(worker: Worker) -> int:
    """Run the scheduler until SIGTERM/SIGINT; returns the exit code (0 after a clean stop)."""
    previous = install_stop_handlers(worker.stop)
    scheduler = build_scheduler(worker)
    scheduler.start()
    log.info("worker %s started (time zone %s); close at %02d:%02d", worker.owner, worker.calendar.time_zone,
             CLOSE_AT["hour"], CLOSE_AT["minute"])
    try:
        while not worker.stop.wait(POLL_SECONDS):
            pass
    finally:
        scheduler.shutdown(wait=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("worker %s stopped", worker.owner)
    return 0
