"""The shape of data/price_table.yaml, validated with pydantic (see docs/price-table.md).

Per-field rules live here (types, signs, unknown keys); rules that span fields or entries (version
order, alias collisions, recharge windows) are in ``pricing.table``, so every problem is reported at once.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from pricing.usage import MAX_COUNT, MAX_MODEL_LENGTH

#: Bounds that keep every figure plausible and every computation small. A typo (an extra zero block, a
#: unit slip) fails validation instead of billing, and an exponent like ``1e-99999`` cannot make the
#: compiled integer rates (scaled by a power of ten per decimal place) enormous. 40 decimal places: the
#: one-api import writes exact conversions of ratios, which can need more than a price list ever shows.
MAX_PRICE = 1_000_000  # USD per 1M tokens, or per item
MAX_MULTIPLIER = 1_000  # group multipliers and channel cost ratios
MAX_RATE = 1_000_000  # exchange and recharge rates, grants in USD
MAX_UNITS_PER_USD = 10**12
DECIMAL_PLACES = 40


def _no_bool(value: Any) -> Any:
    """Refuse YAML booleans where a number is expected (pydantic's lax mode would read ``true`` as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _time_text(value: Any) -> Any:
    """Refuse a number where a time is expected (pydantic would read ``5`` as 1970-01-01T00:00:05Z)."""
    if not isinstance(value, (str, datetime)):
        raise ValueError("must be an ISO 8601 time with a time zone, e.g. 2025-01-01T00:00:00Z")
    return value


def _decimal(*, gt: int | None = None, ge: int | None = None, le: int) -> Any:
    return Annotated[
        Decimal, BeforeValidator(_no_bool), Field(gt=gt, ge=ge, le=le, decimal_places=DECIMAL_PLACES, allow_inf_nan=False)
    ]


def _count(maximum: int) -> Any:
    return Annotated[int, BeforeValidator(_no_bool), Field(gt=0, le=maximum)]


#: A price in USD (per 1M tokens, or per item): exact decimal, never negative, never NaN or infinite.
Price = _decimal(ge=0, le=MAX_PRICE)
#: A strictly positive exact decimal (multipliers, exchange rates, credit per unit paid).
Positive = _decimal(gt=0, le=MAX_RATE)
Multiplier = _decimal(gt=0, le=MAX_MULTIPLIER)
TokenCount = _count(MAX_COUNT)
#: An aware time given as text (or a datetime, from code).
Moment = Annotated[AwareDatetime, BeforeValidator(_time_text)]
#: No surrounding spaces and no NUL (PostgreSQL cannot store it); anything else is kept as written (a
#: gateway's model names may be exotic: the one-api import keeps even line breaks, safely quoted).
_TEXT_PATTERN = r"^[^\s\x00](?:[^\x00]*[^\s\x00])?$"
#: The names operators type on command lines: no control characters either.
_NAME_PATTERN = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$"
#: Model names and aliases (stored in VARCHAR(190) columns).
Name = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_LENGTH, pattern=_TEXT_PATTERN)]
#: Groups, channels, grant kinds, recharge rate ids (stored in VARCHAR(64) columns).
ShortName = Annotated[str, Field(min_length=1, max_length=64, pattern=_NAME_PATTERN)]
#: Free text: sources, labels, notes.
Text = Annotated[str, Field(min_length=1, max_length=1000, pattern=_TEXT_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class LongContextTier(_Strict):
    """Above ``above_input_tokens`` input tokens, every token of the request is billed at these rates."""

    above_input_tokens: TokenCount
    input: Price
    output: Price
    cached_input: Price | None = None
    cache_write_5m: Price | None = None
    cache_write_1h: Price | None = None


class PriceVersion(_Strict):
    """A model's prices from ``effective_from`` on (until the next version's ``effective_from``)."""

    effective_from: Moment
    input: Price
    output: Price
    cached_input: Price | None = None  # absent: cached tokens are billed at the input rate
    cache_write_5m: Price | None = None  # absent: cache writes are billed at the input rate
    cache_write_1h: Price | None = None
    per_request: Price = Decimal(0)
    per_image: Price = Decimal(0)
    per_web_search: Price = Decimal(0)
    long_context: LongContextTier | None = None
    max_output_tokens: TokenCount
    source: Text


class ModelPrices(_Strict):
    """One model: its provider, the other names it goes by, and its price versions in time order."""

    provider: Literal["openai", "anthropic"]
    aliases: list[Name] = []
    versions: list[PriceVersion] = Field(min_length=1)


class RechargeRate(_Strict):
    """What one unit of a currency buys, in USD of list-price credit, during a window."""

    id: ShortName
    currency: Literal["CNY", "USDT", "USD"]
    usd_per_unit: Positive
    valid_from: Moment
    valid_until: Moment | None = None  # open-ended
    label: Text


class ReferenceRate(_Strict):
    """An official exchange rate, so reports can show what the same credit would cost without a promotion."""

    currency: Literal["CNY", "USDT", "USD"]
    per_usd: Positive
    source: Text


class Grant(_Strict):
    """Free credit given once per user for an event (sign-up, a GitHub star)."""

    usd: Positive
    once_per_user: StrictBool = True


class Channel(_Strict):
    """An upstream channel's cost: what the reseller pays upstream, as a share of the list price."""

    cost_ratio: Multiplier  # 0.3 = the channel costs 30% of list price
    note: Text | None = None


class Quota(_Strict):
    """Quota units: the integer currency of the ledger."""

    units_per_usd: _count(MAX_UNITS_PER_USD)


class PriceTableFile(_Strict):
    """The whole file."""

    schema_version: Annotated[Literal[1], BeforeValidator(_no_bool)]
    quota: Quota
    groups: dict[ShortName, Multiplier]
    fallback_model: Name | None = None
    reference_rates: list[ReferenceRate] = []
    recharge_rates: list[RechargeRate] = []
    grants: dict[ShortName, Grant] = {}
    channels: dict[ShortName, Channel] = {}
    models: dict[Name, ModelPrices]
