"""Usage of non-stream responses: upstream usage mapped as documented, or generated text counted here."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction
from typing import Any

import pytest

from metering import count_request
from metering.completion import ResponseError, completion_tokens_local, usage_from_response
from metering.encodings import get_encoding
from metering.errors import UnknownModel
from metering.models import resolve_model
from metering.prompt_count import PromptCount
from pricing.usage import UsageSource

O200K = get_encoding("o200k_base")


def o200k(text: str) -> int:
    """Tokens of ``text`` in o200k_base, straight from tiktoken (the expected figure of a local count)."""
    return len(O200K.encode_ordinary(text))


def prompt(tokens: int, source: UsageSource = UsageSource.LOCAL) -> PromptCount:
    """A prompt count with a chosen figure (only its total and source are read)."""
    return PromptCount("m", "m", "openai", "o200k_base", tokens, source)


# OpenAI API reference, "The chat completion object" example (gpt-4.1, usage 19 / 10).
OPENAI_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Hello! How can I assist you today?", "refusal": None,
                    "annotations": []},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {
        "prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
}

# Anthropic API reference, Messages "create" response example (usage 2095 / 503).
ANTHROPIC_RESPONSE: dict[str, Any] = {
    "content": [{"text": "Hi! My name is Claude.", "type": "text"}],
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "model": "claude-sonnet-4-5-20250929",
    "role": "assistant",
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "type": "message",
    "usage": {"input_tokens": 2095, "output_tokens": 503},
}


def without_usage(response: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(response)
    del stripped["usage"]
    return stripped


def test_openai_upstream_usage() -> None:
    usage = usage_from_response(OPENAI_RESPONSE)
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (19, 0, 10)
    assert usage.source is UsageSource.UPSTREAM
    assert usage.provider == "openai"
    assert usage.model == "gpt-4.1-2025-04-14"  # defaults to the response's model


def test_openai_upstream_cached_tokens() -> None:
    # OpenAI "Prompt caching" guide usage example: 2006 prompt tokens of which 1920 cached.
    response = copy.deepcopy(OPENAI_RESPONSE)
    response["usage"] = {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
                         "prompt_tokens_details": {"cached_tokens": 1920},
                         "completion_tokens_details": {"reasoning_tokens": 0}}
    usage = usage_from_response(response, prompt=prompt(5))  # upstream wins over the prompt count
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (86, 1920, 300)


def test_openai_local_count_without_usage() -> None:
    # 9 o200k tokens, computed here; the API's 10 includes the end-of-message token, which a count of
    # the generated text cannot see (a local count is a floor).
    response = without_usage(OPENAI_RESPONSE)
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello!"}]}
    counted = count_request(body)
    usage = usage_from_response(response, prompt=counted)
    assert usage.output_tokens == o200k("Hello! How can I assist you today?") == 9
    assert usage.input_tokens == counted.prompt_tokens
    assert usage.source is UsageSource.weakest(counted.source, UsageSource.LOCAL)


def test_no_usage_and_no_prompt_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no usage: pass prompt="):
        usage_from_response(without_usage(OPENAI_RESPONSE))


def test_null_usage_counts_as_absent() -> None:
    response = without_usage(OPENAI_RESPONSE) | {"usage": None}
    assert usage_from_response(response, prompt=prompt(7)).source is UsageSource.LOCAL


def test_openai_tool_calls_refusal_legacy_function_and_choices() -> None:
    arguments = '{"location": "Paris, France", "unit": "celsius"}'
    response = {
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ]}},
            {"index": 1, "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}},
            {"index": 2, "message": {"role": "assistant", "content": "Sure.",
                                     "function_call": {"name": "lookup", "arguments": '{"q": "x"}'}}},
        ],
    }
    count, source = completion_tokens_local(response, resolve_model("gpt-4o"))
    # Expected: the tiktoken counts of every generated string, summed over all choices.
    expected = (o200k("get_weather") + o200k(arguments) + o200k("get_time") + o200k("{}")
                + o200k("I can't help with that.") + o200k("Sure.") + o200k("lookup") + o200k('{"q": "x"}'))
    assert (count, source) == (expected, UsageSource.LOCAL)


def test_openai_cl100k_model() -> None:
    count, _ = completion_tokens_local(without_usage(OPENAI_RESPONSE), resolve_model("gpt-3.5-turbo"))
    assert count == len(get_encoding("cl100k_base").encode_ordinary("Hello! How can I assist you today?"))


def test_anthropic_upstream_usage() -> None:
    usage = usage_from_response(ANTHROPIC_RESPONSE)
    assert (usage.input_tokens, usage.output_tokens) == (2095, 503)
    assert usage.provider == "anthropic"
    assert usage.source is UsageSource.UPSTREAM


def test_anthropic_upstream_cache_fields() -> None:
    # Field names from Anthropic's prompt-caching docs; figures made up for the test.
    response = ANTHROPIC_RESPONSE | {"usage": {
        "input_tokens": 21, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 187086,
        "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
        "output_tokens": 393,
    }}
    usage = usage_from_response(response)
    assert (usage.input_tokens, usage.cached_input_tokens) == (21, 187086)
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens, usage.output_tokens) == (400, 600, 393)


def test_anthropic_local_estimate_without_usage() -> None:
    # Content blocks as in Anthropic's tool-use and extended-thinking docs; the expected estimate is
    # computed here: ceil(o200k tokens x 1.35) over text, thinking, tool name and compact tool JSON.
    tool_input = {"location": "San Francisco, CA", "unit": "celsius"}
    response = {
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "The user wants the weather.", "signature": "EqQBCgIYAhIM"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
            {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": tool_input},
        ],
    }
    usage = usage_from_response(response, prompt=prompt(300, UsageSource.ESTIMATED))
    compact = json.dumps(tool_input, ensure_ascii=False, separators=(",", ":"))
    generated = (o200k("The user wants the weather.") + o200k("I'll check the current weather in San Francisco for you.")
                 + o200k("get_weather") + o200k(compact))
    assert usage.output_tokens == math.ceil(generated * Fraction("1.35"))
    assert usage.input_tokens == 300
    assert usage.source is UsageSource.ESTIMATED
    assert usage.provider == "anthropic"


def test_claude_factor_comes_from_the_model_table() -> None:
    # claude-opus-4-7 carries factor 1.8 in the model table; 7 tokens computed here -> ceil(12.6) = 13.
    count, source = completion_tokens_local(without_usage(ANTHROPIC_RESPONSE), resolve_model("claude-opus-4-7"))
    assert o200k("Hi! My name is Claude.") == 7
    assert (count, source) == (13, UsageSource.ESTIMATED)


def test_explicit_model_overrides_the_response_model() -> None:
    usage = usage_from_response(ANTHROPIC_RESPONSE, "anthropic/claude-3-5-sonnet-20241022")
    assert usage.model == "anthropic/claude-3-5-sonnet-20241022"


def test_unknown_model_and_missing_model() -> None:
    with pytest.raises(UnknownModel):
        usage_from_response(OPENAI_RESPONSE | {"model": "gpt-unknown"})
    with pytest.raises(ResponseError, match="model"):
        usage_from_response({k: v for k, v in OPENAI_RESPONSE.items() if k != "model"})


def test_malformed_response_names_the_path() -> None:
    response = without_usage(OPENAI_RESPONSE)
    response["choices"][0]["message"]["content"] = ["not", "a", "string"]
    with pytest.raises(ResponseError, match=r"choices\[0\]\.message\.content"):
        usage_from_response(response, prompt=prompt(1))
    with pytest.raises(ResponseError, match=r"content\[0\]"):
        completion_tokens_local({"content": ["text"]}, resolve_model("claude-sonnet-4-5"))
