"""One pass over a day's usage events: re-price each, audit its tokens, and add it to the roll-up.

The events a close counts are chosen by the watermark rule of docs/worker.md: the day's own events (by
``occurred_at``) and the late ones (by id range). Requests that never became an event (released or
expired holds) are counted from ``holds`` by one GROUP BY.

On SQLite and PostgreSQL the database rolls up the day's own events (``_scan_grouped``): one GROUP BY
per slice of the day (on PostgreSQL ``SCAN_WORKERS`` slices at a time, on connections of their own). It
sums every counter and the quota as integers and the USD list value exactly (on SQLite the decimal text
is split into two integers, its whole part and twelve digits of fraction; on PostgreSQL it is summed as
``numeric``), and it re-prices every event in SQL with the integer formula of ``pricing.quote.quota``'s
precompiled path (``QuotaPlan``: the rates already folded with the group multiplier). Each group also returns
the ids of the events SQL did not clear: a re-priced quota unlike the one charged, a prompt count off
by more than the tolerance, an event outside the precompiled path (an older price version, a model or
group without a plan, a count beyond the range where the integer arithmetic cannot overflow) or, on
SQLite, a USD text that is not a plain decimal. Only those events are read again, and the row-by-row
code below judges them: it stays the one authority on what a discrepancy is. Late events, other
databases and any arithmetic overflow take the row-by-row path for every event (``_scan_rows``).
Memory stays flat whatever the day's size: the database keeps the rows, Python one line per group.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Context, Decimal, Inexact, localcontext
from fractions import Fraction
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection, Engine, Integer, Numeric, Text, and_, bindparam, case, cast, exists, func, literal_column, not_, or_, select,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql.expression import Grouping

from metering.ledger.database import READ_ONLY
from metering.ledger.tables import Hold, UsageEvent
from pricing.quote import decimal_text, quota
from pricing.table import PriceTable, QuotaPlan
from pricing.usage import UsageRecord
from workers.calendar import BusinessCalendar
from workers.close.revenue import revenue_cny, upstream_cost

EVENTS, HOLDS = UsageEvent.__table__, Hold.__table__  # type: ignore[attr-defined]
#: The roll-up's integer columns, in this order in every accumulator.
COUNTERS = (
    "requests", "succeeded", "failed", "aborted", "input_tokens", "cached_input_tokens", "cache_write_5m_tokens",
    "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "images", "web_search_requests", "quota",
)
TOKEN_FIELDS = COUNTERS[4:12]
#: A token difference is flagged above max(this many tokens, this share of the local count).
TOKEN_TOLERANCE_ABSOLUTE = 16
TOKEN_TOLERANCE_SHARE = Fraction(1, 10)
#: Sums of exact decimals: wide enough for any day, and any rounding raises instead of passing silently.
EXACT = Context(prec=80, traps=[Inexact])
#: Rows fetched per round trip while streaming events row by row.
BATCH = 20_000
#: Databases whose GROUP BY rolls up the day's own events (others stream every row).
GROUPED_DIALECTS = frozenset({"sqlite", "postgresql"})
#: GROUP BY queries running at once, each on its own connection (the database works, Python waits).
SCAN_WORKERS = max(1, min(2, os.cpu_count() or 1))
#: ...on PostgreSQL, where the server does the work. SQLite works in this process, and two slices at once
#: cost more CPU than they save (measured: 15.0 s of CPU for a day of 1M events against 12.4 s one at a time).
PARALLEL_DIALECTS = frozenset({"postgresql"})
#: Events per GROUP BY slice of the day (progress and the lease's checkpoints come between slices).
SLICE_EVENTS = 100_000
MAX_SLICES = 256
#: Flagged events read back per query.
ID_CHUNK = 500

#: (occurred_day, user_id, key_id, model, channel, price_group): one roll-up row.
GroupKey = tuple[str, int, int, str, str, str]
Progress = Callable[[str, int, int | None], None]

_COLUMNS = (
    EVENTS.c.id, EVENTS.c.request_id, EVENTS.c.user_id, EVENTS.c.key_id, EVENTS.c.model, EVENTS.c.channel,
    EVENTS.c.price_group, EVENTS.c.outcome, EVENTS.c.source, *(EVENTS.c[name] for name in TOKEN_FIELDS),
    EVENTS.c.quota, EVENTS.c.usd, EVENTS.c.occurred_at, HOLDS.c.prompt_tokens, HOLDS.c.prompt_source,
)
_FIRST_TOKEN = 9  # index of input_tokens in _COLUMNS
_JOINED = EVENTS.outerjoin(HOLDS, HOLDS.c.id == EVENTS.c.hold_id)


class _Counts(NamedTuple):
    """The fields ``quota()``'s precompiled path reads, without UsageRecord's validation (rows are valid)."""

    model: str
    input_tokens: int
    cached_input_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int
    reasoning_tokens: int
    images: int
    web_search_requests: int


@dataclass
class DayTotals:
    """What one pass found: roll-up accumulators and discrepancies (plain dicts, written by the close)."""

    counters: dict[GroupKey, list[int]] = field(default_factory=dict)
    usd: dict[GroupKey, Decimal] = field(default_factory=dict)
    discrepancies: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    late_events: int = 0

    def _slot(self, key: GroupKey) -> list[int]:
        slot = self.counters.get(key)
        if slot is None:
            slot = self.counters[key] = [0] * len(COUNTERS)
            self.usd[key] = Decimal(0)
        return slot


@dataclass(frozen=True)
class Window:
    """The events one close counts (docs/worker.md, the watermark rule)."""

    day: date
    starts_at: datetime  # naive UTC
    ends_at: datetime
    watermark: int  # every event id up to it was committed when read
    previous_watermark: int | None  # the previous close's, None for the first close


def scan_events(
    connection: Connection, prices: PriceTable, calendar: BusinessCalendar, window: Window, *,
    progress: Progress | None = None, checkpoint: Callable[[], None] | None = None,
) -> DayTotals:
    """Re-price, token-audit and roll up every event of ``window``; ``checkpoint`` runs between batches."""
    with localcontext(EXACT):
        day = window.day.isoformat()
        totals = DayTotals()
        if connection.dialect.name not in GROUPED_DIALECTS or not _scan_grouped(
            connection, prices, window, totals, progress, checkpoint
        ):
            totals = DayTotals()  # (a grouped pass that gave up left partial sums: start over)
            own = and_(EVENTS.c.occurred_at >= window.starts_at, EVENTS.c.occurred_at < window.ends_at,
                       (EVENTS.c.id + _int(0)) <= window.watermark)  # the day's index, not every id up to W
            _scan_rows(connection, prices, None, own, totals, day, progress, checkpoint)
        late_from = window.previous_watermark if window.previous_watermark is not None else 0
        late = and_(EVENTS.c.id > late_from, EVENTS.c.id <= window.watermark, EVENTS.c.occurred_at < window.starts_at)
        _scan_rows(connection, prices, calendar, late, totals, day, progress, checkpoint)
        return totals


# ---------------------------------------------------------------------- row by row


def _scan_rows(
    connection: Connection, prices: PriceTable, late: BusinessCalendar | None, condition: Any, totals: DayTotals,
    day: str, progress: Progress | None, checkpoint: Callable[[], None] | None,
) -> None:
    """Every event matching ``condition``, in id order, judged and added in Python (``late``: late events)."""
    query = select(*_COLUMNS).select_from(_JOINED).where(condition).order_by(EVENTS.c.id)
    for rows in _batches(connection, query):
        for row in rows:
            _add_event(totals, prices, row, day, late)
        if progress is not None:
            progress("events", totals.events, None)
        if checkpoint is not None:
            checkpoint()


def _batches(connection: Connection, query: Any) -> Iterator[list[Any]]:
    result = connection.execution_options(yield_per=BATCH).execute(query)
    while rows := result.fetchmany(BATCH):
        yield rows


def _add_event(totals: DayTotals, prices: PriceTable, row: Any, day: str, late: BusinessCalendar | None) -> None:
    (_event_id, _request_id, user_id, key_id, model, channel, group, outcome, _source) = row[:_FIRST_TOKEN]
    tokens = row[_FIRST_TOKEN:_FIRST_TOKEN + len(TOKEN_FIELDS)]
    charged, usd = row[_FIRST_TOKEN + len(TOKEN_FIELDS):_FIRST_TOKEN + len(TOKEN_FIELDS) + 2]
    occurred_day = _judge(totals, prices, row, day, late)
    totals.events += 1
    key = (occurred_day, user_id, key_id, model, channel or "", group)
    slot = totals._slot(key)
    slot[0] += 1
    if outcome == "completed":
        slot[1] += 1
    else:
        slot[3] += 1  # a stream cut short: billed for what was delivered
    for index, value in enumerate(tokens, start=4):
        slot[index] += value
    slot[12] += charged
    totals.usd[key] += Decimal(usd)


def _judge(totals: DayTotals, prices: PriceTable, row: Any, day: str, late: BusinessCalendar | None) -> str:
    """One event's discrepancies (late, price, tokens, in this order); returns the day it occurred on."""
    (_event_id, request_id, user_id, _key_id, model, _channel, group, _outcome, source) = row[:_FIRST_TOKEN]
    tokens = row[_FIRST_TOKEN:_FIRST_TOKEN + len(TOKEN_FIELDS)]
    charged, _usd, occurred_at, local_prompt, prompt_source = row[_FIRST_TOKEN + len(TOKEN_FIELDS):]
    occurred_day = day
    if late is not None:
        occurred_day = late.day_of(occurred_at).isoformat()
        totals.late_events += 1
        totals.discrepancies.append(_discrepancy(
            "late_event", request_id, user_id, None, charged,
            f"occurred {occurred_at.isoformat()}Z (day {occurred_day}, already closed), counted on {day}",
        ))
    expected = _reprice(prices, model, group, tokens, occurred_at)
    if expected != charged:
        totals.discrepancies.append(_discrepancy(
            "price", request_id, user_id, expected, charged,
            f"{model} at {occurred_at.isoformat()}Z re-prices to {expected} units; {charged} were charged",
        ))
    if source == "upstream" and prompt_source == "local" and local_prompt is not None:
        upstream_prompt = tokens[0] + tokens[1] + tokens[2] + tokens[3]
        if abs(upstream_prompt - local_prompt) > max(TOKEN_TOLERANCE_ABSOLUTE, local_prompt * TOKEN_TOLERANCE_SHARE):
            totals.discrepancies.append(_discrepancy(
                "tokens", request_id, user_id, local_prompt, upstream_prompt,
                f"prompt tokens: counted {local_prompt} locally, the upstream reported {upstream_prompt}",
            ))
    return occurred_day


