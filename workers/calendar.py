"""Business days: calendar days in the business time zone, with their bounds in naive UTC (as stored)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from metering.ledger.inputs import EARLIEST, MAX_AHEAD
from workers.errors import InvalidArgument

#: The earliest day a command or report may name: the ledger refuses events before it
#: (metering.ledger.inputs.EARLIEST). Also keeps a day's bounds away from year 1, which has no UTC start.
EARLIEST_DAY = EARLIEST.date()
#: How far after today a day may be named: as far ahead as the ledger dates events (the demo books the
#: coming days ahead of time). Also keeps a day's bounds away from the end of year 9999.
MAX_DAYS_AHEAD = MAX_AHEAD.days
#: The longest range (in days, both ends included) a report or export may span: ten years, more than any
#: bill needs, so a typo such as --from 2000-01-01 cannot ask for every day since the ledger's epoch.
MAX_RANGE_DAYS = 3_660

#: The business time zone when none is given (the resellers this is built for bill in China time).
DEFAULT_TIME_ZONE = "Asia/Shanghai"
#: Environment variable naming the business time zone (the command line's --tz overrides it).
TZ_ENV = "METERING_TZ"


def parse_day(text: str, field: str = "day") -> date:
    """A YYYY-MM-DD day; ValueError naming ``field`` otherwise."""
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: expected a day as YYYY-MM-DD, got {text!r}") from None


def check_day(day: date, field: str = "day", *, today: date | None = None) -> date:
    """``day`` if it is a day a command may name (``EARLIEST_DAY`` to ``MAX_DAYS_AHEAD`` after ``today``,
    default the UTC date), else ``InvalidArgument(field)``: nothing then computes its bounds or overflows."""
    if not isinstance(day, date) or isinstance(day, datetime):
        raise InvalidArgument(field, f"expected a date, got {day!r}")
    latest = (today or datetime.now(timezone.utc).date()) + timedelta(days=MAX_DAYS_AHEAD)
    if day < EARLIEST_DAY:
        raise InvalidArgument(field, f"{day} is before {EARLIEST_DAY}: no ledger holds anything that old")
    if day > latest:
        raise InvalidArgument(field, f"{day} is more than {MAX_DAYS_AHEAD} days ahead (after {latest})")
    return day


def check_range(start: date, end: date, *, today: date | None = None) -> None:
    """Refuse a bad range of days with ``InvalidArgument`` naming ``start`` or ``end``: each a day
    ``check_day`` accepts, in order, at most ``MAX_RANGE_DAYS`` long."""
    check_day(start, "start", today=today)
    check_day(end, "end", today=today)
    if start > end:
        raise InvalidArgument("start", f"{start} is after the end {end}")
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise InvalidArgument("start", f"the range {start} to {end} is longer than {MAX_RANGE_DAYS:,} days")


@dataclass(frozen=True)
class BusinessCalendar:
    """Days of one time zone. ``bounds(day)`` is [start, end) in naive UTC, DST-correct."""

    time_zone: str = DEFAULT_TIME_ZONE

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"time zone: unknown IANA time zone {self.time_zone!r}") from None

    @classmethod
    def from_env(cls, explicit: str | None = None) -> "BusinessCalendar":
        """``explicit``, else ``$METERING_TZ``, else Asia/Shanghai."""
        return cls(explicit or os.environ.get(TZ_ENV) or DEFAULT_TIME_ZONE)

    @property
    def zone(self) -> ZoneInfo:
        """The zone itself."""
        return ZoneInfo(self.time_zone)

    def bounds(self, day: date) -> tuple[datetime, datetime]:
        """The day's [start, end) as naive UTC datetimes."""
        start = datetime.combine(day, time(0), self.zone)
        end = datetime.combine(day + timedelta(days=1), time(0), self.zone)
        return _naive_utc(start), _naive_utc(end)

    def day_of(self, moment: datetime) -> date:
        """The business day holding ``moment`` (a naive datetime is UTC, as the tables store it)."""
        aware = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
        return aware.astimezone(self.zone).date()

    def today(self, now: datetime | None = None) -> date:
        """The business day of ``now`` (default: the current time)."""
        return self.day_of(now or datetime.now(timezone.utc))


def days_between(first: date, last: date) -> list[date]:
    """Every day from ``first`` to ``last``, both included."""
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None)
