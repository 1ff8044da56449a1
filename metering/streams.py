"""Usage of a streamed response, from the raw SSE bytes the gateway relays to its client.

``StreamAccumulator(model, prompt=...)`` is fed byte chunks as they pass through and, at the end,
``finish()`` says how the stream ended and what to bill:

* the upstream's own figures when it reported them (OpenAI's ``include_usage`` chunk; Anthropic's
  ``message_start`` + ``message_delta``), source UPSTREAM;
* otherwise a local count of what was *delivered* (text, refusals, tool-call names and arguments,
  thinking), with the prompt's count as input; a cut stream is billed for what got through, and the text
  of an error event is never billed as output;
* an Anthropic stream cut after ``message_start`` keeps that event's input figures and counts the output
  locally; the record's source is then that of its weakest figure;
* server tools at work when an Anthropic stream is cut: each web search call delivered is billed as a search,
  and the results delivered (``web_search_tool_result``, ``web_fetch_tool_result``) count as input, as the
  provider bills them (the results were poured into its prompt).

The stream dialect follows the model's provider. Bad upstream output (invalid JSON, unexpected shapes)
is counted in ``malformed_lines`` and skipped: metering must never break the stream it watches. A usage
chunk whose figures are invalid (negative, not integers, beyond ``pricing.usage.MAX_COUNT``, contradicting
each other) is such output too: it is never billed, the local count is, and the chunk is kept in
``StreamResult.rejected_usage`` for ``Meter.settle`` to quarantine (docs/ledger.md, "Rejected usage").
Bytes that are not UTF-8 are read as U+FFFD and counted in ``invalid_bytes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from metering.completion import ANTHROPIC_TOOL_BLOCKS, count_generated, require_figures
from metering.errors import RequestError
from metering.models import resolve_model
from metering.prompt_count import PromptCount, compact_json
from metering.sse import SSEDecoder, SSEEvent
from pricing.usage import InvalidUsage, UsageRecord, UsageSource

StreamStatus = Literal["completed", "aborted", "error"]
#: A rejected usage chunk keeps at most this much of its data; a stream keeps at most this many of them.
MAX_REJECTED_CHARS = 8_000
MAX_REJECTED_CHUNKS = 16


@dataclass(frozen=True, slots=True)
class RejectedUsage:
    """An upstream usage object refused (never billed): the field at fault, why, and the chunk's data."""

    field: str
    reason: str
    data: str  # the SSE event's data as received, cut to MAX_REJECTED_CHARS

    def error(self) -> InvalidUsage:
        """The typed error it was refused with."""
        return InvalidUsage(self.field, self.reason)


@dataclass(frozen=True, slots=True)
class StreamResult:
    """How a stream ended, its usage, and what it delivered."""

    status: StreamStatus
    usage: UsageRecord
    text: str  # the assistant text delivered (all choices / text blocks, in index order)
    tool_arguments: tuple[str, ...]  # each tool call's arguments as delivered (JSON text)
    finish_reason: str | None  # OpenAI finish_reason or Anthropic stop_reason
    error: dict[str, Any] | None  # the error event's ``error`` object
    malformed_lines: int
    events: int  # SSE events dispatched, malformed ones included
    rejected_usage: tuple[RejectedUsage, ...] = ()  # upstream usage chunks refused (the local count is billed)
    invalid_bytes: int = 0  # bytes that were not UTF-8 (read as U+FFFD)


class _Malformed(Exception):
    """An event that is not what the protocol documents; counted and skipped by the accumulator."""


def _rejected(exc: Exception, data: str) -> RejectedUsage:
    field = exc.field if isinstance(exc, InvalidUsage) else "usage"
    reason = exc.reason if isinstance(exc, InvalidUsage) else str(exc)
    return RejectedUsage(field, reason, data[:MAX_REJECTED_CHARS])


class _UsageChecked:
    """Keeps the usage objects a stream refused (bounded: a hostile stream cannot grow it without end)."""

    def __init__(self) -> None:
        self.rejected: list[RejectedUsage] = []

    def reject(self, exc: Exception, data: str) -> _Malformed:
        if len(self.rejected) < MAX_REJECTED_CHUNKS:
            self.rejected.append(_rejected(exc, data))
        return _Malformed(str(exc))


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``obj[key]`` if present and not null, checked against ``kind``; ``default`` when absent or null."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Malformed(f"{key} is {type(value).__name__}")
    return value


