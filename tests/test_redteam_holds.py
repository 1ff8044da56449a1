"""Red team, hostile client: a hold is the true worst case of its request, whatever the request's shape.

What is tested (issue 13, part 1; the rules are metering/worst_case.py and docs/ledger.md, "Holds"):

- A property test over generated request bodies of every supported shape (OpenAI chat: string and part
  contents, assistant tool calls, tool results, function tools with any JSON schema, ``response_format``,
  ``n``, ``max_tokens`` / ``max_completion_tokens``, ``web_search_options``, images of unknown size;
  Anthropic Messages: system prompts, text / tool_use / tool_result / thinking blocks, client tools with any
  schema, server tools with and without ``max_uses``, Anthropic-defined tools, ``thinking`` budgets) shows:
  the hold covers the price of (the prompt count + every choice at its output budget) plus the server
  tools' uses; the count never exceeds the body's cheap upper bound (its bytes, a token being at least one
  byte, plus the framing, the images' maximum and the documented tool overheads) nor falls below its lower
  bound (its text's characters over 128); and a stream cut anywhere is never charged less than the prompt.
- Worked cases with figures from the providers' price lists (gpt-4o $2.50 / $10 per 1M tokens: 1.25 and
  5 units a token; Claude Sonnet 4 $3 / $15 per 1M and $10 per 1,000 web searches: 1.5 and 7.5 units a
  token, 5,000 a search; 500,000 units = $1).
- Tool schemas counted in full: every key at any depth adds to the count, marked ``estimated``; a schema the
  published rule covers stays ``local`` with its old count.
- Refusals: a tool that cannot be bounded, MCP servers, ``n`` above 128, NaN / Infinity / lone surrogates,
  a body nested too deeply: a ``RequestError`` naming the path, nothing held.
- A large body whose user cannot afford even its lower bound is refused before it is encoded.
- Holds live as long as their request: ``keep_alive`` moves the expiry (never past ``keep_until``, never
  back), an expiry never takes a hold kept alive meanwhile, on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering.claude_prompt import ANTHROPIC_TOOL_TYPES
from metering.counting import count_request
from metering.errors import RequestError
from metering.images import max_tokens as image_max_tokens
from metering.ledger import Meter, QuotaExceeded
from metering.model_table import MODELS
from metering.models import resolve_model
from metering.streams import StreamAccumulator
from metering.worst_case import (
    DEFAULT_SERVER_TOOL_USES, WEB_FETCH_CONTENT_TOKENS, WEB_SEARCH_RESULT_TOKENS, prompt_lower_bound,
    prompt_upper_bound, scan_body,
)
from pricing.quote import quota
from pricing.table import load_price_table
from pricing.usage import UsageRecord, UsageSource

PRICES = load_price_table()
AT = datetime(2026, 12, 1, tzinfo=timezone.utc)
PRICED = [name for name in MODELS if name in PRICES.names]
OPENAI_MODELS = [name for name in PRICED if MODELS[name].provider == "openai"]
CLAUDE_MODELS = [name for name in PRICED if MODELS[name].provider == "anthropic"]
#: Generated bodies per run; METERING_SOAK=1 runs many more (docs/reliability.md, "Perimeter").
EXAMPLES = 2_000 if os.environ.get("METERING_SOAK") else 150


@pytest.fixture(scope="module")
def estimator(tmp_path_factory: pytest.TempPathFactory) -> Meter:
    """A Meter whose ``estimate`` is pure (it reads no database)."""
    meter = Meter.open(f"sqlite:///{tmp_path_factory.mktemp('holds')}/ledger.db")
    yield meter
    meter.close()


# ---------------------------------------------------------------------- generated bodies

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), TEXT)
#: JSON Schema keys the published rule does not cover: each must add to the count.
EXTRA_KEYS = ["$defs", "anyOf", "oneOf", "allOf", "default", "format", "minimum", "title", "examples", "const",
              "additionalProperties", "pattern", "$ref", "strict", "deprecated"]


def schema(depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A property schema: type, description, enum, nested properties / items, and keys of any kind."""
    leaf = st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "object", "array"])},
        optional={"description": TEXT, "enum": st.lists(st.one_of(TEXT, st.integers()), max_size=4)},
    )
    extras = st.dictionaries(st.sampled_from(EXTRA_KEYS), st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                                                                      st.dictionaries(NAMES, SCALARS, max_size=3)),
                             max_size=2)
    base = st.tuples(leaf, extras).map(lambda pair: {**pair[0], **pair[1]})
    if depth >= 2:
        return base
    nested = st.tuples(base, st.dictionaries(NAMES, st.deferred(lambda: schema(depth + 1)), max_size=3)).map(
        lambda pair: {**pair[0], "properties": pair[1]} if pair[1] else pair[0])
    return st.one_of(base, nested, st.tuples(base, st.deferred(lambda: schema(depth + 1))).map(
        lambda pair: {**pair[0], "type": "array", "items": pair[1]}))


