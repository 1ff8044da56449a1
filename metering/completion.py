"""Completion (output) tokens and the usage record of a non-stream response body.

When the upstream reports ``usage`` we take it as is (source UPSTREAM). When it does not (some
OpenAI-compatible backends, a proxy that strips it), we count what the model produced: for OpenAI models
the exact tiktoken count of the generated text, for Claude the same estimate as the prompt side,
``ceil(o200k tokens x claude_safety_factor)``. Only generated text is counted, never framing: a local
count is a floor of what the upstream would report, which is the side a reseller should err on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from metering.errors import RequestError
from metering.models import ResolvedModel, resolve_model
from metering.prompt_count import PromptCount, compact_json, require, text_counter
from pricing.usage import InvalidUsage, UsageRecord, UsageSource

#: Anthropic content blocks the model writes a tool call in (server tools are called by the model too).
ANTHROPIC_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use"})
#: The names a response's usage gives its input / output count by, (OpenAI, Anthropic).
INPUT_FIGURES = (("prompt_tokens", "input_tokens"), ("input_tokens",))
OUTPUT_FIGURES = (("completion_tokens", "output_tokens"), ("output_tokens",))


class ResponseError(RequestError):
    """A response body that cannot be counted; ``path`` is the JSON path of the fault."""


def count_generated(texts: Iterable[str], resolved: ResolvedModel) -> tuple[int, UsageSource]:
    """Tokens of texts a model generated: exact for OpenAI (LOCAL), the Claude estimate (ESTIMATED)."""
    # No count cache: generated texts are almost never seen twice and would only evict prompt entries.
    count = text_counter(resolved.spec.encoding, None)
    tokens = sum(count(text) for text in texts if text)
    factor = resolved.spec.claude_safety_factor
    if factor is None:
        return tokens, UsageSource.LOCAL
    return math.ceil(tokens * factor), UsageSource.ESTIMATED  # Fraction arithmetic: no float rounding


def completion_tokens_local(response: dict[str, Any], resolved: ResolvedModel) -> tuple[int, UsageSource]:
    """Count locally the output of a non-stream OpenAI chat completion or Anthropic message."""
    if not isinstance(response, dict):
        raise ResponseError((), "response must be an object")
    if resolved.provider == "anthropic":
        texts = _anthropic_texts(response)
    else:
        texts = _openai_texts(response)
    return count_generated(texts, resolved)


def usage_from_response(
    response: dict[str, Any], model: str | None = None, *, prompt: PromptCount | None = None
) -> UsageRecord:
    """The usage record of a non-stream response: upstream ``usage`` if present, else a local count."""
    if not isinstance(response, dict):
        raise ResponseError((), "response must be an object")
    model = model if model is not None else response.get("model")
    if not isinstance(model, str):
        raise ResponseError(("model",), "no model given and the response has no model name")
    resolved = resolve_model(model)
    usage = response.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise InvalidUsage("usage", f"must be an object, got {type(usage).__name__}")
    if usage:
        mapper = UsageRecord.from_anthropic if resolved.provider == "anthropic" else UsageRecord.from_openai
        record = mapper(model, usage, source=UsageSource.UPSTREAM)  # every figure given is checked first
        require_figures(usage, resolved.provider)
        return record
    if prompt is None:
        raise ValueError(
            f"the {model!r} response has no usage: pass prompt= (the request's PromptCount) to bill its input"
        )
    output, output_source = completion_tokens_local(response, resolved)
    return UsageRecord(
        provider=resolved.provider,
        model=model,
        input_tokens=prompt.prompt_tokens,
        output_tokens=output,
        source=UsageSource.weakest(prompt.source, output_source),
    )


def require_figures(usage: dict[str, Any], provider: str, which: tuple[str, ...] = ("input", "output")) -> None:
    """Refuse a usage object that leaves out its input or output count: it would bill that count as 0.

    ``which`` names the counts required (an Anthropic ``message_delta`` carries only the output one).
    """
    for kind in which:
        figures = (INPUT_FIGURES if kind == "input" else OUTPUT_FIGURES)[provider == "anthropic"]
        if all(usage.get(name) is None for name in figures):
            raise InvalidUsage(f"usage.{figures[0]}", "is required in a usage object (absent, it would bill 0)")


def _openai_texts(response: dict[str, Any]) -> list[str]:
    choices = _typed(response.get("choices"), list, ("choices",), "a list")
    texts: list[str] = []
    for index, choice in enumerate(choices):
        path: tuple[str | int, ...] = ("choices", index)
        choice = _typed(choice, dict, path, "an object")
        message = _typed(choice.get("message"), dict, (*path, "message"), "an object")
        path = (*path, "message")
        for key in ("content", "refusal"):
            texts.append(_optional_str(message.get(key), (*path, key)))
        tool_calls = message.get("tool_calls") or []
        for call_index, call in enumerate(_typed(tool_calls, list, (*path, "tool_calls"), "a list")):
            call_path = (*path, "tool_calls", call_index)
            call = _typed(call, dict, call_path, "an object")
            texts.extend(_function_texts(call.get("function"), (*call_path, "function")))
        if message.get("function_call") is not None:
            texts.extend(_function_texts(message["function_call"], (*path, "function_call")))
    return texts


def _function_texts(function: Any, path: Sequence[str | int]) -> list[str]:
    function = _typed(function, dict, path, "an object")
    return [_optional_str(function.get(key), (*path, key)) for key in ("name", "arguments")]


def _anthropic_texts(response: dict[str, Any]) -> list[str]:
    content = _typed(response.get("content"), list, ("content",), "a list of content blocks")
    texts: list[str] = []
    for index, block in enumerate(content):
        path: tuple[str | int, ...] = ("content", index)
        block = _typed(block, dict, path, "an object")
        kind = block.get("type")
        if kind == "text":
            texts.append(_optional_str(block.get("text"), (*path, "text")))
        elif kind == "thinking":
            texts.append(_optional_str(block.get("thinking"), (*path, "thinking")))
        elif isinstance(kind, str) and kind in ANTHROPIC_TOOL_BLOCKS:  # a list or an object is not hashable
            texts.append(_optional_str(block.get("name"), (*path, "name")))
            texts.append(compact_json(block.get("input", {}), (*path, "input")))
        # Other blocks (redacted_thinking, server tool results) carry no text we can count: upstream only.
    return texts


def _typed(value: Any, kind: type, path: Sequence[str | int], what: str) -> Any:
    return require(value, kind, path, what, ResponseError)


def _optional_str(value: Any, path: Sequence[str | int]) -> str:
    if value is None:
        return ""
    return _typed(value, str, path, "a string or null")