def _json_object(data: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad JSON, or nesting deep enough to exhaust the stack
        raise _Malformed("invalid JSON") from exc
    if not isinstance(obj, dict):
        raise _Malformed("not a JSON object")
    return obj


def _error_object(obj: dict[str, Any]) -> dict[str, Any]:
    error = obj.get("error")
    return error if isinstance(error, dict) else obj  # keep whatever the upstream said, as a dict


@dataclass
class _Call:
    """One tool call (or legacy function_call) being streamed; both fields may come in pieces."""

    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Choice:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    function_call: _Call | None = None


class _OpenAIStream(_UsageChecked):
    """State of an OpenAI chat-completion stream (``data: {chunk}`` ... ``data: [DONE]``)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.choices: dict[int, _Choice] = {}
        self.usage: UsageRecord | None = None
        self.finish_reason: str | None = None
        self.error: dict[str, Any] | None = None
        self.done = False

    def on_event(self, event: SSEEvent) -> None:
        if event.data.strip() == "[DONE]":
            self.done = True
            return
        obj = _json_object(event.data)
        if obj.get("error") is not None or event.event == "error":
            self.error = _error_object(obj)
            return
        if "choices" not in obj and "usage" not in obj:
            raise _Malformed("neither choices nor usage")
        refused: _Malformed | None = None
        if obj.get("usage") is not None:
            try:  # from_openai checks the shape too: a usage that is not an object is refused like bad figures
                usage = UsageRecord.from_openai(self.model, obj["usage"], source=UsageSource.UPSTREAM)
                require_figures(obj["usage"], "openai")  # a figure left out would be billed as 0
                self.usage = usage
            except InvalidUsage as exc:
                refused = self.reject(exc, event.data)
        for choice in _field(obj, "choices", list, []):  # the chunk's text was delivered whatever its usage
            self._on_choice(choice)
        if refused is not None:
            raise refused

    def _on_choice(self, choice: Any) -> None:
        if not isinstance(choice, dict):
            raise _Malformed("choice is not an object")
        state = self.choices.setdefault(_field(choice, "index", int, 0), _Choice())
        delta = _field(choice, "delta", dict, {})
        if (content := _field(delta, "content", str)) is not None:
            state.content.append(content)
        if (refusal := _field(delta, "refusal", str)) is not None:
            state.refusal.append(refusal)
        for call in _field(delta, "tool_calls", list, []):
            if not isinstance(call, dict):
                raise _Malformed("tool call is not an object")
            index = _field(call, "index", int)
            if index is None:  # some OpenAI-compatible servers omit it: a new id opens a new call
                index = len(state.calls) if call.get("id") or not state.calls else max(state.calls)
            _on_function(state.calls.setdefault(index, _Call()), _field(call, "function", dict, {}))
        if (function_call := _field(delta, "function_call", dict)) is not None:
            state.function_call = state.function_call or _Call()
            _on_function(state.function_call, function_call)
        if (reason := _field(choice, "finish_reason", str)) is not None:
            self.finish_reason = reason

    @property
    def completed(self) -> bool:
        return self.done or (self.finish_reason is not None and self.usage is not None)

    def _ordered(self) -> list[_Choice]:
        return [self.choices[index] for index in sorted(self.choices)]

    def _calls(self) -> list[_Call]:
        calls: list[_Call] = []
        for choice in self._ordered():
            calls.extend(choice.calls[index] for index in sorted(choice.calls))
            if choice.function_call is not None:
                calls.append(choice.function_call)
        return calls

    def text(self) -> str:
        return "".join("".join(c.content) + "".join(c.refusal) for c in self._ordered())

    def tool_arguments(self) -> tuple[str, ...]:
        return tuple("".join(call.arguments) for call in self._calls())

    def generated(self) -> list[str]:
        texts = ["".join(c.content) for c in self._ordered()] + ["".join(c.refusal) for c in self._ordered()]
        for call in self._calls():
            texts += ["".join(call.name), "".join(call.arguments)]
        return texts

    def searches(self) -> int:
        return 0  # chat completions' web search is billed through the final usage only

    def server_results(self) -> list[str]:
        return []

    def upstream_usage(self) -> UsageRecord | None:
        return self.usage

    def partial_usage(self) -> UsageRecord | None:
        return None  # OpenAI reports usage once, at the end: there is no partial figure


def _on_function(call: _Call, function: dict[str, Any]) -> None:
    if (name := _field(function, "name", str)) is not None:
        call.name.append(name)
    if (arguments := _field(function, "arguments", str)) is not None:
        call.arguments.append(arguments)


@dataclass
class _Block:
    """One Anthropic content block: its text, thinking or tool-input JSON pieces."""

    kind: str
    parts: list[str] = field(default_factory=list)
    name: str = ""
    input: Any = None  # a tool block's start ``input`` (normally {} with the JSON in deltas)
    result: str = ""  # a server tool's results block, as compact JSON (input the provider bills)


#: Server tool result blocks: what they carry was poured into the prompt (billed as input).
SERVER_RESULT_BLOCKS = frozenset({"web_search_tool_result", "web_fetch_tool_result"})


#: Anthropic delta type -> (block type it belongs to, field holding its text).
_DELTAS = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "input_json_delta": ("tool_use", "partial_json"),
}


class _AnthropicStream(_UsageChecked):
    """State of an Anthropic Messages stream (message_start ... message_stop)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.blocks: dict[int, _Block] = {}
        self.usage: dict[str, Any] = {}  # message_start's usage with message_delta's non-null fields over it
        self.started = False  # message_start carried usage
        self.final = False  # message_delta carried usage: the figures are final
        self.finish_reason: str | None = None
        self.error: dict[str, Any] | None = None
        self.done = False

    def on_event(self, event: SSEEvent) -> None:
        obj = _json_object(event.data)
        kind = _field(obj, "type", str)
        if kind == "error" or event.event == "error":
            self.error = _error_object(obj)
        elif kind == "message_start":
            usage = _field(obj, "message", dict, {}).get("usage")
            if usage is not None:
                self._merge_usage(usage, event.data, "input")
                self.started = True
        elif kind == "content_block_start":
            self._on_block_start(obj)
        elif kind == "content_block_delta":
            self._on_delta(obj)
        elif kind == "message_delta":
            self.finish_reason = _field(_field(obj, "delta", dict, {}), "stop_reason", str, self.finish_reason)
            usage = obj.get("usage")
            if usage is not None:
                self._merge_usage(usage, event.data, "output")
                self.final = True
        elif kind == "message_stop":
            self.done = True
        elif kind is None:
            raise _Malformed("event without a type")
        # ping, content_block_stop and event types added later carry nothing to meter (Anthropic's
        # versioning policy says new event types may appear and should be skipped).

    def _merge_usage(self, usage: Any, data: str, required: str) -> None:
        # message_delta's figures are cumulative: the latest non-null value of each field wins. message_start
        # must give the input count, message_delta the output count: left out, either would be billed as 0
        # (or as message_start's provisional output).
        try:
            if not isinstance(usage, dict):
                raise InvalidUsage("usage", f"must be an object, got {type(usage).__name__}")
            merged = {**self.usage, **{key: value for key, value in usage.items() if value is not None}}
            UsageRecord.from_anthropic(self.model, merged)
            require_figures(usage, "anthropic", (required,))
        except InvalidUsage as exc:
            raise self.reject(exc, data) from exc
        self.usage = merged

    def _on_block_start(self, obj: dict[str, Any]) -> None:
        index = _field(obj, "index", int)
        block = _field(obj, "content_block", dict)
        if index is None or block is None:
            raise _Malformed("content_block_start without index or content_block")
        state = self.blocks[index] = _Block(kind=_field(block, "type", str, ""))
        if state.kind in ("text", "thinking"):
            if start_text := _field(block, state.kind, str):  # normally "", the text follows in deltas
                state.parts.append(start_text)
        elif state.kind in ANTHROPIC_TOOL_BLOCKS:
            state.name = _field(block, "name", str, "")
            state.input = block.get("input")
        elif state.kind in SERVER_RESULT_BLOCKS:
            try:
                state.result = compact_json(block)
            except RequestError:  # nested too deeply to write back: what it held is not countable
                state.result = ""

    def _on_delta(self, obj: dict[str, Any]) -> None:
        index = _field(obj, "index", int)
        delta = _field(obj, "delta", dict)
        if index is None or delta is None:
            raise _Malformed("content_block_delta without index or delta")
        known = _DELTAS.get(_field(delta, "type", str, ""))
        if known is None:
            return  # signature_delta, citations_delta, later additions: no generated text to count
        block_kind, key = known
        piece = _field(delta, key, str, "")
        block = self.blocks.get(index)
        if block is None:
            # A delta for a block that never started: the text was still delivered, so keep it.
            self.blocks[index] = _Block(kind=block_kind, parts=[piece])
            raise _Malformed("content_block_delta before its content_block_start")
        block.parts.append(piece)

    @property
    def completed(self) -> bool:
        return self.done

    def _ordered(self) -> list[_Block]:
        return [self.blocks[index] for index in sorted(self.blocks)]

    @staticmethod
    def _arguments(block: _Block) -> str:
        if block.parts:
            return "".join(block.parts)
        try:
            return compact_json(block.input) if block.input is not None else ""
        except RequestError:  # an input nested too deeply to write back: nothing countable was delivered
            return ""

    def text(self) -> str:
        return "".join("".join(b.parts) for b in self._ordered() if b.kind == "text")

    def tool_arguments(self) -> tuple[str, ...]:
        return tuple(self._arguments(b) for b in self._ordered() if b.kind in ANTHROPIC_TOOL_BLOCKS)

    def generated(self) -> list[str]:
        texts: list[str] = []
        for block in self._ordered():
            if block.kind in ("text", "thinking"):
                texts.append("".join(block.parts))
            elif block.kind in ANTHROPIC_TOOL_BLOCKS:
                texts += [block.name, self._arguments(block)]
        return texts

    def searches(self) -> int:
        """Web searches delivered (each is billed per use): the server tool calls named ``web_search``."""
        return sum(1 for b in self.blocks.values() if b.kind == "server_tool_use" and b.name == "web_search")

    def server_results(self) -> list[str]:
        """The server tools' results delivered: input the provider bills."""
        return [b.result for b in self._ordered() if b.kind in SERVER_RESULT_BLOCKS and b.result]

    def upstream_usage(self) -> UsageRecord | None:
        # Final only with input figures too: a message_delta after a lost message_start would bill input 0.
        if not (self.final and (self.started or "input_tokens" in self.usage)):
            return None
        return UsageRecord.from_anthropic(self.model, self.usage, source=UsageSource.UPSTREAM)

    def partial_usage(self) -> UsageRecord | None:
        if not self.started:
            return None
        return UsageRecord.from_anthropic(self.model, self.usage, source=UsageSource.UPSTREAM)


class StreamAccumulator:
    """Watches one streamed response's raw bytes; ``finish()`` gives its status and usage."""

    def __init__(self, model: str, *, prompt: PromptCount | None = None) -> None:
        self._resolved = resolve_model(model)  # an unknown model fails here, before any byte is relayed
        self._model = model
        self._prompt = prompt
        self._decoder = SSEDecoder()
        self._stream: _OpenAIStream | _AnthropicStream = (
            _AnthropicStream(model) if self._resolved.provider == "anthropic" else _OpenAIStream(model)
        )
        self._malformed = 0
        self._events = 0
        self._result: StreamResult | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream, split anywhere."""
        if self._result is not None:
            raise RuntimeError("feed() after finish(): the stream's usage is already settled")
        for event in self._decoder.feed(chunk):
            self._on_event(event)

    def finish(self) -> StreamResult:
        """End of the bytes: settle the status and the usage (calling it again returns the same result)."""
        if self._result is None:
            for event in self._decoder.close():
                self._on_event(event)
            stream = self._stream
            if stream.error is not None:
                status: StreamStatus = "error"
            else:
                status = "completed" if stream.completed else "aborted"
            self._result = StreamResult(
                status=status,
                usage=self._usage(),
                text=stream.text(),
                tool_arguments=stream.tool_arguments(),
                finish_reason=stream.finish_reason,
                error=stream.error,
                malformed_lines=self._malformed + self._decoder.unknown_lines,
                events=self._events,
                rejected_usage=tuple(stream.rejected),
                invalid_bytes=self._decoder.invalid_bytes,
            )
        return self._result

    def _on_event(self, event: SSEEvent) -> None:
        self._events += 1
        if self._stream.error is not None:
            return  # nothing after an error is billed: usage is what was delivered before it
        try:
            self._stream.on_event(event)
        except _Malformed:
            self._malformed += 1

    def _usage(self) -> UsageRecord:
        stream = self._stream
        upstream = stream.upstream_usage()
        if upstream is not None:
            return upstream
        output, output_source = count_generated(stream.generated(), self._resolved)
        results, _ = count_generated(stream.server_results(), self._resolved)  # server tools' results: input
        searches = stream.searches()
        partial = stream.partial_usage()
        if partial is not None:
            # Upstream input figures, local output; message_start's output_tokens is a floor of the output.
            return replace(
                partial, input_tokens=partial.input_tokens + results, output_tokens=max(output, partial.output_tokens),
                reasoning_tokens=0, web_search_requests=max(searches, partial.web_search_requests), source=output_source,
            )
        if self._prompt is None:
            # Without a prompt count the input is unknown: 0, flagged as an estimate for reconciliation.
            return UsageRecord(
                provider=self._resolved.provider,
                model=self._model,
                output_tokens=output,
                source=UsageSource.ESTIMATED,
                extra={"note": "no upstream usage and no prompt count: input_tokens is 0"},
            )
        return UsageRecord(
            provider=self._resolved.provider,
            model=self._model,
            input_tokens=self._prompt.prompt_tokens + results,
            output_tokens=output,
            web_search_requests=searches,
            source=UsageSource.weakest(self._prompt.source, output_source),
        )
