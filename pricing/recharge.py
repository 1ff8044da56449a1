"""Top-ups and grants: money paid (or given) -> USD of list-price credit -> quota units.

Rounding, stated once: credit bought is ``amount x usd_per_unit`` exactly; its quota is that credit x
``units_per_usd`` rounded *down* (a customer never receives a fraction of a unit they did not pay for).
At the shipped promotion, 10 CNY -> $10 -> 5,000,000 units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pricing.errors import FieldError, PriceNotFound
from pricing.quote import decimal_text
from pricing.schema import RechargeRate
from pricing.table import PriceTable, as_timestamp


@dataclass(frozen=True, slots=True)
class TopupQuote:
    """What a payment buys at the recharge rate in force, and what that credit costs at the official rate."""

    amount: Decimal
    currency: str
    rate_id: str
    label: str
    usd_credit: Fraction
    quota: int
    reference_currency: str | None
    reference_price: Fraction | None  # the same USD credit at the official exchange rate

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, exact decimals as strings."""
        return {
            "amount": amount_text(self.amount),
            "currency": self.currency,
            "rate_id": self.rate_id,
            "label": self.label,
            "usd_credit": decimal_text(self.usd_credit),
            "quota": self.quota,
            "reference_currency": self.reference_currency,
            "reference_price": None if self.reference_price is None else decimal_text(self.reference_price),
        }


def rate_in_force(table: PriceTable, currency: str, at: datetime | float) -> RechargeRate:
    """The recharge rate for ``currency`` whose window holds ``at`` (windows never overlap: validated)."""
    moment = as_timestamp(at)
    for rate in table.recharge_rates:
        if rate.currency != currency or moment < rate.valid_from.timestamp():
            continue
        if rate.valid_until is None or moment < rate.valid_until.timestamp():
            return rate
    raise PriceNotFound(f"no recharge rate for {currency} at {datetime.fromtimestamp(moment).isoformat()}")


#: The most one top-up may pay, and its finest fraction (USDT has 6 decimals; cents need 2).
MAX_TOPUP_AMOUNT = Decimal(10**9)
AMOUNT_DECIMAL_PLACES = 8


def topup_amount(amount: Decimal | str | int) -> Decimal:
    """``amount`` as the exact decimal paid, or ``FieldError('amount')``: a positive number up to a billion
    with at most 8 decimal places, given as text, an int or a Decimal (a float has already lost its cents)."""
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, str, int)):
        raise FieldError("amount", f"must be a decimal number as text, an int or a Decimal, got {type(amount).__name__}")
    if isinstance(amount, str) and len(amount) > 64:
        raise FieldError("amount", f"must be a decimal number, got {len(amount)} characters")
    try:
        paid = Decimal(amount)
    except ArithmeticError:
        raise FieldError("amount", f"must be a decimal number, got {amount!r}") from None
    if not paid.is_finite() or paid <= 0:
        raise FieldError("amount", f"must be a positive number, got {amount!r}")
    if paid > MAX_TOPUP_AMOUNT:
        raise FieldError("amount", f"{amount!r} is more than one top-up may pay ({MAX_TOPUP_AMOUNT})")
    exponent = paid.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > AMOUNT_DECIMAL_PLACES and paid != paid.quantize(Decimal(1).scaleb(-AMOUNT_DECIMAL_PLACES)):
        raise FieldError("amount", f"{amount!r} has more than {AMOUNT_DECIMAL_PLACES} decimal places")
    return paid


def amount_text(amount: Decimal) -> str:
    """An amount paid as the one text of its value: no exponent, no trailing zeros (``10``, ``0.5``, ``99.9``).

    What ``topup_orders.amount`` stores: ``10``, ``"10.00"`` and ``Decimal("1e1")`` are one payment."""
    return decimal_text(Fraction(amount))


def same_amount(stored: object, paid: Decimal) -> bool:
    """Whether a stored amount (any text of a decimal, e.g. a row written before amounts were canonical) is
    ``paid`` by value; text that is no number is another amount."""
    try:
        return Decimal(str(stored)) == paid
    except ArithmeticError:
        return False


def quote_topup(table: PriceTable, amount: Decimal | str | int, currency: str, at: datetime | float) -> TopupQuote:
    """USD credit and quota bought by paying ``amount`` of ``currency`` at time ``at``."""
    paid = topup_amount(amount)
    rate = rate_in_force(table, currency, at)
    credit = Fraction(paid) * Fraction(rate.usd_per_unit)
    if math.floor(credit * table.units_per_usd) < 1:
        raise FieldError("amount", f"{amount!r} {currency} buys no quota unit (at {rate.id})")
    reference = next((r for r in table.reference_rates if r.currency == currency), None)
    if reference is None:  # paying in USD or USDT: show the price in the first reference currency
        reference = table.reference_rates[0] if table.reference_rates else None
    return TopupQuote(
        amount=paid,
        currency=currency,
        rate_id=rate.id,
        label=rate.label,
        usd_credit=credit,
        quota=math.floor(credit * table.units_per_usd),
        reference_currency=None if reference is None else reference.currency,
        reference_price=None if reference is None else credit * Fraction(reference.per_usd),
    )


def grant_quota(table: PriceTable, kind: str) -> int:
    """Quota units of a grant (``signup``, ``github_star``, ...), rounded down like top-ups."""
    grant = table.grants.get(kind)
    if grant is None:
        raise PriceNotFound(f"unknown grant {kind!r} (known: {', '.join(sorted(table.grants))})")
    return math.floor(Fraction(grant.usd) * table.units_per_usd)