def _reprice(prices: PriceTable, model: str, group: str, tokens: tuple[int, ...], occurred_at: datetime) -> int:
    at = occurred_at.replace(tzinfo=timezone.utc).timestamp()
    plan = prices.quota_plans.get(group, {}).get(model)
    if plan is not None and at >= plan.starts_at:
        return quota(prices, _Counts(model, *tokens), at, group)  # type: ignore[arg-type]  # the precompiled path
    entry, _ = prices.resolve(model)
    names = dict(zip(TOKEN_FIELDS, tokens))
    return quota(prices, UsageRecord(provider=entry.provider, model=model, **names), at, group)


def _discrepancy(kind: str, subject: str, user_id: int | None, expected: int | None, actual: int | None,
                 detail: str) -> dict[str, Any]:
    return {"kind": kind, "subject": subject[:190], "user_id": user_id, "expected": expected, "actual": actual,
            "detail": detail}


# ---------------------------------------------------------------------- rolled up by the database


class _GiveUp(Exception):
    """The grouped pass cannot be exact here (an overflow, a sum that is not an integer): go row by row."""


def _scan_grouped(
    connection: Connection, prices: PriceTable, window: Window, totals: DayTotals, progress: Progress | None,
    checkpoint: Callable[[], None] | None,
) -> bool:
    """Roll up the day's own events in SQL (see the module docstring); False to take the row-by-row path."""
    backend = connection.dialect.name
    day = window.day.isoformat()
    in_day = and_(EVENTS.c.occurred_at >= window.starts_at, EVENTS.c.occurred_at < window.ends_at)
    estimate = connection.execute(select(func.count()).select_from(EVENTS).where(in_day)).scalar_one()
    if not estimate:
        return True
    statement = _grouped_statement(backend, prices, window)
    workers = SCAN_WORKERS if backend in PARALLEL_DIALECTS else 1
    count = min(MAX_SLICES, max(workers, math.ceil(estimate / SLICE_EVENTS)))
    count = math.ceil(count / workers) * workers
    span = window.ends_at - window.starts_at
    edges = [window.starts_at + span * i / count for i in range(count)] + [window.ends_at]
    flagged: list[int] = []
    odd: list[int] = []
    parts: dict[GroupKey, list[int]] = {}  # SQLite: group -> [sum of whole parts, sum of 12-digit fractions]
    bounds = list(zip(edges, edges[1:]))
    try:
        with closing(_slices(connection, statement, bounds, workers)) as slices:
            for rows in slices:  # in day order
                for row in rows:
                    _merge(totals, parts, flagged, odd, row, day, backend)
                if progress is not None:
                    progress("events", totals.events, None)
                if checkpoint is not None:
                    checkpoint()
        if odd:
            _rescan_odd_usd(connection, parts, totals, odd, day)
    except _GiveUp:
        return False
    except DBAPIError as exc:
        if _arithmetic_error(exc):
            return False
        raise
    for key, (whole, fraction) in parts.items():
        totals.usd[key] += Decimal(whole) + Decimal(fraction).scaleb(-USD_FRACTION_DIGITS)
    flagged.sort()
    for begin in range(0, len(flagged), ID_CHUNK):  # the events SQL did not clear, judged here, in id order
        chunk = flagged[begin:begin + ID_CHUNK]
        query = select(*_COLUMNS).select_from(_JOINED).where(EVENTS.c.id.in_(chunk)).order_by(EVENTS.c.id)
        for row in connection.execute(query):
            _judge(totals, prices, row, day, None)
    return True


