"""Checks of what a ledger call is given, run before anything is read or written.

Each check returns the value to use or raises a typed error naming the field (``InvalidField`` for the
call's own arguments, ``RequestError`` for a request body's fields), so a bad value never reaches a
statement: no database error, no overflow, no partial write. The error never echoes the value itself
(a request id or reference may carry a customer's data), only what is wrong with it.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime, timedelta, timezone
from typing import Any

from metering.errors import RequestError
from metering.ledger.errors import InvalidField
from pricing.usage import MAX_COUNT

#: Request ids and references: the entries' references are ``charge:<request id>``, ``adjustment:<reference>``
#: ... in VARCHAR(190) columns, so an id must leave room for the longest prefix (``adjustment:``, 11).
IDENTIFIER_MAX_CHARS = 160
#: Upstream channel names (VARCHAR(64) columns).
CHANNEL_MAX_CHARS = 64
#: No event of an LLM API predates this; an earlier time is a clock or unit bug (seconds read as ms).
EARLIEST = datetime(2000, 1, 1, tzinfo=timezone.utc)
#: How far ahead of now an event may be dated. Generous on purpose: the demo books the coming days'
#: simulated traffic ahead of time; a year is still far from the overflow of a 9999-12-31 date.
MAX_AHEAD = timedelta(days=366)
#: The longest user or key name: the columns are VARCHAR(190) (PostgreSQL and MariaDB refuse more, SQLite not).
NAME_MAX_CHARS = 190
#: The largest row id (users, keys, ...): the id columns are INTEGER, 32-bit on PostgreSQL (SERIAL) and
#: MariaDB (INT), so no row has a larger one; handed to a driver, a larger number is an error ("integer out
#: of range" on PostgreSQL, an overflow past 64 bits on SQLite), not "no such row".
MAX_ROW_ID = 2**31 - 1
#: Body fields that bound the output, in the order they are read (the newer name first).
MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")


def identifier(value: Any, field: str, max_chars: int = IDENTIFIER_MAX_CHARS) -> str:
    """A request id, reference or channel: non-empty text, no surrounding spaces, storable everywhere.

    No surrounding spaces because MariaDB's collations compare 'a' and 'a ' as equal: refusing them keeps
    every database's idea of "the same id" identical. No NUL or lone surrogate: PostgreSQL cannot store
    the first, UTF-8 cannot encode the second.
    """
    if not isinstance(value, str):
        raise InvalidField(field, f"must be text, got {type(value).__name__}")
    if not value or value != value.strip():
        raise InvalidField(field, "must be non-empty, without leading or trailing spaces")
    if len(value) > max_chars:
        raise InvalidField(field, f"must be at most {max_chars} characters, got {len(value)}")
    for position, char in enumerate(value):
        if char == "\0" or unicodedata.category(char) == "Cs":
            raise InvalidField(field, f"U+{ord(char):04X} at position {position} cannot be stored (NUL or a lone surrogate)")
    return value


def text(value: Any, field: str, max_chars: int = 10_000) -> str:
    """Free text (a note): any text every database stores exactly, bounded; else ``InvalidField``."""
    if not isinstance(value, str):
        raise InvalidField(field, f"expected text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidField(field, f"at most {max_chars} characters, got {len(value)}")
    for position, char in enumerate(value):
        if char == "\0" or unicodedata.category(char) == "Cs":
            raise InvalidField(field, f"U+{ord(char):04X} at position {position} cannot be stored (NUL or a lone surrogate)")
    return value


def row_id(value: Any, field: str) -> int:
    """A user's, key's or other row's id (an integer, or its ASCII digits) from 1 to ``MAX_ROW_ID``; else
    ``InvalidField``. Digits are measured before they are converted: 5,000 of them are refused, not parsed."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value.lstrip("0")) > len(str(MAX_ROW_ID)):
            raise InvalidField(field, f"must be an id from 1 to {MAX_ROW_ID}")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidField(field, f"must be an integer id, got {type(value).__name__}")
    if not 1 <= value <= MAX_ROW_ID:
        raise InvalidField(field, f"must be an id from 1 to {MAX_ROW_ID}")
    return value


def user_ref(value: Any, field: str) -> int | str:
    """A user given by id (an int, or ASCII digits: a user name is never only digits) or by name: the id
    (``row_id``) or the name (text a name column can hold); else ``InvalidField``."""
    if isinstance(value, int) or (isinstance(value, str) and value.isascii() and value.isdigit()):
        return row_id(value, field)
    return text(value, field, NAME_MAX_CHARS)


def event_time(at: Any, field: str = "at", *, now: datetime | None = None) -> datetime:
    """``at`` as an aware datetime between 2000 and a year from now (None: now); else ``InvalidField``."""
    current = now or datetime.now(timezone.utc)
    if at is None:
        return current
    if not isinstance(at, datetime):
        raise InvalidField(field, f"must be a datetime with a time zone, got {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidField(field, "has no time zone (a naive time would be read in the server's local zone)")
    try:
        moment = at.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last datetime once in UTC
        raise InvalidField(field, "is out of range") from None
    if moment < EARLIEST:
        raise InvalidField(field, f"is before {EARLIEST.date()}: no LLM API event is that old")
    if moment > current + MAX_AHEAD:
        raise InvalidField(field, f"is more than {MAX_AHEAD.days} days ahead of now")
    return moment


def naive_utc(moment: Any, field: str) -> datetime:
    """An aware datetime as the naive UTC datetime the tables store; else ``InvalidField``."""
    if not isinstance(moment, datetime):
        raise InvalidField(field, f"must be a datetime with a time zone, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidField(field, "has no time zone")
    try:
        return moment.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        raise InvalidField(field, "is out of range") from None


def request_body(body: Any) -> dict[str, Any]:
    """The request body, if it is a JSON object."""
    if not isinstance(body, dict):
        raise RequestError((), f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The output bound the request asks for (``max_completion_tokens``, else ``max_tokens``), or None.

    A bound that is present must be a positive integer up to ``MAX_COUNT``: a string, a float, a bool, zero,
    a negative or an absurd number is the client's error (the upstream refuses it too), not a reason to
    reserve some other amount silently.
    """
    for field in MAX_OUTPUT_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError((field,), f"must be a positive integer, got {type(value).__name__}")
        if value < 1:
            raise RequestError((field,), f"must be a positive integer, got {value}")
        if value > MAX_COUNT:
            raise RequestError((field,), f"must be at most {MAX_COUNT:,}")
        return value
    return None


__all__ = [
    "CHANNEL_MAX_CHARS", "EARLIEST", "IDENTIFIER_MAX_CHARS", "MAX_AHEAD", "MAX_ROW_ID", "NAME_MAX_CHARS", "event_time",
    "identifier", "max_output_tokens", "naive_utc", "request_body", "row_id", "text", "user_ref",
]
