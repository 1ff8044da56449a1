"""Prompt tokens of a Claude request (the Anthropic Messages body): exact through the API, or estimated.

Claude's tokenizer is not public. The exact count comes from Anthropic's ``messages.count_tokens``
endpoint through the official SDK, when the caller configures a client. Offline we estimate:
the text is counted with tiktoken's o200k_base and multiplied by the model's safety factor (rounded up,
so the estimate errs on the side of reserving enough quota); images cost (w x h)/750 after Anthropic's
resize; tools add Anthropic's documented tool-use system prompt. Estimated counts say so.

Every part of a tool is counted (each key beyond name, description and input_schema as the key plus its
value's compact JSON), and Anthropic-defined tools add the definition tokens Anthropic publishes, or our
documented cap where it publishes none (``ANTHROPIC_TOOL_TYPES``). A tool type we cannot bound (a tool that
bills by the hour, an MCP server whose tools the request does not carry) is refused, never counted as 0.
Server-tool blocks of earlier turns (``server_tool_use``, ``web_search_tool_result``...) are counted as every
string they hold; ``redacted_thinking`` as its encrypted data (more tokens than the thinking it hides).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from metering.count_cache import DEFAULT_CACHE, TokenCountCache
from metering.errors import RequestError, TokenCountUnavailable
from metering.images import decode_base64, size_from_bytes
from metering.model_table import fraction_text
from metering.models import ResolvedModel
from metering.prompt_count import ImageTally, PromptCount, TextCounter, compact_json, require, text_counter
from pricing.usage import UsageSource

#: Body fields the count_tokens endpoint accepts (everything else, e.g. max_tokens, is not sent).
COUNT_TOKENS_FIELDS = ("messages", "system", "tools", "tool_choice", "thinking", "mcp_servers")
#: tool_choice types that use the shorter "any/tool" tool-use system prompt.
FORCED_TOOL_CHOICES = frozenset({"any", "tool"})
#: Keys of a tool counted on their own (every other key: the key and its value as compact JSON).
TOOL_KEYS = frozenset({"name", "description", "input_schema"})
#: Tokens a key counted as compact JSON adds around it (separators), at most.
KEY_FRAMING = 3
#: Anthropic-defined tool types (by prefix of ``type``; a tool without a type, or ``custom``, is the
#: client's own) -> the tokens their definition adds beyond its JSON. Sources: Anthropic "Tool use - pricing"
#: (bash 245 tokens, text editor 700, computer use 735 plus up to 499 of system prompt); web search, web fetch
#: and memory publish no figure: 1,000 is our cap. Their per-use costs are in ``metering.worst_case``.
ANTHROPIC_TOOL_TYPES: tuple[tuple[str, int], ...] = (
    ("bash_", 245),
    ("text_editor_", 700),
    ("computer_", 735 + 499),
    ("web_search_", 1_000),
    ("web_fetch_", 1_000),
    ("memory_", 1_000),
)
#: Content blocks of earlier turns that carry a server tool's call or results: counted as every string in them.
SERVER_TOOL_BLOCKS = frozenset({"server_tool_use", "web_search_tool_result", "web_fetch_tool_result"})


def estimate_claude(
    body: Mapping[str, Any],
    resolved: ResolvedModel,
    *,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    cache: TokenCountCache | None = DEFAULT_CACHE,
) -> PromptCount:
    """Estimate the input tokens of an Anthropic Messages request offline (always marked estimated)."""
    spec = resolved.spec
    if spec.claude_safety_factor is None or spec.claude_tool_prompt is None:
        raise ValueError(f"{resolved.canonical} is not a Claude model")
    if body.get("mcp_servers"):  # their tools' definitions (and what they return) are not in the request
        raise RequestError(("mcp_servers",), "MCP servers cannot be counted offline: their tools are not in the request")
    count = text_counter(spec.encoding, cache)
    images = ImageTally(spec.image, image_sizes)
    framing = spec.framing
    system_tokens = _system_tokens(body.get("system"), count)
    messages = require(body.get("messages"), list, ("messages",), "a list of messages")
    message_tokens = tuple(
        framing.tokens_per_message + _message_tokens(message, index, count, images)
        for index, message in enumerate(messages)
    )
    tools_text, tool_prompt = _tools_tokens(body, count, spec.claude_tool_prompt)
    # Message tokens include their images; only the text part is scaled by the safety factor.
    text_tokens = system_tokens + sum(message_tokens) - images.tokens + tools_text + framing.reply_priming
    scaled = math.ceil(text_tokens * spec.claude_safety_factor)
    return PromptCount(
        model=resolved.requested,
        canonical_model=resolved.canonical,
        provider=spec.provider,
        encoding=None,
        prompt_tokens=scaled + images.tokens + tool_prompt,
        source=UsageSource.ESTIMATED,
        message_tokens=message_tokens,
        system_tokens=system_tokens,
        tools_tokens=tools_text + tool_prompt,
        priming_tokens=framing.reply_priming,
        images=images.images,
        image_tokens=images.tokens,
        estimated_images=images.estimated,
        notes=(f"estimate: {spec.encoding} text tokens x {fraction_text(spec.claude_safety_factor)}, rounded up",),
    )


def count_claude_exact(body: Mapping[str, Any], resolved: ResolvedModel, client: Any) -> PromptCount:
    """The exact input tokens from Anthropic's ``messages.count_tokens`` through the SDK ``client``."""
    import anthropic  # imported here: the offline paths never need the SDK loaded

    require(body.get("messages"), list, ("messages",), "a list of messages")
    params = {key: body[key] for key in COUNT_TOKENS_FIELDS if body.get(key) is not None}
    try:
        result = client.messages.count_tokens(model=resolved.requested, **params)
    except anthropic.APIError as exc:
        raise TokenCountUnavailable(f"count_tokens failed for {resolved.requested}: {exc}") from exc
    tokens = getattr(result, "input_tokens", None)
    if not isinstance(tokens, int) or tokens < 0:
        raise TokenCountUnavailable(f"count_tokens returned no input_tokens for {resolved.requested}")
    return PromptCount(
        model=resolved.requested,
        canonical_model=resolved.canonical,
        provider=resolved.spec.provider,
        encoding=None,
        prompt_tokens=tokens,
        source=UsageSource.UPSTREAM,
        notes=("exact: Anthropic messages.count_tokens",),
    )


