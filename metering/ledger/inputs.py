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
#: The largest value of a BIGINT column (quota, counters, cursors): a signed 64-bit integer.
MAX_BIGINT = 2**63 - 1
#: A key's allowed models: at most this many names, each at most ``MODEL_MAX_CHARS`` (the events' model column),
#: and their stored JSON at most ``MODELS_MAX_CHARS`` (MariaDB's TEXT column holds 65,535 bytes).
MAX_MODELS = 1_000
MODEL_MAX_CHARS = 190
MODELS_MAX_CHARS = 60_000


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
    _storable(value, field)
    return value


def text(value: Any, field: str, max_chars: int = 10_000) -> str:
    """Free text (a note): any text every database stores exactly, bounded; else ``InvalidField``."""
    if not isinstance(value, str):
        raise InvalidField(field, f"expected text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidField(field, f"at most {max_chars} characters, got {len(value)}")
    _storable(value, field)
    return value


def _storable(value: str, field: str) -> None:
    """No NUL (PostgreSQL cannot store it) and no lone surrogate (not UTF-8); ASCII text is checked at once."""
    if value.isascii() and "\0" not in value:  # str.isascii is O(1): the common case skips the walk
        return
    for position, char in enumerate(value):
        if char == "\0" or unicodedata.category(char) == "Cs":
            raise InvalidField(field, f"U+{ord(char):04X} at position {position} cannot be stored (NUL or a lone surrogate)")


def integer(value: Any, field: str, low: int, high: int) -> int:
    """An ``int`` (not a bool, not a float, not text) from ``low`` to ``high``; else ``InvalidField``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidField(field, f"must be an integer from {low} to {high}, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidField(field, f"must be an integer from {low} to {high}")
    return value


def row_id(value: Any, field: str) -> int:
    """The id of a row (a user, key, hold...): an ``int`` from 1 to ``MAX_ROW_ID``; else ``InvalidField``.

    A well-formed id of no row is the caller's ``NotFound``, not this check's."""
    return integer(value, field, 1, MAX_ROW_ID)


def digits_id(value: str, field: str) -> int:
    """A row id typed as ASCII digits (a command line's argument): measured before it is converted, so 5,000
    digits are refused, not parsed; then ``row_id``."""
    if not (value.isascii() and value.isdigit()) or len(value.lstrip("0")) > len(str(MAX_ROW_ID)):
        raise InvalidField(field, f"must be an id from 1 to {MAX_ROW_ID}")
    return row_id(int(value), field)


def user_ref(value: Any, field: str) -> int | str:
    """A user given by id (an int, or ASCII digits: a user name is never only digits) or by name: the id
    (``row_id``) or the name (text a name column can hold); else ``InvalidField``."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return digits_id(value, field)
    if isinstance(value, int) and not isinstance(value, bool):
        return row_id(value, field)
    return text(value, field, NAME_MAX_CHARS)


def flag(value: Any, field: str) -> bool:
    """A ``bool`` (not 0/1, not text); else ``InvalidField``."""
    if not isinstance(value, bool):
        raise InvalidField(field, f"must be True or False, got {type(value).__name__}")
    return value


def choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    """One of ``allowed`` (compared as text, exactly); else ``InvalidField`` listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise InvalidField(field, f"must be one of {', '.join(allowed)}")
    return value


def model_names(value: Any, field: str = "models") -> list[str]:
    """A key's allowed models: a list or tuple of model names, as the sorted, de-duplicated list stored.

    Each name is non-empty text without spaces around it (``identifier``, at most ``MODEL_MAX_CHARS``); at
    least one and at most ``MAX_MODELS`` names (None, not an empty list, allows every model). A bare string
    is refused: it would be read as a list of its characters.
    """
    if not isinstance(value, (list, tuple)):
        raise InvalidField(field, f"must be a list of model names (None allows every model), got {type(value).__name__}")
    if not value:
        raise InvalidField(field, "must name at least one model (None allows every model)")
    if len(value) > MAX_MODELS:
        raise InvalidField(field, f"must name at most {MAX_MODELS} models, got {len(value)}")
    names = sorted({identifier(name, f"{field}[{index}]", MODEL_MAX_CHARS) for index, name in enumerate(value)})
    if sum(len(name) + 4 for name in names) > MODELS_MAX_CHARS:  # a bound on the stored JSON (see MODELS_MAX_CHARS)
        raise InvalidField(field, f"the names are more than the {MODELS_MAX_CHARS:,} characters a key can store")
    return names


def duration(value: Any, field: str, longest: timedelta) -> timedelta:
    """A ``timedelta`` from zero to ``longest``; else ``InvalidField``."""
    if not isinstance(value, timedelta):
        raise InvalidField(field, f"must be a timedelta, got {type(value).__name__}")
    if not timedelta(0) <= value <= longest:
        raise InvalidField(field, f"must be from zero to {longest}")
    return value


def event_time(at: Any, field: str = "at", *, now: datetime | None = None, required: bool = False) -> datetime:
    """``at`` as an aware datetime between 2000 and a year from now (None: now, unless ``required``); else
    ``InvalidField``."""
    current = now or datetime.now(timezone.utc)
    if at is None and not required:
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


__all__ = [
    "CHANNEL_MAX_CHARS", "EARLIEST", "IDENTIFIER_MAX_CHARS", "MAX_AHEAD", "MAX_BIGINT", "MAX_MODELS", "MAX_ROW_ID", "MODEL_MAX_CHARS",
    "MODELS_MAX_CHARS", "NAME_MAX_CHARS", "choice", "digits_id", "duration", "event_time", "flag", "identifier",
    "integer", "model_names", "naive_utc", "request_body", "row_id", "text", "user_ref",
]
