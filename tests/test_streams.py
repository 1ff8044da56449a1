"""Stream metering: raw SSE bytes built here, fed split anywhere, against doc figures or tiktoken counts."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering import count_request
from metering.encodings import get_encoding
from metering.prompt_count import PromptCount
from metering.sse import SSEDecoder, SSEEvent
from metering.streams import StreamAccumulator, StreamResult
from pricing.usage import UsageSource

O200K = get_encoding("o200k_base")


def o200k(text: str) -> int:
    """Tokens of ``text`` in o200k_base, straight from tiktoken (the expected figure of a local count)."""
    return len(O200K.encode_ordinary(text))


def claude_estimate(text: str, factor: str = "1.35") -> int:
    """The Claude output estimate, computed here from tiktoken: ceil(o200k tokens x factor)."""
    return math.ceil(o200k(text) * Fraction(factor))


def prompt(tokens: int, source: UsageSource = UsageSource.LOCAL, model: str = "gpt-4o-mini") -> PromptCount:
    """A prompt count with a chosen figure (streams only read its total and source)."""
    return PromptCount(model, model, "openai", "o200k_base", tokens, source)


def sse(*events: Any, newline: str = "\n") -> bytes:
    """SSE bytes: a dict is a ``data:`` JSON event, ``(name, dict)`` a named one, a str a raw data value."""
    out = []
    for event in events:
        name, data = event if isinstance(event, tuple) else (None, event)
        lines = [f"event: {name}"] if name else []
        lines.append("data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)))
        out.append(newline.join(lines) + newline + newline)
    return "".join(out).encode("utf-8")


def run(model: str, data: bytes, **kwargs: Any) -> StreamResult:
    acc = StreamAccumulator(model, **kwargs)
    acc.feed(data)
    return acc.finish()


def run_split(model: str, data: bytes, cuts: list[int], **kwargs: Any) -> StreamResult:
    acc = StreamAccumulator(model, **kwargs)
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        acc.feed(data[start:cut])
        start = cut
    return acc.finish()


# --- OpenAI chat-completion streams (chunk shape from OpenAI's "The chat completion chunk object") ---


def chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "choices": [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }


def usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
    """The include_usage chunk: empty choices and the request's usage (OpenAI "stream_options")."""
    return {"id": "chatcmpl-123", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [], "usage": usage}


CHINESE = "你好，世界！我们来测试一下多字节字符。"
PIECES = ["Hello", ", ", "world", "! ", CHINESE[:4], CHINESE[4:]]


def openai_text_stream(*, done: bool = True, usage: dict[str, Any] | None = None, newline: str = "\n") -> bytes:
    events: list[Any] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in PIECES]
    events.append(chunk({}, finish_reason="stop"))
    if usage is not None:
        events.append(usage_chunk(usage))
    if done:
        events.append("[DONE]")
    return sse(*events, newline=newline)


def test_openai_include_usage_maps_cached_tokens() -> None:
    # Figures from OpenAI's "Prompt caching" guide usage example: prompt 2006 of which 1920 cached,
    # completion 300, reasoning 0. Cached tokens sit inside prompt_tokens, so fresh input is 2006 - 1920.
    usage = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    result = run("gpt-4o-mini", openai_text_stream(usage=usage), prompt=prompt(9999))
    assert result.status == "completed"
    assert result.usage.source is UsageSource.UPSTREAM
    assert (result.usage.input_tokens, result.usage.cached_input_tokens) == (86, 1920)
    assert result.usage.output_tokens == 300
    assert result.usage.total_input_tokens == 2006
    assert result.text == "".join(PIECES)
    assert result.finish_reason == "stop"
    assert result.malformed_lines == 0
    assert result.events == len(PIECES) + 4  # role chunk, pieces, finish chunk, usage chunk, [DONE]


def test_openai_include_usage_reasoning_tokens() -> None:
    # Figures made up for the test (an o-series reply whose 1024 output tokens include 896 of reasoning).
    usage = {
        "prompt_tokens": 40,
        "completion_tokens": 1024,
        "completion_tokens_details": {"reasoning_tokens": 896},
    }
    result = run("o3-mini", openai_text_stream(usage=usage))
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.reasoning_tokens) == (40, 1024, 896)
    assert result.usage.source is UsageSource.UPSTREAM