PARAMETERS = st.tuples(
    st.dictionaries(NAMES, schema(), max_size=4),
    st.dictionaries(st.sampled_from(["additionalProperties", "$defs", "title"]), SCALARS, max_size=2),
).map(lambda pair: {"type": "object", "properties": pair[0], **pair[1]})
FUNCTIONS = st.fixed_dictionaries({"name": NAMES}, optional={
    "description": TEXT, "parameters": PARAMETERS, "strict": st.booleans()})
OPENAI_TOOLS = st.lists(FUNCTIONS.map(lambda f: {"type": "function", "function": f}), max_size=3)
OUTPUT_BOUND = st.integers(1, 5_000)


@st.composite
def openai_message(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))
    parts = st.lists(st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
            {"url": st.just("https://example.com/cat.png")}, optional={"detail": st.sampled_from(["low", "high", "auto"])})}),
    ), max_size=3)
    message: dict[str, Any] = {"role": role, "content": draw(st.one_of(TEXT, parts) if role == "user" else TEXT)}
    if role == "assistant" and draw(st.booleans()):
        message["tool_calls"] = [{"id": "call_1", "type": "function",
                                  "function": {"name": draw(NAMES), "arguments": json.dumps(draw(st.dictionaries(NAMES, SCALARS, max_size=3)))}}]
    if role == "tool":
        message["tool_call_id"] = "call_1"
    if draw(st.booleans()) and role in ("user", "system"):
        message["name"] = draw(NAMES)
    return message


@st.composite
def openai_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(OPENAI_MODELS)),
                            "messages": draw(st.lists(openai_message(), min_size=1, max_size=5))}
    tools = draw(OPENAI_TOOLS)
    if tools:
        body["tools"] = tools
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", "required",
                                                    {"type": "function", "function": {"name": tools[0]["function"]["name"]}}]))
    for field in ("max_tokens", "max_completion_tokens"):
        if draw(st.booleans()):
            body[field] = draw(OUTPUT_BOUND)
    if draw(st.booleans()):
        body["n"] = draw(st.integers(1, 8))
    format_kind = draw(st.sampled_from([None, "text", "json_object", "json_schema"]))
    if format_kind == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": draw(NAMES), "schema": draw(PARAMETERS),
                                                                         "strict": True}}
    elif format_kind is not None:
        body["response_format"] = {"type": format_kind}
    if draw(st.integers(0, 5)) == 0:
        body["web_search_options"] = {}
    return body


CLAUDE_BLOCKS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.just("toolu_1"), "name": NAMES,
                           "input": st.dictionaries(NAMES, SCALARS, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.just("toolu_1"), "content": TEXT}),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": TEXT, "signature": st.just("c2ln")}),
)
CLAUDE_TOOLS = st.lists(st.one_of(
    st.fixed_dictionaries({"name": NAMES, "input_schema": PARAMETERS}, optional={
        "description": TEXT, "cache_control": st.just({"type": "ephemeral"})}),
    st.fixed_dictionaries({"type": st.just("web_search_20250305"), "name": st.just("web_search")},
                          optional={"max_uses": st.integers(1, 20), "allowed_domains": st.lists(NAMES, max_size=2)}),
    st.fixed_dictionaries({"type": st.just("web_fetch_20250910"), "name": st.just("web_fetch")},
                          optional={"max_uses": st.integers(1, 5), "max_content_tokens": st.integers(1, 50_000)}),
    st.just({"type": "bash_20250124", "name": "bash"}),
    st.just({"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}),
), max_size=3)


@st.composite
def claude_bodies(draw: st.DrawFn) -> dict[str, Any]:
    turns = draw(st.integers(1, 4))
    messages = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": draw(st.one_of(TEXT, st.lists(CLAUDE_BLOCKS, min_size=1, max_size=3)))} for i in range(turns)]
    body: dict[str, Any] = {"model": draw(st.sampled_from(CLAUDE_MODELS)), "messages": messages,
                            "max_tokens": draw(OUTPUT_BOUND)}
    if draw(st.booleans()):
        body["system"] = draw(st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                                       min_size=1, max_size=2)))
    tools = draw(CLAUDE_TOOLS)
    if tools:
        body["tools"] = tools
    if draw(st.booleans()):
        body["thinking"] = {"type": "enabled", "budget_tokens": draw(st.integers(1_024, 10_000))}
    return body


