"""Generated gateway traffic for the demo: chat bodies, response bodies and SSE streams, OpenAI and Claude.

Everything is drawn from one seeded ``random.Random``, so a demo run is reproducible. Bodies are real
chat requests (counted by the real counter), responses carry the upstream usage objects the providers
send, and streams are the providers' SSE framing (see metering/samples/streams for real captures).
"""

from __future__ import annotations

import json
import random
from typing import Any

QUESTIONS = (
    "帮我把这段代码改成异步的，并解释一下为什么更快。",
    "明天上海的天气怎么样？需要带伞吗？",
    "请用三句话总结这篇文章的要点。",
    "Write a SQL query that returns the top 10 customers by revenue this month.",
    "Translate this paragraph into English, keeping the technical terms.",
    "给我写一封请假邮件，语气正式一点。",
    "Why does my Python script raise 'RecursionError: maximum recursion depth exceeded'?",
    "Explain the difference between a mutex and a semaphore with an example.",
    "请帮我检查这份合同里有没有对乙方不利的条款。",
    "Draft a product description for a bamboo standing desk, under 80 words.",
    "用 Rust 写一个读取 CSV 并按列求和的小程序。",
    "What are the trade-offs of event sourcing for a billing system?",
)
ANSWER_SENTENCES = (
    "好的，我们一步一步来看。",
    "首先，需要确认输入数据的格式是否一致。",
    "Here is a version that uses asyncio.gather to run the requests concurrently.",
    "The main cost is the round trip to the database, not the computation itself.",
    "建议把重试逻辑放在调用方，而不是在每个函数里各写一遍。",
    "In short: use a semaphore when you need to limit concurrency, a mutex when you need exclusive access.",
    "```python\nasync def fetch_all(urls):\n    return await asyncio.gather(*(fetch(u) for u in urls))\n```",
    "另外，记得给每个请求加上超时时间。",
    "The query groups orders by customer, sums the totals and keeps the ten largest.",
    "明天上海多云转小雨，最高气温 18°C，建议带一把折叠伞。",
    "This keeps the ledger append-only, so every balance can be rebuilt from its entries.",
    "如果还有其他问题，随时告诉我。",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer concisely.",
    "你是一名资深的软件工程师，回答时请给出可以运行的代码。",
    "You are a customer-support agent for an online store. Be polite and precise.",
)
#: A long reference document some users attach to every request (a knowledge base): the prompt cache's case.
KNOWLEDGE_BASE = "\n\n".join(
    f"第 {n} 条：退货政策与保修说明。Section {n}: items may be returned within 30 days of delivery with the "
    f"original receipt; electronics carry a 12-month warranty covering manufacturing defects but not accidental "
    f"damage. 退款将在收到退货后 5 个工作日内原路退回。Shipping fees are refunded only when the item was faulty."
    for n in range(1, 31)
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]},
    },
}
MAX_TOKENS_CHOICES = (256, 512, 1024, 1024, 2048, 4096, None)


def answer_text(rng: random.Random) -> str:
    """An assistant reply of a few sentences, Chinese and English mixed."""
    return " ".join(rng.choice(ANSWER_SENTENCES) for _ in range(rng.randint(2, 36)))


def _history(rng: random.Random) -> list[tuple[str, str]]:
    turns = [("user", rng.choice(QUESTIONS))]
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 3))):
        turns += [("assistant", answer_text(rng)), ("user", rng.choice(QUESTIONS))]
    return turns


def openai_body(rng: random.Random, model: str, *, knowledge: bool, stream: bool) -> dict[str, Any]:
    """An OpenAI chat completion request."""
    messages: list[dict[str, Any]] = []
    if knowledge:
        messages.append({"role": "system", "content": f"{SYSTEM_PROMPTS[2]}\n\n{KNOWLEDGE_BASE}"})
    elif rng.random() < 0.6:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages += [{"role": role, "content": text} for role, text in _history(rng)]
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0.7}
    if (max_tokens := rng.choice(MAX_TOKENS_CHOICES)) is not None:
        body["max_tokens"] = max_tokens
    if rng.random() < 0.15:
        body["tools"] = [WEATHER_TOOL]
    if stream:
        body["stream"] = True
        if rng.random() < 0.8:
            body["stream_options"] = {"include_usage": True}
    return body


