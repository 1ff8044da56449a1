"""The most a request can make the provider bill: what a hold reserves, and the cheap bounds checked first.

A hold must cover every way the provider bills the request (docs/ledger.md, "Holds"):

* **all choices**: OpenAI's ``n`` multiplies the output (each choice is billed its completion tokens);
* **the output budget** of each choice: the largest of ``max_completion_tokens`` / ``max_tokens`` (and
  Anthropic's ``thinking.budget_tokens``, which interleaved thinking lets exceed ``max_tokens``), else the
  model's maximum output; reasoning tokens are inside this budget (OpenAI: ``max_completion_tokens``
  "including reasoning tokens"; Anthropic: thinking counts toward ``max_tokens``). A ``prediction`` (OpenAI
  predicted outputs) adds its own tokens: rejected prediction tokens are billed as completion tokens;
* **the whole prompt**, counted by ``metering.counting`` (tools, schemas and ``response_format`` included);
* **server-side tools**: Anthropic's web search bills per use and, like web fetch, pours its results into
  the prompt; OpenAI's ``web_search_options`` does one search. Each is bounded by the request's
  ``max_uses`` (and web fetch's ``max_content_tokens``), else by the documented caps below.

Before any of it is counted, ``scan_body`` walks the body once, cheaply: JSON data only (no NaN or
infinity, no lone surrogate, bounded depth and size), and the number of characters it holds, from which
``prompt_lower_bound`` gives a count the real one cannot be below (a BPE token of cl100k_base or
o200k_base is at most 128 bytes, so at most 128 characters): a user who cannot afford even that is
refused before the body is encoded. ``prompt_upper_bound`` is the other side: a token is at least one
byte, so no count of the text exceeds its UTF-8 size (the property tests hold every count to it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any, NamedTuple

from metering.errors import RequestError
from metering.models import ResolvedModel
from metering.prompt_count import text_counter
from pricing.usage import MAX_COUNT, UsageRecord

#: Body fields that bound each choice's output; the largest one present is the bound.
MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")
#: OpenAI refuses ``n`` above 128 (the chat completions API's documented maximum).
MAX_CHOICES = 128
#: The longest text a BPE token of tiktoken's cl100k_base / o200k_base decodes to (measured over both
#: vocabularies: 128 bytes, runs of spaces): a text of N characters is at least ceil(N / 128) tokens.
MAX_TOKEN_CHARS = 128
#: How deep a request body may nest (real bodies, tool schemas included, stay in the low tens).
MAX_BODY_DEPTH = 128
#: Where the prompt's text is: the lower bound reads the strings under these top-level fields only...
PROMPT_FIELDS = frozenset({"messages", "system"})
#: ... but not those under these keys, which are not counted as text (image data and URLs, ids, types,
#: signatures): a megabyte of base64 is an image of at most a few thousand tokens.
NOT_TEXT_KEYS = frozenset({"url", "data", "image_url", "source", "type", "id", "detail", "media_type", "signature",
                           "cache_control", "citations"})

#: Anthropic runs server tools in a loop of its own and pauses the turn (``stop_reason: pause_turn``) after
#: 10 iterations by default: without ``max_uses``, that many uses of each server tool are reserved.
DEFAULT_SERVER_TOOL_USES = 10
#: The most a request may ask of one server tool (``max_uses``): far above any real agent loop.
MAX_SERVER_TOOL_USES = 1_000
#: What one web search may pour into the prompt. The providers publish no figure: this is our cap (ten
#: results of a few thousand tokens each, with room); a reported input above the hold's band is capped anyway.
WEB_SEARCH_RESULT_TOKENS = 32_000
#: What one web fetch may pour into the prompt when the request sets no ``max_content_tokens``.
WEB_FETCH_CONTENT_TOKENS = 100_000

#: The longest a request may run: both SDKs time a call out after 10 minutes, and Anthropic's SDK expects a
#: request for 128,000 output tokens to run an hour (``_calculate_nonstreaming_timeout``: 60 min x
#: max_tokens / 128,000). A hold may be kept alive that long after it was taken.
SDK_TIMEOUT = timedelta(minutes=10)
HOUR_OF_OUTPUT = 128_000


class BodySize(NamedTuple):
    """What ``scan_body`` measured: the characters of the prompt's text and how many strings hold them."""

    chars: int  # in the strings of ``messages`` and ``system`` that are counted as text (``PROMPT_FIELDS``)
    strings: int


