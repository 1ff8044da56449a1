"""Closing a business day exactly once: re-price, audit, roll up, and write it all in one fenced commit.

The rules are in docs/worker.md. In short: a day closes only when complete (its end plus the hold TTL
has passed) and after the day before it; a worker claims it with a lease and a fencing token
(``workers.close.lease``); it reads a watermark, makes one streamed pass over the day's events
(``workers.close.rollup``), and writes the roll-up, the discrepancies and ``status = 'closed'`` in one
transaction that commits only while its claim holds. A crash at any point leaves nothing or everything.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, localcontext
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from metering.ledger.database import READ_ONLY
from metering.ledger.meter import Meter
from metering.ledger.tables import DailyRollup, DayClose, Discrepancy, Hold, UsageEvent
from workers.calendar import BusinessCalendar, days_between
from workers.errors import InvalidArgument
from workers.close.invariants import LedgerCheck
from workers.close.lease import DEFAULT_LEASE, Claim, LeaseLost, claim, default_owner, ensure_day, finish, release, renew
from workers.close.revenue import paid_rates
from workers.close.rollup import COUNTERS, EXACT, DayTotals, Progress, Window, add_unbilled_holds, rollup_rows, scan_events

DAYS, ROLLUPS = DayClose.__table__, DailyRollup.__table__  # type: ignore[attr-defined]
FINDINGS, EVENTS, HOLDS = Discrepancy.__table__, UsageEvent.__table__, Hold.__table__  # type: ignore[attr-defined]
#: The lease is renewed at most this often while a close streams its events.
RENEW_EVERY_SECONDS = 20.0
#: Rows per INSERT statement when the close writes its results.
WRITE_BATCH = 5_000


class Interrupted(RuntimeError):
    """A stop was requested (SIGTERM): the close stopped before its final commit and wrote nothing."""


@dataclass
class CloseResult:
    """What happened to one day: ``closed`` now, ``already_closed``, ``busy`` (another worker holds it),
    ``incomplete`` (its last holds may still be open) or ``blocked`` (an earlier day is not closed)."""

    day: date
    status: str
    fence: int | None = None
    events: int = 0
    late_events: int = 0
    totals: dict[str, Any] = field(default_factory=dict)
    discrepancies: dict[str, int] = field(default_factory=dict)
    adjustments_posted: int = 0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        data = asdict(self)
        data["day"] = self.day.isoformat()
        return data


def utcnow() -> datetime:
    """Now as naive UTC (how the tables store time)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _naive_utc(moment: datetime | None) -> datetime:
    if moment is None:
        return utcnow()
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


# ---------------------------------------------------------------------- which days


def first_day(engine: Engine, calendar: BusinessCalendar) -> date | None:
    """The business day of the ledger's first usage (its earliest usage event or hold); None before any.

    Closes, reports and exports are about usage: no day before this one has anything to close, report or
    export (top-ups and grants alone are not closed). Both times are indexed.
    """
    with _reader(engine) as connection:
        first_event = connection.execute(select(func.min(EVENTS.c.occurred_at))).scalar()
        first_hold = connection.execute(select(func.min(HOLDS.c.created_at))).scalar()
    days = [calendar.day_of(moment) for moment in (first_event, first_hold) if moment is not None]
    return min(days) if days else None


def check_used_day(engine: Engine, calendar: BusinessCalendar, day: date, field: str, *, empty_ok: bool) -> None:
    """Refuse ``day`` with ``InvalidArgument(field)`` if it is before the ledger's first usage.

    ``empty_ok``: a ledger without usage accepts any day (a report or export of it is empty); else it is
    refused too (there is nothing to close).
    """
    first = first_day(engine, calendar)
    if first is None and not empty_ok:
        raise InvalidArgument(field, "the ledger has no usage yet: there is nothing to close")
    if first is not None and day < first:
        raise InvalidArgument(field, f"{day} is before the ledger's first usage, on {first}")


