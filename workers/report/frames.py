"""The report's data: roll-ups, discrepancies and day closes read into pandas, and summed exactly.

Integers stay ``int64`` (never a float: no NaN is ever introduced, missing days are filled with 0);
money stays ``Decimal`` in object columns, summed with ``workers.decimals.exact_sum``. All reads of one
report run in one transaction on one snapshot (SQLite: a deferred BEGIN in WAL mode; PostgreSQL and
MariaDB: REPEATABLE READ), so the sections agree with each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from decimal import Decimal
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, select

from metering.ledger.database import READ_ONLY
from metering.ledger.tables import ApiKey, DailyRollup, DayClose, Discrepancy, User
from workers.decimals import exact_sum

ROLLUPS, FINDINGS, DAYS = DailyRollup.__table__, Discrepancy.__table__, DayClose.__table__  # type: ignore[attr-defined]
USERS, KEYS = User.__table__, ApiKey.__table__  # type: ignore[attr-defined]

COUNT_FIELDS = ("requests", "succeeded", "failed", "aborted")
TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                "output_tokens", "reasoning_tokens", "images", "web_search_requests")
#: ``tokens`` = these (reasoning is part of output; images and web searches are not tokens).
BILLED_TOKEN_FIELDS = TOKEN_FIELDS[:5]
MONEY_FIELDS = ("usd", "revenue_cny")

#: The roll-up frame: column -> kind (int, dec: Decimal or None, str).
ROLLUP_FRAME = {
    "day": "str", "occurred_day": "str", "user_id": "int", "user_name": "str", "key_id": "int", "key_prefix": "str",
    "model": "str", "channel": "str", "price_group": "str", **{name: "int" for name in (*COUNT_FIELDS, *TOKEN_FIELDS)},
    "quota": "int", "usd": "dec", "revenue_cny": "dec", "upstream_cost_usd": "dec",
}
DISCREPANCY_FRAME = {
    "day": "str", "kind": "str", "subject": "str", "user_id": "nint", "expected": "nint", "actual": "nint",
    "detail": "str", "adjustment_reference": "str",
}


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """One read-only transaction whose reads all see the same snapshot."""
    with engine.connect() as connection:
        options: dict[str, Any] = {READ_ONLY: True}
        if engine.dialect.name != "sqlite":
            options["isolation_level"] = "REPEATABLE READ"
        reader = connection.execution_options(**options)
        with reader.begin():
            yield reader


def make_frame(rows: Iterable[Sequence[Any]], spec: dict[str, str]) -> pd.DataFrame:
    """A frame of ``rows`` with each column's kind (int, nint, bool, dec, str) enforced, also with no rows."""
    records = list(rows)
    columns = list(zip(*records)) if records else [() for _ in spec]
    data: dict[str, Any] = {}
    for (name, kind), values in zip(spec.items(), columns):
        if kind == "int":
            data[name] = pd.Series([int(v) for v in values], dtype="int64")
        elif kind == "nint":
            data[name] = pd.Series(pd.array([None if v is None else int(v) for v in values], dtype="Int64"))
        elif kind == "bool":
            data[name] = pd.Series([bool(v) for v in values], dtype=bool)
        elif kind == "dec":
            data[name] = pd.Series([None if v is None or v == "" else Decimal(v) for v in values], dtype=object)
        else:
            data[name] = pd.Series(["" if v is None else str(v) for v in values], dtype=object)
    return pd.DataFrame(data, columns=list(spec))


def read_rollups(connection: Connection, start: date, end: date) -> pd.DataFrame:
    """The roll-up rows of the closed days ``start..end``, with user names and key prefixes."""
    r = ROLLUPS.c
    query = (
        select(r.day, r.occurred_day, r.user_id, USERS.c.name, r.key_id, KEYS.c.display_prefix, r.model, r.channel,
               r.price_group, *(r[name] for name in (*COUNT_FIELDS, *TOKEN_FIELDS)), r.quota, r.usd, r.revenue_cny,
               r.upstream_cost_usd)
        .select_from(ROLLUPS.join(USERS, USERS.c.id == r.user_id).join(KEYS, KEYS.c.id == r.key_id))
        .where(r.day >= start.isoformat(), r.day <= end.isoformat())
        .order_by(r.day, r.occurred_day, r.user_id, r.key_id, r.model, r.channel, r.price_group)
    )
    frame = make_frame(connection.execute(query), ROLLUP_FRAME)
    frame["tokens"] = frame[list(BILLED_TOKEN_FIELDS)].sum(axis=1).astype("int64")
    return frame


def read_discrepancies(connection: Connection, start: date, end: date) -> pd.DataFrame:
    """What the closes of ``start..end`` found, by day, kind and subject."""
    f = FINDINGS.c
    query = (select(f.day, f.kind, f.subject, f.user_id, f.expected, f.actual, f.detail, f.adjustment_reference)
             .where(f.day >= start.isoformat(), f.day <= end.isoformat()).order_by(f.day, f.kind, f.subject))
    return make_frame(connection.execute(query), DISCREPANCY_FRAME)


def read_closed_days(connection: Connection, start: date, end: date) -> set[str]:
    """The days of ``start..end`` whose close is done (YYYY-MM-DD)."""
    query = select(DAYS.c.day).where(DAYS.c.day >= start.isoformat(), DAYS.c.day <= end.isoformat(),
                                     DAYS.c.status == "closed")
    return set(connection.execute(query).scalars())


def totals(frame: pd.DataFrame, keys: Sequence[str], integers: Sequence[str], money: Sequence[str]) -> pd.DataFrame:
    """Sums of ``frame`` per ``keys`` (sorted): integers as int64, money exactly as Decimal."""
    columns = [*keys, *integers, *money]
    if frame.empty:
        return make_frame([], {**{k: "str" for k in keys}, **{i: "int" for i in integers}, **{m: "dec" for m in money}})
    grouped = frame.groupby(list(keys), sort=True, dropna=False)
    summed = grouped[list(integers)].sum().astype("int64") if integers else None
    parts = [summed] if summed is not None else []
    for name in money:
        parts.append(grouped[name].agg(exact_sum).rename(name).astype(object))
    result = pd.concat(parts, axis=1).reset_index()
    return result[columns]


def grand_totals(frame: pd.DataFrame, integers: Sequence[str], money: Sequence[str]) -> dict[str, Any]:
    """Whole-frame sums: Python ints and Decimals."""
    result: dict[str, Any] = {name: int(frame[name].sum()) if not frame.empty else 0 for name in integers}
    result.update({name: exact_sum(frame[name]) for name in money})
    return result