class WorstCase(NamedTuple):
    """The most a request can be billed beyond its prompt, figure by figure."""

    choices: int
    output_per_choice: int  # the output budget of one choice (prediction included)
    output_tokens: int  # all choices
    web_searches: int  # server tool uses billed per use
    tool_input_tokens: int  # what server tools may pour into the prompt

    def usage(self, provider: str, model: str, prompt_tokens: int) -> UsageRecord:
        """The usage the hold prices: the whole prompt plus the tools' results, every choice at its budget."""
        return UsageRecord(
            provider=provider, model=model, input_tokens=min(prompt_tokens + self.tool_input_tokens, MAX_COUNT),
            output_tokens=self.output_tokens, web_search_requests=self.web_searches,
        )

    @property
    def longest_request(self) -> timedelta:
        """How long the request may run, by the documented rule above (never below the SDKs' timeout)."""
        return max(SDK_TIMEOUT, timedelta(hours=1) * self.output_per_choice / HOUR_OF_OUTPUT)


def worst_case(body: Mapping[str, Any], resolved: ResolvedModel, model_max_output: int) -> WorstCase:
    """The worst case of ``body`` for ``resolved`` (whose price version allows ``model_max_output``)."""
    per_choice = _output_budget(body, resolved.provider)
    if per_choice is None:
        per_choice = model_max_output
    if resolved.provider == "openai":
        choices = _count_field(body, "n", MAX_CHOICES, default=1)
        per_choice += _prediction_tokens(body, resolved)
        searches, tool_input = (1, WEB_SEARCH_RESULT_TOKENS) if body.get("web_search_options") is not None else (0, 0)
    else:
        choices = 1
        searches, tool_input = _anthropic_server_tools(body.get("tools"))
    return WorstCase(
        choices=choices, output_per_choice=min(per_choice, MAX_COUNT), output_tokens=min(choices * per_choice, MAX_COUNT),
        web_searches=searches, tool_input_tokens=min(tool_input, MAX_COUNT),
    )


def _output_budget(body: Mapping[str, Any], provider: str) -> int | None:
    """The largest output bound the body sets (each checked), or None when it sets none."""
    bounds = [value for field in MAX_OUTPUT_FIELDS if (value := _count_field(body, field, MAX_COUNT)) is not None]
    thinking = body.get("thinking")
    if provider == "anthropic" and isinstance(thinking, dict) and thinking.get("budget_tokens") is not None:
        bounds.append(_count_value(thinking["budget_tokens"], ("thinking", "budget_tokens"), MAX_COUNT))
    return max(bounds) if bounds else None


def _prediction_tokens(body: Mapping[str, Any], resolved: ResolvedModel) -> int:
    """Tokens of an OpenAI ``prediction`` (rejected prediction tokens are billed as output)."""
    prediction = body.get("prediction")
    if prediction is None:
        return 0
    if not isinstance(prediction, dict):
        raise RequestError(("prediction",), "must be an object")
    content = prediction.get("content")
    count = text_counter(resolved.spec.encoding, None)
    if isinstance(content, str):
        return count(content)
    if not isinstance(content, list):
        raise RequestError(("prediction", "content"), "must be a string or a list of text parts")
    tokens = 0
    for index, part in enumerate(content):
        text = part.get("text") if isinstance(part, dict) else None
        if not isinstance(text, str):
            raise RequestError(("prediction", "content", index, "text"), "must be a string")
        tokens += count(text)
    return tokens


def _anthropic_server_tools(tools: Any) -> tuple[int, int]:
    """(web searches billed, tokens poured into the prompt) of an Anthropic request's server tools."""
    if not isinstance(tools, list):
        return 0, 0  # the prompt counter names a bad ``tools``
    searches = tool_input = 0
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            continue
        if kind.startswith("web_search_"):
            uses = _count_field(tool, "max_uses", MAX_SERVER_TOOL_USES, default=DEFAULT_SERVER_TOOL_USES,
                                path=("tools", index))
            searches += uses
            tool_input += uses * WEB_SEARCH_RESULT_TOKENS
        elif kind.startswith("web_fetch_"):
            uses = _count_field(tool, "max_uses", MAX_SERVER_TOOL_USES, default=DEFAULT_SERVER_TOOL_USES,
                                path=("tools", index))
            content = _count_field(tool, "max_content_tokens", MAX_COUNT, default=WEB_FETCH_CONTENT_TOKENS,
                                   path=("tools", index))
            tool_input += uses * content
    return searches, tool_input


