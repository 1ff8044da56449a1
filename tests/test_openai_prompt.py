"""OpenAI chat request counting against the figures OpenAI publishes."""

from __future__ import annotations

import copy
import json

import pytest

from metering import RequestError, count_request
from metering.encodings import get_encoding

# OpenAI cookbook "How to count tokens with tiktoken", section 6: example_messages, and the
# prompt_tokens the OpenAI API reported for them (129 for gpt-3.5-turbo / gpt-4, 124 for gpt-4o / -mini,
# and 127 for gpt-3.5-turbo-0301 in the cookbook's earlier revision).
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]

# Same cookbook, section 7: tools, example_messages, and the API's prompt_tokens (105 / 101).
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo-0301", 127),
        ("gpt-3.5-turbo", 129),
        ("gpt-3.5-turbo-0125", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-2024-08-06", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_cookbook_messages(model: str, expected: int) -> None:
    result = count_request({"model": model, "messages": COOKBOOK_MESSAGES})
    assert result.prompt_tokens == expected
    assert str(result.source) == "local"


@pytest.mark.parametrize(("model", "expected"), [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)])
def test_cookbook_tools(model: str, expected: int) -> None:
    result = count_request({"model": model, "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS})
    assert result.prompt_tokens == expected


def test_legacy_functions_count_like_tools() -> None:
    functions = [COOKBOOK_TOOLS[0]["function"]]
    with_tools = count_request({"model": "gpt-4", "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS})
    with_functions = count_request({"model": "gpt-4", "messages": COOKBOOK_TOOL_MESSAGES, "functions": functions})
    assert with_functions.prompt_tokens == with_tools.prompt_tokens == 105


def test_every_tool_is_counted_not_only_the_last() -> None:
    one = count_request({"model": "gpt-4o", "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS})
    second = copy.deepcopy(COOKBOOK_TOOLS[0])
    second["function"]["name"] = "get_forecast"
    two = count_request({"model": "gpt-4o", "messages": COOKBOOK_TOOL_MESSAGES, "tools": [*COOKBOOK_TOOLS, second]})
    # The second definition costs what the first did (func_end is paid once), with its own name.
    enc = get_encoding("o200k_base")
    name_delta = len(enc.encode_ordinary("get_forecast:Get the current weather in a given location")) - len(
        enc.encode_ordinary("get_current_weather:Get the current weather in a given location")
    )
    assert two.tools_tokens - one.tools_tokens == one.tools_tokens - 12 + name_delta


def test_nested_properties_are_counted() -> None:
    nested = copy.deepcopy(COOKBOOK_TOOLS)
    nested[0]["function"]["parameters"]["properties"]["where"] = {
        "type": "object",
        "description": "Where to look",
        "properties": {"lat": {"type": "number", "description": "Latitude"}},
    }
    flat = count_request({"model": "gpt-4o", "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS})
    deep = count_request({"model": "gpt-4o", "messages": COOKBOOK_TOOL_MESSAGES, "tools": nested})
    enc = get_encoding("o200k_base")
    # "where" costs prop_key + its line; its nested object prop_init + prop_key + "lat:number:Latitude".
    expected = 3 + len(enc.encode_ordinary("where:object:Where to look")) + 3 + 3 + len(enc.encode_ordinary("lat:number:Latitude"))
    assert deep.prompt_tokens - flat.prompt_tokens == expected


def test_tool_choice_named_and_none() -> None:
    base = {"model": "gpt-4o", "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    auto = count_request({**base, "tool_choice": "auto"}).prompt_tokens
    assert count_request(base).prompt_tokens == auto == 101
    assert count_request({**base, "tool_choice": "none"}).prompt_tokens == auto + 1
    named = {"type": "function", "function": {"name": "get_current_weather"}}
    name_tokens = len(get_encoding("o200k_base").encode_ordinary("get_current_weather"))
    assert count_request({**base, "tool_choice": named}).prompt_tokens == auto + name_tokens + 4


def test_assistant_tool_calls_and_tool_messages_are_counted() -> None:
    enc = get_encoding("o200k_base")
    arguments = '{"location": "上海", "unit": "celsius"}'
    messages = [
        {"role": "user", "content": "上海天气?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_current_weather", "arguments": arguments}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    result = count_request({"model": "gpt-4o", "messages": messages})
    n = lambda text: len(enc.encode_ordinary(text))  # noqa: E731
    calls = n("get_current_weather") + n(arguments) + 3 + n("get_time") + n("{}") + 3
    assert result.message_tokens[1] == 3 + n("assistant") + calls
    assert result.message_tokens[2] == 3 + n("tool") + n("call_1") + n("18C")


def test_list_content_counts_its_text_parts() -> None:
    as_string = count_request({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}]})
    as_parts = count_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]}
    )
    assert as_parts.prompt_tokens == as_string.prompt_tokens


def test_special_token_text_is_counted_as_text_not_rejected() -> None:
    result = count_request({"model": "gpt-4", "messages": [{"role": "user", "content": "<|endoftext|>"}]})
    assert result.message_tokens[0] == 3 + 1 + len(get_encoding("cl100k_base").encode_ordinary("<|endoftext|>"))


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"model": "gpt-4o"}, "messages"),
        ({"model": "gpt-4o", "messages": {}}, "messages"),
        ({"model": "gpt-4o", "messages": ["hi"]}, "messages[0]"),
        ({"model": "gpt-4o", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]}, "messages[0].content[0].image_url.url"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]}]}, "messages[0].content[0].image_url.detail"),
        ({"model": "gpt-4o", "messages": [], "tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
        ({"model": "gpt-4o", "messages": [], "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name"),
        ({"messages": []}, "model"),
    ],
)
def test_bad_input_names_the_json_path(body: dict, path: str) -> None:
    with pytest.raises(RequestError) as info:
        count_request(body)
    assert str(info.value).startswith(path + ":"), str(info.value)


def test_the_body_is_not_modified() -> None:
    body = {"model": "gpt-4o", "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    before = json.dumps(body, sort_keys=True)
    count_request(body)
    assert json.dumps(body, sort_keys=True) == before