def _system_tokens(system: Any, count: TextCounter) -> int:
    if system is None:
        return 0
    if isinstance(system, str):
        return count(system)
    tokens = 0
    for index, block in enumerate(require(system, list, ("system",), "a string or a list of text blocks")):
        block = require(block, dict, ("system", index), "a text block")
        tokens += count(require(block.get("text"), str, ("system", index, "text"), "a string"))
    return tokens


def _message_tokens(message: Any, index: int, count: TextCounter, images: ImageTally) -> int:
    path = ("messages", index)
    message = require(message, dict, path, "a message object")
    role = require(message.get("role"), str, (*path, "role"), "a string")
    content = message.get("content")
    if isinstance(content, str):
        return count(role) + count(content)
    blocks = require(content, list, (*path, "content"), "a string or a list of content blocks")
    return count(role) + sum(
        _block_tokens(block, (*path, "content", block_index), count, images) for block_index, block in enumerate(blocks)
    )


def _block_tokens(block: Any, path: tuple[str | int, ...], count: TextCounter, images: ImageTally) -> int:
    block = require(block, dict, path, "a content block object")
    kind = block.get("type")
    if kind == "text":
        return count(require(block.get("text"), str, (*path, "text"), "a string"))
    if kind == "image":
        return _image_tokens(block.get("source"), (*path, "source"), images)
    if kind == "tool_use":
        name = require(block.get("name"), str, (*path, "name"), "a string")
        return count(name) + count(compact_json(block.get("input") or {}, (*path, "input")))
    if kind == "tool_result":
        content = block.get("content")
        if content is None or isinstance(content, str):
            return count(content or "")
        nested = require(content, list, (*path, "content"), "a string or a list of blocks")
        return sum(_block_tokens(item, (*path, "content", i), count, images) for i, item in enumerate(nested))
    if kind == "thinking":
        return count(require(block.get("thinking"), str, (*path, "thinking"), "a string"))
    if kind == "redacted_thinking":
        # Encrypted: billed as the thinking it hides when it is the last turn's; its text is an upper bound.
        return count(require(block.get("data") or "", str, (*path, "data"), "a string"))
    if isinstance(kind, str) and kind in SERVER_TOOL_BLOCKS:
        return count(compact_json(block, path))
    raise RequestError((*path, "type"), f"content block type {kind!r} cannot be counted")


def _image_tokens(source: Any, path: tuple[str | int, ...], images: ImageTally) -> int:
    source = require(source, dict, path, "an image source object")
    kind = source.get("type")
    if kind == "base64":
        data = require(source.get("data"), str, (*path, "data"), "a base64 string")
        return images.add_size(size_from_bytes(decode_base64(data, (*path, "data")), (*path, "data")))
    if kind == "url":
        return images.add_url(source.get("url"), "auto", (*path, "url"))
    if kind == "file":
        return images.add_size(None)  # a Files API id: the size is not ours to know
    raise RequestError((*path, "type"), f"image source type {kind!r} cannot be counted")


def _tools_tokens(body: Mapping[str, Any], count: TextCounter, tool_prompt: tuple[int, int]) -> tuple[int, int]:
    """(tokens of the tool definitions, tokens of the tool-use system prompt)."""
    tools = body.get("tools")
    if not tools:
        return 0, 0
    text = 0
    for index, tool in enumerate(require(tools, list, ("tools",), "a list of tools")):
        path = ("tools", index)
        tool = require(tool, dict, path, "a tool object")
        text += count(require(tool.get("name"), str, (*path, "name"), "a string"))
        text += count(require(tool.get("description") or "", str, (*path, "description"), "a string"))
        schema = tool.get("input_schema")
        if schema is not None:
            text += count(compact_json(schema, (*path, "input_schema")))
        for key, value in tool.items():
            if key not in TOOL_KEYS and value is not None:
                text += KEY_FRAMING + count(key) + count(compact_json(value, (*path, key)))
        text += _tool_type_tokens(tool.get("type"), path)
    choice = body.get("tool_choice") or {}
    choice_type = require(choice, dict, ("tool_choice",), "an object").get("type", "auto")
    if not isinstance(choice_type, str):
        raise RequestError(("tool_choice", "type"), f"must be a string, got {type(choice_type).__name__}")
    auto_or_none, any_or_tool = tool_prompt
    return text, any_or_tool if choice_type in FORCED_TOOL_CHOICES else auto_or_none


def _tool_type_tokens(kind: Any, path: tuple[str | int, ...]) -> int:
    """What an Anthropic-defined tool's definition adds; a type that cannot be bounded is refused."""
    if kind is None or kind == "custom":
        return 0
    if isinstance(kind, str):
        for prefix, tokens in ANTHROPIC_TOOL_TYPES:
            if kind.startswith(prefix):
                return tokens
    raise RequestError((*path, "type"), f"tool type {kind!r} cannot be counted or bounded")