def test_openai_without_usage_counts_delivered_text_locally() -> None:
    # Expected output computed here with tiktoken on the concatenated text (gpt-4o-mini is o200k_base).
    result = run("gpt-4o-mini", openai_text_stream(), prompt=prompt(57))
    assert result.status == "completed"
    assert result.usage.output_tokens == o200k("".join(PIECES))
    assert result.usage.input_tokens == 57
    assert result.usage.source is UsageSource.LOCAL


def test_openai_cl100k_model_counts_in_its_own_encoding() -> None:
    # gpt-4 uses cl100k_base; the expected count is computed here from that encoding.
    result = run("gpt-4", openai_text_stream(), prompt=prompt(5))
    assert result.usage.output_tokens == len(get_encoding("cl100k_base").encode_ordinary("".join(PIECES)))


def test_prompt_from_the_request_counter() -> None:
    # The input figure is whatever count_request gives for the request the stream answers.
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello in Chinese."}]}
    counted = count_request(body)
    result = run("gpt-4o-mini", openai_text_stream(), prompt=counted)
    assert result.usage.input_tokens == counted.prompt_tokens
    assert result.usage.source is UsageSource.weakest(counted.source, UsageSource.LOCAL)


def test_estimated_prompt_makes_the_record_estimated() -> None:
    result = run("gpt-4o-mini", openai_text_stream(), prompt=prompt(100, UsageSource.ESTIMATED))
    assert result.usage.source is UsageSource.ESTIMATED


def test_no_prompt_bills_input_zero_and_says_so() -> None:
    result = run("gpt-4o-mini", openai_text_stream())
    assert result.usage.input_tokens == 0
    assert result.usage.source is UsageSource.ESTIMATED
    assert "no prompt count" in result.usage.extra["note"]


def test_tool_call_argument_pieces_are_concatenated() -> None:
    # Shape from OpenAI's function-calling streaming example: name first, arguments in pieces.
    first = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": ""}}]}
    pieces = ['{"loc', 'ation": "Par', 'is, Fra', 'nce"}']
    second = {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                              "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]}
    events = [chunk({"role": "assistant", "content": None}), chunk(first)]
    events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
    events += [chunk(second), chunk({}, finish_reason="tool_calls"), "[DONE]"]
    result = run("gpt-4o", sse(*events), prompt=prompt(80))
    assert result.tool_arguments == ('{"location": "Paris, France"}', '{"tz": "CET"}')
    assert result.text == ""
    assert result.finish_reason == "tool_calls"
    # Expected: tiktoken counts of each name and each full argument string, summed.
    expected = o200k("get_weather") + o200k("".join(pieces)) + o200k("get_time") + o200k('{"tz": "CET"}')
    assert result.usage.output_tokens == expected


def test_legacy_function_call_and_refusal_are_counted() -> None:
    events = [
        chunk({"function_call": {"name": "lookup", "arguments": '{"q": '}}),
        chunk({"function_call": {"arguments": '"x"}'}}),
        chunk({"refusal": "I can't help with that."}, index=1),
        chunk({}, finish_reason="function_call"),
        "[DONE]",
    ]
    result = run("gpt-4o", sse(*events), prompt=prompt(1))
    assert result.tool_arguments == ('{"q": "x"}',)
    assert result.text == "I can't help with that."
    # Expected: tiktoken counts of the refusal, the function name and its arguments.
    assert result.usage.output_tokens == o200k("I can't help with that.") + o200k("lookup") + o200k('{"q": "x"}')


def test_cut_stream_is_aborted_and_billed_for_what_was_delivered() -> None:
    data = openai_text_stream(done=False)
    cut = data.index(b'"content": "world"')  # the bytes stop inside the third piece's chunk
    result = run("gpt-4o-mini", data[:cut], prompt=prompt(12))
    assert result.status == "aborted"
    assert result.text == "Hello, "
    assert result.malformed_lines == 1  # the half chunk, flushed at close, is not valid JSON
    assert result.usage.output_tokens == o200k("Hello, ")  # computed here with tiktoken
    assert result.usage.source is UsageSource.LOCAL


def test_finish_reason_without_done_or_usage_is_aborted() -> None:
    assert run("gpt-4o-mini", openai_text_stream(done=False)).status == "aborted"


def test_finish_reason_and_usage_without_done_is_completed() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 20}
    result = run("gpt-4o-mini", openai_text_stream(done=False, usage=usage))
    assert result.status == "completed"
    assert result.usage.output_tokens == 20


