"""Worked examples from the providers' pricing pages, priced through the shipped price table.

Every figure is computed by hand in the comments: USD = tokens x price per 1M / 1,000,000, and
quota = ceil(USD x 500,000) (500,000 units = $1, group `default` = 1x).
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from metering.models import resolve_model
from pricing.errors import PriceNotFound
from pricing.quote import price, quota
from pricing.table import as_timestamp, load_price_table
from pricing.usage import UsageRecord

TABLE = load_price_table(Path(__file__).resolve().parents[1] / "data" / "price_table.yaml")
CLAUDE = sorted(name for name, entry in TABLE.models.items() if entry.provider == "anthropic")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def usd(text: str) -> Fraction:
    return Fraction(Decimal(text))


def check_quota(result, usage: UsageRecord, when: datetime) -> None:
    """The fast path agrees with price(), and the residual is what rounding added."""
    assert quota(TABLE, usage, as_timestamp(when)) == result.quota
    assert 0 <= result.residual_units < 1


# ----------------------------------------------------------------------------------------------- Anthropic


@pytest.mark.parametrize("model", CLAUDE)
def test_anthropic_cache_multipliers_hold_for_every_claude_price(model: str) -> None:
    # Source: Anthropic pricing page (docs.anthropic.com/en/docs/about-claude/pricing), prompt caching:
    # "5-minute cache write tokens are 1.25 times the base input tokens price, 1-hour cache write tokens
    # are 2 times, cache read tokens are 0.1 times." Also checked on long-context tiers, where "prompt
    # caching multipliers apply on top of long context pricing".
    # The one exception is Claude Haiku 3, whose row on that page reads $0.25 input, $0.30 5m writes,
    # $0.50 1h writes, $0.03 cache hits (not 0.3125 and 0.025): the published figures win.
    for version in TABLE.file.models[model].versions:
        rows = [version] + ([version.long_context] if version.long_context is not None else [])
        for row in rows:
            if version.cached_input is None:  # Claude 3 Sonnet: no prompt caching, no cache prices at all
                assert (row.cached_input, row.cache_write_5m, row.cache_write_1h) == (None, None, None)
                continue
            if model == "claude-3-haiku":
                assert (row.input, row.cache_write_5m, row.cache_write_1h, row.cached_input) == (
                    Decimal("0.25"), Decimal("0.30"), Decimal("0.50"), Decimal("0.03"))
                continue
            assert row.cached_input == row.input * Decimal("0.1"), (model, version.effective_from)
            assert row.cache_write_5m == row.input * Decimal("1.25"), (model, version.effective_from)
            assert row.cache_write_1h == row.input * 2, (model, version.effective_from)


def test_claude_sonnet_4_5_cache_read_and_writes() -> None:
    # Source: Anthropic pricing page, model pricing row "Claude Sonnet 4.5": $3 base input, $3.75 5m cache
    # writes, $6 1h cache writes, $0.30 cache hits, $15 output (per MTok).
    usage = UsageRecord.from_anthropic(
        "claude-sonnet-4-5-20250929",
        {
            "input_tokens": 50,
            "cache_read_input_tokens": 100_000,
            "cache_creation_input_tokens": 248,
            "cache_creation": {"ephemeral_5m_input_tokens": 48, "ephemeral_1h_input_tokens": 200},
            "output_tokens": 503,
        },
    )
    when = at("2025-11-28T12:00:00")
    result = price(TABLE, usage, when)
    # input 50 x $3 = $0.00015; reads 100,000 x $0.30 = $0.03; 5m writes 48 x $3.75 = $0.00018;
    # 1h writes 200 x $6 = $0.0012; output 503 x $15 = $0.007545.
    assert result.breakdown == {
        "input": usd("0.00015"),
        "cached_input": usd("0.03"),
        "cache_write_5m": usd("0.00018"),
        "cache_write_1h": usd("0.0012"),
        "output": usd("0.007545"),
    }
    # total $0.039075 -> x 500,000 = 19,537.5 units -> 19,538 (residual 0.5).
    assert result.usd == usd("0.039075")
    assert result.quota == 19_538 and result.residual_units == Fraction(1, 2)
    assert not result.long_context
    check_quota(result, usage, when)


def test_claude_sonnet_4_above_200k_input_tokens_bills_every_token_at_long_context_rates() -> None:
    # Source: Anthropic pricing page, "Long context pricing": Claude Sonnet 4.5 / 4, > 200K input tokens:
    # input $6 / MTok, output $22.50 / MTok; "If your request exceeds 200K input tokens, all tokens incur
    # premium pricing. The 200K threshold is based solely on input tokens (including cache reads/writes)";
    # caching multipliers on top: reads 0.1 x $6 = $0.60, 5m writes 1.25 x $6 = $7.50.
    usage = UsageRecord.from_anthropic(
        "claude-sonnet-4-20250514",
        {
            "input_tokens": 150_000,  # alone below 200K ...
            "cache_read_input_tokens": 40_000,
            "cache_creation_input_tokens": 20_000,  # ... 210,000 with the cache: above
            "output_tokens": 1_000,
        },
    )
    when = at("2025-09-01T00:00:00")
    result = price(TABLE, usage, when)
    assert result.long_context
    # 150,000 x $6 = $0.90; 40,000 x $0.60 = $0.024; 20,000 x $7.50 = $0.15; 1,000 x $22.50 = $0.0225.
    assert result.breakdown == {
        "input": usd("0.9"),
        "cached_input": usd("0.024"),
        "cache_write_5m": usd("0.15"),
        "output": usd("0.0225"),
    }
    # total $1.0965 -> 548,250 units exactly.
    assert result.usd == usd("1.0965") and result.quota == 548_250 and result.residual_units == 0
    check_quota(result, usage, when)


@pytest.mark.parametrize("model", ["claude-sonnet-4", "claude-sonnet-4-5"])
def test_long_context_threshold_is_strictly_above_200k(model: str) -> None:
    # Source: Anthropic pricing page, "Long context pricing" (<= 200K: standard; > 200K: premium).
    when = at("2025-12-01T00:00:00")
    at_limit = UsageRecord.from_anthropic(model, {"input_tokens": 200_000, "output_tokens": 1_000})
    above = UsageRecord.from_anthropic(model, {"input_tokens": 200_001, "output_tokens": 1_000})
    standard = price(TABLE, at_limit, when)
    # 200,000 x $3 = $0.60; 1,000 x $15 = $0.015 -> $0.615 -> 307,500 units.
    assert not standard.long_context and standard.usd == usd("0.615") and standard.quota == 307_500
    premium = price(TABLE, above, when)
    # 200,001 x $6 = $1.200006; 1,000 x $22.50 = $0.0225 -> $1.222506 -> 611,253 units.
    assert premium.long_context and premium.usd == usd("1.222506") and premium.quota == 611_253


def test_web_search_is_10_dollars_per_1000_searches() -> None:
    # Source: Anthropic pricing page, "Web search tool": "$10 per 1,000 searches, plus standard token costs".
    usage = UsageRecord.from_anthropic(
        "claude-opus-4-5",
        {"input_tokens": 1_000, "output_tokens": 200, "server_tool_use": {"web_search_requests": 3}},
    )
    when = at("2025-12-15T00:00:00")
    result = price(TABLE, usage, when)
    # 1,000 x $5 = $0.005; 200 x $25 = $0.005; 3 searches x $0.01 = $0.03 -> $0.04 -> 20,000 units.
    assert result.breakdown["web_search"] == usd("0.03")
    assert result.usd == usd("0.04") and result.quota == 20_000
    check_quota(result, usage, when)


def test_claude_3_5_haiku_launch_price_then_cut() -> None:
    # Sources: launch at $1 / $5 per MTok (API release 2024-11-04, anthropic.com/claude/haiku); "we're
    # lowering the price of Claude 3.5 Haiku to $0.80 per million input tokens and $4 per million output
    # tokens across all platforms" (Anthropic, "Claude 3.5 Haiku on AWS Trainium2 ...", 2024-12-03).
    usage = UsageRecord.from_anthropic("claude-3-5-haiku-20241022", {"input_tokens": 10**6, "output_tokens": 10**6})
    launch = price(TABLE, usage, at("2024-11-20T00:00:00"))
    # $1 + $5 = $6 -> 3,000,000 units.
    assert launch.usd == 6 and launch.quota == 3_000_000
    cut = price(TABLE, usage, at("2025-01-01T00:00:00"))
    # $0.80 + $4 = $4.80 -> 2,400,000 units.
    assert cut.usd == usd("4.8") and cut.quota == 2_400_000
    assert cut.price_version == at("2024-12-03T00:00:00")


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [
        # Source: Anthropic pricing page, model pricing table (base input / output per MTok).
        ("claude-3-opus-20240229", "15", "75"),
        ("claude-3-sonnet-20240229", "3", "15"),  # Claude 3 family announcement, 2024-03-04
        ("claude-3-haiku-20240307", "0.25", "1.25"),
        ("claude-3-5-sonnet-20241022", "3", "15"),
        ("claude-3-7-sonnet-20250219", "3", "15"),
        ("claude-sonnet-4-20250514", "3", "15"),
        ("claude-sonnet-4-5-20250929", "3", "15"),
        ("claude-opus-4-20250514", "15", "75"),
        ("claude-opus-4-1-20250805", "15", "75"),
        ("claude-opus-4-5-20251101", "5", "25"),
        ("claude-haiku-4-5-20251001", "1", "5"),
    ],
)
def test_claude_list_prices(model: str, input_price: str, output_price: str) -> None:
    # 100,000 tokens each way (below the 200K long-context threshold): a tenth of the price per 1M.
    usage = UsageRecord.from_anthropic(model, {"input_tokens": 10**5, "output_tokens": 10**5})
    result = price(TABLE, usage, at("2025-12-31T00:00:00"))
    assert result.breakdown == {"input": usd(input_price) / 10, "output": usd(output_price) / 10}


# ------------------------------------------------------------------------------------------------- OpenAI


def test_gpt_4o_cached_tokens_are_billed_at_the_cached_rate_instead_of_input() -> None:
    # Source: OpenAI prompt caching guide, usage example: prompt_tokens 2006 with cached_tokens 1920,
    # completion_tokens 300; OpenAI pricing page, gpt-4o: $2.50 input, $1.25 cached input, $10 output.
    usage = UsageRecord.from_openai(
        "gpt-4o",
        {"prompt_tokens": 2006, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": 1920}},
    )
    when = at("2025-01-01T00:00:00")
    result = price(TABLE, usage, when)
    # Never both: 86 uncached x $2.50 = $0.000215, 1,920 cached x $1.25 = $0.0024 (not also at $2.50),
    # 300 output x $10 = $0.003.
    assert result.breakdown == {"input": usd("0.000215"), "cached_input": usd("0.0024"), "output": usd("0.003")}
    # total $0.005615 -> x 500,000 = 2,807.5 -> 2,808 units (residual 0.5).
    assert result.usd == usd("0.005615") and result.quota == 2_808 and result.residual_units == Fraction(1, 2)
    # Without the cache the same prompt would cost 2,006 x $2.50 + $0.003 = $0.008015.
    uncached = price(TABLE, UsageRecord.from_openai("gpt-4o", {"prompt_tokens": 2006, "completion_tokens": 300}), when)
    assert uncached.usd == usd("0.008015")
    check_quota(result, usage, when)


def test_gpt_4o_version_change() -> None:
    # Sources: "Hello GPT-4o" (2024-05-13): $5 / $15 per 1M; models page: the gpt-4o alias "points to
    # gpt-4o-2024-05-13 until October 2, 2024", then to gpt-4o-2024-08-06 at $2.50 / $10 (pricing page).
    usage = UsageRecord.from_openai("gpt-4o", {"prompt_tokens": 10**6, "completion_tokens": 10**6})
    june = price(TABLE, usage, at("2024-06-01T00:00:00"))
    # $5 + $15 = $20 -> 10,000,000 units.
    assert june.usd == 20 and june.quota == 10_000_000
    assert june.price_version == at("2024-05-13T00:00:00")
    later = price(TABLE, usage, at("2025-01-01T00:00:00"))
    # $2.50 + $10 = $12.50 -> 6,250,000 units.
    assert later.usd == usd("12.5") and later.quota == 6_250_000
    assert later.price_version == at("2024-10-02T00:00:00")
    # The switch is at 2024-10-02T00:00:00Z: the latest effective_from <= event time wins.
    assert price(TABLE, usage, at("2024-10-01T23:59:59")).usd == 20
    assert price(TABLE, usage, at("2024-10-02T00:00:00")).usd == usd("12.5")
    with pytest.raises(PriceNotFound):
        price(TABLE, usage, at("2024-05-12T00:00:00"))


def test_gpt_4o_snapshots_keep_their_own_prices() -> None:
    # Sources: OpenAI pricing page (gpt-4o-2024-05-13: $5 / $15, no cached price); "Introducing Structured
    # Outputs in the API" (2024-08-06): gpt-4o-2024-08-06 at $2.50 / $10 from its release.
    usage = {"prompt_tokens": 10**6, "completion_tokens": 10**6}
    september = at("2024-09-01T00:00:00")  # the alias still meant gpt-4o-2024-05-13
    assert price(TABLE, UsageRecord.from_openai("gpt-4o", usage), september).usd == 20
    assert price(TABLE, UsageRecord.from_openai("gpt-4o-2024-08-06", usage), september).usd == usd("12.5")
    # gpt-4o-2024-05-13 has no cached price: cached tokens cost the input price, $5.
    cached = {"prompt_tokens": 10**6, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 10**6}}
    result = price(TABLE, UsageRecord.from_openai("gpt-4o-2024-05-13", cached), at("2025-01-01T00:00:00"))
    assert result.breakdown == {"cached_input": 5}


def test_o3_price_cut_of_2025_06_10() -> None:
    # Sources: "Introducing OpenAI o3 and o4-mini" (2025-04-16): $10 input, $2.50 cached, $40 output;
    # 2025-06-10: o3 price cut by 80% to $2 / $0.50 / $8 (OpenAI pricing page).
    usage = UsageRecord.from_openai(
        "o3-2025-04-16",
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 5_000,
            "prompt_tokens_details": {"cached_tokens": 2_000},
            "completion_tokens_details": {"reasoning_tokens": 4_000},  # inside the 5,000, not added
        },
    )
    before = price(TABLE, usage, at("2025-06-09T23:59:59"))
    # 8,000 x $10 = $0.08; 2,000 x $2.50 = $0.005; 5,000 x $40 = $0.20 -> $0.285 -> 142,500 units.
    assert before.usd == usd("0.285") and before.quota == 142_500
    after = price(TABLE, usage, at("2025-06-10T00:00:00"))
    # 8,000 x $2 = $0.016; 2,000 x $0.50 = $0.001; 5,000 x $8 = $0.04 -> $0.057 -> 28,500 units.
    assert after.usd == usd("0.057") and after.quota == 28_500
    assert after.price_version == at("2025-06-10T00:00:00")


@pytest.mark.parametrize(
    ("when", "input_price", "output_price"),
    [
        # Sources: "Introducing ChatGPT and Whisper APIs" (2023-03-01): $0.002 / 1K tokens;
        # "Function calling and other API updates" (2023-06-13): input cut 25% to $0.0015 / 1K, "effective today";
        # models page (early 2024): gpt-3.5-turbo "currently points to gpt-3.5-turbo-0613" and moves to
        # gpt-3.5-turbo-0125 ($0.50 / $1.50 per 1M) on February 16th (it never pointed to 1106).
        ("2023-05-01T00:00:00", "2.00", "2.00"),
        ("2023-07-01T00:00:00", "1.50", "2.00"),
        ("2023-12-20T00:00:00", "1.50", "2.00"),
        ("2024-02-15T23:59:59", "1.50", "2.00"),
        ("2024-02-16T00:00:00", "0.50", "1.50"),
    ],
)
def test_gpt_3_5_turbo_alias_history(when: str, input_price: str, output_price: str) -> None:
    usage = UsageRecord.from_openai("gpt-3.5-turbo", {"prompt_tokens": 10**6, "completion_tokens": 10**6})
    result = price(TABLE, usage, at(when))
    assert result.breakdown == {"input": usd(input_price), "output": usd(output_price)}


@pytest.mark.parametrize(
    ("model", "when", "input_price", "cached_price", "output_price"),
    [
        # Source: OpenAI pricing page (including its "older models" table) and the launch posts named in
        # the table's `source` fields; USD per 1M tokens. cached_price None: no cached price (input rate).
        ("gpt-3.5-turbo-0301", "2023-04-01T00:00:00", "2.00", None, "2.00"),
        ("gpt-3.5-turbo-0301", "2023-07-01T00:00:00", "1.50", None, "2.00"),
        ("gpt-3.5-turbo-0613", "2023-07-01T00:00:00", "1.50", None, "2.00"),
        ("gpt-3.5-turbo-16k", "2023-07-01T00:00:00", "3.00", None, "4.00"),
        ("gpt-3.5-turbo-16k-0613", "2023-07-01T00:00:00", "3.00", None, "4.00"),
        ("gpt-3.5-turbo-1106", "2023-12-01T00:00:00", "1.00", None, "2.00"),
        ("gpt-3.5-turbo-0125", "2024-02-01T00:00:00", "0.50", None, "1.50"),
        ("gpt-4", "2023-06-01T00:00:00", "30", None, "60"),
        ("gpt-4-0613", "2024-01-01T00:00:00", "30", None, "60"),
        ("gpt-4-32k", "2023-06-01T00:00:00", "60", None, "120"),
        ("gpt-4-1106-preview", "2023-12-01T00:00:00", "10", None, "30"),
        ("gpt-4-turbo", "2024-05-01T00:00:00", "10", None, "30"),
        ("gpt-4-vision-preview", "2023-12-01T00:00:00", "10", None, "30"),
        ("gpt-4o-mini", "2025-01-01T00:00:00", "0.15", "0.075", "0.60"),
        ("gpt-4.1", "2025-05-01T00:00:00", "2.00", "0.50", "8.00"),
        ("gpt-4.1-mini", "2025-05-01T00:00:00", "0.40", "0.10", "1.60"),
        ("gpt-4.1-nano", "2025-05-01T00:00:00", "0.10", "0.025", "0.40"),
        ("o1", "2025-01-01T00:00:00", "15.00", "7.50", "60.00"),
        ("o4-mini", "2025-05-01T00:00:00", "1.10", "0.275", "4.40"),
        ("gpt-5", "2025-09-01T00:00:00", "1.25", "0.125", "10.00"),
        ("gpt-5-chat-latest", "2025-09-01T00:00:00", "1.25", "0.125", "10.00"),
        ("gpt-5-mini", "2025-09-01T00:00:00", "0.25", "0.025", "2.00"),
        ("gpt-5-nano", "2025-09-01T00:00:00", "0.05", "0.005", "0.40"),
    ],
)
def test_openai_list_prices(model: str, when: str, input_price: str, cached_price: str | None, output_price: str) -> None:
    # 1M uncached + 1M cached input, 1M output: each bucket then shows its price per 1M.
    usage = UsageRecord.from_openai(
        model,
        {"prompt_tokens": 2 * 10**6, "completion_tokens": 10**6, "prompt_tokens_details": {"cached_tokens": 10**6}},
    )
    result = price(TABLE, usage, at(when))
    assert result.breakdown == {
        "input": usd(input_price),
        "cached_input": usd(cached_price if cached_price is not None else input_price),
        "output": usd(output_price),
    }


# ---------------------------------------------------------------------------------------------- rounding


def test_rounding_is_once_per_request_with_a_one_unit_floor() -> None:
    # gpt-4o-mini output $0.60 / 1M (OpenAI pricing page): 1 token = $0.0000006 = 0.3 units -> 1 unit.
    when = at("2025-01-01T00:00:00")
    one = price(TABLE, UsageRecord.from_openai("gpt-4o-mini", {"prompt_tokens": 0, "completion_tokens": 1}), when)
    assert one.exact_units == Fraction(3, 10) and one.quota == 1 and one.residual_units == Fraction(7, 10)
    # Zero usage costs 0 units.
    zero = price(TABLE, UsageRecord.from_openai("gpt-4o-mini", {"prompt_tokens": 0, "completion_tokens": 0}), when)
    assert zero.usd == 0 and zero.quota == 0
    # Rounded once per request, not per bucket: gpt-4o, 1 uncached input ($2.50 / 1M = 1.25 units), 1 cached
    # ($1.25 / 1M = 0.625 units), 1 output ($10 / 1M = 5 units) = 6.875 units -> 7 (per bucket: 2 + 1 + 5 = 8).
    usage = UsageRecord.from_openai(
        "gpt-4o", {"prompt_tokens": 2, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 1}}
    )
    result = price(TABLE, usage, when)
    assert result.exact_units == Fraction(55, 8) and result.quota == 7 and result.residual_units == Fraction(1, 8)
    check_quota(result, usage, when)


# --------------------------------------------------------------------------------------- required models

REQUIRED = [
    "gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-3.5-turbo-0613", "gpt-3.5-turbo-1106", "gpt-4", "gpt-4-32k",
    "gpt-4-1106-preview", "gpt-4-turbo", "gpt-4-vision-preview", "gpt-4o", "gpt-4o-mini", "gpt-4.1",
    "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano",
    "claude-3-opus", "claude-3-sonnet", "claude-3-haiku", "claude-3-5-sonnet", "claude-3-7-sonnet",
    "claude-3-5-haiku", "claude-sonnet-4", "claude-sonnet-4-5", "claude-opus-4", "claude-opus-4-1",
    "claude-opus-4-5", "claude-haiku-4-5",
]


def test_required_models_are_priced_and_every_name_is_counted() -> None:
    for name in REQUIRED:
        TABLE.resolve(name)  # raises UnknownModel if missing
    for name, entry in TABLE.models.items():
        for alias in (name, *entry.aliases):
            resolve_model(alias)  # the counting table knows every priced name
