"""Claiming a business day: one row per day in ``day_closes``, a lease and a fencing token.

A claim is one conditional UPDATE that also adds one to ``fence``; renewing and finishing carry the
fence in their WHERE, so a worker whose lease lapsed (and whose day another worker claimed since) finds
no row to update and cannot write. See docs/worker.md, "Claiming a day".
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from metering.ledger.database import READ_ONLY
from metering.ledger.tables import DayClose
from workers.calendar import BusinessCalendar

DAYS = DayClose.__table__  # type: ignore[attr-defined]
#: How long a claim lasts without renewal; a close renews it between batches.
DEFAULT_LEASE = timedelta(minutes=5)


class LeaseLost(RuntimeError):
    """This worker's claim on the day is gone (its lease lapsed and the day was claimed again, or it closed)."""


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one day: write only while ``fence`` is still the day's fence."""

    day: date
    owner: str
    fence: int
    lease: timedelta


def default_owner() -> str:
    """host:pid:random, so two workers on one host never share a name."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def ensure_day(engine: Engine, day: date, calendar: BusinessCalendar) -> None:
    """Insert the day's row (status open) unless it exists; refuse a day recorded in another time zone."""
    start, end = calendar.bounds(day)
    try:
        with engine.begin() as connection:
            connection.execute(insert(DAYS).values(
                day=day.isoformat(), status="open", fence=0, time_zone=calendar.time_zone, starts_at=start, ends_at=end,
            ))
    except IntegrityError:
        pass  # made before (or by a concurrent worker)
    with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
        zone = connection.execute(select(DAYS.c.time_zone).where(DAYS.c.day == day.isoformat())).scalar_one()
    if zone != calendar.time_zone:
        raise ValueError(
            f"time zone: day {day} was recorded in {zone}, not {calendar.time_zone}; the business time zone "
            "of a database cannot change"
        )


def claim(engine: Engine, day: date, owner: str, now: datetime, lease: timedelta = DEFAULT_LEASE) -> Claim | None:
    """Claim an open day, or one whose previous claim lapsed; None when it is closed or claimed by another."""
    with engine.begin() as connection:
        taken = connection.execute(
            update(DAYS)
            .where(DAYS.c.day == day.isoformat(), DAYS.c.status != "closed")
            .where((DAYS.c.status == "open") | (DAYS.c.lease_expires_at < now))
            .values(status="closing", owner=owner, lease_expires_at=now + lease, fence=DAYS.c.fence + 1)
        )
        if taken.rowcount != 1:
            return None
        fence = connection.execute(select(DAYS.c.fence).where(DAYS.c.day == day.isoformat())).scalar_one()
    return Claim(day, owner, int(fence), lease)


def renew(engine: Engine, held: Claim, now: datetime) -> None:
    """Extend the lease; ``LeaseLost`` when the day was claimed again since."""
    with engine.begin() as connection:
        if connection.execute(_fenced(held, now).values(lease_expires_at=now + held.lease)).rowcount != 1:
            raise LeaseLost(f"the claim on {held.day} (fence {held.fence}) is gone")


def finish(connection: Connection, held: Claim, now: datetime, **values: object) -> None:
    """Mark the day closed inside the close's final transaction; ``LeaseLost`` (roll back) unless still held."""
    changed = connection.execute(_fenced(held, now).values(status="closed", closed_at=now, lease_expires_at=None, **values))
    if changed.rowcount != 1:
        raise LeaseLost(f"the claim on {held.day} (fence {held.fence}) is gone: nothing was written")


def release(engine: Engine, held: Claim) -> None:
    """Give the day back (status open) after a failed or interrupted close, so the next run need not wait."""
    with engine.begin() as connection:
        connection.execute(
            update(DAYS).where(DAYS.c.day == held.day.isoformat(), DAYS.c.fence == held.fence, DAYS.c.status == "closing")
            .values(status="open", owner=None, lease_expires_at=None)
        )


def _fenced(held: Claim, now: datetime):  # type: ignore[no-untyped-def]
    """UPDATE of the day's row only while it carries our fence, is closing, and our lease has not lapsed."""
    return update(DAYS).where(
        DAYS.c.day == held.day.isoformat(), DAYS.c.fence == held.fence, DAYS.c.status == "closing",
        DAYS.c.owner == held.owner, DAYS.c.lease_expires_at >= now,
    )
