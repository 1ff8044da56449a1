"""The worker's jobs, free of any scheduler: fold deferred usage, expire holds, close due days, export them.

``metering worker`` runs them on APScheduler (workers/scheduler.py); ``metering worker --once`` runs each
once, in this order, and reports what ran (``Worker.run_once``). Every job is safe to run twice and from
two workers at once: the ledger and the close protect themselves (unique references, the day's lease and
fencing token), not the scheduler.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from workers.calendar import BusinessCalendar
from workers.close.lease import default_owner

log = logging.getLogger("metering.worker")

#: The nightly exports, one CSV per kind and closed day: ``{kind}-{YYYY-MM-DD}.csv`` (+ ``.manifest.json``).
#: Closed days this far back whose nightly files are missing in --out are exported again (a crash between
#: the close and its export, or a worker that ran without --out for a while).
EXPORT_LOOKBACK_DAYS = 7
#: Deferred events folded per call; the fold job loops while a call fills its batch (and no stop is asked).
FOLD_BATCH = 1_000


def export_path(out: Path, kind: str, day: date) -> Path:
    """Where the nightly export of ``kind`` for ``day`` goes."""
    return out / f"{kind}-{day.isoformat()}.csv"


@dataclass
class Worker:
    """The jobs over one meter; ``stop`` is checked between batches (set by SIGTERM/SIGINT)."""

    meter: Any
    calendar: BusinessCalendar
    out: Path | None = None
    apply: bool = False
    owner: str = field(default_factory=default_owner)
    stop: threading.Event = field(default_factory=threading.Event)
    progress: Callable[[str, int, int | None], None] | None = None

    def fold(self) -> int:
        """Charge pending deferred usage events; returns how many were charged."""
        total = 0
        while not self.stop.is_set():
            folded = self.meter.fold_deferred(limit=FOLD_BATCH)
            total += folded
            if folded < FOLD_BATCH:
                break
        if total:
            log.info("folded %d deferred usage events", total)
        return total

    def expire(self, now: datetime | None = None) -> int:
        """Release every open hold past its TTL; returns how many."""
        if self.stop.is_set():
            return 0
        expired = self.meter.expire_holds(now=now)
        if expired:
            log.info("expired %d holds", expired)
        return expired

    def close(self, now: datetime | None = None) -> list[Any]:
        """Close every complete day not closed yet, oldest first (the catch-up and the nightly close)."""
        from workers.close.nightly import Interrupted, close_due_days

        try:
            results = close_due_days(
                self.meter, calendar=self.calendar, now=now, owner=self.owner, apply=self.apply,
                progress=self.progress, stop=self.stop,
            )
        except Interrupted as exc:  # SIGTERM mid-close: nothing of that day was written; the next run closes it
            log.info("%s", exc)
            return []
        for result in results:
            level = logging.INFO if result.status in ("closed", "already_closed") else logging.WARNING
            log.log(level, "close %s: %s%s", result.day.isoformat(), result.status,
                    f" ({result.detail})" if result.detail else "")
        return results

    def export_due(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Write the nightly exports of recently closed days whose files are missing in ``out``."""
        if self.out is None:
            return []
        return self.export_days(self._closed_days(now))

    def export_days(self, days: list[date]) -> list[dict[str, Any]]:
        """Write each day's usage, rollup and invoice CSVs into ``out`` unless they are there already."""
        if self.out is None or not days:
            return []
        from workers.containment import contained
        from workers.export.exporter import KINDS, export

        manifests = []
        for day in days:
            for kind in KINDS:
                path = export_path(self.out, kind, day)
                if self.stop.is_set():
                    return manifests
                self.out.mkdir(parents=True, exist_ok=True)
                # Before the "already there" test, which follows symlinks: a file planted in --out that
                # leads outside it is refused (InvalidArgument, field out), never taken for a finished export.
                contained(path, self.out, "out", "out")
                if path.exists() and Path(f"{path}.manifest.json").exists():
                    continue
                manifest = export(self.meter.engine, kind, day, day, path, calendar=self.calendar, jobs=None,
                                  root=self.out)
                manifests.append({"kind": kind, "day": day.isoformat(), "path": str(path), "manifest": manifest})
                log.info("exported %s", path)
        return manifests

    def _closed_days(self, now: datetime | None) -> list[date]:
        """Closed days from ``EXPORT_LOOKBACK_DAYS`` before today (business time zone), oldest first."""
        from sqlalchemy import select

        from metering.ledger.database import READ_ONLY
        from metering.ledger.tables import DayClose

        table = DayClose.__table__  # type: ignore[attr-defined]
        since = (self.calendar.today(now) - timedelta(days=EXPORT_LOOKBACK_DAYS)).isoformat()
        query = select(table.c.day).where(table.c.status == "closed", table.c.day >= since).order_by(table.c.day)
        with self.meter.engine.connect().execution_options(**{READ_ONLY: True}) as connection:
            return [date.fromisoformat(day) for day in connection.execute(query).scalars()]

    def close_and_export(self, now: datetime | None = None) -> tuple[list[Any], list[dict[str, Any]]]:
        """The nightly job: close the due days, then write their exports (when ``out`` is set)."""
        closes = self.close(now)
        return closes, self.export_due(now)

    def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """Run every job once (fold, expire, catch-up closes, exports); what ran, JSON-ready.

        A job that fails is reported in ``errors`` and the others still run.
        """
        report: dict[str, Any] = {
            "now": (now or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(),
            "time_zone": self.calendar.time_zone, "owner": self.owner, "apply": self.apply,
            "out": None if self.out is None else str(self.out),
            "folded": 0, "expired": 0, "closes": [], "exports": [], "errors": [],
        }
        steps: list[tuple[str, Callable[[], None]]] = [
            ("fold", lambda: report.update(folded=self.fold())),
            ("expire", lambda: report.update(expired=self.expire(now))),
            ("close", lambda: report.update(closes=[r.to_dict() for r in self.close(now)])),
            ("export", lambda: report.update(exports=self.export_due(now))),
        ]
        for name, step in steps:
            if self.stop.is_set():
                break
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (reported, and the next job still runs)
                log.exception("%s job failed", name)
                report["errors"].append({"job": name, "error": f"{type(exc).__name__}: {exc}"})
        report["stopped"] = self.stop.is_set()
        return report
