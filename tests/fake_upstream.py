"""A local fake of the OpenAI and Anthropic APIs (paid APIs: the tests never call them for real).

``fake_upstream()`` serves one ``FakeUpstream`` on 127.0.0.1 (through ``tests.servers.serve``)::

    with fake_upstream() as up:
        client = openai.OpenAI(base_url=up.openai_base_url, api_key=up.api_key)
        ...
        up.requests[-1].headers["authorization"]   # what the relay sent upstream
        up.reported[-1]["prompt_tokens"]           # what the upstream reported: the relay must bill that

Endpoints: ``POST /v1/chat/completions`` (OpenAI Chat Completions) and ``POST /v1/messages`` (Anthropic
Messages), stream and non-stream, text and tool calls, in the providers' exact wire formats (ids, object
names, ``usage`` objects, SSE framing, error bodies, auth headers). Anything else is a provider-style 404.

Replies are deterministic functions of the request: a fixed sentence pool, entered at a point given by a
hash of the messages, ``reply_words`` words long (cut by words to fit ``max_tokens`` /
``max_completion_tokens``, then finish_reason ``length`` / stop_reason ``max_tokens``). Streams send the
reply in deltas of ``words_per_delta`` words. A request with tools gets a tool call when ``tool_choice``
forces one, or (``auto``) when its last message is a user's text mentioning "weather" or a tool's name.

Reported usage: input = ``metering.counting.count_request(body, model).prompt_tokens`` (+ ``prompt_offset``);
output = ``metering.completion.count_generated`` of what was generated (exact tiktoken count for OpenAI
models, the deterministic Claude estimate for Claude) (+ ``reasoning``, OpenAI only).

Behaviours, queued with ``behave(*modes)`` and consumed one per API request (FIFO; ``"ok"`` when the queue is
empty); several can be combined with ``+`` (``"prompt_offset:7+hang:0.2"``):

* ``ok``;
* ``status:NNN`` - answer HTTP NNN with the provider's error body (524: a Cloudflare HTML page);
* ``hang:S`` - wait S seconds before answering (a client that disconnects meanwhile gets nothing and
  nothing is reported);
* ``cut:N`` - stream: N content (or tool-argument) deltas, then the connection is dropped (no finish chunk,
  no usage, no ``[DONE]`` / ``message_stop``); non-stream: the headers and half the body, then dropped;
* ``error_event:N`` - stream: N deltas, then the provider's in-stream error event (OpenAI ``data: {"error":
  {...server_error}}``, Anthropic ``event: error`` overloaded_error), then the end of the body (no ``[DONE]`` /
  ``message_stop``); non-stream: HTTP 500 (OpenAI) / 529 overloaded_error (Anthropic);
* ``prompt_offset:K`` - report K more input tokens than our own count (an upstream that counts otherwise);
* ``reasoning:K`` - OpenAI: K reasoning tokens, reported in completion_tokens and its details;
* ``slow:S`` - stream: wait S seconds before each delta (time-to-first-token / pass-through tests).
* ``stall:S`` - non-stream: the headers and half the body, then S seconds before the rest (a client that
  disconnects meanwhile: the rest is not sent, and the entry's outcome is ``disconnected``).

``reported`` gets one entry per answered request (none for an error status or a hang the client gave up
on), appended before the last byte is sent: ``provider``, ``request_id`` (the body's id), ``model`` (as
answered), ``requested_model``, ``stream``, ``outcome`` (``ok`` | ``cut`` | ``error_event`` |
``disconnected``), ``finish_reason``, ``delivered_text``, ``tool_arguments``, ``usage`` (the usage object
exactly as the upstream reported it, or None when it reported none: an OpenAI stream without
``include_usage``, a cut OpenAI stream) and that object's fields flattened into the entry. For Anthropic,
``usage`` is message_start's usage with message_delta's over it (a cut stream: message_start's alone);
``cut`` is True for a cut response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from metering.completion import count_generated
from metering.count_cache import TokenCountCache
from metering.counting import count_request
from metering.errors import MeteringError
from metering.models import ResolvedModel, resolve_model
from metering.prompt_count import compact_json
from pricing.errors import BillingError, UnknownModel
from tests.servers import serve

__all__ = ["DEFAULT_KEY", "SENTENCES", "SNAPSHOTS", "FakeUpstream", "Recorded", "fake_upstream"]

DEFAULT_KEY = "sk-upstream-test"
THREAD_NAME = "fake-upstream"

#: The reply text is cut from this pool (plain English: a few dozen tokens for ~30 words).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Metering every token exactly is what keeps a reseller honest and solvent.",
    "Streaming responses arrive in small pieces, each one carrying a few words.",
    "A careful gateway bills what the upstream reported, never a guess of its own.",
    "Rain is expected in the afternoon, with clearer skies later in the evening.",
    "Numbers like 42, 3.14 and 2048 tokenize differently from ordinary words.",
    "Good tests describe behaviour, not implementation, and they run quickly.",
    "Every request has a prompt, a completion, and a bill that must add up.",
)

#: What the real APIs answer in ``model`` for an alias (``snapshot=True``).
SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-4-turbo": "gpt-4-turbo-2024-04-09",
    "gpt-4": "gpt-4-0613",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "o1": "o1-2024-12-17",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-sonnet-latest": "claude-3-5-sonnet-20241022",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}

CLOUDFLARE_524 = """<!DOCTYPE html>
<html lang="en-US">
<head><title>{host} | 524: A timeout occurred</title></head>
<body>
<div id="cf-error-details"><h1>A timeout occurred</h1><span>Error code 524</span>
<p>The origin web server timed out responding to this request.</p>
<p>Cloudflare Ray ID: <strong>8f1c2a3b4d5e6f70</strong></p></div>
</body>
</html>
"""

# status -> (type, code, message): OpenAI's error bodies.
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("request_forbidden", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    409: ("invalid_request_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 500, Used 500, Requested 1. "
        "Please try again in 120ms. Visit https://platform.openai.com/account/rate-limits to learn more.",
    ),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
# status -> (type, message): Anthropic's error bodies.
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    529: ("overloaded_error", "Overloaded"),
}


class _Quiet(logging.Filter):
    """Drops uvicorn's complaint about the connections the fake cuts on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.threadName.startswith(THREAD_NAME)
            and record.msg == "ASGI callable returned without completing response."
        )


