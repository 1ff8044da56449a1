"""Claude counting: exact through the SDK's count_tokens (against a local server), estimated offline."""

from __future__ import annotations

import anthropic
import pytest

from metering import RequestError, TokenCountUnavailable, count_request
from metering.encodings import get_encoding
from tests.fake_anthropic import fake_anthropic

# Anthropic "Token counting" docs: system "You are a scientist" + "Hello, Claude" -> 14 input tokens;
# the get_weather tool example -> 403 input tokens.
HELLO = {"model": "claude-sonnet-4-5", "system": "You are a scientist", "messages": [{"role": "user", "content": "Hello, Claude"}]}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"}},
        "required": ["location"],
    },
}
WEATHER = {"model": "claude-sonnet-4-5", "tools": [WEATHER_TOOL],
           "messages": [{"role": "user", "content": "What's the weather like in San Francisco?"}]}


def client_for(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-ant-test", base_url=base_url, max_retries=0)


def test_exact_count_goes_through_the_sdk() -> None:
    with fake_anthropic(lambda body: (200, {"input_tokens": 14})) as (url, requests):
        result = count_request({**HELLO, "max_tokens": 1024, "temperature": 0.2}, anthropic_client=client_for(url))
    assert result.prompt_tokens == 14 and str(result.source) == "upstream"
    (request,) = requests
    assert request["path"] == "/v1/messages/count_tokens"
    headers = request["headers"]  # SDK 2.x sends the key as a bearer token, 0.x as x-api-key
    assert headers.get("x-api-key") == "sk-ant-test" or headers.get("authorization") == "Bearer sk-ant-test"
    assert "anthropic-version" in request["headers"]
    # Only what count_tokens accepts is sent: generation settings are not.
    assert request["body"] == {"model": "claude-sonnet-4-5", "system": "You are a scientist",
                               "messages": [{"role": "user", "content": "Hello, Claude"}]}


def test_exact_count_forwards_tools_and_tool_choice() -> None:
    body = {**WEATHER, "tool_choice": {"type": "any"}}
    with fake_anthropic(lambda body: (200, {"input_tokens": 403})) as (url, requests):
        assert count_request(body, anthropic_client=client_for(url)).prompt_tokens == 403
    assert requests[0]["body"]["tools"] == [WEATHER_TOOL]
    assert requests[0]["body"]["tool_choice"] == {"type": "any"}


def test_endpoint_failure_is_typed_or_falls_back_to_the_estimate() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with fake_anthropic(lambda body: (529, error)) as (url, _):
        with pytest.raises(TokenCountUnavailable):
            count_request(HELLO, anthropic_client=client_for(url), fallback_to_estimate=False)
        fallback = count_request(HELLO, anthropic_client=client_for(url))
    assert str(fallback.source) == "estimated"
    assert any("exact count unavailable" in note for note in fallback.notes)


@pytest.mark.parametrize(("body", "published"), [(HELLO, 14), (WEATHER, 403)])
def test_offline_estimate_covers_the_published_count(body: dict, published: int) -> None:
    result = count_request(body)
    assert str(result.source) == "estimated" and result.encoding is None
    # An estimate reserves quota: it must not fall below the real count, nor be absurdly above it.
    assert published <= result.prompt_tokens <= published * 1.6


def test_estimate_scales_text_and_adds_images_and_tool_prompt_unscaled() -> None:
    enc = get_encoding("o200k_base")
    n = lambda text: len(enc.encode_ordinary(text))  # noqa: E731
    result = count_request(HELLO)
    text = n("You are a scientist") + 3 + n("user") + n("Hello, Claude") + 3
    assert result.prompt_tokens == -(-text * 135 // 100)  # ceil(text x 1.35) for claude-sonnet-4-5
    with_tools = count_request(WEATHER)
    forced = count_request({**WEATHER, "tool_choice": {"type": "tool", "name": "get_weather"}})
    # Anthropic "Tool use" pricing: Sonnet 4.x adds 346 tokens (auto/none) or 313 (any/tool).
    assert with_tools.prompt_tokens - forced.prompt_tokens == 346 - 313


def test_claude_3_opus_tool_prompt_is_its_own() -> None:
    auto = count_request({**WEATHER, "model": "claude-3-opus-20240229"})
    forced = count_request({**WEATHER, "model": "claude-3-opus-20240229", "tool_choice": {"type": "any"}})
    assert auto.prompt_tokens - forced.prompt_tokens == 530 - 281


def test_image_blocks_use_the_area_rule() -> None:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(buffer, "PNG")
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(buffer.getvalue()).decode()}}
    plain = count_request({"model": "claude-3-5-sonnet", "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe."}]}]})
    with_image = count_request({"model": "claude-3-5-sonnet", "messages": [{"role": "user", "content": [block, {"type": "text", "text": "Describe."}]}]})
    assert with_image.image_tokens == 1334  # Anthropic vision doc: 1000x1000 ~ 1334 tokens
    assert with_image.prompt_tokens - plain.prompt_tokens == 1334  # images are not scaled by the factor


def test_tool_use_and_tool_result_blocks_are_counted() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "15C, sunny"}]}]},
    ]
    result = count_request({"model": "claude-3-haiku", "messages": messages})
    enc = get_encoding("o200k_base")
    assert result.message_tokens[1] == 3 + len(enc.encode_ordinary("assistant")) + len(enc.encode_ordinary("get_weather")) + len(
        enc.encode_ordinary('{"location":"Paris"}'))
    assert result.message_tokens[2] == 3 + len(enc.encode_ordinary("user")) + len(enc.encode_ordinary("15C, sunny"))


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"model": "claude-3-haiku", "messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages[0].content[0].type"),
        ({"model": "claude-3-haiku", "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "%%%"}}]}]}, "messages[0].content[0].source.data"),
        ({"model": "claude-3-haiku", "system": [{"type": "text"}], "messages": []}, "system[0].text"),
        ({"model": "claude-3-haiku", "messages": [], "tools": [{"description": "x"}]}, "tools[0].name"),
    ],
)
def test_bad_claude_input_names_the_path(body: dict, path: str) -> None:
    with pytest.raises(RequestError) as info:
        count_request(body)
    assert str(info.value).startswith(path + ":"), str(info.value)