def test_error_event_is_never_billed_as_text() -> None:
    # Error shape from OpenAI's error responses ({"error": {"message", "type", "param", "code"}}).
    error = {"message": "The server had an error while processing your request. Sorry about that!",
             "type": "server_error", "param": None, "code": None}
    events = [chunk({"content": "Partial"}), chunk({"content": " answer"}), {"error": error},
              chunk({"content": " after the error"}), "[DONE]"]
    result = run("gpt-4o-mini", sse(*events), prompt=prompt(30))
    assert result.status == "error"
    assert result.error == error
    assert result.text == "Partial answer"
    assert result.usage.output_tokens == o200k("Partial answer")  # computed here with tiktoken
    assert result.usage.input_tokens == 30


def test_malformed_lines_are_counted_and_skipped() -> None:
    data = (
        sse(chunk({"content": "A"}))
        + b"data: {not json\n\n"
        + b"data: [1, 2]\n\n"  # JSON, but not an object
        + b'data: {"id": "x"}\n\n'  # neither choices nor usage
        + sse({"choices": [{"index": 0, "delta": {"content": 7}}]})  # content of the wrong type
        + b"bogus field line\n\n"  # an unknown SSE field
        + b": a comment is fine\n\n"
        + sse(chunk({"content": "B"}), "[DONE]")
    )
    result = run("gpt-4o-mini", data, prompt=prompt(3))
    assert result.malformed_lines == 5
    assert result.text == "AB"
    assert result.status == "completed"
    assert result.usage.output_tokens == o200k("AB")


def test_invalid_upstream_usage_is_malformed_not_billed() -> None:
    # cached above prompt contradicts itself: counted as malformed, and the local count is used instead.
    bad = {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}}
    result = run("gpt-4o-mini", openai_text_stream(usage=bad), prompt=prompt(5))
    assert result.malformed_lines == 1
    assert result.usage.source is UsageSource.LOCAL


def test_feed_after_finish_raises_and_finish_is_idempotent() -> None:
    acc = StreamAccumulator("gpt-4o-mini")
    acc.feed(openai_text_stream())
    first = acc.finish()
    assert acc.finish() is first
    with pytest.raises(RuntimeError):
        acc.feed(b"data: [DONE]\n\n")


def test_byte_by_byte_equals_whole() -> None:
    data = openai_text_stream(usage={"prompt_tokens": 10, "completion_tokens": 20}, newline="\r\n")
    whole = run("gpt-4o-mini", data)
    assert run_split("gpt-4o-mini", data, list(range(1, len(data)))) == whole
    assert whole.text == "".join(PIECES)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_any_split_equals_whole_openai(data: st.DataObject, newline: str) -> None:
    raw = openai_text_stream(newline=newline)
    # Cut points anywhere, so also between "\r" and "\n" and inside the 3-byte Chinese characters.
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(raw)), max_size=30))
    result = run_split("gpt-4o-mini", raw, cuts, prompt=prompt(4))
    assert result == run("gpt-4o-mini", raw, prompt=prompt(4))
    assert result.text == "".join(PIECES)
    assert result.malformed_lines == 0


# --- Anthropic Messages streams ---

# Anthropic "Streaming Messages", basic streaming request: the documented event flow and its figures
# (message_start usage input 25 / output 1, message_delta output 15).
ANTHROPIC_DOC_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [],
        "model": "claude-opus-4-6", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
)


def test_anthropic_doc_stream_uses_upstream_usage() -> None:
    result = run("claude-opus-4-6", ANTHROPIC_DOC_STREAM, prompt=prompt(999, UsageSource.ESTIMATED))
    assert result.status == "completed"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (25, 15)
    assert result.usage.source is UsageSource.UPSTREAM
    assert result.usage.provider == "anthropic"
    assert result.text == "Hello!"
    assert result.finish_reason == "end_turn"
    assert result.events == 8
    assert result.malformed_lines == 0