_QUIET = _Quiet()
logging.getLogger("uvicorn.error").addFilter(_QUIET)


@dataclass(frozen=True, slots=True)
class Mode:
    """One request's behaviour, parsed from ``behave()``'s strings."""

    text: str = "ok"
    status: int | None = None
    hang: float = 0.0
    cut: int | None = None
    error_event: int | None = None
    prompt_offset: int = 0
    reasoning: int = 0
    slow: float = 0.0
    stall: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Mode:
        fields: dict[str, Any] = {}
        for part in text.split("+"):
            name, _, arg = part.strip().partition(":")
            try:
                if name == "ok" and not arg:
                    continue
                if name == "status":
                    fields["status"] = int(arg)
                    if not 400 <= fields["status"] <= 599:
                        raise ValueError("an error status is 400 to 599")
                elif name in ("hang", "slow", "stall"):
                    fields[name] = float(arg)
                elif name in ("cut", "error_event", "prompt_offset", "reasoning"):
                    fields[name] = int(arg)
                    if name != "prompt_offset" and fields[name] < 0:
                        raise ValueError("must not be negative")
                else:
                    raise ValueError("unknown behaviour")
            except ValueError as exc:
                raise ValueError(f"bad behaviour {part!r} in {text!r}: {exc}") from None
        return cls(text=text, **fields)


OK = Mode()


@dataclass
class Recorded:
    """One request as the upstream received it."""

    path: str
    headers: dict[str, str]  # names lower-cased
    json: Any  # the parsed body (None if it was not JSON)
    body: bytes
    mode: str  # the behaviour it was answered with
    method: str = "POST"
    client: tuple[str, int] | None = None  # the peer address (one per connection: shows keep-alive)


