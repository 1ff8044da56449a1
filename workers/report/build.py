"""Billing reports from the closed days: daily summary, grouping, invoices, models, discrepancies, margin.

``build_report(engine, prices, start, end, by=("day",), calendar=...)`` reads the roll-ups of business
days ``start..end`` (the day a row is counted on is its close's day: late events count on the day that
closed them), the discrepancies those closes found, and which days are closed; ``render(report, fmt)``
writes it as ``table`` (rich tables as text), ``csv`` (the grouped section), ``json`` (every section,
money as exact decimal strings) or ``html`` (one self-contained file with three charts).

Money is never a float: quota and counts are integers, USD and CNY amounts ``Decimal`` summed exactly.
The margin compares revenue (CNY at the rates customers paid) with the upstream cost of the channels
whose cost is configured (list USD x ``cost_ratio``, at the reference CNY rate of the price table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from pricing.table import PriceTable
from workers.report.options import BY_FIELDS, FORMATS
from workers.calendar import BusinessCalendar, check_range, days_between
from workers.decimals import EXACT, ZERO, exact_sum
from workers.errors import InvalidArgument
from workers.report.frames import (
    COUNT_FIELDS,
    TOKEN_FIELDS,
    grand_totals,
    make_frame,
    read_closed_days,
    read_discrepancies,
    read_rollups,
    snapshot,
    totals,
)

#: What ``by`` may group on, and the columns each one adds.
SUMMARY_INTEGERS = (*COUNT_FIELDS, "tokens", "quota")
SUMMARY_MONEY = ("usd", "revenue_cny")


@dataclass(frozen=True)
class Report:
    """The sections of a report (pandas frames) and its totals."""

    start: date
    end: date
    time_zone: str
    by: tuple[str, ...]
    reference_cny_per_usd: Decimal
    daily: pd.DataFrame  # day, closed, counts, quota, usd, revenue_cny, reference_cny
    grouped: pd.DataFrame  # the ``by`` columns, counts, tokens, quota, usd, revenue_cny
    invoice: pd.DataFrame  # per user, group and month (the invoice export's columns)
    models: pd.DataFrame  # per model: counts, every token kind, quota, usd
    discrepancies: pd.DataFrame  # day, kind, subject, user_id, expected, actual, detail, adjustment_reference
    margin: pd.DataFrame  # per configured channel: revenue against upstream cost
    totals: dict[str, Any]
    open_days: list[str]  # days of the range not closed yet (their figures are missing or partial)
    unpriced_channels: list[str]  # channels in the range whose cost is not configured ("" = none named)
    rollups: pd.DataFrame = field(repr=False)  # the roll-up rows read (for the charts)


def check_by(by: Sequence[str]) -> tuple[str, ...]:
    """The grouping fields, validated (at least one, each known, no repeats)."""
    fields = tuple(by)
    if isinstance(by, str) or not fields:
        raise InvalidArgument("by", f"give a sequence of at least one of {', '.join(BY_FIELDS)}")
    for name in fields:
        if name not in BY_FIELDS:
            raise InvalidArgument("by", f"unknown field {name!r} (choose from {', '.join(BY_FIELDS)})")
    if len(set(fields)) != len(fields):
        raise InvalidArgument("by", f"a field is repeated in {fields!r}")
    return fields


def reference_rate(prices: PriceTable) -> Decimal:
    """The price table's reference CNY per USD (the official rate, not the promotion)."""
    for rate in prices.reference_rates:
        if rate.currency == "CNY":
            return Decimal(rate.per_usd)
    raise InvalidArgument("prices", "the price table has no CNY reference rate (reference_rates)")


def build_report(
    engine: Engine, prices: PriceTable, start: date, end: date, *, by: Sequence[str] = ("day",),
    calendar: BusinessCalendar,
) -> Report:
    """Read the closed days ``start..end`` and build every section of the report."""
    check_range(start, end)
    fields = check_by(by)
    rate = reference_rate(prices)
    with snapshot(engine) as connection:
        rollups = read_rollups(connection, start, end)
        findings = read_discrepancies(connection, start, end)
        closed = read_closed_days(connection, start, end)
    days = [day.isoformat() for day in days_between(start, end)]
    daily = daily_summary(rollups, days, closed, rate)
    margin, unpriced = margin_by_channel(rollups, prices, rate)
    summed = grand_totals(rollups, SUMMARY_INTEGERS, SUMMARY_MONEY)
    with_cost = margin_totals(margin)
    report_totals = {
        **summed, "reference_cny": _times(summed["usd"], rate), **with_cost,
        "discrepancies": len(findings), "days": len(days), "closed_days": len(closed),
    }
    return Report(
        start=start, end=end, time_zone=calendar.time_zone, by=fields, reference_cny_per_usd=rate, daily=daily,
        grouped=grouped_summary(rollups, fields), invoice=invoice(rollups), models=model_usage(rollups),
        discrepancies=findings, margin=margin, totals=report_totals,
        open_days=[day for day in days if day not in closed], unpriced_channels=unpriced, rollups=rollups,
    )