def _slices(connection: Connection, statement: Any, bounds: list[tuple[datetime, datetime]],
            workers: int) -> Iterator[Sequence[Any]]:
    """Each slice's groups, in order: ``workers`` slices run at once on connections of their own, and at most
    one finished slice waits to be read, so memory stays flat whatever the number of slices."""
    engine = connection.engine
    if not _own_connections(engine):  # an in-memory SQLite database: only this connection sees it
        for lo, hi in bounds:
            yield connection.execute(statement, {"lo": lo, "hi": hi}).all()
        return
    if workers <= 1:
        for lo, hi in bounds:
            yield _run_slice(engine, statement, lo, hi)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="close-scan")
    try:
        pending: deque[Future[Sequence[Any]]] = deque()
        for lo, hi in bounds:
            pending.append(pool.submit(_run_slice, engine, statement, lo, hi))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a stop or an error: the running slices end first


def _run_slice(engine: Engine, statement: Any, lo: datetime, hi: datetime) -> Sequence[Any]:
    """One slice's groups, on a connection of its own."""
    with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
        if connection.dialect.name == "postgresql":
            for setting in _PG_SLICE_SETTINGS:
                connection.exec_driver_sql(f"SET LOCAL {setting}")
        return connection.execute(statement, {"lo": lo, "hi": hi}).all()


