"""Data for the export and report tests, booked through the real ledger API and closed by the real close.

Users carry the names that break naive CSV and HTML writers: formula starters (``=``, ``+``, ``-``,
``@``), Chinese with a comma and quotes, and markup. Requests are settled, cut short (aborted) or
released (failed) at fixed times in the business time zone (Asia/Shanghai), some near midnight so the
business day differs from the UTC date.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import insert, text

from metering.ledger.meter import Meter
from metering.ledger.tables import DailyRollup, DayClose
from metering.streams import StreamResult
from pricing.usage import UsageRecord
from workers.calendar import BusinessCalendar

CALENDAR = BusinessCalendar("Asia/Shanghai")
DAY1, DAY2 = date(2026, 11, 2), date(2026, 11, 3)
#: (name, top-up in CNY or None, the key's channel)
CUSTOMERS = (
    ("张伟, \"VIP\"", "50", "azure-east"),
    ("=cmd|' /C calc'!A0", "20", "openai-official"),
    ("+1", None, None),
    ("-x", "10", "azure-east"),
    ("@SUM(1)", None, "openai-official"),
    ("<script>alert(1)</script>", "5", None),
)
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5")
ROLLUPS, DAYS = DailyRollup.__table__, DayClose.__table__  # type: ignore[attr-defined]


def at(day: date, hour: int, minute: int = 0) -> datetime:
    """``hour:minute`` of ``day`` in the business time zone, aware."""
    return datetime.combine(day, time(hour, minute), CALENDAR.zone)


def after(day: date) -> datetime:
    """An aware moment one hour after ``day`` ends: the day is complete (its holds' TTL has passed)."""
    return at(day + timedelta(days=1), 1)


def book_customers(meter: Meter) -> list[str]:
    """The users of ``CUSTOMERS`` with a signup grant, their top-up and one key each; returns the secrets."""
    secrets = []
    for number, (name, cny, _) in enumerate(CUSTOMERS):
        user = meter.create_user(name)
        meter.grant(user, "signup")
        if cny:
            meter.topup(user, cny, "CNY", f"order-{number}", at=at(DAY1, 0, 1))
        secrets.append(meter.create_key(user, f"key-{number}"))
    return secrets


def book_day(meter: Meter, secrets: list[str], day: date, requests: int = 5) -> None:
    """``requests`` requests per customer key over ``day``: the 2nd failed (released), the 3rd aborted, the rest
    settled; the 4th has a request id starting with ``-``."""
    for number in range(requests):
        for index, secret in enumerate(secrets):
            model = MODELS[(number + index) % len(MODELS)]
            minute = (number * 97 + index * 13) % (24 * 60)
            channel = CUSTOMERS[index][2]
            body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hello " * (1 + number)}]}
            request_id = f"{day}-{index}-{number}" if number != 3 else f"-{day}-{index}"  # some ids start like a formula
            hold = meter.authorize(secret, body, request_id, at=at(day, minute // 60, minute % 60), channel=channel)
            if number % 5 == 1:
                meter.release(hold)
                continue
            provider = "anthropic" if model.startswith("claude") else "openai"
            usage = UsageRecord(provider=provider, model=model, input_tokens=hold.prompt_tokens,
                                cached_input_tokens=number % 3, output_tokens=10 + number)
            if number % 5 == 2:
                meter.settle(hold, stream=StreamResult("aborted", usage, "", (), None, None, 0, 3))
            else:
                meter.settle(hold, usage=usage)


def booked_and_closed(meter: Meter, days: tuple[date, ...] = (DAY1, DAY2)) -> list[str]:
    """Customers, traffic on ``days``, and each day closed by ``workers.close.nightly.close_day``; returns the secrets."""
    from workers.close.nightly import close_day

    secrets = book_customers(meter)
    for day in days:
        book_day(meter, secrets, day)
    for day in days:
        result = close_day(meter, day, calendar=CALENDAR, now=after(days[-1]))
        assert result.status == "closed", result
    return secrets


def insert_rollup(meter: Meter, **values: Any) -> None:
    """One roll-up row written directly (for cases a close does not produce, e.g. a negative quota)."""
    row = {
        "day": DAY1.isoformat(), "occurred_day": DAY1.isoformat(), "channel": "", "price_group": "default",
        "requests": 0, "succeeded": 0, "failed": 0, "aborted": 0, "input_tokens": 0, "cached_input_tokens": 0,
        "cache_write_5m_tokens": 0, "cache_write_1h_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0,
        "images": 0, "web_search_requests": 0, "quota": 0, "usd": "0", "revenue_cny": "0.00", "upstream_cost_usd": None,
    } | values
    with meter.engine.begin() as connection:
        connection.execute(insert(ROLLUPS).values(**row))


def mark_closed(meter: Meter, day: date) -> None:
    """A day_closes row saying ``day`` is closed (for data written with ``insert_rollup``)."""
    start, end = CALENDAR.bounds(day)
    with meter.engine.begin() as connection:
        connection.execute(insert(DAYS).values(day=day.isoformat(), status="closed", fence=1, time_zone=CALENDAR.time_zone,
                                               starts_at=start, ends_at=end, closed_at=end))


def scalar(meter: Meter, sql: str, **params: Any) -> Any:
    """One value of a SQL query."""
    with meter.engine.connect() as connection:
        return connection.execute(text(sql), params).scalar_one()


def decimal_sum_sql(meter: Meter, column: str, table: str, where: str, **params: Any) -> Any:
    """The database's own exact sum of a decimal-text column (PostgreSQL and MariaDB: SUM of a DECIMAL cast).

    SQLite has no exact decimal type (CAST gives a float), so there the texts are summed with Decimal.
    """
    from decimal import Decimal

    if meter.engine.dialect.name == "sqlite":
        with meter.engine.connect() as connection:
            texts = connection.execute(text(f"SELECT {column} FROM {table} WHERE {where}"), params).scalars()
            return sum((Decimal(t) for t in texts if t is not None), Decimal(0))
    value = scalar(meter, f"SELECT SUM(CAST({column} AS DECIMAL(38, 18))) FROM {table} WHERE {where}", **params)
    return Decimal(0) if value is None else Decimal(value)
