"""Usage -> exact USD cost -> integer quota units, by the price version in force at the event time.

The rule, stated once: ``quota = ceil(exact list USD cost x group multiplier x units_per_usd)``, rounded
once per request, with integer arithmetic only. A request that used anything at a non-zero price
therefore costs at least 1 unit; zero usage costs 0 units. The exact cost is returned too, so reports
can show the rounding residual (``quota - exact units``, always in [0, 1)).

Buckets are disjoint (see ``pricing.usage``): OpenAI cached tokens are billed at the cached rate
*instead of* the input rate, Anthropic cache reads and writes at their own rates, reasoning tokens as
the output tokens they are part of. A long-context tier applies when the request's total input
(all four input buckets) is above its threshold: then every token of the request moves to its rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pricing.table import RATE_FIELDS, CompiledVersion, PriceTable, QuotaPlan, as_timestamp
from pricing.usage import InvalidUsage, UsageRecord

#: The most quota one request may cost: 10^18 units ($2 trillion at 500,000 units per USD). The ledger keeps
#: quota in signed 64-bit integers (up to 9.2 x 10^18): one charge always fits with room for a balance to
#: carry several. Counts are bounded (``pricing.usage.MAX_COUNT``) and so are prices, but not their product
#: at every multiplier: checked here, so an absurd charge is an ``InvalidUsage``, never a database overflow.
MAX_QUOTA = 10**18


@dataclass(frozen=True, slots=True)
class PricedUsage:
    """One request priced: the exact costs, the quota charged and what it was priced by."""

    model: str  # as the usage record named it
    priced_model: str  # the table entry used (the fallback model when ``fallback_used``)
    fallback_used: bool
    price_version: datetime  # effective_from of the version in force
    long_context: bool
    group: str
    multiplier: Fraction
    usd: Fraction  # exact list-price cost, before the group multiplier
    charged_usd: Fraction  # usd x multiplier
    quota: int
    exact_units: Fraction  # charged_usd x units_per_usd, before rounding
    breakdown: dict[str, Fraction]  # list USD per bucket (RATE_FIELDS), zero buckets omitted

    @property
    def residual_units(self) -> Fraction:
        """What rounding up added: ``quota - exact_units``, in [0, 1)."""
        return self.quota - self.exact_units

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: exact decimals as strings, quota as an int."""
        return {
            "model": self.model,
            "priced_model": self.priced_model,
            "fallback_used": self.fallback_used,
            "price_version": self.price_version.isoformat(),
            "long_context": self.long_context,
            "group": self.group,
            "multiplier": decimal_text(self.multiplier),
            "usd": decimal_text(self.usd),
            "charged_usd": decimal_text(self.charged_usd),
            "quota": self.quota,
            "exact_units": decimal_text(self.exact_units),
            "residual_units": decimal_text(self.residual_units),
            "breakdown": {name: decimal_text(value) for name, value in self.breakdown.items()},
        }


def decimal_text(value: Fraction) -> str:
    """An exact decimal string for a fraction whose denominator divides a power of ten."""
    numerator, denominator = value.numerator, value.denominator
    digits = 0
    while denominator % 2 == 0 or denominator % 5 == 0:
        factor = 10 // (2 if denominator % 2 == 0 else 5)
        numerator, denominator = numerator * factor, denominator * factor // 10
        digits += 1
    if denominator != 1:
        raise ValueError(f"{value} has no finite decimal expansion")
    return format(Decimal(numerator).scaleb(-digits).normalize(), "f") if digits else str(numerator)


def _counts(usage: UsageRecord, requests: int) -> tuple[int, ...]:
    """The counts in RATE_FIELDS order."""
    return (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_5m_tokens,
        usage.cache_write_1h_tokens,
        usage.output_tokens,
        usage.images,
        requests,
        usage.web_search_requests,
    )


