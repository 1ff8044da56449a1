"""Quota arithmetic: one ceiling per request, exact costs, the version in force, no token billed twice."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.errors import PriceNotFound, UnknownModel
from pricing.quote import price, quota
from pricing.recharge import grant_quota, quote_topup
from pricing.table import load_price_table, parse_price_table
from pricing.usage import UsageRecord

TABLE = load_price_table()
NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)
M = Fraction(1, 1_000_000)  # prices are per 1M tokens


def openai(model: str, prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> UsageRecord:
    return UsageRecord.from_openai(model, {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": {"reasoning_tokens": reasoning}})


def anthropic(model: str, inp: int, out: int, read: int = 0, w5: int = 0, w1: int = 0) -> UsageRecord:
    return UsageRecord.from_anthropic(model, {
        "input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": read, "cache_creation_input_tokens": w5 + w1,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}})


def test_openai_cached_tokens_are_billed_instead_of_not_on_top_of_input() -> None:
    # gpt-4o list prices (OpenAI pricing page): input $2.50, cached input $1.25, output $10 per 1M.
    priced = price(TABLE, openai("gpt-4o", 2006, 300, cached=1920), NOW)
    assert priced.usd == (86 * Fraction("2.50") + 1920 * Fraction("1.25") + 300 * 10) * M  # $0.005615
    assert priced.quota == 2808  # 0.005615 x 500,000 = 2807.5 -> rounded up once
    assert priced.residual_units == Fraction(1, 2)


def test_reasoning_tokens_are_output_tokens_billed_once() -> None:
    # o3 after the 2025-06-10 cut: $2 in / $8 out. 1,200 completion tokens of which 1,000 reasoning.
    priced = price(TABLE, openai("o3", 100, 1200, reasoning=1000), NOW)
    assert priced.usd == (100 * 2 + 1200 * 8) * M


def test_anthropic_cache_reads_and_writes_have_their_own_rates() -> None:
    # Claude Sonnet 4.5 (Anthropic pricing page): $3 in, $0.30 cache read, $3.75 5m write, $6 1h write, $15 out.
    priced = price(TABLE, anthropic("claude-sonnet-4-5", 50, 503, read=100_000, w5=48, w1=200), NOW)
    assert priced.usd == (50 * 3 + 100_000 * Fraction("0.30") + 48 * Fraction("3.75") + 200 * 6 + 503 * 15) * M
    assert priced.quota == 19538  # $0.039075 x 500,000 = 19,537.5 -> 19,538


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_no_openai_token_is_billed_twice(uncached: int, cached: int, completion: int) -> None:
    usd = price(TABLE, openai("gpt-4.1", uncached + cached, completion, cached=cached), NOW).usd
    # gpt-4.1: $2 in, $0.50 cached, $8 out. Each prompt token is billed at exactly one of the two input rates.
    assert usd == (uncached * 2 + cached * Fraction("0.5") + completion * 8) * M


@settings(max_examples=200, deadline=None)
@given(*(st.integers(0, 50_000) for _ in range(5)))
def test_no_anthropic_token_is_billed_twice(inp: int, read: int, w5: int, w1: int, out: int) -> None:
    usd = price(TABLE, anthropic("claude-3-5-haiku", inp, out, read, w5, w1), NOW).usd
    # claude-3-5-haiku since 2024-12: $0.80 in, $0.08 read, $1 5m write, $1.60 1h write, $4 out.
    assert usd == (inp * Fraction("0.8") + read * Fraction("0.08") + w5 * 1 + w1 * Fraction("1.6") + out * 4) * M


usage_records = st.one_of(
    st.builds(openai, st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "o4-mini", "gpt-5-nano"]),
              st.integers(0, 300_000), st.integers(0, 100_000)),
    st.builds(anthropic, st.sampled_from(["claude-sonnet-4", "claude-3-haiku", "claude-opus-4-1"]),
              st.integers(0, 300_000), st.integers(0, 64_000), st.integers(0, 100_000), st.integers(0, 50_000),
              st.integers(0, 50_000)),
)
FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "output_tokens")


@settings(max_examples=300, deadline=None)
@given(usage_records, st.sampled_from(FIELDS), st.integers(1, 250_000))
def test_quota_is_monotonic_in_every_token_count(record: UsageRecord, field: str, extra: int) -> None:
    from dataclasses import replace

    bigger = replace(record, **{field: getattr(record, field) + extra})
    assert price(TABLE, bigger, NOW).quota >= price(TABLE, record, NOW).quota


@settings(max_examples=300, deadline=None)
@given(usage_records)
def test_quota_is_the_exact_cost_rounded_up_once(record: UsageRecord) -> None:
    priced = price(TABLE, record, NOW)
    assert priced.exact_units == priced.usd * TABLE.units_per_usd
    assert 0 <= priced.quota - priced.exact_units < 1  # never below the exact cost, never a unit more
    assert quota(TABLE, record, NOW.timestamp()) == priced.quota  # the fast path agrees
    if priced.usd > 0:
        assert priced.quota >= 1


def test_zero_usage_costs_nothing_and_one_token_costs_one_unit() -> None:
    assert price(TABLE, openai("gpt-4o-mini", 0, 0), NOW).quota == 0
    # one gpt-4o-mini input token is $0.00000015 = 0.075 units: it still costs 1 unit.
    assert price(TABLE, openai("gpt-4o-mini", 1, 0), NOW).quota == 1


def test_long_context_moves_every_token_to_the_higher_rates() -> None:
    # Anthropic pricing, Sonnet 4 with more than 200K input tokens: $6 in / $22.50 out for the whole request.
    at_limit = price(TABLE, anthropic("claude-sonnet-4", 200_000, 1000), NOW)
    above = price(TABLE, anthropic("claude-sonnet-4", 200_001, 1000), NOW)
    assert not at_limit.long_context and at_limit.usd == (200_000 * 3 + 1000 * 15) * M
    assert above.long_context and above.usd == (200_001 * 6 + 1000 * Fraction("22.5")) * M
    # Cache reads count toward the threshold (all input tokens of the request).
    assert price(TABLE, anthropic("claude-sonnet-4", 1000, 10, read=199_001), NOW).long_context


def test_the_version_in_force_at_the_event_time_prices_it() -> None:
    # gpt-4o: $5/$15 from 2024-05-13, $2.50/$10 from 2024-10-02.
    usage = openai("gpt-4o", 1_000_000, 1_000_000)
    change = datetime(2024, 10, 2, tzinfo=timezone.utc)
    assert price(TABLE, usage, change - timedelta(seconds=1)).usd == 20
    assert price(TABLE, usage, change).usd == Fraction("12.5")
    assert price(TABLE, usage, change).price_version == change
    with pytest.raises(PriceNotFound):
        price(TABLE, usage, datetime(2024, 5, 12, tzinfo=timezone.utc))


def test_unknown_models_and_groups_are_typed_errors_never_a_default() -> None:
    with pytest.raises(UnknownModel):
        price(TABLE, openai("gpt-4o-2099-01-01", 1, 1), NOW)
    with pytest.raises(PriceNotFound, match="unknown group"):
        price(TABLE, openai("gpt-4o", 1, 1), NOW, group="vip")
    with pytest.raises(ValueError, match="time zone"):
        price(TABLE, openai("gpt-4o", 1, 1), datetime(2026, 1, 1))


def test_aliases_price_like_their_model() -> None:
    assert price(TABLE, openai("gpt-4-1106-preview", 1000, 1000), NOW).priced_model == "gpt-4-turbo"
    assert price(TABLE, openai("GPT-4O-2024-11-20", 1000, 1000), NOW).priced_model == "gpt-4o-2024-08-06"
    # gpt-4o-2024-05-13 kept its launch price: its own entry, not folded into gpt-4o.
    assert price(TABLE, openai("gpt-4o-2024-05-13", 10**6, 0), NOW).usd == 5


SMALL = """\
schema_version: 1
quota: {units_per_usd: 500000}
groups: {default: 1, vip: "0.8", premium: "1.5"}
fallback_model: m1
models:
  m1:
    provider: openai
    versions:
      - {effective_from: 2025-01-01T00:00:00Z, input: "1", output: "3", per_request: "0.002", max_output_tokens: 10, source: t}
