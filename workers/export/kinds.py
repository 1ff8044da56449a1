"""What each export reads and how a chunk of database rows becomes CSV rows (and adds to the totals).

Rows are read in chunks and transformed a column at a time (``zip(*rows)``): sums, formula-injection
checks and timestamp formatting run as C-level loops over a column instead of Python code per cell,
which is what keeps a million usage rows close to the bare SELECT streamed to csv.writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

from sqlalchemy import Connection, Select, func, select, type_coerce
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import NullType, Text

from metering.ledger.tables import ApiKey, DailyRollup, UsageEvent, User
from workers.calendar import BusinessCalendar
from workers.export.csv_safety import neutralize, neutralize_column
from workers.export.csv_writer import quote_column
from workers.decimals import ZERO, decimal_text, exact_sum, money_text
from workers.export.times import DayIndex, iso_column

EVENTS, ROLLUPS = UsageEvent.__table__, DailyRollup.__table__  # type: ignore[attr-defined]
USERS, KEYS = User.__table__, ApiKey.__table__  # type: ignore[attr-defined]
TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                "output_tokens", "reasoning_tokens", "images", "web_search_requests")
#: Token kinds summed into an invoice's ``tokens`` (reasoning is part of output; images and searches are not tokens).
BILLED_TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                       "output_tokens")
COUNT_FIELDS = ("requests", "succeeded", "failed", "aborted")


class Totals:
    """Running totals of an export: integers exactly, decimal texts exactly (Decimal, never float)."""

    def __init__(self, integers: Sequence[str], decimals: Sequence[str], money: Sequence[str] = ()) -> None:
        self.integers = {name: 0 for name in integers}
        self.decimals = {name: ZERO for name in decimals}
        self.money = set(money)

    def add_integers(self, name: str, column: Sequence[int]) -> None:
        """Add a column of integers."""
        self.integers[name] += sum(column)

    def add_decimals(self, name: str, column: Sequence[str | None]) -> None:
        """Add a column of decimal texts (empty cells count as nothing)."""
        self.decimals[name] = exact_sum((self.decimals[name], exact_sum(column)))

    def to_json(self) -> dict[str, int | str]:
        """Integers as numbers, decimals as exact strings (CNY amounts keep two decimals)."""
        texts = {n: money_text(v) if n in self.money else decimal_text(v) for n, v in self.decimals.items()}
        return {**self.integers, **texts}


def _raw(column: Any) -> Any:
    """A column read without SQLAlchemy's result processing (SQLite's DateTime parsing costs ~40%)."""
    return type_coerce(column, NullType()).label(column.name)


# ---------------------------------------------------------------------------------------------- usage


class UsagePlan:
    """One row per usage event of the days, by id.

    A usage export is a million rows where a roll-up is thousands, so its lines are built for speed, byte
    for byte as csv.writer would write them: the database joins the ten integer cells of a row into one
    text (``joined_integers``), text cells are neutralized and quoted a column at a time, and each line
    is one ``",".join``. Its integer totals come from one aggregate query (``totals_query``) in the same
    transaction, so they are those of the rows written.
    """

    def __init__(self, start: date, end: date, calendar: BusinessCalendar) -> None:
        self.days = DayIndex(start, end, calendar)
        self.since, self.until = calendar.bounds(start)[0], calendar.bounds(end)[1]
        self.totals = Totals(("requests", *TOKEN_FIELDS, "quota"), ("usd",))
        self.ids: tuple[int, int] | None = None
        self.within: tuple[int, int] | None = None

    def where(self) -> Any:
        """The events of the range (within ``restrict``'s ids, if given)."""
        inside = (EVENTS.c.occurred_at >= self.since) & (EVENTS.c.occurred_at < self.until)
        if self.within is not None:
            inside = inside & EVENTS.c.id.between(*self.within)
        return inside

    def restrict(self, low: int, high: int) -> None:
        """Export only the range's events with ids from ``low`` to ``high`` (one slice of a parallel export)."""
        self.within = (low, high)

    def _joined(self) -> Any:
        return EVENTS.join(USERS, USERS.c.id == EVENTS.c.user_id).join(KEYS, KEYS.c.id == EVENTS.c.key_id)

    def query(self) -> Select[Any]:
        """The events with their user's name and key's prefix, by id (the integers as one text)."""
        e = EVENTS.c
        return (
            select(_raw(e.occurred_at), e.request_id, e.user_id, USERS.c.name, e.key_id, KEYS.c.display_prefix,
                   e.model, func.coalesce(e.channel, "").label("channel"), e.price_group, e.status, e.outcome,
                   e.source, joined_integers(*(e[name] for name in TOKEN_FIELDS), e.quota), e.usd,
                   _raw(e.price_version))
            .select_from(self._joined()).where(self.where(), *self._ids()).order_by(e.id)
        )

    def _ids(self) -> list[Any]:
        # Between the lowest and highest id of the range (``add_totals`` learns them): SQLite then reads
        # the rows by id, already in order, instead of through the occurred_at index and a sort of them all.
        if self.ids is None:
            return []
        return [EVENTS.c.id >= self.ids[0], EVENTS.c.id <= self.ids[1]]

    def totals_query(self) -> Select[Any]:
        """The rows, each token kind and the quota, summed over exactly the rows ``query`` reads."""
        e = EVENTS.c
        sums = (func.coalesce(func.sum(e[name]), 0) for name in (*TOKEN_FIELDS, "quota"))
        return select(func.count(), func.min(e.id), func.max(e.id), *sums) \
            .select_from(self._joined()).where(self.where())

    def add_totals(self, row: Sequence[Any]) -> None:
        """Add ``totals_query``'s row to the totals (and learn the range's lowest and highest id)."""
        self.totals.integers["requests"] += int(row[0])
        for name, value in zip((*TOKEN_FIELDS, "quota"), row[3:]):
            self.totals.integers[name] += int(value)
        self.ids = (int(row[1]), int(row[2])) if row[0] else None

    def count(self) -> Select[Any]:
        """How many rows the export writes."""
        return select(func.count()).select_from(EVENTS).where(self.where())

    def text(self, chunk: Sequence[Sequence[Any]]) -> str:
        """The CSV lines of a chunk (in ``USAGE_COLUMNS`` order, each ending in CRLF); its USD added to the totals."""
        if not chunk:
            return ""
        (occurred, request_id, user_id, user_name, key_id, key_prefix, model, channel, group, status, outcome,
         source, integers, usd, version) = zip(*chunk)
        self.totals.add_decimals("usd", usd)
        def cells(column: Sequence[str | None]) -> Sequence[str]:
            return quote_column(neutralize_column(column))
        lines = map(",".join, zip(
            self.days.column(occurred), iso_column(occurred), cells(request_id), map(str, user_id), cells(user_name),
            map(str, key_id), cells(key_prefix), cells(model), cells(channel), cells(group), cells(status),
            cells(outcome), cells(source), integers, quote_column(usd), iso_column(version),
        ))
        return "\r\n".join(lines) + "\r\n"


class joined_integers(FunctionElement[str]):
    """Integer columns as one comma-separated text, as Python's ``str`` writes each (SQLite has no concat_ws
    before 3.44: its printf; MySQL's CONCAT_WS of numbers is binary: cast to text)."""

    type = Text()
    inherit_cache = True


@compiles(joined_integers)
def _joined_integers(element: joined_integers, compiler: Any, **kw: Any) -> str:
    return f"concat_ws(',', {compiler.process(element.clauses, **kw)})"


@compiles(joined_integers, "sqlite")
def _joined_integers_sqlite(element: joined_integers, compiler: Any, **kw: Any) -> str:
    formats = ",".join(["%d"] * len(element.clauses))
    return f"printf('{formats}', {compiler.process(element.clauses, **kw)})"


@compiles(joined_integers, "mysql")
@compiles(joined_integers, "mariadb")
def _joined_integers_mysql(element: joined_integers, compiler: Any, **kw: Any) -> str:
    return f"CAST(concat_ws(',', {compiler.process(element.clauses, **kw)}) AS CHAR)"


# --------------------------------------------------------------------------------------------- rollup


class RollupPlan:
    """The roll-up rows of the closed days, in their unique key's order."""

    def __init__(self, start: date, end: date, calendar: BusinessCalendar) -> None:
        self.first, self.last = start.isoformat(), end.isoformat()
        self.totals = Totals((*COUNT_FIELDS, *TOKEN_FIELDS, "quota"), ("usd", "revenue_cny", "upstream_cost_usd"),
                             money=("revenue_cny",))

    def where(self) -> Any:
        """The roll-ups of the range's days."""
        return (ROLLUPS.c.day >= self.first) & (ROLLUPS.c.day <= self.last)

    def query(self) -> Select[Any]:
        """The roll-up rows with names, ordered by day, occurred_day, user, key, model, channel, group."""
        r = ROLLUPS.c
        return (
            select(r.day, r.occurred_day, r.user_id, USERS.c.name, r.key_id, KEYS.c.display_prefix, r.model, r.channel,
                   r.price_group, *(r[name] for name in (*COUNT_FIELDS, *TOKEN_FIELDS)), r.quota, r.usd,
                   r.revenue_cny, r.upstream_cost_usd)
            .select_from(ROLLUPS.join(USERS, USERS.c.id == r.user_id).join(KEYS, KEYS.c.id == r.key_id))
            .where(self.where())
            .order_by(r.day, r.occurred_day, r.user_id, r.key_id, r.model, r.channel, r.price_group)
        )

    def count(self) -> Select[Any]:
        """How many rows the export writes."""
        return select(func.count()).select_from(ROLLUPS).where(self.where())

    def rows(self, chunk: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """CSV rows of a chunk (in ``ROLLUP_COLUMNS`` order), added to the totals."""
        day, occurred_day, user_id, user_name, key_id, key_prefix, model, channel, group, *numbers = zip(*chunk)
        integers, (usd, revenue, cost) = numbers[:-3], numbers[-3:]
        for name, column in zip((*COUNT_FIELDS, *TOKEN_FIELDS, "quota"), integers):
            self.totals.add_integers(name, column)
        for name, column in (("usd", usd), ("revenue_cny", revenue), ("upstream_cost_usd", cost)):
            self.totals.add_decimals(name, column)
        safe = neutralize_column
        return list(zip(
            day, occurred_day, user_id, safe(user_name), key_id, safe(key_prefix), safe(model), safe(channel),
            safe(group), *integers, usd, revenue, cost,
        ))


# -------------------------------------------------------------------------------------------- invoice


class InvoicePlan:
    """Per user, pricing group and calendar month: the roll-ups of the range's days, summed exactly."""

    integer_fields = (*COUNT_FIELDS, "tokens", "quota")

    def __init__(self, start: date, end: date, calendar: BusinessCalendar) -> None:
        self.first, self.last = start.isoformat(), end.isoformat()
        self.totals = Totals(self.integer_fields, ("usd", "revenue_cny"), money=("revenue_cny",))
        self._open: list[Any] | None = None  # the line being summed: key, name, integers, usd, revenue

    def where(self) -> Any:
        """The roll-ups of the range's days."""
        return (ROLLUPS.c.day >= self.first) & (ROLLUPS.c.day <= self.last)

    def _month(self) -> Any:
        return func.substr(ROLLUPS.c.day, 1, 7)

    def query(self) -> Select[Any]:
        """Roll-up rows ordered so that each invoice line's rows are adjacent."""
        r = ROLLUPS.c
        tokens = sum((r[name] for name in BILLED_TOKEN_FIELDS[1:]), r[BILLED_TOKEN_FIELDS[0]])
        return (
            select(self._month(), r.user_id, USERS.c.name, r.price_group, *(r[n] for n in COUNT_FIELDS),
                   tokens, r.quota, r.usd, r.revenue_cny)
            .select_from(ROLLUPS.join(USERS, USERS.c.id == r.user_id))
            .where(self.where())
            .order_by(self._month(), r.user_id, r.price_group, r.id)
        )

    def count(self) -> Select[Any]:
        """How many lines the export writes."""
        lines = select(self._month(), ROLLUPS.c.user_id, ROLLUPS.c.price_group).where(self.where()).distinct()
        return select(func.count()).select_from(lines.subquery())

    def rows(self, chunk: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """The invoice lines completed by this chunk (the last one stays open until ``finish``)."""
        done: list[tuple[Any, ...]] = []
        for month, user_id, name, group, *numbers in chunk:
            key = (month, user_id, group)
            if self._open is None or self._open[0] != key:
                if self._open is not None:
                    done.append(self._line())
                self._open = [key, name, [0] * len(self.integer_fields), ZERO, ZERO]
            line = self._open
            for index, value in enumerate(numbers[:len(self.integer_fields)]):
                line[2][index] += value
            line[3] = exact_sum((line[3], numbers[-2]))
            line[4] = exact_sum((line[4], numbers[-1]))
        return done

    def finish(self) -> list[tuple[Any, ...]]:
        """The last open line, if any."""
        if self._open is None:
            return []
        last, self._open = self._line(), None
        return [last]

    def _line(self) -> tuple[Any, ...]:
        assert self._open is not None
        (month, user_id, group), name, integers, usd, revenue = self._open
        for field, value in zip(self.integer_fields, integers):
            self.totals.integers[field] += value
        self.totals.decimals["usd"] = exact_sum((self.totals.decimals["usd"], usd))
        self.totals.decimals["revenue_cny"] = exact_sum((self.totals.decimals["revenue_cny"], revenue))
        return (user_id, neutralize(name), neutralize(group), month, *integers, decimal_text(usd), money_text(revenue))


PLANS: dict[str, type[UsagePlan] | type[RollupPlan] | type[InvoicePlan]] = {
    "usage": UsagePlan, "rollup": RollupPlan, "invoice": InvoicePlan,
}


def stream_chunks(connection: Connection, query: Select[Any], size: int) -> Iterator[Sequence[Any]]:
    """The query's rows in chunks of ``size``, streamed (server-side cursors on PostgreSQL and MariaDB)."""
    result = connection.execution_options(stream_results=True, yield_per=size).execute(query)
    try:
        yield from result.partitions()
    finally:
        result.close()