def anthropic_body(rng: random.Random, model: str, *, knowledge: bool, stream: bool) -> dict[str, Any]:
    """An Anthropic Messages request (the knowledge base as a cached system block)."""
    body: dict[str, Any] = {"model": model, "max_tokens": rng.choice((512, 1024, 2048, 4096)),
                            "messages": [{"role": role, "content": text} for role, text in _history(rng)]}
    if knowledge:
        body["system"] = [{"type": "text", "text": SYSTEM_PROMPTS[2]},
                          {"type": "text", "text": KNOWLEDGE_BASE, "cache_control": {"type": "ephemeral"}}]
    elif rng.random() < 0.6:
        body["system"] = rng.choice(SYSTEM_PROMPTS)
    if stream:
        body["stream"] = True
    return body


def openai_usage(prompt: int, cached: int, completion: int) -> dict[str, Any]:
    """OpenAI's usage object (``prompt_tokens`` includes the cached tokens)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}


def anthropic_usage(uncached: int, cache_read: int, cache_write: int, output: int) -> dict[str, Any]:
    """Anthropic's usage object (``input_tokens`` excludes cache reads and writes)."""
    return {"input_tokens": uncached, "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_write,
            "cache_creation": {"ephemeral_5m_input_tokens": cache_write, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output}


def openai_response(model: str, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    """A non-stream chat completion (``usage`` None: an OpenAI-compatible upstream that reports none)."""
    body: dict[str, Any] = {"id": "chatcmpl-demo", "object": "chat.completion", "model": model,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}]}
    if usage is not None:
        body["usage"] = usage
    return body


def anthropic_response(model: str, text: str, usage: dict[str, Any]) -> dict[str, Any]:
    """A non-stream Anthropic message."""
    return {"id": "msg_demo", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "usage": usage}


def _pieces(rng: random.Random, text: str) -> list[str]:
    """The text split into stream deltas of 2-12 characters (tokens arrive a few characters at a time)."""
    pieces, start = [], 0
    while start < len(text):
        size = rng.randint(2, 12)
        pieces.append(text[start:start + size])
        start += size
    return pieces


def _data(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def openai_sse(rng: random.Random, model: str, text: str, usage: dict[str, Any] | None) -> list[bytes]:
    """An OpenAI chat completion stream, one chunk per event; the usage chunk when ``usage`` is given."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _data({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in _pieces(rng, text)]
    events.append(chunk({}, "stop"))
    if usage is not None:
        events.append(_data({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                             "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_sse(rng: random.Random, model: str, text: str, usage: dict[str, Any], *, overloaded: bool = False) -> list[bytes]:
    """An Anthropic Messages stream; ``overloaded``: an error event after a few deltas (the upstream failed)."""
    start_usage = {**usage, "output_tokens": 1}
    events = [
        _event("message_start", {"type": "message_start", "message": {
            "id": "msg_demo", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
        _event("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        _event("ping", {"type": "ping"}),
    ]
    deltas = [_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": piece}})
              for piece in _pieces(rng, text)]
    if overloaded:
        return events + deltas[: max(1, len(deltas) // 4)] + [
            _event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]
    return events + deltas + [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": usage["output_tokens"]}}),
        _event("message_stop", {"type": "message_stop"}),
    ]


def cut(rng: random.Random, events: list[bytes]) -> bytes:
    """The stream as a client that hung up received it: cut mid-way, in the middle of an event."""
    data = b"".join(events)
    head = b"".join(events[: max(2, len(events) // 3 + rng.randint(0, len(events) // 3))])
    return data[: len(head) + rng.randint(0, 20)]
