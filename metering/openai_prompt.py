"""Prompt tokens of an OpenAI chat request (the body as sent to /v1/chat/completions).

The method is the one OpenAI publishes in its cookbook ("How to count tokens with tiktoken"):
every message costs ``tokens_per_message`` plus the tokens of each of its string fields, a ``name``
adds ``tokens_per_name``, and the reply is primed with 3 more. Function/tool definitions follow the
cookbook's ``num_tokens_for_tools``. Where the cookbook is silent we document our rule next to it:
nested object properties are counted like top-level ones, assistant tool calls cost their name and
arguments plus a fixed framing, and ``tool_choice`` follows openai-chat-tokens' measurements.

What the cookbook's rule does not know is never left out: every other key of a definition or schema, at
any depth (``strict``, ``additionalProperties``, ``$defs``, ``anyOf``, ``default``, ``format``, an ``items``'
own ``description``...), and a ``response_format`` JSON schema (the model is shown it), is counted as an
upper bound: the key and its value as compact JSON, plus ``UNKNOWN_KEY_FRAMING`` tokens. JSON's quotes,
colons and braces cost more tokens than the TypeScript-like text OpenAI renders schemas into, so this errs
on the side of reserving enough; a count that includes such a part says ``estimated``, never ``local``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from metering.count_cache import DEFAULT_CACHE, TokenCountCache
from metering.encodings import get_encoding
from metering.errors import RequestError, format_path
from metering.model_table import ChatFraming, ToolFraming
from metering.models import ResolvedModel
from metering.prompt_count import ImageTally, PromptCount, TextCounter, compact_json, require, text_counter
from pricing.usage import UsageSource

#: Message keys that carry no prompt text (client-side hints some OpenAI-compatible clients send).
IGNORED_MESSAGE_KEYS = frozenset({"cache_control", "annotations", "audio"})
IMAGE_DETAILS = frozenset({"low", "high", "auto"})
#: How deep tool parameter schemas may nest (each level is counted; real schemas stay in single digits).
MAX_SCHEMA_DEPTH = 64
#: The keys the cookbook's rule counts (or that render as no text: ``required`` only adds ``?`` marks);
#: any other key is counted as an upper bound.
TOOL_KEYS = frozenset({"type", "function"})
FUNCTION_KEYS = frozenset({"name", "description", "parameters"})
PARAMETERS_KEYS = frozenset({"type", "properties", "required"})
PROPERTY_KEYS = frozenset({"type", "description", "enum", "properties", "items", "required"})
ITEMS_KEYS = frozenset({"type", "properties", "required"})
#: Tokens added to each key counted as an upper bound (a separator and a line break around it, at most).
UNKNOWN_KEY_FRAMING = 3
#: ``response_format`` types that show the model no schema.
PLAIN_RESPONSE_FORMATS = frozenset({"text", "json_object"})


def count_openai_chat(
    body: Mapping[str, Any],
    resolved: ResolvedModel,
    *,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    cache: TokenCountCache | None = DEFAULT_CACHE,
) -> PromptCount:
    """Count the prompt tokens of an OpenAI chat-completions request body."""
    spec = resolved.spec
    count = text_counter(spec.encoding, cache)
    # Without a cache the fast path calls the encoder itself: one Python frame less per string.
    encode = get_encoding(spec.encoding).encode_ordinary if cache is None else None
    framing = spec.framing
    images = ImageTally(spec.image, image_sizes)
    messages = require(body.get("messages"), list, ("messages",), "a list of messages")
    per_message, per_name = framing.tokens_per_message, framing.tokens_per_name
    counted: list[int] = []
    for index, message in enumerate(messages):
        # Fast path for the bulk of a chat history: a message whose fields are all strings. Anything
        # else (list content, tool calls, a missing role, bad input) takes the full walk below.
        if type(message) is dict and "role" in message:
            tokens = per_message
            for key, value in message.items():
                if type(value) is not str:
                    break
                tokens += len(encode(value)) if encode is not None else count(value)
                if key == "name":
                    tokens += per_name
            else:
                counted.append(tokens)
                continue
        counted.append(_message_tokens(message, index, count, framing, images))
    message_tokens = tuple(counted)
    bound = UpperBound(count)
    tools_tokens = 0
    if spec.tools is not None and (
        "tools" in body or "functions" in body or "tool_choice" in body or "function_call" in body
    ):
        tools_tokens = _definitions_tokens(body, count, spec.tools, bound) + _choice_tokens(body, count, spec.tools)
    format_tokens = _response_format_tokens(body.get("response_format"), bound)
    total = sum(message_tokens) + tools_tokens + format_tokens + framing.reply_priming
    notes: tuple[str, ...] = ("image size unknown: counted at the rule's maximum",) if images.estimated else ()
    if bound.parts:
        notes += (f"upper bound for parts the published rule does not cover: {', '.join(bound.parts[:5])}",)
    return PromptCount(
        model=resolved.requested,
        canonical_model=resolved.canonical,
        provider=spec.provider,
        encoding=spec.encoding,
        prompt_tokens=total,
        source=UsageSource.ESTIMATED if images.estimated or bound.parts else UsageSource.LOCAL,
        message_tokens=message_tokens,
        tools_tokens=tools_tokens + format_tokens,
        priming_tokens=framing.reply_priming,
        images=images.images,
        image_tokens=images.tokens,
        estimated_images=images.estimated,
        notes=notes,
    )


class UpperBound:
    """Counts, as an upper bound, the parts of a request the published rule does not cover; remembers which."""

    __slots__ = ("count", "parts")

    def __init__(self, count: TextCounter) -> None:
        self.count = count
        self.parts: list[str] = []

    def key(self, key: str, value: Any, path: tuple[str | int, ...]) -> int:
        """One key and its value: both encoded (the value as compact JSON), plus the framing around them."""
        self.parts.append(format_path((*path, key)))
        return UNKNOWN_KEY_FRAMING + self.count(key) + self.count(compact_json(value, (*path, key)))

    def others(self, obj: Mapping[str, Any], known: frozenset[str], path: tuple[str | int, ...]) -> int:
        """Every key of ``obj`` outside ``known``, counted by ``key``."""
        return sum(self.key(key, value, path) for key, value in obj.items() if key not in known)


def _response_format_tokens(response_format: Any, bound: UpperBound) -> int:
    """A ``response_format`` JSON schema is shown to the model: counted as an upper bound (0 for text / json_object)."""
    if response_format is None:
        return 0
    response_format = require(response_format, dict, ("response_format",), "an object")
    if response_format.get("type") in PLAIN_RESPONSE_FORMATS and len(response_format) == 1:
        return 0
    return bound.others(response_format, frozenset({"type"}), ("response_format",))


def message_tokens(
    message: Mapping[str, Any], resolved: ResolvedModel, cache: TokenCountCache | None = DEFAULT_CACHE
) -> int:
    """Tokens of one chat message on its own (framing included, reply priming not)."""
    tally = ImageTally(resolved.spec.image, None)
    return _message_tokens(message, 0, text_counter(resolved.spec.encoding, cache), resolved.spec.framing, tally)


def _message_tokens(
    message: Any, index: int, count: TextCounter, framing: ChatFraming, images: ImageTally
) -> int:
    if not isinstance(message, dict):
        require(message, dict, ("messages", index), "a message object")
    if "role" not in message:
        raise RequestError(("messages", index, "role"), "is required")
    tokens = framing.tokens_per_message
    for key, value in message.items():
        if type(value) is str:  # the common case first: role, string content, name, tool_call_id
            tokens += count(value)
            if key == "name":
                tokens += framing.tokens_per_name
        elif value is None or key in IGNORED_MESSAGE_KEYS:
            continue
        elif key == "content":
            tokens += _parts_tokens(value, ("messages", index, "content"), count, images)
        elif key == "tool_calls":
            path = ("messages", index, "tool_calls")
            for call_index, call in enumerate(require(value, list, path, "a list of tool calls")):
                call_path = (*path, call_index)
                function = require(call, dict, call_path, "a tool call object").get("function")
                tokens += _call_tokens(function, (*call_path, "function"), count, framing)
        elif key == "function_call":
            tokens += _call_tokens(value, ("messages", index, "function_call"), count, framing)
        else:
            raise RequestError(("messages", index, key), f"unexpected {type(value).__name__} value")
    return tokens


def _parts_tokens(content: Any, path: tuple[str | int, ...], count: TextCounter, images: ImageTally) -> int:
    parts = require(content, list, path, "a string or a list of content parts")
    tokens = 0
    for part_index, part in enumerate(parts):
        part_path = (*path, part_index)
        kind = require(part, dict, part_path, "a content part object").get("type")
        if kind == "text":
            tokens += count(require(part.get("text"), str, (*part_path, "text"), "a string"))
        elif kind == "image_url":
            tokens += _image_part_tokens(part.get("image_url"), (*part_path, "image_url"), images)
        elif kind == "refusal":
            tokens += count(require(part.get("refusal"), str, (*part_path, "refusal"), "a string"))
        else:
            raise RequestError((*part_path, "type"), f"content part type {kind!r} cannot be counted")
    return tokens


def _image_part_tokens(image: Any, path: tuple[str | int, ...], images: ImageTally) -> int:
    if isinstance(image, str):  # some clients send the URL directly
        return images.add_url(image, "auto", path)
    image = require(image, dict, path, "an object with a url")
    detail = image.get("detail") or "auto"
    if not isinstance(detail, str) or detail not in IMAGE_DETAILS:  # a list or an object is not hashable
        raise RequestError((*path, "detail"), f"must be one of low, high, auto; got {detail!r}")
    return images.add_url(image.get("url"), detail, (*path, "url"))


def _call_tokens(function: Any, path: tuple[str | int, ...], count: TextCounter, framing: ChatFraming) -> int:
    function = require(function, dict, path, "a function call object")
    name = require(function.get("name"), str, (*path, "name"), "a string")
    arguments = function.get("arguments") or ""
    if not isinstance(arguments, str):  # some clients send parsed JSON; the model saw it serialized
        arguments = _dumps(arguments, (*path, "arguments"), ensure_ascii=False)
    return count(name) + count(arguments) + framing.tokens_per_tool_call


def _definitions_tokens(body: Mapping[str, Any], count: TextCounter, tf: ToolFraming, bound: UpperBound) -> int:
    definitions: list[tuple[Any, tuple[str | int, ...]]] = []
    extra_tokens = 0
    tools = body.get("tools")
    if tools is not None:
        for index, tool in enumerate(require(tools, list, ("tools",), "a list of tools")):
            tool = require(tool, dict, ("tools", index), "a tool object")
            if tool.get("type", "function") != "function":
                raise RequestError(("tools", index, "type"), f"tool type {tool.get('type')!r} cannot be counted")
            extra_tokens += bound.others(tool, TOOL_KEYS, ("tools", index))
            definitions.append((tool.get("function"), ("tools", index, "function")))
    functions = body.get("functions")
    if functions is not None:
        for index, function in enumerate(require(functions, list, ("functions",), "a list of functions")):
            definitions.append((function, ("functions", index)))
    if not definitions:
        return extra_tokens
    tokens = tf.func_end + extra_tokens
    for function, path in definitions:
        function = require(function, dict, path, "a function definition object")
        name = require(function.get("name"), str, (*path, "name"), "a string")
        description = require(function.get("description") or "", str, (*path, "description"), "a string")
        tokens += tf.func_init + count(f"{name}:{description.removesuffix('.')}") + bound.others(function, FUNCTION_KEYS, path)
        parameters = require(function.get("parameters") or {}, dict, (*path, "parameters"), "an object")
        tokens += bound.others(parameters, PARAMETERS_KEYS, (*path, "parameters"))
        tokens += _properties_tokens(parameters.get("properties"), (*path, "parameters", "properties"), count, tf, bound)
    return tokens


def _properties_tokens(
    properties: Any, path: tuple[str | int, ...], count: TextCounter, tf: ToolFraming, bound: UpperBound, depth: int = 0
) -> int:
    if not properties:
        return 0
    properties = require(properties, dict, path, "an object of properties")
    if depth >= MAX_SCHEMA_DEPTH:
        raise RequestError(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    tokens = tf.prop_init
    for key, prop in properties.items():
        prop = require(prop, dict, (*path, key), "a property schema object")
        tokens += tf.prop_key + bound.others(prop, PROPERTY_KEYS, (*path, key))
        enum = prop.get("enum")
        if enum is not None:
            tokens += tf.enum_init
            for item in require(enum, list, (*path, key, "enum"), "a list"):
                tokens += tf.enum_item + count(item if isinstance(item, str) else _dumps(item, (*path, key, "enum")))
        kind = prop.get("type", "")
        if isinstance(kind, list):
            kind = ",".join(str(k) for k in kind)
        description = require(prop.get("description") or "", str, (*path, key, "description"), "a string")
        tokens += count(f"{key}:{kind}:{description.removesuffix('.')}")
        # Beyond the cookbook (which stops at the top level): nested objects and array items count alike.
        tokens += _properties_tokens(prop.get("properties"), (*path, key, "properties"), count, tf, bound, depth + 1)
        items = prop.get("items")
        if isinstance(items, dict):
            tokens += bound.others(items, ITEMS_KEYS, (*path, key, "items"))
            tokens += _properties_tokens(
                items.get("properties"), (*path, key, "items", "properties"), count, tf, bound, depth + 1
            )
        elif items is not None:  # a tuple schema (a list): every part of it, as an upper bound
            tokens += bound.key("items", items, (*path, key))
    return tokens


def _dumps(value: Any, path: tuple[str | int, ...], **options: Any) -> str:
    """``json.dumps(value, **options)`` (the text counted), or a ``RequestError`` naming ``path`` when JSON
    cannot write the value (a set, bytes, a cycle, too deep): a caller's object, never a decoded body."""
    try:
        return json.dumps(value, **options)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RequestError(path, f"must be JSON data ({reason})") from None


def _choice_tokens(body: Mapping[str, Any], count: TextCounter, tf: ToolFraming) -> int:
    for key in ("tool_choice", "function_call"):
        choice = body.get(key)
        if choice is None or choice in ("auto", "required"):
            continue
        if choice == "none":
            return tf.choice_none
        choice = require(choice, dict, (key,), 'one of "none", "auto", "required" or a named function')
        named = choice.get("function") if key == "tool_choice" else choice
        named = require(named, dict, (key, "function") if key == "tool_choice" else (key,), "an object")
        path: Sequence[str | int] = (key, "function", "name") if key == "tool_choice" else (key, "name")
        return count(require(named.get("name"), str, path, "a string")) + tf.choice_named_extra
    return 0