def test_anthropic_cache_fields_latest_values_win() -> None:
    # Field names from Anthropic's prompt-caching docs; figures made up for the test. message_delta
    # repeats the input figures (newer APIs do), one of them changed, to check that its values win.
    start_usage = {
        "input_tokens": 21, "cache_creation_input_tokens": 188086, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1,
    }
    delta_usage = {
        "input_tokens": 21, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 187086,
        "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
        "output_tokens": 393, "server_tool_use": None,
    }
    data = sse(
        ("message_start", {"type": "message_start", "message": {"usage": start_usage}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage}),
        ("message_stop", {"type": "message_stop"}),
    )
    usage = run("claude-sonnet-4-5", data).usage
    assert usage.source is UsageSource.UPSTREAM
    assert (usage.input_tokens, usage.cached_input_tokens) == (21, 187086)
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (400, 600)
    assert usage.output_tokens == 393


def test_anthropic_message_delta_without_input_keeps_message_start_input() -> None:
    data = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 50, "cache_read_input_tokens": 2000,
                                                         "output_tokens": 1}}},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
    )
    usage = run("claude-haiku-4-5", data).usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (50, 2000, 7)


def test_anthropic_message_delta_after_a_lost_message_start_is_not_trusted_for_input() -> None:
    # message_start is malformed, so message_delta's output-only usage would bill input 0 as upstream.
    data = b"event: message_start\ndata: {broken\n\n" + ANTHROPIC_DOC_STREAM.split(b"\n\n", 1)[1]
    result = run("claude-opus-4-6", data, prompt=prompt(30, UsageSource.ESTIMATED))
    assert result.malformed_lines == 1
    assert result.usage.input_tokens == 30
    assert result.usage.output_tokens == claude_estimate("Hello!")  # computed here from tiktoken
    assert result.usage.source is UsageSource.ESTIMATED


def test_anthropic_cut_stream_keeps_upstream_input_and_estimates_output() -> None:
    cut = ANTHROPIC_DOC_STREAM.index(b"event: content_block_stop")
    result = run("claude-opus-4-6", ANTHROPIC_DOC_STREAM[:cut])
    assert result.status == "aborted"
    assert result.text == "Hello!"
    assert result.usage.input_tokens == 25  # from message_start (the doc's figure)
    assert result.usage.output_tokens == max(claude_estimate("Hello!"), 1)  # computed here from tiktoken
    assert result.usage.source is UsageSource.ESTIMATED


def test_anthropic_cut_before_message_start_uses_prompt() -> None:
    result = run("claude-opus-4-7", b"event: message_start\ndata: {\"type\": \"mess", prompt=prompt(40))
    assert result.status == "aborted"
    assert result.malformed_lines == 1
    assert (result.usage.input_tokens, result.usage.output_tokens) == (40, 0)
    assert result.usage.source is UsageSource.ESTIMATED


def test_anthropic_tool_use_and_thinking_are_counted() -> None:
    # Event shapes from Anthropic's streaming docs (extended thinking and tool use examples).
    thinking = "Let me find the weather in San Francisco first."
    json_pieces = ['{"location":', ' "San Fra', 'ncisco, CA"}']
    events: list[Any] = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 400, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": thinking}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking."}},
        {"type": "content_block_start", "index": 2, "content_block": {
            "type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}},
    ]
    events += [{"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": p}}
               for p in json_pieces]
    result = run("claude-sonnet-4-5", sse(*events))  # cut before message_delta: output counted here
    assert result.status == "aborted"
    assert result.text == "Checking."
    assert result.tool_arguments == ("".join(json_pieces),)
    # Expected: one estimate over all generated text (thinking, text, tool name, tool JSON), from tiktoken.
    generated = o200k(thinking) + o200k("Checking.") + o200k("get_weather") + o200k("".join(json_pieces))
    assert result.usage.output_tokens == math.ceil(generated * Fraction("1.35"))
    assert result.usage.input_tokens == 400


