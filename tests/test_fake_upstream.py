"""The fake upstream is faithful: the official SDKs parse it, our stream reader bills what it reported.

Every SDK client here runs with ``max_retries=0`` (the SDKs would otherwise retry 429/5xx/connection
errors with back-off, and the file must stay fast).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from metering.completion import count_generated, usage_from_response
from metering.counting import count_request
from metering.models import resolve_model
from metering.streams import StreamAccumulator
from pricing.usage import UsageRecord, UsageSource
from tests.fake_upstream import DEFAULT_KEY, FakeUpstream, Mode, fake_upstream
from tests.servers import ServerStartError, closed_port, serve

GPT = "gpt-4o"
CLAUDE = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "Say hello to the billing team."}]
WEATHER_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a place",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location", "unit"],
        },
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Current weather for a place",
    "input_schema": WEATHER_TOOL_OPENAI["function"]["parameters"],
}
WEATHER_ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "up" in request.fixturenames:
        request.getfixturevalue("up").reset()


def oai(up: FakeUpstream, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.openai_base_url, api_key=kw.pop("api_key", DEFAULT_KEY), max_retries=0, **kw)


def ant(up: FakeUpstream, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=up.base_url, api_key=kw.pop("api_key", DEFAULT_KEY), max_retries=0, **kw)


def raw_post(up: FakeUpstream, provider: str, body: dict[str, Any], **headers: str) -> httpx2.Response:
    path, auth = _route(provider)
    return httpx2.post(f"{up.base_url}{path}", json=body, headers={**auth, **headers}, timeout=5)


def _route(provider: str) -> tuple[str, dict[str, str]]:
    if provider == "openai":
        return "/v1/chat/completions", {"authorization": f"Bearer {DEFAULT_KEY}"}
    return "/v1/messages", {"x-api-key": DEFAULT_KEY, "anthropic-version": "2023-06-01"}


def raw_stream(up: FakeUpstream, provider: str, body: dict[str, Any]) -> tuple[bytes, Exception | None]:
    """The raw SSE bytes of a streamed request (and the transport error that ended it, if any)."""
    path, auth = _route(provider)
    data = bytearray()
    with httpx2.Client(timeout=5) as client, client.stream("POST", f"{up.base_url}{path}", json=body, headers=auth) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        try:
            for chunk in r.iter_raw():
                data += chunk
        except httpx2.TransportError as exc:
            return bytes(data), exc
    return bytes(data), None


def accumulate(model: str, data: bytes, body: dict[str, Any]) -> Any:
    acc = StreamAccumulator(model, prompt=count_request(body, model))
    for start in range(0, len(data), 97):  # split anywhere, as the network would
        acc.feed(data[start : start + 97])
    return acc.finish()


def sse_data(data: bytes) -> list[Any]:
    out = []
    for line in data.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


# -- tests/servers.py ------------------------------------------------------------------------------------


def _hello_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])


def test_serve_starts_fast_many_times_on_distinct_ports() -> None:
    urls = []
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            url = stack.enter_context(serve(_hello_app()))
            urls.append(url)
            assert httpx2.get(url, timeout=5).text == "hi"
    assert len(set(urls)) == 5
    assert all(url.startswith("http://127.0.0.1:") for url in urls)
    assert time.perf_counter() - started < 3


def test_serve_raises_when_the_app_cannot_start() -> None:
    @contextlib.asynccontextmanager
    async def broken(app: Any) -> Any:
        raise RuntimeError("database unreachable")
        yield

    started = time.perf_counter()
    with pytest.raises(ServerStartError, match="database unreachable"):
        with serve(Starlette(lifespan=broken)):
            pass
    assert time.perf_counter() - started < 2


def test_serve_raises_when_the_port_is_taken() -> None:
    with serve(_hello_app()) as url:
        with pytest.raises(ServerStartError, match="address already in use"):
            with serve(_hello_app(), port=int(url.rsplit(":", 1)[1])):
                pass


def test_closed_port_refuses_connections() -> None:
    url = closed_port()
    assert url == closed_port()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(url, timeout=2)


# -- OpenAI ---------------------------------------------------------------------------------------------


def test_openai_non_stream_is_parsed_and_reports_our_counts(up: FakeUpstream) -> None:
    body = {"model": GPT, "messages": HELLO}
    response = oai(up).chat.completions.create(**body)
    choice = response.choices[0]
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == GPT and response.system_fingerprint.startswith("fp_")
    assert choice.finish_reason == "stop" and choice.message.role == "assistant" and choice.message.refusal is None
    text = choice.message.content
    assert 20 <= len(text.split()) <= 30
    tokens = count_generated([text], resolve_model(GPT))[0]
    assert tokens >= 20
    usage = response.usage
    assert usage.prompt_tokens == count_request(body, GPT).prompt_tokens
    assert usage.completion_tokens == tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0 and usage.completion_tokens_details.reasoning_tokens == 0
    [entry] = up.reported
    assert entry["request_id"] == response.id and entry["model"] == GPT and entry["stream"] is False
    assert entry["prompt_tokens"] == usage.prompt_tokens and entry["completion_tokens"] == usage.completion_tokens
    assert entry["outcome"] == "ok" and entry["delivered_text"] == text
    # the same request gives the same reply; our non-stream reader bills the reported figures
    raw = raw_post(up, "openai", body).json()
    assert raw["choices"][0]["message"]["content"] == text
    assert usage_from_response(raw, GPT) == UsageRecord.from_openai(GPT, up.reported[-1]["usage"])


def test_openai_snapshot_model_name() -> None:
    with fake_upstream(snapshot=True) as up:
        response = oai(up).chat.completions.create(model=GPT, messages=HELLO)
    assert response.model == "gpt-4o-2024-08-06"
    assert up.reported[0]["model"] == "gpt-4o-2024-08-06" and up.reported[0]["requested_model"] == GPT


def test_openai_stream_with_include_usage(up: FakeUpstream) -> None:
    body = {"model": GPT, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    chunks = list(oai(up).chat.completions.create(**body))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    entry = up.reported[-1]
    assert chunks[-1].usage.prompt_tokens == entry["prompt_tokens"] == count_request(body, GPT).prompt_tokens
    assert chunks[-1].usage.completion_tokens == entry["completion_tokens"]
    assert "".join(pieces) == entry["delivered_text"]

    data, error = raw_stream(up, "openai", body)
    assert error is None and data.endswith(b"data: [DONE]\n\n")
    objs = sse_data(data)
    assert all(obj["usage"] is None for obj in objs[:-1]) and objs[-1]["choices"] == []
    result = accumulate(GPT, data, body)
    assert result.status == "completed" and result.usage.source == UsageSource.UPSTREAM
    assert result.usage == UsageRecord.from_openai(GPT, up.reported[-1]["usage"])
    assert result.text == up.reported[-1]["delivered_text"]


def test_openai_stream_without_include_usage(up: FakeUpstream) -> None:
    body = {"model": GPT, "messages": HELLO, "stream": True}
    chunks = list(oai(up).chat.completions.create(**body))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    data, _ = raw_stream(up, "openai", body)
    assert all("usage" not in obj for obj in sse_data(data))
    entry = up.reported[-1]
    assert entry["usage"] is None and "prompt_tokens" not in entry
    result = accumulate(GPT, data, body)  # nothing reported: we count (exactly, for an OpenAI model)
    assert result.status == "completed" and result.usage.source == UsageSource.LOCAL
    assert result.usage.output_tokens == count_generated([entry["delivered_text"]], resolve_model(GPT))[0]


def test_openai_tool_call(up: FakeUpstream) -> None:
    client = oai(up)
    body = {"model": GPT, "messages": WEATHER_ASK, "tools": [WEATHER_TOOL_OPENAI]}
    response = client.chat.completions.create(**body)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris, France", "unit": "celsius"}
    assert response.usage.completion_tokens == count_generated(["get_weather", call.function.arguments], resolve_model(GPT))[0]

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = list(client.chat.completions.create(**stream_body))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    data, _ = raw_stream(up, "openai", stream_body)
    result = accumulate(GPT, data, stream_body)
    assert result.tool_arguments == (call.function.arguments,) and result.finish_reason == "tool_calls"
    assert result.usage == UsageRecord.from_openai(GPT, up.reported[-1]["usage"])
    # tool_choice "none" or no mention of the tool: a plain text answer
    assert client.chat.completions.create(**{**body, "tool_choice": "none"}).choices[0].message.tool_calls is None
    plain = client.chat.completions.create(**{**body, "messages": HELLO})
    assert plain.choices[0].finish_reason == "stop"
    forced = client.chat.completions.create(**{**body, "messages": HELLO, "tool_choice": "required"})
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_openai_max_tokens_cuts_the_reply(up: FakeUpstream) -> None:
    response = oai(up).chat.completions.create(model=GPT, messages=HELLO, max_completion_tokens=7)
    assert response.choices[0].finish_reason == "length"
    assert 0 < response.usage.completion_tokens <= 7


def test_openai_reasoning_tokens(up: FakeUpstream) -> None:
    up.behave("reasoning:50")
    response = oai(up).chat.completions.create(model="o3-mini", messages=HELLO)
    visible = count_generated([response.choices[0].message.content], resolve_model("o3-mini"))[0]
    assert response.usage.completion_tokens == visible + 50
    assert response.usage.completion_tokens_details.reasoning_tokens == 50
    assert UsageRecord.from_openai("o3-mini", up.reported[-1]["usage"]).reasoning_tokens == 50


# -- Anthropic ------------------------------------------------------------------------------------------


def test_anthropic_non_stream_is_parsed_and_reports_our_counts(up: FakeUpstream) -> None:
    body = {"model": CLAUDE, "max_tokens": 256, "messages": HELLO}
    message = ant(up).messages.create(**body)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == CLAUDE and message.stop_reason == "end_turn" and message.stop_sequence is None
    [block] = message.content
    assert block.type == "text" and len(block.text.split()) == 30
    usage = message.usage
    assert usage.input_tokens == count_request(body, CLAUDE).prompt_tokens
    assert usage.output_tokens == count_generated([block.text], resolve_model(CLAUDE))[0]
    assert usage.cache_read_input_tokens == 0 and usage.cache_creation_input_tokens == 0
    entry = up.reported[-1]
    assert entry["request_id"] == message.id and entry["input_tokens"] == usage.input_tokens
    assert entry["output_tokens"] == usage.output_tokens and entry["stream"] is False
    headers = up.requests[-1].headers
    assert headers["anthropic-version"] and "x-api-key" not in headers  # the SDK 2.x sends the key as Bearer
    assert headers["authorization"] == f"Bearer {DEFAULT_KEY}"
    raw = raw_post(up, "anthropic", body).json()
    assert usage_from_response(raw, CLAUDE) == UsageRecord.from_anthropic(CLAUDE, up.reported[-1]["usage"])


def test_anthropic_stream(up: FakeUpstream) -> None:
    body = {"model": CLAUDE, "max_tokens": 256, "messages": HELLO}
    with ant(up).messages.stream(**body) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 5 and final.content[0].text == "".join(pieces)
    entry = up.reported[-1]
    assert final.usage.input_tokens == entry["input_tokens"] and final.usage.output_tokens == entry["output_tokens"]
    assert final.stop_reason == "end_turn" and entry["delivered_text"] == "".join(pieces)

    stream_body = {**body, "stream": True}
    data, error = raw_stream(up, "anthropic", stream_body)
    assert error is None
    events = [line[7:] for line in data.decode().splitlines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = sse_data(data)[0]["message"]["usage"]
    assert start["output_tokens"] == 1 and start["input_tokens"] == entry["input_tokens"]
    result = accumulate(CLAUDE, data, stream_body)
    assert result.status == "completed" and result.usage.source == UsageSource.UPSTREAM
    assert result.usage == UsageRecord.from_anthropic(CLAUDE, up.reported[-1]["usage"])


def test_anthropic_tool_use(up: FakeUpstream) -> None:
    body = {"model": CLAUDE, "max_tokens": 256, "messages": WEATHER_ASK, "tools": [WEATHER_TOOL_ANTHROPIC]}
    client = ant(up)
    message = client.messages.create(**body)
    assert message.stop_reason == "tool_use"
    text, tool = message.content
    assert text.type == "text" and tool.type == "tool_use" and tool.id.startswith("toolu_")
    assert tool.name == "get_weather" and tool.input == {"location": "Paris, France", "unit": "celsius"}
    with client.messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert final.content[1].input == tool.input and final.stop_reason == "tool_use"

    stream_body = {**body, "stream": True}
    data, _ = raw_stream(up, "anthropic", stream_body)
    assert b'"input_json_delta"' in data
    result = accumulate(CLAUDE, data, stream_body)
    assert result.tool_arguments == (json.dumps(tool.input, separators=(",", ":")),)
    assert result.usage == UsageRecord.from_anthropic(CLAUDE, up.reported[-1]["usage"])
    assert client.messages.create(**{**body, "messages": HELLO}).stop_reason == "end_turn"
    forced = client.messages.create(**{**body, "messages": HELLO, "tool_choice": {"type": "any"}})
    assert forced.content[-1].type == "tool_use"


def test_anthropic_requests_the_real_api_would_refuse(up: FakeUpstream) -> None:
    response = raw_post(up, "anthropic", {"model": CLAUDE, "messages": HELLO})
    assert response.status_code == 400 and response.json()["error"]["message"] == "max_tokens: Field required"
    response = httpx2.post(f"{up.base_url}/v1/messages", json={"model": CLAUDE, "max_tokens": 5, "messages": HELLO},
                           headers={"x-api-key": DEFAULT_KEY}, timeout=5)
    assert response.status_code == 400 and "anthropic-version" in response.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        ant(up).messages.create(model="claude-nonexistent-9", max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.NotFoundError):
        ant(up).messages.create(model=GPT, max_tokens=5, messages=HELLO)  # not a Claude model


# -- auth, statuses, faults -----------------------------------------------------------------------------


def test_auth_is_checked_and_headers_recorded(up: FakeUpstream) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        oai(up, api_key="sk-client-key-1234").chat.completions.create(model=GPT, messages=HELLO)
    assert info.value.code == "invalid_api_key" and "sk-*1234" in info.value.message
    assert up.requests[-1].headers["authorization"] == "Bearer sk-client-key-1234"
    with pytest.raises(anthropic.AuthenticationError):
        ant(up, api_key="sk-client-key").messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    path, auth = _route("anthropic")
    wrong_bearer = {**auth, "authorization": "Bearer sk-client-key"}  # a right x-api-key does not excuse it
    assert httpx2.post(f"{up.base_url}{path}", json={}, headers=wrong_bearer).status_code == 401
    no_key = httpx2.post(f"{up.base_url}/v1/chat/completions", json={"model": GPT, "messages": HELLO})
    assert no_key.status_code == 401 and "didn't provide an API key" in no_key.json()["error"]["message"]
    assert up.reported == []
    assert raw_post(up, "anthropic", {"model": CLAUDE, "max_tokens": 5, "messages": HELLO}).status_code == 200


def test_unknown_model_and_path(up: FakeUpstream) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai(up).chat.completions.create(model="gpt-9-ultra", messages=HELLO)
    assert info.value.code == "model_not_found"
    response = httpx2.post(f"{up.base_url}/v1/completions", json={}, headers=_route("openai")[1])
    assert response.status_code == 404 and response.json()["error"]["message"] == "Invalid URL (POST /v1/completions)"


OPENAI_STATUS = [
    (400, openai.BadRequestError),
    (401, openai.AuthenticationError),
    (403, openai.PermissionDeniedError),
    (404, openai.NotFoundError),
    (429, openai.RateLimitError),
    (500, openai.InternalServerError),
    (503, openai.InternalServerError),
]
ANTHROPIC_STATUS = [
    (400, anthropic.BadRequestError),
    (401, anthropic.AuthenticationError),
    (429, anthropic.RateLimitError),
    (500, anthropic.InternalServerError),
    (529, anthropic.OverloadedError),
]


@pytest.mark.parametrize(("status", "error"), OPENAI_STATUS)
def test_openai_error_statuses(up: FakeUpstream, status: int, error: type) -> None:
    up.behave(f"status:{status}")
    with pytest.raises(error) as info:
        oai(up).chat.completions.create(model=GPT, messages=HELLO)
    assert info.value.status_code == status
    assert set(info.value.body) == {"message", "type", "param", "code"}  # the SDK keeps body["error"]
    assert up.reported == []


@pytest.mark.parametrize(("status", "error"), ANTHROPIC_STATUS)
def test_anthropic_error_statuses(up: FakeUpstream, status: int, error: type) -> None:
    up.behave(f"status:{status}")
    with pytest.raises(error) as info:
        ant(up).messages.create(model=CLAUDE, max_tokens=50, messages=HELLO, stream=True)
    assert info.value.status_code == status
    assert info.value.body["type"] == "error" and set(info.value.body["error"]) == {"type", "message"}


def test_cloudflare_524(up: FakeUpstream) -> None:
    up.behave("status:524", "status:524")
    with pytest.raises(openai.APIStatusError) as info:
        oai(up).chat.completions.create(model=GPT, messages=HELLO)
    assert info.value.status_code == 524 and "A timeout occurred" in info.value.response.text
    assert info.value.response.headers["content-type"].startswith("text/html")
    with pytest.raises(anthropic.APIStatusError) as info2:
        ant(up).messages.create(model=CLAUDE, max_tokens=50, messages=HELLO)
    assert info2.value.status_code == 524


def test_behaviours_are_consumed_in_order(up: FakeUpstream) -> None:
    up.behave("status:429", "prompt_offset:7")
    client = oai(up)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=GPT, messages=HELLO)
    assert up.pending() == ["prompt_offset:7"]
    body = {"model": GPT, "messages": HELLO}
    assert client.chat.completions.create(**body).usage.prompt_tokens == count_request(body, GPT).prompt_tokens + 7
    assert client.chat.completions.create(**body).usage.prompt_tokens == count_request(body, GPT).prompt_tokens
    assert [r.mode for r in up.requests] == ["status:429", "prompt_offset:7", "ok"]
    with pytest.raises(ValueError, match="unknown behaviour"):
        up.behave("ok", "explode:3")
    assert up.pending() == []  # nothing queued from a call with a bad behaviour
    assert Mode.parse("prompt_offset:-3+hang:0.5") == Mode("prompt_offset:-3+hang:0.5", hang=0.5, prompt_offset=-3)


def test_prompt_offset_is_what_a_stream_bills(up: FakeUpstream) -> None:
    body = {"model": CLAUDE, "max_tokens": 100, "messages": HELLO, "stream": True}
    up.behave("prompt_offset:40")
    data, _ = raw_stream(up, "anthropic", body)
    result = accumulate(CLAUDE, data, body)
    assert result.usage.input_tokens == count_request(body, CLAUDE).prompt_tokens + 40 == up.reported[-1]["input_tokens"]


def test_cut_streams(up: FakeUpstream) -> None:
    body = {"model": GPT, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    up.behave("cut:3")
    received = []
    with pytest.raises(openai.APIConnectionError):  # httpx2.RemoteProtocolError inside: incomplete chunked read
        for chunk in oai(up).chat.completions.create(**body):
            received.append(chunk)
    assert len(received) == 4  # the role chunk and three deltas
    entry = up.reported[-1]
    assert entry["cut"] is True and entry["outcome"] == "cut" and entry["usage"] is None
    assert entry["delivered_text"] == "".join(c.choices[0].delta.content for c in received)

    up.behave("cut:2")
    data, error = raw_stream(up, "openai", body)
    assert isinstance(error, httpx2.RemoteProtocolError) and b"[DONE]" not in data
    result = accumulate(GPT, data, body)
    assert result.status == "aborted" and result.text == up.reported[-1]["delivered_text"]

    claude = {"model": CLAUDE, "max_tokens": 200, "messages": HELLO, "stream": True}
    up.behave("cut:2")
    # unlike openai's, the anthropic SDK's stream lets the transport error through unwrapped
    with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):
        with ant(up).messages.stream(**{k: v for k, v in claude.items() if k != "stream"}) as stream:
            list(stream.text_stream)
    up.behave("cut:2")
    data, error = raw_stream(up, "anthropic", claude)
    assert error is not None and b"message_delta" not in data
    result = accumulate(CLAUDE, data, claude)
    entry = up.reported[-1]
    assert result.status == "aborted" and result.usage.input_tokens == entry["usage"]["input_tokens"]
    assert result.text == entry["delivered_text"]


def test_cut_non_stream(up: FakeUpstream) -> None:
    up.behave("cut:0")
    with pytest.raises(openai.APIConnectionError):
        oai(up).chat.completions.create(model=GPT, messages=HELLO)
    assert up.reported[-1]["cut"] is True
    up.behave("cut:0")
    with pytest.raises(anthropic.APIConnectionError):
        ant(up).messages.create(model=CLAUDE, max_tokens=50, messages=HELLO)


def test_error_events(up: FakeUpstream) -> None:
    body = {"model": GPT, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    up.behave("error_event:2")
    with pytest.raises(openai.APIError) as info:
        list(oai(up).chat.completions.create(**body))
    assert "server had an error" in info.value.message
    up.behave("error_event:2")
    data, error = raw_stream(up, "openai", body)
    assert error is None and b'data: {"error":' in data
    result = accumulate(GPT, data, body)
    assert result.status == "error" and result.error["type"] == "server_error"
    assert result.text == up.reported[-1]["delivered_text"] and up.reported[-1]["outcome"] == "error_event"

    claude = {"model": CLAUDE, "max_tokens": 200, "messages": HELLO}
    up.behave("error_event:1")
    with pytest.raises(anthropic.APIStatusError) as info2:
        with ant(up).messages.stream(**claude) as stream:
            list(stream.text_stream)
    assert info2.value.body["error"]["type"] == "overloaded_error"
    up.behave("error_event:1")
    data, _ = raw_stream(up, "anthropic", {**claude, "stream": True})
    assert b"event: error\n" in data
    result = accumulate(CLAUDE, data, {**claude, "stream": True})
    assert result.status == "error" and result.error["type"] == "overloaded_error"


def test_hang_and_client_timeout(up: FakeUpstream) -> None:
    up.behave("hang:5")
    started = time.perf_counter()
    with pytest.raises(openai.APITimeoutError):
        oai(up, timeout=0.3).chat.completions.create(model=GPT, messages=HELLO)
    assert time.perf_counter() - started < 2
    time.sleep(0.05)
    assert up.reported == []  # the client gave up: the fake answered nothing
    up.behave("hang:0.3")
    started = time.perf_counter()
    ant(up, timeout=5).messages.create(model=CLAUDE, max_tokens=50, messages=HELLO)
    assert 0.3 <= time.perf_counter() - started < 2
    assert len(up.reported) == 1


def test_stall_sends_half_the_answer_then_waits(up: FakeUpstream) -> None:
    up.behave("stall:0.3")
    started = time.perf_counter()
    reply = oai(up).chat.completions.create(model=GPT, messages=HELLO)
    assert reply.choices[0].message.content and 0.3 <= time.perf_counter() - started < 2
    assert up.reported[-1]["outcome"] == "ok"
    up.behave("stall:5")
    with pytest.raises(anthropic.APITimeoutError):  # the headers came at once, the rest of the body did not
        ant(up, timeout=0.3).messages.create(model=CLAUDE, max_tokens=50, messages=HELLO)
    up.wait_reported(2)
    assert up.reported[-1]["outcome"] == "disconnected"


def test_slow_stream_delivers_deltas_over_time(up: FakeUpstream) -> None:
    up.behave("slow:0.05")
    client = oai(up)
    arrivals = [time.perf_counter() for _ in client.chat.completions.create(model=GPT, messages=HELLO, stream=True)]
    assert arrivals[-1] - arrivals[0] >= 0.4  # ten deltas, 0.05 s apart, each sent as it was produced


def test_keep_alive_and_low_overhead(up: FakeUpstream) -> None:
    client = oai(up)
    client.chat.completions.create(model=GPT, messages=HELLO)  # warm up
    started = time.perf_counter()
    for _ in range(30):
        client.chat.completions.create(model=GPT, messages=HELLO)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.5, f"30 requests took {elapsed:.2f} s"
    assert len({r.client for r in up.requests}) == 1  # one connection, reused


def test_client_disconnect_mid_stream_is_reported(up: FakeUpstream) -> None:
    up.behave("slow:0.03")
    path, auth = _route("openai")
    body = {"model": GPT, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    with httpx2.Client(timeout=5) as client, client.stream("POST", f"{up.base_url}{path}", json=body, headers=auth) as r:
        next(r.iter_raw())
    [entry] = up.wait_reported(1)
    assert entry["outcome"] == "disconnected" and entry["usage"] is None


def test_async_sdks_concurrently(up: FakeUpstream) -> None:
    async def main() -> list[Any]:
        aoai = openai.AsyncOpenAI(base_url=up.openai_base_url, api_key=DEFAULT_KEY, max_retries=0)
        aant = anthropic.AsyncAnthropic(base_url=up.base_url, api_key=DEFAULT_KEY, max_retries=0)

        async def openai_stream() -> str:
            stream = await aoai.chat.completions.create(model=GPT, messages=HELLO, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def claude_stream() -> str:
            async with aant.messages.stream(model=CLAUDE, max_tokens=100, messages=HELLO) as stream:
                return "".join([t async for t in stream.text_stream])

        return await asyncio.gather(*[openai_stream() for _ in range(10)], *[claude_stream() for _ in range(10)])

    texts = asyncio.run(main())
    assert len(set(texts)) == 2 or len(set(texts)) == 1  # deterministic: one reply per prompt (and dialect)
    assert len(up.reported) == 20 and {e["outcome"] for e in up.reported} == {"ok"}