"""


def test_group_multipliers_and_the_operators_fallback_are_recorded() -> None:
    table = parse_price_table(SMALL)
    usage = openai("some-new-model", 1000, 1000)
    priced = price(table, usage, NOW, "vip")
    assert priced.fallback_used and priced.priced_model == "m1"
    assert priced.usd == (1000 * 1 + 1000 * 3) * M + Fraction("0.002")
    assert priced.charged_usd == priced.usd * Fraction("0.8") and priced.quota == 2400  # $0.0048 x 500,000
    assert price(table, usage, NOW, "premium").quota == 4500


def test_per_request_price_is_charged_per_request() -> None:
    table = parse_price_table(SMALL)
    assert price(table, openai("m1", 0, 0), NOW, requests=3).quota == 3000  # 3 x $0.002 = $0.006
    assert price(table, openai("m1", 0, 0), NOW, requests=0).quota == 0


def test_topup_at_the_promotion_and_the_reference_price() -> None:
    # The product's promotion: 1 CNY buys $1 of list-price credit; official rate CNY 7.1 per USD.
    topup = quote_topup(TABLE, "10", "CNY", NOW)
    assert (topup.usd_credit, topup.quota, topup.reference_price) == (10, 5_000_000, 71)
    assert quote_topup(TABLE, "0.01", "USDT", NOW).quota == 5000
    with pytest.raises(PriceNotFound):
        quote_topup(TABLE, "10", "CNY", datetime(2025, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(ValueError):
        quote_topup(TABLE, "-5", "CNY", NOW)


def test_grants() -> None:
    assert grant_quota(TABLE, "signup") == 100_000  # $0.2
    assert grant_quota(TABLE, "github_star") == 500_000  # $1


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metering", *args], capture_output=True, text=True)


def test_cli_quote_json() -> None:
    out = run("quote", "--model", "gpt-4o", "--input", "2006", "--output", "300", "--cached-input", "1920",
              "--at", "2026-11-28T00:00:00Z", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["usd"] == "0.005615" and payload["quota"] == 2808 and payload["group"] == "default"
    assert payload["price_version"] == "2024-10-02T00:00:00+00:00" and payload["model"] == "gpt-4o"


def test_cli_quote_anthropic_cache_flags_take_the_usage_numbers() -> None:
    out = run("quote", "--model", "claude-sonnet-4-5", "--input", "50", "--cached-input", "100000", "--cache-write", "248",
              "--cache-write-1h", "200", "--output", "503", "--json")
    assert json.loads(out.stdout)["quota"] == 19538


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-9", "--input", "1", "--output", "1"], "unknown model"),
        (["--model", "gpt-4o", "--input", "1", "--output", "1", "--at", "2026-01-01"], "no time zone"),
        (["--model", "gpt-4o", "--input", "1", "--output", "1", "--group", "vip"], "unknown group"),
        (["--model", "gpt-4o", "--input", "1", "--output", "1", "--cache-write", "5"], "no cache writes"),
        (["--model", "gpt-4o", "--input", "5", "--output", "1", "--cached-input", "6"], "exceeds prompt_tokens"),
    ],
)
def test_cli_quote_bad_input_exits_2(args: list[str], message: str) -> None:
    out = run("quote", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_cli_quote_topup_json() -> None:
    out = run("quote-topup", "--amount", "10", "--currency", "CNY", "--json")
    payload = json.loads(out.stdout)
    assert (payload["usd_credit"], payload["quota"], payload["reference_price"]) == ("10", 5_000_000, "71")
    bad = run("quote-topup", "--amount", "ten", "--currency", "CNY")
    assert bad.returncode == 2