def test_anthropic_error_event() -> None:
    # Error event from Anthropic's streaming docs ("Error events": overloaded_error).
    error = {"type": "overloaded_error", "message": "Overloaded"}
    cut = ANTHROPIC_DOC_STREAM.index(b"event: content_block_stop")
    data = ANTHROPIC_DOC_STREAM[:cut] + sse(("error", {"type": "error", "error": error}))
    result = run("claude-opus-4-6", data)
    assert result.status == "error"
    assert result.error == error
    assert result.text == "Hello!"
    assert result.usage.output_tokens == claude_estimate("Hello!")
    assert result.usage.input_tokens == 25


def test_anthropic_unknown_events_are_skipped_not_malformed() -> None:
    # Anthropic's versioning policy: new event types may appear and should be ignored.
    data = ANTHROPIC_DOC_STREAM.replace(b"event: ping", b"event: future_event", 1).replace(
        b'{"type": "ping"}', b'{"type": "future_event"}', 1
    )
    result = run("claude-opus-4-6", data)
    assert result.malformed_lines == 0
    assert result.status == "completed"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_equals_whole_anthropic(data: st.DataObject) -> None:
    raw = ANTHROPIC_DOC_STREAM.replace(b'"Hello"', json.dumps(CHINESE, ensure_ascii=False).encode())
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(raw)), max_size=30))
    result = run_split("claude-opus-4-6", raw, cuts)
    assert result == run("claude-opus-4-6", raw)
    assert result.text == CHINESE + "!"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(max_size=300), model=st.sampled_from(["gpt-4o", "claude-sonnet-4-5"]))
def test_garbage_never_raises(garbage: bytes, model: str) -> None:
    acc = StreamAccumulator(model)
    acc.feed(b"data: " + garbage + b"\n\n" + garbage)
    result = acc.finish()
    assert result.status in ("completed", "aborted", "error")


@settings(max_examples=300)
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "choices", "delta", "index", "usage", "content", "message", "error",
                         "tool_calls", "function", "content_block", "text", "prompt_tokens"]), inner, max_size=4),
    max_leaves=20,
), model=st.sampled_from(["gpt-4o", "claude-sonnet-4-5"]))
def test_odd_json_shapes_never_raise(value: Any, model: str) -> None:
    acc = StreamAccumulator(model)
    acc.feed(sse(value if not isinstance(value, str) else json.dumps(value)))
    acc.finish()


# --- the SSE decoder on its own (WHATWG event-stream rules) ---


def decode(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [event for piece in chunks for event in decoder.feed(piece)]
    return events + decoder.close()


def test_sse_fields_comments_and_multiline_data() -> None:
    raw = b": keep-alive\nevent: add\ndata: a\ndata:b\ndata\nid: 7\nretry: 10\n\ndata: second\n\n"
    assert decode(raw) == [SSEEvent("add", "a\nb\n"), SSEEvent(None, "second")]


def test_sse_all_line_endings_and_cr_split_from_lf() -> None:
    assert decode(b"data: x\r\n\r\ndata: y\r\rdata: z\n\n") == [SSEEvent(None, "x"), SSEEvent(None, "y"), SSEEvent(None, "z")]
    # "\r" ends one chunk and "\n" starts the next: one line end, not two (no empty event in between).
    assert decode(b"data: x\r", b"\ndata: y\r\n\r\n") == [SSEEvent(None, "x\ny")]


def test_sse_bom_event_without_data_and_unterminated_flush() -> None:
    raw = "\ufeffevent: only-a-name\n\ndata: 中文\n".encode()
    assert decode(raw[:5], raw[5:-3], raw[-3:]) == [SSEEvent(None, "中文")]


def test_sse_unknown_field_lines_are_counted() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"foo: bar\nbaz\ndata: ok\n\n")
    assert decoder.unknown_lines == 2


@settings(max_examples=200)
@given(
    values=st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=8),
                    min_size=1, max_size=6),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    data=st.data(),
)
def test_sse_any_split_equals_whole(values: list[str], newline: str, data: st.DataObject) -> None:
    raw = "".join(f"data: {value}{newline}{newline}" for value in values).encode()
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(raw)), max_size=20)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    assert decode(*pieces) == decode(raw) == [SSEEvent(None, value) for value in values]