# ---------------------------------------------------------------------- the oracle, written from the docs


def documented_worst(body: dict[str, Any]) -> tuple[int, int, int, int]:
    """(choices, output per choice, web searches, tool input tokens) by docs/ledger.md, written out here."""
    model = body["model"]
    bounds = [body[f] for f in ("max_tokens", "max_completion_tokens") if f in body]
    if isinstance(body.get("thinking"), dict):
        bounds.append(body["thinking"]["budget_tokens"])
    per_choice = max(bounds) if bounds else PRICES.resolve(model)[0].versions[-1].version.max_output_tokens
    searches = tool_input = 0
    for tool in body.get("tools", []):
        kind = tool.get("type", "")
        if kind.startswith("web_search_"):
            uses = tool.get("max_uses", DEFAULT_SERVER_TOOL_USES)
            searches, tool_input = searches + uses, tool_input + uses * WEB_SEARCH_RESULT_TOKENS
        elif kind.startswith("web_fetch_"):
            tool_input += tool.get("max_uses", DEFAULT_SERVER_TOOL_USES) * tool.get("max_content_tokens",
                                                                                 WEB_FETCH_CONTENT_TOKENS)
    if "web_search_options" in body:
        searches, tool_input = 1, WEB_SEARCH_RESULT_TOKENS
    return body.get("n", 1), per_choice, searches, tool_input


def upper_bound(body: dict[str, Any]) -> int:
    """The cheap upper bound of the body's count: its bytes, framing, images at their maximum, tool overheads."""
    resolved = resolve_model(body["model"])
    spec = resolved.spec
    images = sum(1 for m in body["messages"] if isinstance(m.get("content"), list)
                 for part in m["content"] if part.get("type") in ("image_url", "image"))
    fixed = 0
    if spec.claude_tool_prompt is not None and body.get("tools"):
        overheads = sum(tokens for tool in body["tools"] for prefix, tokens in ANTHROPIC_TOOL_TYPES
                        if tool.get("type", "").startswith(prefix))
        fixed = max(spec.claude_tool_prompt) + math.ceil(overheads * spec.claude_safety_factor)
    size = len(json.dumps(body, ensure_ascii=False).encode())
    return prompt_upper_bound(size, len(body["messages"]), images, image_max_tokens(spec.image, "high"), resolved, fixed)


# ---------------------------------------------------------------------- the property


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
@given(body=st.one_of(openai_bodies(), claude_bodies()))
def test_a_hold_covers_every_way_the_provider_bills_the_request(estimator: Meter, body: dict[str, Any]) -> None:
    model = body["model"]
    amount, prompt, worst = estimator.estimate(body, model, "default", AT)
    choices, per_choice, searches, tool_input = documented_worst(body)
    assert (worst.choices, worst.output_per_choice, worst.web_searches, worst.tool_input_tokens) == (
        choices, per_choice, searches, tool_input)
    provider = MODELS[resolve_model(model).canonical].provider
    # hold >= the price of (the prompt count + all choices x their output budget), and of the server tools' uses
    floor = UsageRecord(provider=provider, model=model, input_tokens=prompt.prompt_tokens,
                        output_tokens=choices * per_choice)
    worst_usage = UsageRecord(provider=provider, model=model, input_tokens=prompt.prompt_tokens + tool_input,
                              output_tokens=choices * per_choice, web_search_requests=searches)
    assert amount >= quota(PRICES, floor, AT.timestamp())
    assert amount == quota(PRICES, worst_usage, AT.timestamp())
    # The count is bounded by the body's size on both sides, without encoding it.
    assert prompt.prompt_tokens <= upper_bound(body)
    assert prompt_lower_bound(scan_body(body), len(body["messages"]), resolve_model(model)) <= prompt.prompt_tokens
    # A schema part the published rule does not cover is never counted as exact.
    if any(key in json.dumps(body.get("tools", [])) for key in EXTRA_KEYS) or (
        body.get("response_format", {}).get("type") == "json_schema"
    ):
        assert prompt.source == UsageSource.ESTIMATED


