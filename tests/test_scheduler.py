"""The worker's scheduler: job settings, a stop on SIGTERM, and jobs that fail without killing the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from metering.ledger import Meter
from workers.calendar import BusinessCalendar
from workers.jobs import Worker
from workers.scheduler import JOB_DEFAULTS, MISFIRE_GRACE_SECONDS, build_scheduler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def meter(tmp_path: Path) -> Any:
    opened = Meter.open(f"sqlite:///{tmp_path}/worker.db")
    yield opened
    opened.close()


def test_jobs_coalesce_never_overlap_and_tolerate_hours_of_delay(meter: Any) -> None:
    worker = Worker(meter, BusinessCalendar("Asia/Shanghai"))
    scheduler = build_scheduler(worker)
    scheduler.start(paused=True)  # job defaults are applied when the scheduler starts
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"fold", "expire", "close"}
        for job in jobs.values():
            assert job.coalesce is True and job.max_instances == 1
            assert job.misfire_grace_time == MISFIRE_GRACE_SECONDS >= 3600
            assert str(job.trigger.timezone) == "Asia/Shanghai"
        assert jobs["fold"].trigger.interval == timedelta(seconds=10)
        assert jobs["expire"].trigger.interval == timedelta(minutes=1)
        close = jobs["close"].trigger
        assert isinstance(close, CronTrigger)
        fields = {field.name: str(field) for field in close.fields}
        assert fields["hour"] == "0" and fields["minute"] == "10"
        # The catch-up: the close job's first run is now, not tonight.
        assert jobs["close"].next_run_time - datetime.now(jobs["close"].next_run_time.tzinfo) < timedelta(minutes=1)
        assert str(scheduler.timezone) == "Asia/Shanghai"
    finally:
        scheduler.shutdown(wait=False)


def test_the_close_runs_at_ten_past_midnight_in_the_business_zone(meter: Any) -> None:
    scheduler = build_scheduler(Worker(meter, BusinessCalendar("America/New_York")), catch_up=False)
    scheduler.start(paused=True)
    try:
        close = scheduler.get_job("close")
        local = close.next_run_time.astimezone(BusinessCalendar("America/New_York").zone)
        assert (local.hour, local.minute) == (0, 10)
    finally:
        scheduler.shutdown(wait=False)


def _run_late_job(job_defaults: dict[str, Any]) -> bool:
    """Whether a job due an hour ago still runs when the scheduler gets to it."""
    ran = threading.Event()
    scheduler = BackgroundScheduler(job_defaults=job_defaults)
    scheduler.add_job(ran.set, "date", run_date=datetime.now().astimezone() - timedelta(hours=1))
    scheduler.start()
    try:
        deadline = time.monotonic() + 5
        while scheduler.get_jobs() and time.monotonic() < deadline:  # run or skipped, the date job is then removed
            time.sleep(0.02)
        return ran.wait(1)
    finally:
        scheduler.shutdown(wait=True)


def test_a_run_an_hour_late_still_runs_with_our_grace_but_not_with_apschedulers_default() -> None:
    assert _run_late_job(dict(JOB_DEFAULTS)) is True
    assert _run_late_job({}) is False  # APScheduler 3's default grace (1 s) would skip the night


class FlakyWorker(Worker):
    """Its fold raises the first time; every call is counted."""

    calls: int = 0

    def fold(self) -> int:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("database went away")
        return 0

    def close_and_export(self, now: datetime | None = None) -> tuple[list[Any], list[Any]]:
        raise RuntimeError("close failed")


def test_a_failing_job_does_not_kill_the_worker(meter: Any) -> None:
    worker = FlakyWorker(meter, BusinessCalendar())
    scheduler = build_scheduler(worker)
    outcomes: list[tuple[str, bool]] = []
    scheduler.add_listener(lambda event: outcomes.append((event.job_id, event.exception is None)),
                           EVENT_JOB_ERROR | EVENT_JOB_EXECUTED)
    scheduler.start()
    try:
        zone = worker.calendar.zone
        for runs in (1, 2):
            scheduler.modify_job("fold", next_run_time=datetime.now(zone))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sum(job == "fold" for job, _ in outcomes) < runs:
                time.sleep(0.02)
        assert ("fold", False) in outcomes and ("fold", True) in outcomes  # failed once, then ran again
        assert ("close", False) in outcomes  # the catch-up failed too
        assert scheduler.running and {job.id for job in scheduler.get_jobs()} == {"fold", "expire", "close"}
    finally:
        scheduler.shutdown(wait=True)


def test_run_once_reports_a_failed_job_and_runs_the_others(meter: Any) -> None:
    report = FlakyWorker(meter, BusinessCalendar()).run_once()
    assert report["errors"][0]["job"] == "fold" and "database went away" in report["errors"][0]["error"]
    assert report["closes"] == [] and report["expired"] == 0  # the expire and close jobs still ran


def test_sigterm_stops_a_running_worker_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1", "METERING_DB": f"sqlite:///{tmp_path}/worker.db"}
    process = subprocess.Popen([sys.executable, "-m", "workers", "worker", "--out", str(tmp_path / "out")],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert process.stderr is not None
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            seen.append(line)
            if "started" in line or not line:
                break
        assert any("started" in line for line in seen), "".join(seen)
        time.sleep(0.5)  # let the catch-up run
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        rest = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, rest
    assert time.monotonic() - began < 10
    assert "SIGTERM received" in rest and "stopped" in rest