def _count_field(
    obj: Mapping[str, Any], field: str, maximum: int, *, default: int | None = None, path: tuple[str | int, ...] = (),
) -> Any:
    """``obj[field]`` as a positive integer up to ``maximum`` (absent or null: ``default``)."""
    value = obj.get(field)
    if value is None:
        return default
    return _count_value(value, (*path, field), maximum)


def _count_value(value: Any, path: tuple[str | int, ...], maximum: int) -> int:
    # A string, a float, a bool, zero, a negative or an absurd number is the client's error (the provider
    # refuses it too), never a reason to reserve some other amount silently.
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(path, f"must be a positive integer, got {type(value).__name__}")
    if value < 1:
        raise RequestError(path, f"must be a positive integer, got {value}")
    if value > maximum:
        raise RequestError(path, f"must be at most {maximum:,}")
    return value


# ---------------------------------------------------------------------- the upstream's figures, checked

#: A reported input beyond the band is beyond any miscount: an exact count (OpenAI's text, tools by the
#: published rule, images of known size) is within a few tokens of the provider's, so its band is the count
#: plus a tenth plus ``INPUT_BAND_SLACK``; an estimate (Claude, unknown image sizes, schemas counted as an upper
#: bound) errs high but not always, so its band is ``INPUT_BAND_FACTOR`` x the count plus the slack. Server
#: tools' results are already in the hold's input.
INPUT_BAND_EXACT_SHARE = 10  # the band of an exact count: count + count // 10 + slack
INPUT_BAND_FACTOR = 2
INPUT_BAND_SLACK = 1_024
#: The input buckets, most expensive first: a capped input loses these first (cache writes cost 1.25-2x
#: input, cache reads a tenth of it), so what is charged never exceeds the worst case's input at the input rate.
INPUT_BUCKETS = ("cache_write_1h_tokens", "cache_write_5m_tokens", "input_tokens", "cached_input_tokens")


class HoldBounds(NamedTuple):
    """What a hold reserved, figure by figure: the reported usage is checked against it before it is charged."""

    input_tokens: int
    output_tokens: int
    web_searches: int
    exact: bool  # the hold's prompt count was exact (``local``), not an estimate

    @property
    def input_band(self) -> int:
        """The most input a report may give before it is capped."""
        if self.exact:
            return self.input_tokens + self.input_tokens // INPUT_BAND_EXACT_SHARE + INPUT_BAND_SLACK
        return self.input_tokens * INPUT_BAND_FACTOR + INPUT_BAND_SLACK

    def beyond(self, usage: UsageRecord) -> list[tuple[str, str]]:
        """The figures of ``usage`` beyond the worst case, as (field, what was reported against what); empty:
        it is charged as reported."""
        found = []
        if usage.output_tokens > self.output_tokens:
            found.append(("output_tokens", f"output {usage.output_tokens} tokens (the worst case {self.output_tokens}:"
                                           " all choices at their budget)"))
        if usage.total_input_tokens > self.input_band:
            found.append(("input_tokens", f"input {usage.total_input_tokens} tokens (the hold's {self.input_tokens}, "
                                          f"band {self.input_band})"))
        if usage.web_search_requests > self.web_searches:
            found.append(("web_search_requests", f"{usage.web_search_requests} web searches (the worst case "
                                                 f"{self.web_searches})"))
        return found

    def cap(self, usage: UsageRecord) -> UsageRecord:
        """``usage`` with every figure beyond the worst case brought back to it (the input to the hold's own)."""
        output = min(usage.output_tokens, self.output_tokens)
        changes: dict[str, Any] = {
            "output_tokens": output, "reasoning_tokens": min(usage.reasoning_tokens, output),
            "web_search_requests": min(usage.web_search_requests, self.web_searches),
        }
        if usage.total_input_tokens > self.input_band:
            excess = usage.total_input_tokens - self.input_tokens
            for bucket in INPUT_BUCKETS:
                taken = min(getattr(usage, bucket), excess)
                changes[bucket] = getattr(usage, bucket) - taken
                excess -= taken
        return replace(usage, **changes)


# ---------------------------------------------------------------------- the cheap walk, before counting


