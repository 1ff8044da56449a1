"""The shape of data/price_table.yaml, validated with pydantic (see docs/price-table.md).

Per-field rules live here (types, signs, unknown keys); rules that span fields or entries (version
order, alias collisions, recharge windows) are in ``pricing.table``, so every problem is reported at once.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PositiveInt, StrictBool

#: A price in USD (per 1M tokens, or per item): exact decimal, never negative, never NaN or infinite.
Price = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
#: A strictly positive exact decimal (multipliers, exchange rates, credit per unit paid).
Positive = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class LongContextTier(_Strict):
    """Above ``above_input_tokens`` input tokens, every token of the request is billed at these rates."""

    above_input_tokens: PositiveInt
    input: Price
    output: Price
    cached_input: Price | None = None
    cache_write_5m: Price | None = None
    cache_write_1h: Price | None = None


class PriceVersion(_Strict):
    """A model's prices from ``effective_from`` on (until the next version's ``effective_from``)."""

    effective_from: AwareDatetime
    input: Price
    output: Price
    cached_input: Price | None = None  # absent: cached tokens are billed at the input rate
    cache_write_5m: Price | None = None  # absent: cache writes are billed at the input rate
    cache_write_1h: Price | None = None
    per_request: Price = Decimal(0)
    per_image: Price = Decimal(0)
    per_web_search: Price = Decimal(0)
    long_context: LongContextTier | None = None
    max_output_tokens: PositiveInt
    source: Name


class ModelPrices(_Strict):
    """One model: its provider, the other names it goes by, and its price versions in time order."""

    provider: Literal["openai", "anthropic"]
    aliases: list[Name] = []
    versions: list[PriceVersion] = Field(min_length=1)


class RechargeRate(_Strict):
    """What one unit of a currency buys, in USD of list-price credit, during a window."""

    id: Name
    currency: Literal["CNY", "USDT", "USD"]
    usd_per_unit: Positive
    valid_from: AwareDatetime
    valid_until: AwareDatetime | None = None  # open-ended
    label: Name


class ReferenceRate(_Strict):
    """An official exchange rate, so reports can show what the same credit would cost without a promotion."""

    currency: Literal["CNY", "USDT", "USD"]
    per_usd: Positive
    source: Name


class Grant(_Strict):
    """Free credit given once per user for an event (sign-up, a GitHub star)."""

    usd: Positive
    once_per_user: StrictBool = True


class Channel(_Strict):
    """An upstream channel's cost: what the reseller pays upstream, as a share of the list price."""

    cost_ratio: Positive  # 0.3 = the channel costs 30% of list price
    note: Name | None = None


class Quota(_Strict):
    """Quota units: the integer currency of the ledger."""

    units_per_usd: PositiveInt


class PriceTableFile(_Strict):
    """The whole file."""

    schema_version: Literal[1]
    quota: Quota
    groups: dict[Name, Positive]
    fallback_model: Name | None = None
    reference_rates: list[ReferenceRate] = []
    recharge_rates: list[RechargeRate] = []
    grants: dict[Name, Grant] = {}
    channels: dict[Name, Channel] = {}
    models: dict[Name, ModelPrices]