def days_to_close(
    meter: Meter, *, calendar: BusinessCalendar, now: datetime | None = None, until: date | None = None,
) -> list[date]:
    """Every complete day from the ledger's first usage (to ``until``) that is not closed yet, oldest first."""
    first = first_day(meter.engine, calendar)
    if first is None:
        return []
    last = calendar.day_of(_naive_utc(now) - meter.hold_ttl) - timedelta(days=1)  # the day before ends by now - TTL
    if until is not None:
        last = min(last, until)
    if first > last:
        return []
    with _reader(meter.engine) as connection:
        closed = set(connection.execute(select(DAYS.c.day).where(DAYS.c.status == "closed", DAYS.c.day >= first.isoformat(),
                                                               DAYS.c.day <= last.isoformat())).scalars())
    return [day for day in days_between(first, last) if day.isoformat() not in closed]


def close_due_days(
    meter: Meter, *, calendar: BusinessCalendar, now: datetime | None = None, owner: str | None = None,
    apply: bool = False, progress: Progress | None = None, stop: threading.Event | None = None,
    lease: timedelta = DEFAULT_LEASE, until: date | None = None,
) -> list[CloseResult]:
    """Close every complete day (up to ``until``) that is not closed, oldest first; stops at the first it cannot close."""
    results = []
    for day in days_to_close(meter, calendar=calendar, now=now, until=until):
        result = close_day(meter, day, calendar=calendar, owner=owner, apply=apply, now=now, progress=progress,
                           stop=stop, lease=lease)
        results.append(result)
        if result.status not in ("closed", "already_closed"):
            break  # a later day must wait for this one
    return results


def reconcile(
    meter: Meter, day: date, *, calendar: BusinessCalendar, apply: bool = False, now: datetime | None = None,
    progress: Progress | None = None,
) -> CloseResult:
    """``metering reconcile``: close ``day`` and the open days before it (never a day after it); ``apply``
    posts the re-pricing adjustments of ``day``.

    A day before the ledger's first usage (``first_day``), or any day of a ledger without usage, is refused
    with ``InvalidArgument`` (field ``day``): there is nothing to close.
    """
    check_used_day(meter.engine, calendar, day, "day", empty_ok=False)
    recorded = _recorded(meter.engine, day)
    if recorded is None:
        for result in close_due_days(meter, calendar=calendar, now=now, apply=apply, progress=progress, until=day):
            if result.day == day:
                return result
            if result.status not in ("closed", "already_closed"):
                return CloseResult(day, "blocked", detail=f"{result.day} could not be closed first: {result.status}")
        recorded = _recorded(meter.engine, day)
        if recorded is None:
            start, end = calendar.bounds(day)
            if end + meter.hold_ttl > _naive_utc(now):
                return CloseResult(day, "incomplete", detail=_incomplete(end, meter))
            return close_day(meter, day, calendar=calendar, apply=apply, now=now, progress=progress)
    if apply:
        recorded.adjustments_posted = post_adjustments(meter, day)
    return recorded


# ---------------------------------------------------------------------- one day


def close_day(
    meter: Meter, day: date, *, calendar: BusinessCalendar, owner: str | None = None, apply: bool = False,
    now: datetime | None = None, progress: Progress | None = None, stop: threading.Event | None = None,
    lease: timedelta = DEFAULT_LEASE, clock: Callable[[], datetime] = utcnow,
) -> CloseResult:
    """Close ``day`` exactly once (see the module docstring); ``now`` decides completeness, ``clock`` leases."""
    engine, current = meter.engine, _naive_utc(now)
    end = calendar.bounds(day)[1]
    if end + meter.hold_ttl > current:
        return CloseResult(day, "incomplete", detail=_incomplete(end, meter))
    ensure_day(engine, day, calendar)
    recorded = _recorded(engine, day)
    if recorded is not None:
        return recorded
    previous, blocker = _previous_close(engine, day, calendar)
    if blocker:
        return CloseResult(day, "blocked", detail=blocker)
    held = claim(engine, day, owner or default_owner(), clock(), lease)
    if held is None:
        recorded = _recorded(engine, day)
        return recorded or CloseResult(day, "busy", detail="another worker holds this day's lease")
    try:
        summary = _close_claimed(meter, held, calendar, current, previous, progress, _checkpoint(engine, held, clock, stop), clock)
    except BaseException:
        with suppress(Exception):  # the lease lapses by itself if even this fails
            release(engine, held)
        raise
    result = _result(day, held.fence, summary)
    if apply:
        result.adjustments_posted = post_adjustments(meter, day)
    return result