def scan_body(body: Any) -> BodySize:
    """Walk a request body once: JSON data a provider accepts, bounded; its characters in strings.

    Refused with a ``RequestError`` naming the path: a value JSON cannot carry to a provider (NaN,
    infinity, a lone surrogate, a set, bytes...), nesting deeper than ``MAX_BODY_DEPTH``. The walk keeps no
    paths (it runs on every request); the rare refusal walks again to name where.
    """
    chars = strings = 0
    stack: list[tuple[Any, int, bool]] = [(body, 0, False)]  # value, depth, whether its text is the prompt's
    while stack:
        value, depth, text = stack.pop()
        kind = type(value)
        if kind is str:
            if text:
                chars += len(value)
                strings += 1
            if not value.isascii() and not _utf8(value):
                raise _fault(body, "is not UTF-8 text (a lone surrogate)")
        elif kind is dict:
            if depth >= MAX_BODY_DEPTH:
                raise _fault(body, f"nests deeper than {MAX_BODY_DEPTH} levels")
            for key, item in value.items():
                if type(key) is not str:
                    raise _fault(body, "has an object key that is not text")
                if not key.isascii() and not _utf8(key):
                    raise _fault(body, "has an object key that is not UTF-8 text (a lone surrogate)")
                inside = key in PROMPT_FIELDS if depth == 0 else text and key not in NOT_TEXT_KEYS
                stack.append((item, depth + 1, inside))
        elif kind is list:
            if depth >= MAX_BODY_DEPTH:
                raise _fault(body, f"nests deeper than {MAX_BODY_DEPTH} levels")
            stack.extend((item, depth + 1, text) for item in value)
        elif kind is float:
            if not math.isfinite(value):
                raise _fault(body, "is not a finite number (NaN and Infinity are not JSON)")
        elif value is not None and kind is not int and kind is not bool:
            raise _fault(body, f"is a {kind.__name__}, not JSON data")
    return BodySize(chars, strings)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fault(body: Any, reason: str) -> RequestError:
    """The ``RequestError`` naming the first value of ``body`` that ``scan_body`` refuses (found again, with paths)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind is str and not _utf8(value):
            return RequestError(path, reason)
        if kind is float and not math.isfinite(value):
            return RequestError(path, reason)
        if kind is dict or kind is list:
            if len(path) >= MAX_BODY_DEPTH:
                return RequestError(path[:8], reason)  # the start of the path is enough to find it
            items = list(value.items() if kind is dict else enumerate(value))
            for key, item in reversed(items):
                if kind is dict and (type(key) is not str or not _utf8(key)):
                    return RequestError(path, reason)
                stack.append((item, (*path, key)))
        elif value is not None and kind not in (str, int, bool, float):
            return RequestError(path, reason)
    return RequestError((), reason)


def prompt_lower_bound(size: BodySize, messages: int, resolved: ResolvedModel) -> int:
    """A count the prompt cannot be below: the framing of its messages and its characters over 128."""
    framing = resolved.spec.framing
    per_message = framing.tokens_per_message + min(framing.tokens_per_name, 0)  # gpt-3.5-turbo-0301: -1 a name
    tokens = messages * per_message + framing.reply_priming + -(-size.chars // MAX_TOKEN_CHARS)
    factor = resolved.spec.claude_safety_factor
    return tokens if factor is None else math.ceil(tokens * factor)


def prompt_upper_bound(body_bytes: int, messages: int, images: int, max_image_tokens: int, resolved: ResolvedModel,
                       fixed_tokens: int = 0) -> int:
    """A count the prompt cannot exceed: its bytes (a token is at least one byte), the framing of its
    messages, the most each image can cost and ``fixed_tokens`` (documented overheads, such as tool prompts)."""
    framing = resolved.spec.framing
    text = body_bytes + messages * framing.tokens_per_message + framing.reply_priming
    factor = resolved.spec.claude_safety_factor
    scaled = text if factor is None else math.ceil(text * factor)
    return scaled + images * max_image_tokens + fixed_tokens


__all__ = [
    "BodySize", "DEFAULT_SERVER_TOOL_USES", "HoldBounds", "INPUT_BAND_EXACT_SHARE", "INPUT_BAND_FACTOR",
    "INPUT_BAND_SLACK", "MAX_BODY_DEPTH", "MAX_CHOICES", "MAX_OUTPUT_FIELDS", "MAX_SERVER_TOOL_USES",
    "MAX_TOKEN_CHARS", "WEB_FETCH_CONTENT_TOKENS", "WEB_SEARCH_RESULT_TOKENS", "WorstCase", "prompt_lower_bound",
    "prompt_upper_bound", "scan_body", "worst_case",
]