def _rates_for(compiled: CompiledVersion, total_input: int) -> tuple[tuple[int, ...], bool]:
    above = compiled.long_context_above
    if above is not None and total_input > above:
        assert compiled.long_rates is not None
        return compiled.long_rates, True
    return compiled.rates, False


def price(
    table: PriceTable,
    usage: UsageRecord,
    at: datetime | float,
    group: str = "default",
    *,
    requests: int = 1,
) -> PricedUsage:
    """Price one request's usage at event time ``at`` for ``group`` (``requests`` for per-request prices)."""
    if requests < 0:
        raise ValueError("requests must not be negative")
    entry, fallback_used = table.resolve(usage.model)
    compiled = entry.version_at(as_timestamp(at))
    multiplier = table.group_multiplier(group)
    rates, long_context = _rates_for(compiled, usage.total_input_tokens)
    counts = _counts(usage, requests)
    denominator = compiled.denominator
    breakdown = {
        name: Fraction(count * rate, denominator)
        for name, count, rate in zip(RATE_FIELDS, counts, rates, strict=True)
        if count * rate
    }
    usd = Fraction(sum(count * rate for count, rate in zip(counts, rates, strict=True)), denominator)
    charged = usd * multiplier
    exact_units = charged * table.units_per_usd
    units = _in_range(-(-exact_units.numerator // exact_units.denominator))
    return PricedUsage(
        model=usage.model,
        priced_model=entry.name,
        fallback_used=fallback_used,
        price_version=compiled.version.effective_from,
        long_context=long_context,
        group=group,
        multiplier=multiplier,
        usd=usd,
        charged_usd=charged,
        quota=units,
        exact_units=exact_units,
        breakdown=breakdown,
    )


def quota(table: PriceTable, usage: UsageRecord, at: float, group: str = "default", requests: int = 1) -> int:
    """Only the quota of ``price(...)``, without building the result: the hot path of the worker.

    ``at`` is a POSIX timestamp here (convert datetimes once, outside the loop). Events at the latest
    version of a known name and group take the precompiled ``QuotaPlan``; anything else (an older
    version, an unusual spelling, the fallback model, an unknown group) takes ``price()``'s path.
    """
    plan = table.quota_plans.get(group, _NO_PLANS).get(usage.model)
    if plan is None or at < plan.starts_at:
        return _quota_slow(table, usage, at, group, requests)
    inp = usage.input_tokens
    cached = usage.cached_input_tokens
    w5 = usage.cache_write_5m_tokens
    w1 = usage.cache_write_1h_tokens
    r = plan.rates
    above = plan.long_context_above
    if above is not None and inp + cached + w5 + w1 > above:
        r = plan.long_rates  # type: ignore[assignment]
    total = (
        inp * r[0]
        + cached * r[1]
        + w5 * r[2]
        + w1 * r[3]
        + usage.output_tokens * r[4]
        + usage.images * r[5]
        + requests * r[6]
        + usage.web_search_requests * r[7]
    )
    return _in_range(-(-total // plan.divisor))


def _in_range(units: int) -> int:
    """``units`` if the ledger can hold it, else ``InvalidUsage``: never an overflow in the database."""
    if units > MAX_QUOTA:
        raise InvalidUsage("usage", f"costs {units} quota units, more than one request can be charged ({MAX_QUOTA})")
    return units


_NO_PLANS: dict[str, QuotaPlan] = {}


def _quota_slow(table: PriceTable, usage: UsageRecord, at: float, group: str, requests: int) -> int:
    entry, _ = table.resolve(usage.model)
    compiled = entry.version_at(at)
    multiplier = table.group_multiplier(group)
    rates, _ = _rates_for(compiled, usage.total_input_tokens)
    total = sum(count * rate for count, rate in zip(_counts(usage, requests), rates, strict=True))
    numerator = total * multiplier.numerator * table.units_per_usd
    return _in_range(-(-numerator // (compiled.denominator * multiplier.denominator)))


def now() -> datetime:
    """The current time, aware (UTC)."""
    return datetime.now(timezone.utc)
