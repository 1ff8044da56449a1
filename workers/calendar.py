"""Business days: calendar days in the business time zone, with their bounds in naive UTC (as stored)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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