def _own_connections(engine: Engine) -> bool:
    """Whether another connection sees the same database (not so for an in-memory SQLite one)."""
    return not isinstance(engine.pool, (SingletonThreadPool, StaticPool))


#: PostgreSQL, for the slice's transaction only: no JIT (compiling the re-pricing CASE costs more than running
#: it), and a hash aggregate in memory (the planner, expecting many groups, would sort every row to disk).
_PG_SLICE_SETTINGS = ("jit = off", "enable_sort = off", "work_mem = '32MB'")


def _merge(totals: DayTotals, parts: dict[GroupKey, list[int]], flagged: list[int], odd: list[int], row: Any,
           day: str, backend: str) -> None:
    user_id, key_id, model, channel, group, requests, succeeded = row[:7]
    key = (day, user_id, key_id, model, channel or "", group)  # no channel and "" are one row, as row by row
    slot = totals._slot(key)
    requests, succeeded = _integer(requests), _integer(succeeded)
    slot[0] += requests
    slot[1] += succeeded
    slot[3] += requests - succeeded
    for index in range(4, 13):  # the eight token kinds, then quota
        slot[index] += _integer(row[index + 3])
    totals.events += requests
    if backend == "sqlite":
        whole, fraction, ids, odd_ids = row[16:20]
        sums = parts.setdefault(key, [0, 0])
        sums[0] += _integer(whole)
        sums[1] += _integer(fraction)
        if odd_ids:
            odd.extend(int(i) for i in odd_ids.split(","))
    else:
        usd, ids = row[16:18]
        if usd is not None:
            totals.usd[key] += usd if isinstance(usd, Decimal) else Decimal(usd)
    if ids:
        flagged.extend(int(i) for i in ids.split(","))