@dataclass
class _Reply:
    """What the model "generates" for one request."""

    text: str  # assistant text (for Claude, the preface of a tool call too)
    finish: str  # OpenAI finish_reason
    tool: dict[str, Any] | None = None  # {"id", "name", "arguments" (JSON text), "input"}
    pieces: list[tuple[str, str]] = field(default_factory=list)  # ("text" | "args", piece), in stream order


class _Disconnected(Exception):
    pass


def _openai_error(status: int, message: str | None = None, code: str | None = None, param: str | None = None) -> dict:
    kind, default_code, default_message = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, f"HTTP {status}")
    )
    return {"error": {"message": message or default_message, "type": kind, "param": param, "code": code or default_code}}


def _anthropic_error(status: int, message: str | None = None, kind: str | None = None) -> dict:
    default_kind, default_message = _ANTHROPIC_ERRORS.get(
        status, ("api_error" if status >= 500 else "invalid_request_error", f"HTTP {status}")
    )
    return {
        "type": "error",
        "error": {"type": kind or default_kind, "message": message or default_message},
        "request_id": "req_" + uuid.uuid4().hex[:24],
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _text_of(content: Any) -> str:
    """The plain text of a message's content (a string, or text parts / blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _sample(name: str, schema: Any) -> Any:
    """A plausible value for a JSON-schema property (tool-call arguments)."""
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    lowered = name.lower()
    if lowered in ("location", "city", "place"):
        return "Paris, France"
    if lowered == "unit":
        return "celsius"
    return "example"


def _arguments(parameters: Any) -> dict[str, Any]:
    parameters = parameters if isinstance(parameters, dict) else {}
    props = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
    required = parameters.get("required")
    names = [n for n in props if n in required] if isinstance(required, list) and required else list(props)
    return {name: _sample(name, props[name]) for name in names}


def _split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class FakeUpstream:
    """The fake's state and its ASGI app (``app``); serve it with ``fake_upstream()``."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_KEY,
        snapshot: bool = False,
        reply_words: int = 30,
        words_per_delta: int = 3,
        retry_after: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.snapshot = snapshot
        self.reply_words = reply_words
        self.words_per_delta = max(1, words_per_delta)
        self.retry_after = retry_after  # sent as retry-after on 429 / 503 / 529 when set
        self.base_url = ""
        self.requests: list[Recorded] = []
        self.reported: list[dict[str, Any]] = []
        self._queue: deque[Mode] = deque()
        self._lock = threading.Lock()
        self._cache = TokenCountCache()  # our own: sharing the relay's cache would skew its benchmarks
        self._fingerprint = "fp_" + uuid.uuid4().hex[:10]
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", _Endpoint(self, "openai"), methods=["POST"]),
                Route("/v1/messages", _Endpoint(self, "anthropic"), methods=["POST"]),
                Route("/{path:path}", _Endpoint(self, "unknown"), methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
            ]
        )

    # -- test-facing API --------------------------------------------------------------------------

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for ``openai.OpenAI`` (``{base_url}/v1``)."""
        return f"{self.base_url}/v1"

    def behave(self, *modes: str) -> None:
        """Queue behaviours for the next requests, one each, in order (see the module docstring)."""
        parsed = [Mode.parse(mode) for mode in modes]  # all checked before any is queued
        with self._lock:
            self._queue.extend(parsed)

    def pending(self) -> list[str]:
        """The behaviours queued and not yet consumed."""
        with self._lock:
            return [mode.text for mode in self._queue]

    def reset(self) -> None:
        """Forget the requests, the reports and the queued behaviours."""
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.reported.clear()

    def wait_reported(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``reported`` holds ``count`` entries (the fake records from its own thread)."""
        deadline = time.monotonic() + timeout
        while len(self.reported) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.reported)} reported, {count} expected")
            time.sleep(0.005)
        return self.reported

    # -- internals --------------------------------------------------------------------------------

    def _next_mode(self) -> Mode:
        with self._lock:
            return self._queue.popleft() if self._queue else OK

    def _report(self, entry: dict[str, Any]) -> None:
        usage = entry.get("usage")
        if isinstance(usage, dict):
            entry = {**usage, **entry}
        with self._lock:
            self.reported.append(entry)

    def _answered_model(self, requested: str) -> str:
        return SNAPSHOTS.get(requested, requested) if self.snapshot else requested

    def _reply(self, body: dict[str, Any], resolved: ResolvedModel, provider: str) -> _Reply:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        asked = _text_of(last.get("content")) if last.get("role") == "user" else ""
        tool = self._tool_to_call(body, asked, provider)
        seed = zlib.crc32(_dumps(messages))
        words: list[str] = []
        index = seed % len(SENTENCES)
        while len(words) < self.reply_words:
            words.extend(SENTENCES[index % len(SENTENCES)].split())
            index += 1
        if tool is not None:
            words = ["I'll", "call", tool["name"], "for", "that."] if provider == "anthropic" else []
        else:
            words = words[: self.reply_words]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        finish = "tool_calls" if tool is not None else "stop"
        arguments = tool["arguments"] if tool is not None else ""
        if isinstance(limit, int) and not isinstance(limit, bool):
            extra = [tool["name"], arguments] if tool is not None else []
            if tool is not None and count_generated(extra, resolved)[0] > limit:
                tool, extra, words, finish = None, [], [], "length"  # not even the call fits: an empty reply
            while words and count_generated([" ".join(words), *extra], resolved)[0] > limit:
                words.pop()  # a tool call's preface shrinks; a plain reply is cut short
                finish = finish if tool is not None else "length"
        text = " ".join(words)
        reply = _Reply(text=text, finish=finish, tool=tool)
        for start in range(0, len(words), self.words_per_delta):
            piece = " ".join(words[start : start + self.words_per_delta])
            reply.pieces.append(("text", piece if start == 0 else " " + piece))
        if tool is not None:
            reply.pieces += [("args", piece) for piece in _split(tool["arguments"], 8)]
        return reply

    @staticmethod
    def _tool_to_call(body: dict[str, Any], asked: str, provider: str) -> dict[str, Any] | None:
        tools = body.get("tools")
        if not isinstance(tools, list) or not tools:
            return None
        defs: list[tuple[str, Any]] = []
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            if provider == "openai":
                function = tool.get("function") if isinstance(tool.get("function"), dict) else {}
                defs.append((str(function.get("name", "")), function.get("parameters")))
            elif tool.get("type") in (None, "custom") and isinstance(tool.get("name"), str):
                defs.append((tool["name"], tool.get("input_schema")))
        if not defs:
            return None
        choice = body.get("tool_choice")
        forced: str | None = None
        if provider == "openai":
            if choice == "none":
                return None
            if isinstance(choice, dict):
                forced = (choice.get("function") or {}).get("name")
            elif choice == "required":
                forced = defs[0][0]
        elif isinstance(choice, dict):
            kind = choice.get("type")
            if kind == "none":
                return None
            if kind == "tool":
                forced = choice.get("name")
            elif kind == "any":
                forced = defs[0][0]
        if forced is None:
            lowered = asked.lower()
            named = [name for name, _ in defs if name and name.lower() in lowered]
            if named:
                forced = named[0]
            elif "weather" in lowered:
                forced = next((name for name, _ in defs if "weather" in name.lower()), defs[0][0])
            else:
                return None
        parameters = next((params for name, params in defs if name == forced), None)
        arguments = _arguments(parameters)
        prefix = "call_" if provider == "openai" else "toolu_01"
        return {
            "id": prefix + uuid.uuid4().hex[:24],
            "name": forced,
            "input": arguments,
            "arguments": compact_json(arguments),
        }

    def _prompt_tokens(self, body: dict[str, Any], model: str) -> int:
        return count_request(body, model, cache=self._cache).prompt_tokens


