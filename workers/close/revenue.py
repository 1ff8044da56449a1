"""What quota is worth in money: the customer's paid rate (revenue) and the channel's cost (upstream).

Revenue in CNY of a quota amount = amount x the user's paid rate: the CNY paid over the quota bought,
over the user's top-ups up to the end of the day (a non-CNY payment counts at its USD credit x the
reference CNY rate of the price table). A user who never paid (grants, codes only) brings 0. Rounded
once, per roll-up row, half-even to the fen.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from sqlalchemy import Connection, select

from metering.ledger.tables import TopupOrder
from pricing.table import PriceTable

ORDERS = TopupOrder.__table__  # type: ignore[attr-defined]


def cny_per_usd(prices: PriceTable) -> Decimal:
    """The reference CNY rate of the price table (the official rate, not the promotion)."""
    for rate in prices.reference_rates:
        if rate.currency == "CNY":
            return rate.per_usd
    raise ValueError("reference_rates: the price table has no CNY reference rate; revenue in CNY needs one")


def paid_rates(connection: Connection, prices: PriceTable, until: datetime) -> dict[int, Fraction]:
    """CNY paid per quota unit bought, per user, over top-ups created before ``until`` (naive UTC)."""
    reference = cny_per_usd(prices)
    paid: dict[int, Decimal] = {}
    bought: dict[int, int] = {}
    rows = connection.execute(
        select(ORDERS.c.user_id, ORDERS.c.amount, ORDERS.c.currency, ORDERS.c.usd_credit, ORDERS.c.quota)
        .where(ORDERS.c.created_at < until)
    )
    for user_id, amount, currency, usd_credit, quota in rows:
        cny = Decimal(amount) if currency == "CNY" else Decimal(usd_credit) * reference
        paid[user_id] = paid.get(user_id, Decimal(0)) + cny
        bought[user_id] = bought.get(user_id, 0) + int(quota)
    return {user: Fraction(paid[user]) / bought[user] for user in paid if bought[user] > 0}


def revenue_cny(quota: int, rate: Fraction | None) -> Decimal:
    """``quota`` at ``rate`` CNY per unit, rounded half-even to the fen (0 without a rate)."""
    if rate is None or quota == 0:
        return Decimal("0.00")
    return round_half_even(Fraction(quota) * rate, 2)


def round_half_even(value: Fraction, places: int) -> Decimal:
    """``value`` rounded once, half-even, to ``places`` decimals (integer arithmetic: no double rounding)."""
    scaled = value * 10**places
    whole = round(scaled)  # Fraction.__round__ rounds half to even, exactly
    return Decimal(whole).scaleb(-places).quantize(Decimal(1).scaleb(-places))


def upstream_cost(usd: Decimal, channel: str, prices: PriceTable) -> Decimal | None:
    """The channel's cost of ``usd`` of list price (exact), or None where the channel's cost is not configured."""
    configured = prices.channels.get(channel)
    return None if configured is None else usd * configured.cost_ratio