@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])
@given(body=st.one_of(openai_bodies(), claude_bodies()), words=st.lists(TEXT, max_size=6), cut=st.floats(0, 1))
def test_a_cut_stream_is_never_charged_less_than_the_prompt(
    estimator: Meter, body: dict[str, Any], words: list[str], cut: float
) -> None:
    """Cut anywhere (no usage chunk got through): charged the whole prompt count and what was delivered."""
    model = body["model"]
    prompt = count_request(body)
    provider = MODELS[resolve_model(model).canonical].provider
    stream = _stream(provider, model, words, prompt.prompt_tokens)
    accumulator = StreamAccumulator(model, prompt=prompt)
    accumulator.feed(stream[: int(len(stream) * cut)])
    usage = accumulator.finish().usage
    assert usage.total_input_tokens >= prompt.prompt_tokens
    assert quota(PRICES, usage, AT.timestamp()) >= quota(
        PRICES, UsageRecord(provider=provider, model=model, input_tokens=prompt.prompt_tokens), AT.timestamp())


def _stream(provider: str, model: str, words: list[str], prompt_tokens: int) -> bytes:
    """An SSE answer delivering ``words``; the usage (the provider saw the prompt as counted) comes last."""
    if provider == "openai":
        chunks = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in words]
        chunks.append({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words)}})
        return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    events = [("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": word}}) for word in words]
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                     "usage": {"output_tokens": len(words)}}))
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


# ---------------------------------------------------------------------- worked cases


GPT4O = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}  # 8 prompt tokens (tests/test_ledger.py)


def units_4o(input_tokens: int, output_tokens: int) -> int:
    """gpt-4o: $2.50 / $10 per 1M tokens (OpenAI pricing): 1.25 and 5 units a token, rounded up once."""
    return math.ceil(Fraction(5, 4) * input_tokens + 5 * output_tokens)


@pytest.mark.parametrize(("extra", "output"), [
    ({"max_tokens": 100}, 100),
    ({"max_tokens": 100, "n": 3}, 300),  # every choice is billed its completion tokens
    ({"max_completion_tokens": 50, "max_tokens": 100}, 100),  # both sent: the larger bounds it
    ({"n": 2}, 2 * 16_384),  # no bound: the model's maximum output (gpt-4o: 16,384) for each choice
    ({"max_tokens": 10, "prediction": {"type": "content", "content": "hello"}}, 11),  # rejected prediction tokens
])
def test_the_output_budget_of_every_choice_is_held(estimator: Meter, extra: dict[str, Any], output: int) -> None:
    amount, prompt, worst = estimator.estimate({**GPT4O, **extra}, "gpt-4o", "default", AT)
    assert prompt.prompt_tokens == 8 and worst.output_tokens == output
    assert amount == units_4o(8, output)


def test_anthropic_server_tools_are_held_by_their_uses(estimator: Meter) -> None:
    """Claude Sonnet 4: $3 / $15 per 1M, web search $10 per 1,000 (Anthropic pricing): 1.5 / 7.5 / 5,000 units."""
    base = {"model": "claude-sonnet-4", "max_tokens": 1_000, "messages": [{"role": "user", "content": "news?"}]}
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    plain = estimator.estimate(base, "claude-sonnet-4", "default", AT)
    held = estimator.estimate({**base, "tools": [search]}, "claude-sonnet-4", "default", AT)
    assert (held.worst.web_searches, held.worst.tool_input_tokens) == (3, 3 * WEB_SEARCH_RESULT_TOKENS)
    expected = math.ceil(Fraction(3, 2) * (held.prompt.prompt_tokens + 3 * 32_000) + Fraction(15, 2) * 1_000 + 3 * 5_000)
    assert held.amount == expected and held.amount > plain.amount + 3 * 5_000
    unbounded = estimator.estimate({**base, "tools": [{k: v for k, v in search.items() if k != "max_uses"}]},
                                   "claude-sonnet-4", "default", AT)
    assert unbounded.worst.web_searches == DEFAULT_SERVER_TOOL_USES  # Anthropic pauses its loop after 10
    fetch = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2, "max_content_tokens": 5_000}
    fetched = estimator.estimate({**base, "tools": [fetch]}, "claude-sonnet-4", "default", AT)
    assert (fetched.worst.web_searches, fetched.worst.tool_input_tokens) == (0, 10_000)
    thinking = estimator.estimate({**base, "thinking": {"type": "enabled", "budget_tokens": 8_000}},
                                  "claude-sonnet-4", "default", AT)
    assert thinking.worst.output_tokens == 8_000  # interleaved thinking may exceed max_tokens