def _integer(value: Any) -> int:
    """An integer sum as returned (int; Decimal from PostgreSQL's sum of bigint); anything else is not exact."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    raise _GiveUp(f"not an integer sum: {value!r}")


def _rescan_odd_usd(connection: Connection, parts: dict[GroupKey, list[int]], totals: DayTotals, odd: list[int],
                    day: str) -> None:
    """SQLite: USD texts that are not plain decimals were split anyway: take their parts back, add them exactly."""
    whole, fraction = _usd_parts(EVENTS.c.usd)
    odd.sort()
    for begin in range(0, len(odd), ID_CHUNK):
        query = select(EVENTS.c.user_id, EVENTS.c.key_id, EVENTS.c.model, EVENTS.c.channel, EVENTS.c.price_group,
                       whole, fraction, EVENTS.c.usd).where(EVENTS.c.id.in_(odd[begin:begin + ID_CHUNK]))
        for user_id, key_id, model, channel, group, units, digits, usd in connection.execute(query):
            key = (day, user_id, key_id, model, channel or "", group)
            sums = parts[key]
            sums[0] -= _integer(units)
            sums[1] -= _integer(digits)
            totals.usd[key] += Decimal(usd)


def _arithmetic_error(exc: DBAPIError) -> bool:
    """An integer overflow (SQLite's sum) or a data exception (PostgreSQL: out of range, not a number)."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("22")
    return "overflow" in str(exc.orig).lower()


#: SQLite sums a plain decimal USD text as two integers: its whole part, and its fraction as this many digits.
USD_FRACTION_DIGITS = 12
#: ...for texts of at most this many characters (so at most 12 decimals, and whole parts far from overflowing).
USD_PLAIN_LENGTH = 14


def _usd_parts(usd: Any) -> tuple[Any, Any]:
    """SQLite: a plain decimal text as (whole part, fraction x 10^12) ("12.0125" -> 12, 12500000000)."""
    fraction = func.substr(usd, func.instr(usd.concat("."), ".") + 1)  # "" without a point
    return (cast(usd, Integer),  # SQLite casts the longest integer prefix: "12.0125" -> 12
            cast(func.substr(fraction.concat("0" * USD_FRACTION_DIGITS), 1, USD_FRACTION_DIGITS), Integer))


def _grouped_statement(backend: str, prices: PriceTable, window: Window) -> Any:
    """The GROUP BY of one slice ``[:lo, :hi)`` of the day (see the module docstring)."""
    e, h = EVENTS.c, HOLDS.c
    priced = (e.input_tokens, e.cached_input_tokens, e.cache_write_5m_tokens, e.cache_write_1h_tokens, e.output_tokens,
              e.images, None, e.web_search_requests)  # RATE_FIELDS order; None: the request itself (1)
    counts = [c for c in priced if c is not None]
    limit = _safe_count(prices)
    least, greatest = (func.min, func.max) if backend == "sqlite" else (func.least, func.greatest)
    safe = and_(least(*counts) >= 0, greatest(*counts) <= _int(limit))
    window_start = window.starts_at.replace(tzinfo=timezone.utc).timestamp()
    by_group = {}
    for group, plans in prices.quota_plans.items():
        branches = {name: _expected(priced, plan, window_start) for name, plan in plans.items()}
        by_group[group] = _switch(e.model, sorted(branches.items()), backend)
    repriced = case(by_group, value=e.price_group) if by_group else None
    expected = case((safe, repriced)) if repriced is not None else None
    local = h.prompt_tokens
    share = TOKEN_TOLERANCE_SHARE
    difference = func.abs(e.input_tokens + e.cached_input_tokens + e.cache_write_5m_tokens + e.cache_write_1h_tokens - local)
    allowed = case((local * _int(share.numerator) > _int(TOKEN_TOLERANCE_ABSOLUTE * share.denominator),
                    local * _int(share.numerator)), else_=_int(TOKEN_TOLERANCE_ABSOLUTE * share.denominator))
    within = and_(local >= 0, local <= _int(limit), difference * _int(share.denominator) <= allowed)
    tokens_flag = case((and_(h.prompt_source == "local", local.is_not(None), e.source == "upstream"),
                        case((within, 0), else_=1)), else_=0)
    flag = case((expected == e.quota, tokens_flag), else_=1) if expected is not None else literal_column("1")
    flagged_id = case((flag == 1, e.id))
    columns: list[Any] = [
        e.user_id, e.key_id, e.model, e.channel, e.price_group, func.count(),
        func.sum(case((e.outcome == "completed", 1), else_=0)), *(func.sum(e[name]) for name in TOKEN_FIELDS),
        func.sum(e.quota),
    ]
    if backend == "sqlite":
        usd = e.usd
        glob = usd.op("GLOB", is_comparison=True)
        # A plain text starts with a digit, so at most USD_PLAIN_LENGTH characters hold at most 12 decimals
        # ("5." is plain: 5 and nothing); anything else is odd and summed exactly in Python.
        odd = or_(func.length(usd) > USD_PLAIN_LENGTH, glob("*[^0-9.]*"), glob("*.*.*"), not_(glob("[0-9]*")))
        columns += [func.sum(part) for part in _usd_parts(usd)]
        columns += [func.group_concat(flagged_id), func.group_concat(case((odd, e.id)))]
    else:
        columns += [func.sum(cast(e.usd, Numeric)), func.string_agg(cast(flagged_id, Text), ",")]
    lo = bindparam("lo", type_=e.occurred_at.type)
    hi = bindparam("hi", type_=e.occurred_at.type)
    # ``id + 0``: the watermark must not be used as an index range (SQLite would scan every event up to it).
    where = and_(e.occurred_at >= lo, e.occurred_at < hi, (e.id + _int(0)) <= _int(window.watermark))
    keys = [e.user_id, e.key_id, e.model, e.channel, e.price_group]  # no channel and "": merged in Python
    return select(*columns).select_from(_JOINED).where(where).group_by(*keys)


def _int(value: int) -> Any:
    """An integer written into the SQL (no bind: the same type everywhere, and no parameter limit)."""
    return literal_column(str(int(value)))


def _safe_count(prices: PriceTable) -> int:
    """The largest count for which every term of the SQL re-pricing and token check fits in a signed 64-bit integer."""
    rates = [rate for plans in prices.quota_plans.values() for plan in plans.values()
             for rate in (*plan.rates, *(plan.long_rates or ()))] or [0]
    divisors = [plan.divisor for plans in prices.quota_plans.values() for plan in plans.values()] or [1]
    biggest = max(1, max(rates))
    room = 2**63 - 1 - biggest - max(divisors)
    share = TOKEN_TOLERANCE_SHARE
    return max(0, min(room // (7 * biggest), (2**63 - 1) // (5 * share.denominator * max(1, share.numerator)), 10**15))


def _expected(priced: tuple[Any, ...], plan: QuotaPlan, window_start: float) -> Any:
    """``quota()``'s precompiled path in SQL: ceil(sum(count x rate) / divisor); NULL before the plan's version."""
    def total(rates: tuple[int, ...]) -> Any:
        terms = [_int(rate) if column is None else column * _int(rate)
                 for column, rate in zip(priced, rates, strict=True) if rate]
        result = terms[0] if terms else _int(0)
        for term in terms[1:]:
            result = result + term
        return result

    amount = total(plan.rates)
    if plan.long_context_above is not None:
        assert plan.long_rates is not None
        prompt = priced[0] + priced[1] + priced[2] + priced[3]
        amount = case((prompt > _int(plan.long_context_above), total(plan.long_rates)), else_=amount)
    value = Grouping(amount + _int(plan.divisor - 1)).op("/")(_int(plan.divisor))  # integer division: ceil for sums >= 0
    if plan.starts_at <= window_start:
        return value  # every event of the window is at or after this version
    starts = datetime.fromtimestamp(plan.starts_at, timezone.utc).replace(tzinfo=None)
    return case((EVENTS.c.occurred_at >= starts, value))  # before it: NULL, judged in Python


def _switch(column: Any, branches: list[tuple[str, Any]], backend: str) -> Any:
    """CASE over sorted names as a binary search: a few comparisons per row instead of one per name."""
    if len(branches) <= 4:
        return case(dict(branches), value=column)
    middle = len(branches) // 2
    pivot = branches[middle][0]
    ordered = column if backend == "sqlite" else column.collate("C")  # code point order, as Python sorts
    return case((ordered < pivot, _switch(column, branches[:middle], backend)),
                else_=_switch(column, branches[middle:], backend))


# ---------------------------------------------------------------------- holds and rows


def add_unbilled_holds(connection: Connection, totals: DayTotals, window: Window) -> None:
    """Count the day's requests that never became a usage event: failed (released) and abandoned (expired)."""
    # A hold's event is the one its settle inserted, under the hold's request id (unique), which names the
    # hold: looking it up by request id uses that unique index (usage_events.hold_id has none).
    no_event = ~exists().where(EVENTS.c.request_id == HOLDS.c.request_id, EVENTS.c.hold_id == HOLDS.c.id)
    rows = connection.execute(
        select(HOLDS.c.user_id, HOLDS.c.key_id, HOLDS.c.model, HOLDS.c.channel, HOLDS.c.price_group, HOLDS.c.status,
               func.count())
        .where(HOLDS.c.created_at >= window.starts_at, HOLDS.c.created_at < window.ends_at,
               HOLDS.c.status.in_(("released", "expired")), no_event)
        .group_by(HOLDS.c.user_id, HOLDS.c.key_id, HOLDS.c.model, HOLDS.c.channel, HOLDS.c.price_group, HOLDS.c.status)
    )
    day = window.day.isoformat()
    for user_id, key_id, model, channel, group, status, count in rows:
        slot = totals._slot((day, user_id, key_id, model, channel or "", group))
        slot[0] += count
        slot[2 if status == "released" else 3] += count


def rollup_rows(totals: DayTotals, day: date, prices: PriceTable, rates: dict[int, Fraction]) -> list[dict[str, Any]]:
    """The roll-up rows to insert, with revenue and upstream cost, in a stable order."""
    rows = []
    with localcontext(EXACT):
        for key in sorted(totals.counters):
            rows.append(_rollup_row(totals, key, day, prices, rates))
    return rows


def _rollup_row(totals: DayTotals, key: GroupKey, day: date, prices: PriceTable, rates: dict[int, Fraction]) -> dict[str, Any]:
    occurred_day, user_id, key_id, model, channel, group = key
    usd = totals.usd[key]
    cost = upstream_cost(usd, channel, prices)
    counts = dict(zip(COUNTERS, totals.counters[key]))
    return {
        "day": day.isoformat(), "occurred_day": occurred_day, "user_id": user_id, "key_id": key_id, "model": model,
        "channel": channel, "price_group": group, **counts, "usd": decimal_text(Fraction(usd)),
        "revenue_cny": str(revenue_cny(counts["quota"], rates.get(user_id))),
        "upstream_cost_usd": None if cost is None else decimal_text(Fraction(cost)),
    }
