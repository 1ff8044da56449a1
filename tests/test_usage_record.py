"""The normalized usage record: provider usage mapped into disjoint buckets, nothing billed twice."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricing import InvalidUsage, UsageRecord, UsageSource


def test_openai_cached_tokens_are_inside_prompt_tokens() -> None:
    # OpenAI "Prompt caching" guide's usage example: prompt_tokens 2006 with cached_tokens 1920.
    usage = {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
             "prompt_tokens_details": {"cached_tokens": 1920},
             "completion_tokens_details": {"reasoning_tokens": 0}}
    record = UsageRecord.from_openai("gpt-4o", usage)
    assert (record.input_tokens, record.cached_input_tokens, record.output_tokens) == (86, 1920, 300)
    assert record.total_input_tokens == 2006 and record.total_tokens == 2306


def test_openai_reasoning_tokens_are_part_of_output() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 1200, "completion_tokens_details": {"reasoning_tokens": 1000}}
    record = UsageRecord.from_openai("o3", usage)
    assert record.output_tokens == 1200 and record.reasoning_tokens == 1000
    assert record.total_tokens == 1300  # reasoning is not added a second time


def test_anthropic_input_excludes_cache_reads_and_writes() -> None:
    # Anthropic "Prompt caching" docs: input_tokens counts only tokens after the last cache breakpoint.
    usage = {"input_tokens": 50, "cache_read_input_tokens": 100000, "cache_creation_input_tokens": 248,
             "cache_creation": {"ephemeral_5m_input_tokens": 48, "ephemeral_1h_input_tokens": 200},
             "output_tokens": 503, "server_tool_use": {"web_search_requests": 2}}
    record = UsageRecord.from_anthropic("claude-sonnet-4-5", usage)
    assert (record.input_tokens, record.cached_input_tokens) == (50, 100000)
    assert (record.cache_write_5m_tokens, record.cache_write_1h_tokens) == (48, 200)
    assert record.total_input_tokens == 50 + 100000 + 248
    assert record.web_search_requests == 2 and record.output_tokens == 503


def test_anthropic_cache_writes_without_split_are_5_minute_writes() -> None:
    record = UsageRecord.from_anthropic("claude-3-5-haiku", {"input_tokens": 3, "cache_creation_input_tokens": 1500, "output_tokens": 7})
    assert record.cache_write_5m_tokens == 1500 and record.cache_write_1h_tokens == 0


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
        {"prompt_tokens": -1},
        {"prompt_tokens": 1.5},
        {"prompt_tokens": True},
        {"completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 6}},
    ],
)
def test_contradictory_openai_usage_is_rejected(usage: dict) -> None:
    with pytest.raises(InvalidUsage):
        UsageRecord.from_openai("gpt-4o", usage)


def test_split_that_does_not_add_up_is_rejected() -> None:
    with pytest.raises(InvalidUsage):
        UsageRecord.from_anthropic("claude-3-5-haiku", {"cache_creation_input_tokens": 10,
                                                        "cache_creation": {"ephemeral_5m_input_tokens": 4}})


counts = st.integers(min_value=0, max_value=10**9)


@given(counts, counts, counts, counts)
def test_openai_buckets_partition_prompt_tokens(uncached: int, cached: int, completion: int, reasoning_part: int) -> None:
    prompt = uncached + cached
    reasoning = min(reasoning_part, completion)
    record = UsageRecord.from_openai("gpt-4o", {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning}})
    # Every prompt token is in exactly one bucket: the buckets add up to prompt_tokens, none is negative.
    assert record.input_tokens + record.cached_input_tokens + record.cache_write_5m_tokens + record.cache_write_1h_tokens == prompt
    assert record.total_tokens == prompt + completion


@given(counts, counts, counts, counts, counts)
def test_anthropic_buckets_partition_all_input(inp: int, read: int, w5: int, w1: int, out: int) -> None:
    record = UsageRecord.from_anthropic("claude-sonnet-4", {
        "input_tokens": inp, "cache_read_input_tokens": read, "cache_creation_input_tokens": w5 + w1,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}, "output_tokens": out})
    assert record.total_input_tokens == inp + read + w5 + w1
    assert record.total_tokens == inp + read + w5 + w1 + out


def test_weakest_source_wins() -> None:
    assert UsageSource.weakest(UsageSource.UPSTREAM, UsageSource.LOCAL) is UsageSource.LOCAL
    assert UsageSource.weakest(UsageSource.LOCAL, UsageSource.ESTIMATED, UsageSource.UPSTREAM) is UsageSource.ESTIMATED


def test_pricing_does_not_import_metering() -> None:
    import subprocess
    import sys

    code = "import sys, pricing, pricing.usage; sys.exit(any(m.split('.')[0] in ('metering', 'workers') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