def test_every_part_of_a_tool_schema_is_counted(estimator: Meter) -> None:
    """A schema the cookbook covers keeps its count (local); each part beyond it adds tokens (estimated)."""
    city = {"type": "string", "description": "The city"}
    plain = {"type": "function", "function": {"name": "weather", "description": "Get the weather",
                                              "parameters": {"type": "object", "properties": {"city": city}}}}
    base = count_request({**GPT4O, "tools": [plain]})
    assert base.source == UsageSource.LOCAL
    previous = base.prompt_tokens
    deep = json.loads(json.dumps(plain))
    params = deep["function"]["parameters"]
    for path, value in [
        (("function", "strict"), True),
        (("parameters", "additionalProperties"), False),
        (("city", "default"), "Paris"),
        (("city", "anyOf"), [{"type": "string", "description": "a long description nested in anyOf " * 5}]),
        (("parameters", "$defs"), {"Unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                                             "description": "a unit of temperature"}}),
    ]:
        target = {"function": deep["function"], "parameters": params, "city": params["properties"]["city"]}[path[0]]
        target[path[1]] = value
        counted = count_request({**GPT4O, "tools": [deep]})
        assert counted.source == UsageSource.ESTIMATED, path
        assert counted.prompt_tokens > previous, path
        previous = counted.prompt_tokens
    structured = count_request({**GPT4O, "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}}}})
    assert structured.source == UsageSource.ESTIMATED and structured.prompt_tokens > 8 + 10
    assert count_request({**GPT4O, "response_format": {"type": "json_object"}}).prompt_tokens == 8


@pytest.mark.parametrize(("body", "path"), [
    ({**GPT4O, "n": 129}, "n"),
    ({**GPT4O, "n": 0}, "n"),
    ({**GPT4O, "max_tokens": 10.5}, "max_tokens"),
    ({"model": "claude-sonnet-4", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "code_execution_20250522", "name": "code_execution"}]}, "tools[0].type"),
    ({"model": "claude-sonnet-4", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 0}]}, "tools[0].max_uses"),
    ({"model": "claude-sonnet-4", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
      "mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}]}, "mcp_servers"),
    ({**GPT4O, "messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({**GPT4O, "temperature": float("nan")}, "temperature"),
    ({**GPT4O, "top_p": float("inf")}, "top_p"),
])
def test_what_cannot_be_bounded_is_refused_naming_the_field(meter: Meter, body: dict[str, Any], path: str) -> None:
    uid = meter.create_user("alice")
    meter.adjust(uid, 10**9, "fund", "test funding")
    secret = meter.create_key(uid, "k")
    with pytest.raises(RequestError) as refused:
        meter.authorize(secret, body, "req-bad")
    assert str(refused.value).startswith(f"{path}: ")
    assert meter.balance(uid) == 10**9  # nothing held


def test_a_body_nested_too_deeply_is_refused_before_it_is_counted(estimator: Meter) -> None:
    nested: Any = "x"
    for _ in range(200):
        nested = [nested]
    with pytest.raises(RequestError, match="nests deeper than 128"):
        scan_body({**GPT4O, "metadata": nested})


def test_a_large_body_the_user_cannot_afford_is_refused_before_it_is_encoded(
    meter: Meter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 MB of text is at least 65,536 tokens (a token is at most 128 characters): 81,920 units for gpt-4o."""
    uid = meter.create_user("alice")
    meter.adjust(uid, 50_000, "fund", "test funding")
    secret = meter.create_key(uid, "k")
    huge = {**GPT4O, "max_tokens": 1, "messages": [{"role": "user", "content": "a" * (8 << 20)}]}

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the body was counted")

    monkeypatch.setattr("metering.ledger.meter.count_request", never)
    with pytest.raises(QuotaExceeded) as refused:
        meter.authorize(secret, huge, "req-huge")
    assert refused.value.needed >= units_4o((8 << 20) // 128, 1) and refused.value.available == 50_000
    assert meter.balance(uid) == 50_000


# ---------------------------------------------------------------------- holds live as long as their request


def test_a_hold_is_kept_alive_while_its_call_runs_never_past_its_longest_run(ledger_url: str) -> None:
    meter = Meter.open(ledger_url, hold_ttl=timedelta(minutes=2))
    try:
        uid = meter.create_user("alice")
        meter.adjust(uid, 10**9, "fund", "test funding")
        secret = meter.create_key(uid, "k")
        # Anthropic's SDK expects 128,000 output tokens to take an hour: 64,000 may run 30 minutes.
        long = {"model": "claude-sonnet-4", "max_tokens": 64_000, "messages": [{"role": "user", "content": "essay"}]}
        hold = meter.authorize(secret, long, "req-long")
        assert hold.keep_until == hold.created_at + timedelta(minutes=30)
        assert hold.expires_at == hold.created_at + timedelta(minutes=2)
        clock = hold.created_at
        for _ in range(20):  # the relay's beat: every third of the TTL
            clock += timedelta(seconds=40)
            assert meter.expire_holds(now=clock) == 0
            kept = meter.keep_alive(hold, now=clock)
            assert kept == min(clock + timedelta(minutes=2), hold.keep_until)
        assert meter.keep_alive(hold, now=hold.created_at) == kept  # never moved back
        past = hold.keep_until + timedelta(minutes=5)
        assert meter.keep_alive(hold, now=past) == hold.keep_until  # never past the longest documented run
        assert meter.expire_holds(now=past) == 1
        assert meter.keep_alive(hold, now=past) is None  # resolved: nothing to keep
        short = meter.authorize(secret, {**long, "max_tokens": 100}, "req-short")
        assert short.keep_until == short.created_at + timedelta(minutes=10)  # both SDKs' 10-minute timeout
        receipt = meter.settle(short, usage=UsageRecord(provider="anthropic", model="claude-sonnet-4",
                                                        input_tokens=10, output_tokens=100))
        assert receipt.overage == 0 and meter.keep_alive(short) is None
        assert meter.audit().ok
    finally:
        meter.close()


def test_an_expiry_never_takes_a_hold_kept_alive_after_it_was_found_due(ledger_url: str) -> None:
    """``expire_holds`` reads the due holds, then resolves each: a keep-alive in between wins."""
    meter = Meter.open(ledger_url, hold_ttl=timedelta(minutes=1))
    try:
        uid = meter.create_user("alice")
        meter.adjust(uid, 10**6, "fund", "test funding")
        hold = meter.authorize(meter.create_key(uid, "k"), {**GPT4O, "max_tokens": 10}, "req-1")
        later = hold.created_at + timedelta(minutes=2)
        real_read = meter._read

        def read_then_keep_alive(work: Any) -> Any:
            found = real_read(work)
            meter.keep_alive(hold, now=later)  # the relay's beat lands between the read and the resolution
            return found

        meter._read = read_then_keep_alive  # type: ignore[method-assign]
        assert meter.expire_holds(now=later) == 0
        meter._read = real_read  # type: ignore[method-assign]
        assert meter.settle(hold, usage=UsageRecord(provider="openai", model="gpt-4o", input_tokens=8,
                                                    output_tokens=10)).overage == 0
        assert meter.audit().ok
    finally:
        meter.close()


def test_a_cut_claude_stream_pays_for_the_searches_and_results_it_delivered() -> None:
    """Cut after a web search ran: the search is billed per use and its results as input, as Anthropic bills them."""
    results = [{"type": "web_search_result", "title": "News", "url": "https://example.com/n",
                "encrypted_content": "EqgfCioIARgBIiQ3YTAw" * 50}]
    events = [
        ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 20, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
            "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "input_json_delta", "partial_json": '{"query": "news"}'}}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": results}}),
    ]
    accumulator = StreamAccumulator("claude-sonnet-4")
    accumulator.feed(b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events))
    finished = accumulator.finish()
    assert finished.status == "aborted"
    assert finished.usage.web_search_requests == 1
    assert finished.usage.input_tokens > 20 + 100  # the results' text (its o200k count x 1.35) came in as input