class _Endpoint:
    """The raw ASGI handler of one API (full control over framing: needed to cut connections)."""

    def __init__(self, upstream: FakeUpstream, provider: str) -> None:
        self.up = upstream
        self.provider = provider

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        provider = self.provider
        if provider == "unknown":
            provider = "anthropic" if "x-api-key" in headers or "anthropic-version" in headers else "openai"
        mode = self.up._next_mode() if self.provider != "unknown" else OK
        with self.up._lock:
            self.up.requests.append(
                Recorded(path=scope["path"], headers=headers, json=body, body=raw, mode=mode.text, method=scope["method"],
                         client=tuple(scope["client"]) if scope.get("client") else None)
            )
        call = _Call(self.up, provider, scope, receive, send, headers, mode)
        if self.provider == "unknown":
            message = f"Invalid URL ({scope['method']} {scope['path']})"
            if provider == "openai":
                await call.json(404, _openai_error(404, message, code=None))
            else:
                await call.json(404, _anthropic_error(404, f"Not Found: {scope['path']}"))
            return
        if mode.hang:
            try:
                await asyncio.wait_for(call.disconnected(), mode.hang)
                return  # the client gave up: nothing is answered, nothing reported
            except TimeoutError:
                pass
        if mode.status is not None:
            await call.error(mode.status)
            return
        if not call.authorized():
            return await call.refuse()
        await call.answer(body)


