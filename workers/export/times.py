"""Timestamps of an export, a column at a time: ISO 8601 UTC text and the business day, without per-cell Python.

Drivers hand timestamps back differently: PostgreSQL and MariaDB as naive-UTC ``datetime`` objects,
SQLite as the text SQLAlchemy stored (``2026-11-27 08:00:00.000000``, fixed width). Fixed-width text
sorts like time, so SQLite's column is bisected and reformatted as text (checked by one regex over
the whole column first); anything else is parsed. A column with few distinct values (price versions)
is formatted once per value.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from functools import partial
from itertools import repeat
from operator import add, methodcaller
from typing import Any

from workers.calendar import BusinessCalendar

#: SQLAlchemy's SQLite storage of a DateTime has this shape (digits as 0), always; a column is checked
#: at once: its NUL-joined text with every digit made 0 must be this shape repeated.
_STORED_SHAPE = "0000-00-00 00:00:00.000000\x00"
_DIGITS_TO_ZERO = str.maketrans("123456789", "000000000")
_ISO = methodcaller("isoformat", timespec="microseconds")


def iso_utc(moment: datetime | str) -> str:
    """A naive-UTC moment (or its stored text) as ISO 8601 UTC with microseconds: ``2026-11-27T08:00:00.000000Z``."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.isoformat(timespec="microseconds") + "Z"


def is_stored_text(column: Sequence[Any]) -> bool:
    """Whether every value is SQLite's fixed-width timestamp text (``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    if not column or not isinstance(column[0], str):
        return False
    joined = "\x00".join(column) + "\x00"
    return len(joined) == len(_STORED_SHAPE) * len(column) and joined.translate(_DIGITS_TO_ZERO) == _STORED_SHAPE * len(column)


def as_datetimes(column: Sequence[Any]) -> Sequence[datetime]:
    """Timestamps as datetimes (text is parsed)."""
    if column and isinstance(column[0], str):
        return list(map(datetime.fromisoformat, column))
    return column


def iso_column(column: Sequence[Any]) -> Sequence[str]:
    """ISO 8601 UTC text of every timestamp of a column."""
    distinct = set(column)
    if len(distinct) * 8 <= len(column):
        texts = {value: iso_utc(value) for value in distinct}
        return list(map(texts.__getitem__, column))
    if is_stored_text(column):
        return ("Z\x00".join(column) + "Z").replace(" ", "T").split("\x00")
    return list(map(add, map(_ISO, as_datetimes(column)), repeat("Z")))


class DayIndex:
    """The business day (YYYY-MM-DD) of moments inside [start of ``first``, end of ``last``), by bisection."""

    def __init__(self, first: date, last: date, calendar: BusinessCalendar) -> None:
        days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        self.starts = [calendar.bounds(day)[0] for day in days] + [calendar.bounds(last)[1]]
        self.text_starts = [moment.isoformat(sep=" ", timespec="microseconds") for moment in self.starts]
        self.names: list[str | None] = [None, *(day.isoformat() for day in days), None]

    def column(self, column: Sequence[Any]) -> Sequence[str | None]:
        """The business day of every timestamp of a column (None outside the range)."""
        if not column:
            return []
        values, starts = (column, self.text_starts) if is_stored_text(column) else (as_datetimes(column), self.starts)
        first, last = bisect_right(starts, min(values)), bisect_right(starts, max(values))
        if first == last:  # the whole chunk is one day: the usual case, rows come in id (about time) order
            return [self.names[first]] * len(values)
        return list(map(self.names.__getitem__, map(partial(bisect_right, starts), values)))