def daily_summary(rollups: pd.DataFrame, days: list[str], closed: set[str], rate: Decimal) -> pd.DataFrame:
    """Every day of the range (0 where nothing was counted), closed or not, with the reference price."""
    summed = totals(rollups, ("day",), (*COUNT_FIELDS, "quota"), SUMMARY_MONEY).set_index("day")
    rows = []
    for day in days:
        if day in summed.index:
            line = summed.loc[day]
            counts = [int(line[name]) for name in (*COUNT_FIELDS, "quota")]
            usd, revenue = line["usd"], line["revenue_cny"]
        else:
            counts, usd, revenue = [0] * 5, ZERO, Decimal("0.00")
        rows.append((day, day in closed, *counts, usd, revenue, _times(usd, rate)))
    spec = {"day": "str", "closed": "bool", **{n: "int" for n in (*COUNT_FIELDS, "quota")},
            "usd": "dec", "revenue_cny": "dec", "reference_cny": "dec"}
    return make_frame(rows, spec)


def grouped_summary(rollups: pd.DataFrame, by: tuple[str, ...]) -> pd.DataFrame:
    """Sums per the ``by`` fields (users by id with their name, keys by id with their prefix)."""
    keys = [column for name in by for column in BY_FIELDS[name]]
    return totals(rollups, keys, SUMMARY_INTEGERS, SUMMARY_MONEY)


def invoice(rollups: pd.DataFrame) -> pd.DataFrame:
    """Per user, pricing group and calendar month of the closed day: the invoice export's columns."""
    frame = rollups.assign(month=rollups["day"].str.slice(0, 7)) if not rollups.empty else rollups.assign(month="")
    summed = totals(frame, ("month", "user_id", "price_group"), SUMMARY_INTEGERS, SUMMARY_MONEY)
    names = rollups.drop_duplicates("user_id").set_index("user_id")["user_name"] if not rollups.empty else {}
    summed.insert(1, "user_name", [names[user] for user in summed["user_id"]] if len(summed) else [])
    columns = ["user_id", "user_name", "price_group", "month", *SUMMARY_INTEGERS, *SUMMARY_MONEY]
    return summed[columns].reset_index(drop=True)


def model_usage(rollups: pd.DataFrame) -> pd.DataFrame:
    """Per model: counts, every token kind, quota and list USD."""
    return totals(rollups, ("model",), (*COUNT_FIELDS, *TOKEN_FIELDS, "quota"), ("usd",))


def margin_by_channel(rollups: pd.DataFrame, prices: PriceTable, rate: Decimal) -> tuple[pd.DataFrame, list[str]]:
    """Revenue against upstream cost (CNY at ``rate``) per channel whose cost is configured; and the others."""
    summed = totals(rollups, ("channel",), ("requests", "quota"), SUMMARY_MONEY)
    rows, unpriced = [], []
    for line in summed.itertuples(index=False):
        channel = prices.channels.get(line.channel)
        if channel is None:
            unpriced.append(line.channel)
            continue
        ratio = Decimal(channel.cost_ratio)
        cost_usd = _times(line.usd, ratio)
        cost_cny = _times(cost_usd, rate)
        with_margin = exact_sum((line.revenue_cny, -cost_cny))
        rows.append((line.channel, ratio, int(line.requests), int(line.quota), line.usd, line.revenue_cny,
                     cost_usd, cost_cny, with_margin))
    spec = {"channel": "str", "cost_ratio": "dec", "requests": "int", "quota": "int", "usd": "dec",
            "revenue_cny": "dec", "upstream_cost_usd": "dec", "upstream_cost_cny": "dec", "margin_cny": "dec"}
    return make_frame(rows, spec), unpriced


def margin_totals(margin: pd.DataFrame) -> dict[str, Decimal]:
    """Revenue, cost and margin summed over the channels whose cost is configured."""
    return {
        "margin_revenue_cny": exact_sum(margin["revenue_cny"]),
        "upstream_cost_cny": exact_sum(margin["upstream_cost_cny"]),
        "margin_cny": exact_sum(margin["margin_cny"]),
    }


def render(report: Report, fmt: str) -> str:
    """The report as ``table`` | ``csv`` | ``json`` | ``html`` text."""
    from workers.report.render import RENDERERS

    if fmt not in RENDERERS:
        raise InvalidArgument("format", f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return RENDERERS[fmt](report)


def _times(value: Decimal, factor: Decimal) -> Decimal:
    """An exact product (never rounded: the EXACT context traps any rounding)."""
    return EXACT.multiply(value, factor)