class _Call:
    """One request being answered."""

    def __init__(
        self, up: FakeUpstream, provider: str, scope: dict, receive: Any, send: Any, headers: dict[str, str], mode: Mode
    ) -> None:
        self.up = up
        self.provider = provider
        self.scope = scope
        self.receive = receive
        self.send = send
        self.headers = headers
        self.mode = mode
        self.request_id = "req_" + uuid.uuid4().hex[:24]
        self.gone = False
        self._anthropic_start_usage: dict | None = None  # message_start's usage, once sent

    # -- plumbing ---------------------------------------------------------------------------------

    def _headers(self, content_type: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
        id_header = b"x-request-id" if self.provider == "openai" else b"request-id"
        headers = [(b"content-type", content_type), (id_header, self.request_id.encode()), *extra]
        if self.provider == "openai":
            headers.append((b"openai-processing-ms", b"1"))
        return headers

    async def json(self, status: int, payload: Any, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        data = _dumps(payload)
        headers = self._headers(b"application/json", [(b"content-length", str(len(data)).encode()), *extra])
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": data})

    async def disconnected(self) -> None:
        """Returns when the client disconnects."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True

    async def error(self, status: int, message: str | None = None, **kw: Any) -> None:
        if status == 524:
            page = CLOUDFLARE_524.format(host="api.openai.com" if self.provider == "openai" else "api.anthropic.com")
            data = page.encode()
            await self.send({"type": "http.response.start", "status": 524, "headers": [
                (b"content-type", b"text/html; charset=UTF-8"), (b"content-length", str(len(data)).encode()),
                (b"server", b"cloudflare"), (b"cf-ray", b"8f1c2a3b4d5e6f70-AMS")]})
            await self.send({"type": "http.response.body", "body": data})
            return
        extra: list[tuple[bytes, bytes]] = []
        if self.up.retry_after is not None and status in (429, 503, 529):
            extra.append((b"retry-after", self.up.retry_after.encode()))
        if self.provider == "openai":
            await self.json(status, _openai_error(status, message, **kw), extra)
        else:
            await self.json(status, _anthropic_error(status, message, **kw), extra)

    def authorized(self) -> bool:
        bearer = self.headers.get("authorization") == f"Bearer {self.up.api_key}"
        if self.provider == "openai":
            return bearer
        # x-api-key, or (what the anthropic SDK 2.x sends) the API key as a Bearer token; a wrong one
        # in either header is refused even if the other is right.
        given = [self.headers[name] for name in ("x-api-key", "authorization") if name in self.headers]
        return bool(given) and all(v in (self.up.api_key, f"Bearer {self.up.api_key}") for v in given)

    async def refuse(self) -> None:
        if self.provider == "anthropic":
            return await self.error(401, "invalid x-api-key")
        given = self.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not given[7:].strip():
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header using "
                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
                "if you're accessing the API from your browser and are prompted for a username and password. You "
                "can obtain an API key from https://platform.openai.com/account/api-keys."
            )
            return await self.error(401, message, code=None)
        key = given[7:].strip()
        shown = f"{key[:3]}*{key[-4:]}" if len(key) > 8 else "*" * len(key)
        await self.error(
            401,
            f"Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys.",
        )

    # -- answering --------------------------------------------------------------------------------

    async def answer(self, body: Any) -> None:
        bad = self._validate(body)
        if bad is not None:
            status, message, param = bad
            if self.provider == "openai":
                code = "model_not_found" if status == 404 else ("missing_required_parameter" if param else None)
                return await self.error(status, message, code=code, param=param)
            return await self.error(status, message)
        model = body["model"]
        resolved = resolve_model(model)
        try:
            prompt = self.up._prompt_tokens(body, model)
        except (MeteringError, BillingError, ValueError) as exc:
            return await self.error(400, str(exc))
        reply = self.up._reply(body, resolved, self.provider)
        prompt += self.mode.prompt_offset
        if prompt < 0:
            prompt = 0
        texts = [reply.text] + ([reply.tool["name"], reply.tool["arguments"]] if reply.tool else [])
        completion = count_generated(texts, resolved)[0]
        stream = body.get("stream") is True
        if self.mode.error_event is not None and not stream:
            return await self.error(500 if self.provider == "openai" else 529)
        answered = self.up._answered_model(model)
        if self.provider == "openai":
            reasoning = self.mode.reasoning
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion + reasoning,
                "total_tokens": prompt + completion + reasoning,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": reasoning,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            }
            if stream:
                return await self._openai_stream(body, answered, reply, usage)
            return await self._openai_message(body, answered, reply, usage)
        usage = {
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": completion,
            "service_tier": "standard",
        }
        if stream:
            return await self._anthropic_stream(body, answered, reply, usage)
        return await self._anthropic_message(body, answered, reply, usage)

    def _validate(self, body: Any) -> tuple[int, str, str | None] | None:
        """(status, message, param) of a request the real API would refuse, or None."""
        openai = self.provider == "openai"
        if not isinstance(body, dict):
            if openai:
                return 400, "We could not parse the JSON body of your request.", None
            return 400, "There was an error parsing the body of your request.", None
        if not openai and not self.headers.get("anthropic-version"):
            return 400, "anthropic-version: header is required", None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return (400, "you must provide a model parameter", None) if openai else (400, "model: Field required", None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            if openai:
                return 400, "Missing required parameter: 'messages'.", "messages"
            return 400, "messages: Field required" if messages is None else "messages: at least one message is required", None
        if not openai and not isinstance(body.get("max_tokens"), int):
            return 400, "max_tokens: Field required", None
        try:
            resolved = resolve_model(model)
        except UnknownModel:
            resolved = None
        if resolved is None or resolved.provider != self.provider:
            if openai:
                return 404, f"The model `{model}` does not exist or you do not have access to it.", None
            return 404, f"model: {model}", None
        return None

    def _entry(self, request_id: str, model: str, body: dict, stream: bool, outcome: str, reply: _Reply,
               usage: dict | None, text: str, arguments: list[str], finish: str | None) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "request_id": request_id,
            "model": model,
            "requested_model": body["model"],
            "stream": stream,
            "outcome": outcome,
            "cut": outcome == "cut",
            "finish_reason": finish,
            "delivered_text": text,
            "tool_arguments": arguments,
            "usage": usage,
        }

    async def _openai_message(self, body: dict, model: str, reply: _Reply, usage: dict) -> None:
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:29]
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None, "annotations": []}
        if reply.tool is not None:
            message["content"] = None
            message["tool_calls"] = [{
                "id": reply.tool["id"],
                "type": "function",
                "function": {"name": reply.tool["name"], "arguments": reply.tool["arguments"]},
            }]
        elif message["content"] is None:
            message["content"] = ""
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": self.up._fingerprint,
        }
        arguments = [reply.tool["arguments"]] if reply.tool else []
        await self._send_body(payload, self._entry(completion_id, model, body, False, "ok", reply, usage,
                                                   reply.text, arguments, reply.finish))

    async def _anthropic_message(self, body: dict, model: str, reply: _Reply, usage: dict) -> None:
        message_id = "msg_01" + uuid.uuid4().hex[:22]
        content: list[dict[str, Any]] = []
        if reply.text or reply.tool is None:
            content.append({"type": "text", "text": reply.text})
        if reply.tool is not None:
            content.append({"type": "tool_use", "id": reply.tool["id"], "name": reply.tool["name"], "input": reply.tool["input"]})
        stop = _stop_reason(reply)
        payload = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        arguments = [reply.tool["arguments"]] if reply.tool else []
        await self._send_body(payload, self._entry(message_id, model, body, False, "ok", reply, usage,
                                                   reply.text, arguments, stop))

    async def _send_body(self, payload: dict, entry: dict) -> None:
        data = _dumps(payload)
        headers = self._headers(b"application/json", [(b"content-length", str(len(data)).encode())])
        if self.mode.cut is not None:  # the headers and half the body, then the connection drops
            self.up._report({**entry, "outcome": "cut", "cut": True, "delivered_text": "", "tool_arguments": [],
                             "usage": None, "finish_reason": None})
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            await self.send({"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True})
            return
        if self.mode.stall:  # half the body, a pause (the client may leave), then the rest
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            await self.send({"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True})
            try:
                await asyncio.wait_for(self.disconnected(), self.mode.stall)
                self.up._report({**entry, "outcome": "disconnected"})
                return
            except TimeoutError:
                pass
            self.up._report(entry)
            await self.send({"type": "http.response.body", "body": data[len(data) // 2 :]})
            return
        self.up._report(entry)
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.send({"type": "http.response.body", "body": data})

    # -- streams ----------------------------------------------------------------------------------

    async def _start_stream(self) -> asyncio.Task:
        headers = self._headers(b"text/event-stream; charset=utf-8", [(b"cache-control", b"no-cache")])
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        return asyncio.get_running_loop().create_task(self.disconnected())

    async def _emit(self, data: bytes) -> None:
        if self.gone:
            raise _Disconnected
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def _end(self, watcher: asyncio.Task, data: bytes = b"") -> None:
        watcher.cancel()
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    async def _openai_stream(self, body: dict, model: str, reply: _Reply, usage: dict) -> None:
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:29]
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        include_usage = options.get("include_usage") is True
        obfuscate = options.get("include_obfuscation", True) is not False
        created = int(time.time())
        fingerprint = self.up._fingerprint

        def chunk(choices: list[dict], **extra: Any) -> bytes:
            obj: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": fingerprint,
                "choices": choices,
            }
            if include_usage:
                obj["usage"] = None
            obj.update(extra)
            if obfuscate and choices:
                obj["obfuscation"] = "x" * (len(completion_id) % 7 + 1)
            return b"data: " + _dumps(obj) + b"\n\n"

        def delta(d: dict, finish: str | None = None) -> list[dict]:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

        text: list[str] = []
        args: list[str] = []
        entry = lambda outcome, used, finish: self._entry(  # noqa: E731
            completion_id, model, body, True, outcome, reply, used, "".join(text), ["".join(args)] if reply.tool else [], finish
        )
        watcher = await self._start_stream()
        try:
            first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
            if reply.tool is not None:
                first = {"role": "assistant", "content": None, "tool_calls": [{
                    "index": 0, "id": reply.tool["id"], "type": "function",
                    "function": {"name": reply.tool["name"], "arguments": ""}}], "refusal": None}
            await self._emit(chunk(delta(first)))
            for sent, (kind, piece) in enumerate(reply.pieces):
                if await self._interrupt(sent, watcher, entry, "openai"):
                    return
                if self.mode.slow:
                    await asyncio.sleep(self.mode.slow)
                if kind == "text":
                    text.append(piece)
                    await self._emit(chunk(delta({"content": piece})))
                else:
                    args.append(piece)
                    await self._emit(chunk(delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})))
            if await self._interrupt(len(reply.pieces), watcher, entry, "openai"):
                return
            await self._emit(chunk(delta({}, reply.finish)))
            if include_usage:
                self.up._report(entry("ok", usage, reply.finish))
                await self._emit(chunk([], usage=usage))
            else:
                self.up._report(entry("ok", None, reply.finish))
            await self._end(watcher, b"data: [DONE]\n\n")
        except _Disconnected:
            self.up._report(entry("disconnected", None, None))

    async def _interrupt(self, sent: int, watcher: asyncio.Task, entry: Any, dialect: str) -> bool:
        """Cut the stream or send the error event once ``sent`` deltas went out, if the mode says so."""
        mode = self.mode
        if mode.cut is not None and sent >= mode.cut:
            used = None
            if dialect == "anthropic":
                used = self._anthropic_start_usage
            self.up._report(entry("cut", used, None))
            watcher.cancel()
            return True  # return without ending the body: uvicorn drops the connection
        if mode.error_event is not None and sent >= mode.error_event:
            self.up._report(entry("error_event", self._anthropic_start_usage if dialect == "anthropic" else None, None))
            if dialect == "openai":
                error = _openai_error(500)
                await self._end(watcher, b"data: " + _dumps(error) + b"\n\n")
            else:
                error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                await self._end(watcher, b"event: error\ndata: " + _dumps(error) + b"\n\n")
            return True
        return False

    async def _anthropic_stream(self, body: dict, model: str, reply: _Reply, usage: dict) -> None:
        message_id = "msg_01" + uuid.uuid4().hex[:22]
        start_usage = {**usage, "output_tokens": 1}
        self._anthropic_start_usage = start_usage

        def event(kind: str, obj: dict) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + _dumps({"type": kind, **obj}) + b"\n\n"

        text: list[str] = []
        args: list[str] = []
        stop = _stop_reason(reply)
        entry = lambda outcome, used, finish: self._entry(  # noqa: E731
            message_id, model, body, True, outcome, reply, used, "".join(text), ["".join(args)] if reply.tool else [], finish
        )
        watcher = await self._start_stream()
        try:
            await self._emit(event("message_start", {"message": {
                "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}}))
            index = 0
            open_block: str | None = None
            if reply.text or reply.tool is None:
                await self._emit(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
                open_block = "text"
            await self._emit(event("ping", {}))
            for sent, (kind, piece) in enumerate(reply.pieces):
                if await self._interrupt(sent, watcher, entry, "anthropic"):
                    return
                if self.mode.slow:
                    await asyncio.sleep(self.mode.slow)
                if kind == "args" and open_block != "tool_use":
                    if open_block is not None:
                        await self._emit(event("content_block_stop", {"index": index}))
                        index += 1
                    tool = reply.tool or {}
                    await self._emit(event("content_block_start", {"index": index, "content_block": {
                        "type": "tool_use", "id": tool["id"], "name": tool["name"], "input": {}}}))
                    open_block = "tool_use"
                if kind == "text":
                    text.append(piece)
                    await self._emit(event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}}))
                else:
                    args.append(piece)
                    await self._emit(event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": piece}}))
            if await self._interrupt(len(reply.pieces), watcher, entry, "anthropic"):
                return
            if open_block is not None:
                await self._emit(event("content_block_stop", {"index": index}))
            final = {"output_tokens": usage["output_tokens"]}
            self.up._report(entry("ok", {**start_usage, **final}, stop))
            await self._emit(event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": final}))
            await self._end(watcher, event("message_stop", {}))
        except _Disconnected:
            self.up._report(entry("disconnected", start_usage, None))


def _stop_reason(reply: _Reply) -> str:
    return {"tool_calls": "tool_use", "length": "max_tokens"}.get(reply.finish, "end_turn")


@contextmanager
def fake_upstream(**options: Any) -> Iterator[FakeUpstream]:
    """Serve a ``FakeUpstream(**options)`` on 127.0.0.1; yields it with ``base_url`` set."""
    upstream = FakeUpstream(**options)
    with serve(upstream.app, name=THREAD_NAME) as base_url:
        upstream.base_url = base_url
        yield upstream