def _close_claimed(
    meter: Meter, held: Claim, calendar: BusinessCalendar, current: datetime, previous: int | None,
    progress: Progress | None, checkpoint: Callable[[], None], clock: Callable[[], datetime],
) -> dict[str, Any]:
    """The close proper, under a claim: settle what is due, read, compute, then the one fenced write."""
    engine, day = meter.engine, held.day
    start, end = calendar.bounds(day)
    meter.expire_holds(now=current.replace(tzinfo=timezone.utc))
    while meter.fold_deferred():
        checkpoint()
    window = Window(day, start, end, _watermark(engine), previous)
    ledger = LedgerCheck(engine)  # the invariants' quick check runs while the day is scanned
    with _reader(engine) as connection:
        totals = scan_events(connection, meter.prices, calendar, window, progress=progress, checkpoint=checkpoint)
        add_unbilled_holds(connection, totals, window)
        rates = paid_rates(connection, meter.prices, end)
        for violation in ledger.violations(connection):
            totals.discrepancies.append({
                "kind": "invariant", "subject": f"{violation.invariant}: {violation.subject}"[:190], "user_id": None,
                "expected": None, "actual": None, "detail": violation.detail,
            })
    checkpoint()
    rows = rollup_rows(totals, day, meter.prices, rates)
    summary = _summary(totals, rows, window)
    _write(engine, held, clock, rows, totals.discrepancies, summary, window.watermark)
    return summary


def post_adjustments(meter: Meter, day: date) -> int:
    """Post the re-pricing adjustments of a closed day, each exactly once; returns how many were posted now."""
    with _reader(meter.engine) as connection:
        findings = connection.execute(
            select(FINDINGS.c.id, FINDINGS.c.subject, FINDINGS.c.user_id, FINDINGS.c.expected, FINDINGS.c.actual)
            .where(FINDINGS.c.day == day.isoformat(), FINDINGS.c.kind == "price").order_by(FINDINGS.c.id)
        ).all()
    posted = 0
    for finding_id, request_id, user_id, expected, charged in findings:
        reference = adjustment_reference(request_id)
        note = f"re-priced on the close of {day}: {charged} charged, {expected} due"
        posted += meter.adjust(user_id, charged - expected, reference, note)  # unique reference: once
        with meter.engine.begin() as connection:
            connection.execute(update(FINDINGS).where(FINDINGS.c.id == finding_id).values(adjustment_reference=reference))
    return posted


def adjustment_reference(request_id: str) -> str:
    """The ledger reference of a request's re-pricing adjustment (short enough for the column)."""
    return "reprice:" + (request_id if len(request_id) <= 150 else hashlib.sha256(request_id.encode()).hexdigest())


# ---------------------------------------------------------------------- steps


def _reader(engine: Engine):  # type: ignore[no-untyped-def]
    """A read-only connection (on SQLite its snapshot takes no write lock: gateways keep writing)."""
    return engine.connect().execution_options(**{READ_ONLY: True})


def _incomplete(end: datetime, meter: Meter) -> str:
    return f"the day is complete at {(end + meter.hold_ttl).isoformat()}Z (its end plus the hold TTL)"


def _previous_close(engine: Engine, day: date, calendar: BusinessCalendar) -> tuple[int | None, str | None]:
    """The previous close's watermark, or why ``day`` must wait (the day before it is not closed).

    Days close in order from the ledger's first usage: each day after the first needs the day before it
    closed. The first day (or a day before it: an operator may close an empty day) needs nothing before it;
    it takes the watermark of the latest close before it, if any, so a close recorded before the ledger's
    first usage never blocks the days after it.
    """
    with _reader(engine) as connection:
        previous = connection.execute(
            select(DAYS.c.day, DAYS.c.watermark_event_id).where(DAYS.c.day < day.isoformat(), DAYS.c.status == "closed")
            .order_by(DAYS.c.day.desc()).limit(1)
        ).first()
    watermark = None if previous is None else int(previous.watermark_event_id)
    first = first_day(engine, calendar)
    if first is None or day <= first:
        return watermark, None
    wanted = day - timedelta(days=1)
    if previous is None or previous.day != wanted.isoformat():
        after = first if previous is None else max(first, date.fromisoformat(previous.day) + timedelta(days=1))
        return None, f"{after} is not closed yet" + ("" if after == wanted else f" (nor the days to {wanted})")
    return watermark, None


