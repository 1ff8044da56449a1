"""Exact decimal sums for money columns stored as decimal text (never through float).

The default decimal context keeps 28 digits and would round a long sum silently; ``EXACT`` keeps 80
and traps ``Inexact``, so a sum is either exact or an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Context, Decimal, Inexact, InvalidOperation, localcontext

#: Enough digits for any sum of the ledger's amounts; a rounded result raises instead of passing silently.
EXACT = Context(prec=80, traps=[Inexact, InvalidOperation])
ZERO = Decimal(0)


def exact_sum(values: Iterable[str | Decimal | None]) -> Decimal:
    """The exact sum of decimal texts (or Decimals); None and "" count as nothing; a bad value raises ValueError."""
    try:
        with localcontext(EXACT):
            total = sum(map(Decimal, filter(None, values)), ZERO)  # filter(None) skips None and "" (and zeros)
    except InvalidOperation:
        raise ValueError("a money column holds a value that is not a decimal") from None
    if not total.is_finite():
        raise ValueError(f"a money column holds a value that is not a finite decimal (sum {total})")
    return total


def decimal_text(value: Decimal) -> str:
    """The shortest exact plain text of ``value`` ("0.00125", "12", never an exponent)."""
    if not value:
        return "0"
    return format(value.normalize(EXACT), "f")


def money_text(value: Decimal, places: int = 2) -> str:
    """``value`` with at least ``places`` decimals (a CNY amount keeps its fen: "12.30"), never rounded."""
    exact = value.normalize(EXACT) if value else ZERO
    exponent = exact.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= -places:
        return format(exact.quantize(Decimal(1).scaleb(-places), context=EXACT), "f")
    return decimal_text(value)