def _watermark(engine: Engine) -> int:
    """The highest usage event id once every insert in flight has committed (docs/worker.md)."""
    backend = engine.dialect.name
    query = select(func.coalesce(func.max(EVENTS.c.id), 0))
    if backend == "mysql":
        with engine.connect() as connection:
            connection.exec_driver_sql("LOCK TABLES usage_events READ")  # waits for inserting transactions
            try:
                return int(connection.execute(query).scalar_one())
            finally:
                connection.exec_driver_sql("UNLOCK TABLES")
                connection.commit()
    with engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE, the write lock: no insert is in flight
        if backend == "postgresql":
            connection.exec_driver_sql("LOCK TABLE usage_events IN SHARE MODE")  # waits for inserting transactions
        return int(connection.execute(query).scalar_one())


def _checkpoint(engine: Engine, held: Claim, clock: Callable[[], datetime], stop: threading.Event | None) -> Callable[[], None]:
    """Between batches: stop if asked (nothing written yet), renew the lease when due."""
    last = time.monotonic()

    def checkpoint() -> None:
        nonlocal last
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped while closing {held.day}; nothing was written, the next run closes it")
        if time.monotonic() - last >= RENEW_EVERY_SECONDS:
            renew(engine, held, clock())
            last = time.monotonic()

    return checkpoint


def _summary(totals: DayTotals, rows: list[dict[str, Any]], window: Window) -> dict[str, Any]:
    sums = {name: sum(row[name] for row in rows) for name in COUNTERS}
    with localcontext(EXACT):
        money = {name: str(sum((Decimal(row[name]) for row in rows if row[name] is not None), Decimal(0)))
                 for name in ("usd", "revenue_cny", "upstream_cost_usd")}
    kinds = Counter(finding["kind"] for finding in totals.discrepancies)
    return {"events": totals.events, "late_events": totals.late_events, "watermark": window.watermark,
            "totals": sums | money, "discrepancies": dict(sorted(kinds.items()))}


def _write(engine: Engine, held: Claim, clock: Callable[[], datetime], rows: list[dict[str, Any]],
           findings: list[dict[str, Any]], summary: dict[str, Any], watermark: int) -> None:
    """The close's only write: everything, or (claim lost, crash) nothing."""
    now = clock()
    seen: Counter[tuple[str, str]] = Counter()
    for finding in findings:  # one subject may break several checks: keep each, numbered
        key = (finding["kind"], finding["subject"])
        seen[key] += 1
        if seen[key] > 1:
            finding["subject"] = f"{finding['subject'][:180]} #{seen[key]}"
    with engine.begin() as connection:
        finish(connection, held, now, watermark_event_id=watermark, summary=json.dumps(summary, sort_keys=True))
        for begin in range(0, len(rows), WRITE_BATCH):
            connection.execute(insert(ROLLUPS), rows[begin:begin + WRITE_BATCH])
        day = held.day.isoformat()
        for begin in range(0, len(findings), WRITE_BATCH):
            connection.execute(insert(FINDINGS), [f | {"day": day, "created_at": now} for f in findings[begin:begin + WRITE_BATCH]])


def _recorded(engine: Engine, day: date) -> CloseResult | None:
    """The result of a day already closed (from its stored summary), else None."""
    with _reader(engine) as connection:
        row = connection.execute(select(DAYS.c.status, DAYS.c.fence, DAYS.c.summary).where(DAYS.c.day == day.isoformat())).first()
    if row is None or row.status != "closed":
        return None
    result = _result(day, int(row.fence), json.loads(row.summary))
    result.status = "already_closed"
    return result


def _result(day: date, fence: int, summary: dict[str, Any]) -> CloseResult:
    return CloseResult(day, "closed", fence, summary["events"], summary["late_events"], summary["totals"],
                       summary["discrepancies"])


__all__ = [
    "CloseResult", "Interrupted", "LeaseLost", "adjustment_reference", "close_day", "close_due_days", "days_to_close",
    "check_used_day", "first_day", "post_adjustments", "reconcile",
]
