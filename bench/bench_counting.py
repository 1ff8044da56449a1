"""Counting bench: what our OpenAI chat counter costs next to raw tiktoken, and what the cache buys.

Figures (see BENCHMARKS.md for the targets and the last figures seen):

1. ``count_openai_chat(body, resolve_model(M), cache=None)`` on a 10-message mixed English/Chinese chat
   request, against raw tiktoken with the cookbook framing on the very same ``Encoding`` object
   (``metering.encodings.get_encoding``), for gpt-4 (cl100k_base) and gpt-4o (o200k_base). Target: <= 1.05x.
   Second figure: the same call with a cold ``TokenCountCache()`` made per call (no target).
2. Optional peer: ``litellm.token_counter`` when ``import litellm`` works (the ``bench`` extra).
3. A growing conversation (one user + assistant turn at a time, the whole history resent every turn):
   a shared ``TokenCountCache`` against re-encoding everything with ``cache=None``. Target: <= 0.25x.
4. The cache's memory, measured with tracemalloc after filling a small cache far past its bounds with
   mixed English/Chinese texts, against ``TokenCountCache.memory_bound_bytes()``; then the bound's own
   worst case (both bounds full, every char astral: 4 bytes plus its cached UTF-8 copy), informational.

Candidates are timed side by side in one process: warm-up, then rounds; every round times every
candidate over the same number of iterations (shuffled order, one untimed call first), gc disabled.
Each iteration gets its own freshly JSON-parsed request (as a gateway would: new str objects, hashes not
yet cached), parsed outside the timed region. A figure is the median over rounds of the per-iteration time; the
median and IQR of the round-by-round ratios, and an A/A control (the baseline timed twice), show the noise.

Human-readable lines first; the LAST line of stdout is one JSON object with every figure. Exits 1 if a
count ever differs from the raw tiktoken baseline (a missed speed target is reported, not an error).

    .venv/bin/python bench/bench_counting.py [--quick] [--json-only]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

import tiktoken

from metering.count_cache import DEFAULT_CACHE, TokenCountCache
from metering.encodings import get_encoding
from metering.models import resolve_model
from metering.openai_prompt import count_openai_chat

OVERHEAD_TARGET = 1.05  # count_openai_chat(cache=None) / raw tiktoken, same framing
GROWING_TARGET = 0.25  # shared cache / no cache, over a whole growing conversation
MODELS = (("gpt4", "gpt-4"), ("gpt4o", "gpt-4o"))
GROWING_MODEL = "gpt-4o"

# --------------------------------------------------------------------------------------------------
# Deterministic mixed English/Chinese chat text (no downloads).

_EN_TEXT = (
    "the a an of to in for on with by from about into over after before between through during "
    "request response model token tokens count counting billing invoice quota usage price pricing "
    "gateway proxy upstream provider customer account balance ledger entry refund charge cache memory "
    "latency throughput stream streaming chunk message messages system user assistant prompt completion "
    "reply answer question context window history conversation turn turns limit budget cost costs "
    "team project service server client library function method argument result error retry timeout "
    "we you they it this that these those our your their should could would must can will may might "
    "check compute measure report explain describe compare summarize translate review update deploy "
    "quickly carefully exactly roughly usually always never often rarely again also still only just "
    "new old large small long short simple complex accurate reliable expensive cheap fast slow busy "
    "data table row column file line page section chapter example detail note issue fix patch release "
    "morning evening today tomorrow yesterday week month year hour minute second day night weekend"
)
EN_WORDS = tuple(_EN_TEXT.split())
TECH_TERMS = (
    "Python",
    "tiktoken",
    "GPT-4o",
    "API",
    "JSON",
    "HTTP 429",
    "Redis",
    "PostgreSQL",
    "Kubernetes",
    "o200k_base",
    "cl100k_base",
    "SSE",
    "LRU",
    "p99",
    "Docker",
    "OpenAI",
    "Claude",
    "max_tokens",
)
ZH_TEMPLATES = (
    "我们的网关每天处理大约{n}万个请求，其中大部分来自中文用户。",
    "请帮我把这段话翻译成英文，注意保持原来的语气。",
    "这个月的账单比上个月多了{n}%，主要是因为上下文变长了。",
    "在计算提示词的令牌数时，每条消息都要额外加上固定的开销。",
    "如果上游返回{term}错误，我们应该等待一段时间再重试。",
    "用户希望知道为什么同一句话在不同模型里的令牌数不一样。",
    "缓存可以避免重复编码历史消息，但必须限制它占用的内存。",
    "请用{term}写一个函数，统计每个客户的剩余额度。",
    "昨天晚上服务器的延迟突然升高，我们怀疑是{term}的连接池满了。",
    "这份报告需要在周五之前发给财务部门，请提前检查所有数字。",
    "中文文本通常比英文文本占用更多的令牌，所以价格也会更高一些。",
    "他说明天上午十点开会，讨论下一个季度的预算和人员安排。",
    "每一次对话都会把完整的历史记录重新发送给模型。",
    "我们需要一个可靠的方法来核对供应商账单和我们自己的记录。",
    "请把{term}的超时时间改成{n}秒，然后重新部署服务。",
    "这个问题看起来很简单，但实际上涉及很多边界情况。",
    "天气预报说周末会下雨，所以我们把户外活动改到了下周。",
    "如果图片的尺寸未知，我们按照规则的最大值来估算令牌数。",
    "新版本发布以后，请大家留意错误日志，有问题及时反馈。",
    "她觉得这本书的第三章写得最好，尤其是关于历史的部分。",
    "我们先用{term}做一个原型，确认思路正确以后再优化性能。",
    "请总结一下这段对话的要点，不超过{n}个字。",
    "数据库里有一张表专门记录每个请求的用量和价格。",
    "为了防止重复扣费，每条账目都有一个唯一的幂等键。",
    "这家餐厅的菜很好吃，但是周末排队的人太多了。",
    "你能解释一下{term}和普通缓存有什么区别吗？",
    "客户反映流式响应偶尔会中断，需要我们查一下原因。",
    "我们每天夜里都会和供应商的用量报表做一次对账。",
)
CODE_SNIPPETS = (
    "```python\ndef remaining_quota(account, used):\n    return max(0, account.quota - used)\n```",
    '```json\n{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}\n```',
    "```sql\nSELECT account_id, SUM(prompt_tokens) FROM usage WHERE day = '2024-05-01' GROUP BY 1;\n```",
    "```bash\ncurl -s https://gateway.example/v1/chat/completions -H 'Authorization: Bearer $KEY'\n```",
)


def en_sentence(rng: random.Random) -> str:
    words = [rng.choice(EN_WORDS) for _ in range(rng.randint(7, 22))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), rng.choice(TECH_TERMS))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(2, 9999)))
    return " ".join(words).capitalize() + rng.choice((".", ".", ".", "?", "!", ":"))


def zh_sentence(rng: random.Random) -> str:
    return rng.choice(ZH_TEMPLATES).format(n=rng.randint(2, 500), term=rng.choice(TECH_TERMS))


def chat_text(rng: random.Random, enc: tiktoken.Encoding, target_tokens: int, kind: str) -> str:
    """A paragraph-y text of about ``target_tokens`` tokens: English, Chinese or both mixed."""
    parts: list[str] = []
    tokens = 0
    while tokens < target_tokens:
        if kind == "en" or (kind == "mixed" and rng.random() < 0.5):
            piece = en_sentence(rng)
            sep = " "
        else:
            piece = zh_sentence(rng)
            sep = ""
        if rng.random() < 0.08:
            piece, sep = "\n\n" + piece, ""
        if kind != "zh" and rng.random() < 0.03:
            piece, sep = "\n\n" + rng.choice(CODE_SNIPPETS) + "\n\n" + piece, ""
        parts.append((sep if parts else "") + piece)
        tokens += len(enc.encode_ordinary(piece))
    return "".join(parts)


def make_messages(rng: random.Random, enc: tiktoken.Encoding, count: int, *, system: bool) -> list[dict]:
    """``count`` alternating user/assistant messages (after a system message when ``system``)."""
    kinds = ("en", "zh", "mixed", "mixed")
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": chat_text(rng, enc, rng.randint(150, 260), "mixed")})
    for i in range(count):
        role = "user" if i % 2 == 0 else "assistant"
        size = rng.randint(120, 300) if role == "user" else rng.randint(200, 480)
        messages.append({"role": role, "content": chat_text(rng, enc, size, rng.choice(kinds))})
    return messages


def request_messages(enc: tiktoken.Encoding) -> list[dict]:
    """The 10-message request: system + 9 alternating user/assistant messages, one user message named."""
    messages = make_messages(random.Random(20240501), enc, 9, system=True)
    messages[3]["name"] = "li_wei"
    return messages


# --------------------------------------------------------------------------------------------------
# The baseline: raw tiktoken with the cookbook's framing.


def cookbook_count(messages: Sequence[dict], enc: tiktoken.Encoding) -> int:
    """OpenAI cookbook num_tokens_from_messages: 3 a message, its strings, +1 per name, 3 to prime."""
    num_tokens = 0
    for message in messages:
        num_tokens += 3
        for key, value in message.items():
            num_tokens += len(enc.encode_ordinary(value))
            if key == "name":
                num_tokens += 1
    return num_tokens + 3


# --------------------------------------------------------------------------------------------------
# Timing.


def timed_block(fn: Callable[[Any], Any], inputs: list) -> tuple[int, Any]:
    """Nanoseconds to run ``fn`` over ``inputs`` (gc disabled), and the last result."""
    result = None
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for item in inputs:
            result = fn(item)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed, result


def interleaved(
    candidates: dict[str, Callable[[Any], Any]],
    fresh_inputs: Callable[[int], list],
    *,
    rounds: int,
    block_seconds: float,
    warmup_rounds: int = 2,
    rewarm: bool = True,
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Median ns per iteration of each candidate, the per-round figures, and each one's last result.

    Warm-up runs every candidate, sizes the block (iterations a round) on the first candidate so a block
    lasts about ``block_seconds``, then runs ``warmup_rounds`` untimed rounds. Each timed round times
    every candidate once over the same number of iterations, in a shuffled order. With ``rewarm`` each
    block starts with one untimed call: a candidate using another ``Encoding`` object (litellm has its
    own) leaves the CPU caches cold for whichever block follows it, a cost that belongs to neither.
    """
    names = list(candidates)
    last: dict[str, Any] = {}
    for name in names:  # warm-up (also loads anything lazy)
        for item in fresh_inputs(2):
            last[name] = candidates[name](item)
    probe = fresh_inputs(3)
    elapsed, _ = timed_block(candidates[names[0]], probe)
    iterations = max(1, round(block_seconds / (elapsed / 3 / 1e9)))
    per_round: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(1234)
    for round_index in range(warmup_rounds + rounds):
        for name in order.sample(names, len(names)):
            inputs = fresh_inputs(iterations + rewarm)
            gc.collect()
            if rewarm:
                candidates[name](inputs.pop())
            elapsed, last[name] = timed_block(candidates[name], inputs)
            if round_index >= warmup_rounds:
                per_round[name].append(elapsed / iterations)
            del inputs
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    return medians, per_round, last


def paired_ratios(per_round: dict[str, list[float]], ours: str, base: str) -> tuple[float, float, float]:
    """Median and interquartile range of the round-by-round ratios ours/base (a noise indicator)."""
    ratios = [a / b for a, b in zip(per_round[ours], per_round[base])]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


# --------------------------------------------------------------------------------------------------
# Output helpers.


class Report:
    def __init__(self, json_only: bool) -> None:
        self.json_only = json_only
        self.figures: dict[str, Any] = {}
        self.mismatches: list[str] = []

    def say(self, line: str = "") -> None:
        if not self.json_only:
            print(line, flush=True)

    def verdict(self, label: str, value: float | None, target: float) -> bool | None:
        if value is None:
            self.say(f"  {label}: n/a")
            return None
        met = value <= target
        self.say(f"  {label}: {value:.3f}  (target <= {target})  {'MET' if met else 'NOT MET'}")
        return met

    def mismatch(self, what: str) -> None:
        self.mismatches.append(what)
        print(f"COUNT MISMATCH: {what}", file=sys.stderr, flush=True)


def us(ns: float) -> float:
    return round(ns / 1000, 2)


# --------------------------------------------------------------------------------------------------
# 1 and 2: one request, ours vs raw tiktoken (and litellm when installed).


def load_litellm(report: Report) -> Any:
    # litellm fetches its model cost map over the network at import unless told to use the bundled one.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:
        report.say("litellm: not installed (pip install 'llm-metering[bench]' in a scratch venv to compare)")
        return None
    litellm.suppress_debug_info = True
    return litellm


def bench_request(report: Report, litellm: Any, rounds: int, block_seconds: float) -> None:
    request_enc = get_encoding("cl100k_base")
    messages = request_messages(request_enc)
    wire = json.dumps({"model": "gpt-4o", "messages": messages}, ensure_ascii=False)
    report.figures["request_messages"] = len(messages)
    report.figures["request_chars"] = sum(len(m["content"]) for m in messages)
    report.say(
        f"request: {len(messages)} messages, {report.figures['request_chars']} chars of content, "
        f"{len(wire.encode())} bytes as JSON"
    )

    def fresh(n: int) -> list:
        return [json.loads(wire) for _ in range(n)]

    for key, model in MODELS:
        resolved = resolve_model(model)
        enc = get_encoding(resolved.spec.encoding)
        expected = cookbook_count(messages, enc)
        candidates: dict[str, Callable[[Any], Any]] = {
            "baseline": lambda body, enc=enc: cookbook_count(body["messages"], enc),
            "ours": lambda body, r=resolved: count_openai_chat(body, r, cache=None).prompt_tokens,
            "cold_cache": lambda body, r=resolved: count_openai_chat(body, r, cache=TokenCountCache()).prompt_tokens,
            # A/A control: the baseline timed a second time, so its ratio to the first shows the noise floor.
            "baseline_again": lambda body, enc=enc: cookbook_count(body["messages"], enc),
        }
        if litellm is not None:
            candidates["litellm"] = lambda body, m=model: litellm.token_counter(model=m, messages=body["messages"])
        medians, per_round, last = interleaved(candidates, fresh, rounds=rounds, block_seconds=block_seconds)

        # Counts: ours (both cache modes) must equal raw tiktoken exactly; litellm is only reported.
        body = fresh(1)[0]
        ours_result = count_openai_chat(body, resolved, cache=None)
        per_message_expected = tuple(cookbook_count([m], enc) - 3 for m in messages)
        for name in ("baseline", "ours", "cold_cache", "baseline_again"):
            if last[name] != expected:
                report.mismatch(f"{model} {name}: {last[name]} != raw tiktoken {expected}")
        if ours_result.message_tokens != per_message_expected:
            report.mismatch(f"{model} per-message tokens {ours_result.message_tokens} != {per_message_expected}")
        warm = TokenCountCache()
        for _ in range(2):  # a miss then a hit
            got = count_openai_chat(fresh(1)[0], resolved, cache=warm).prompt_tokens
            if got != expected:
                report.mismatch(f"{model} with a cache: {got} != raw tiktoken {expected}")

        base = medians["baseline"]
        ratio = medians["ours"] / base
        cold = medians["cold_cache"] / base
        control = medians["baseline_again"] / base
        paired, q1, q3 = paired_ratios(per_round, "ours", "baseline")
        report.say(f"\n[{model} / {resolved.spec.encoding}] prompt_tokens = {expected} (raw tiktoken agrees)")
        report.say(f"  raw tiktoken (cookbook framing): {us(base):9.1f} us")
        report.say(f"  count_openai_chat(cache=None):   {us(medians['ours']):9.1f} us")
        report.say(f"  count_openai_chat(cold cache):   {us(medians['cold_cache']):9.1f} us")
        report.verdict("ratio ours/raw", ratio, OVERHEAD_TARGET)
        report.say(
            f"    noise: round-by-round ours/raw median {paired:.3f} (IQR {q1:.3f}..{q3:.3f}); "
            f"A/A control raw/raw {control:.3f}"
        )
        report.say(f"  cold-cache ratio: {cold:.3f}  (informational, no target)")
        report.figures.update(
            {
                f"prompt_tokens_{key}": expected,
                f"baseline_{key}_us": us(base),
                f"openai_{key}_us": us(medians["ours"]),
                f"cold_cache_{key}_us": us(medians["cold_cache"]),
                f"openai_{key}_ratio": round(ratio, 4),
                f"openai_{key}_paired_ratio": round(paired, 4),
                f"noise_control_{key}_ratio": round(control, 4),
                f"cold_cache_{key}_ratio": round(cold, 4),
                f"openai_{key}_met": ratio <= OVERHEAD_TARGET,
            }
        )
        if litellm is not None:
            lite = medians["litellm"] / base
            same = last["litellm"] == expected
            report.say(
                f"  litellm.token_counter:           {us(medians['litellm']):9.1f} us   ratio {lite:.3f}  "
                f"(counts {last['litellm']}{', same' if same else f', ours {expected}'})"
            )
            report.figures.update(
                {
                    f"litellm_{key}_us": us(medians["litellm"]),
                    f"litellm_{key}_ratio": round(lite, 4),
                    f"litellm_{key}_tokens": last["litellm"],
                }
            )
        else:
            report.figures.update(
                {f"litellm_{key}_us": None, f"litellm_{key}_ratio": None, f"litellm_{key}_tokens": None}
            )


# --------------------------------------------------------------------------------------------------
# 3: a growing conversation, the whole history resent every turn.


def bench_growing(report: Report, turns: int, rounds: int) -> None:
    resolved = resolve_model(GROWING_MODEL)
    enc = get_encoding(resolved.spec.encoding)
    rng = random.Random(77)
    history = make_messages(rng, enc, 2 * turns, system=True)
    # Turn t sends the system message, the t-1 earlier user/assistant pairs and the new user message.
    wires = [
        json.dumps({"model": GROWING_MODEL, "messages": history[: 2 * t]}, ensure_ascii=False)
        for t in range(1, turns + 1)
    ]
    expected = [cookbook_count(history[: 2 * t], enc) for t in range(1, turns + 1)]
    sent_messages = sum(2 * t for t in range(1, turns + 1))
    report.say(
        f"\n[growing conversation, {GROWING_MODEL}] {turns} turns, {len(history) - 1} user/assistant messages, "
        f"{sent_messages} messages sent in all; last request {expected[-1]} tokens"
    )

    def fresh(n: int) -> list:  # each turn's body parsed anew, as the gateway would see it
        return [[json.loads(w) for w in wires] for _ in range(n)]

    def with_cache(bodies: list) -> list[int]:
        cache = TokenCountCache()
        return [count_openai_chat(body, resolved, cache=cache).prompt_tokens for body in bodies]

    def no_cache(bodies: list) -> list[int]:
        return [count_openai_chat(body, resolved, cache=None).prompt_tokens for body in bodies]

    candidates = {"no_cache": no_cache, "shared_cache": with_cache}
    medians, per_round, last = interleaved(
        candidates, fresh, rounds=rounds, block_seconds=0.0, warmup_rounds=1, rewarm=False
    )
    for name in candidates:
        if last[name] != expected:
            bad = next(i for i, (a, b) in enumerate(zip(last[name], expected)) if a != b)
            report.mismatch(
                f"growing conversation {name}, turn {bad + 1}: {last[name][bad]} != raw tiktoken {expected[bad]}"
            )
    ratio = medians["shared_cache"] / medians["no_cache"]
    paired, q1, q3 = paired_ratios(per_round, "shared_cache", "no_cache")
    report.say(f"  re-encode every turn (cache=None): {us(medians['no_cache']) / 1000:8.2f} ms per conversation")
    report.say(f"  shared TokenCountCache:            {us(medians['shared_cache']) / 1000:8.2f} ms per conversation")
    report.say(
        "  counts identical to raw tiktoken at every turn" if last["shared_cache"] == expected else "  COUNTS DIFFER"
    )
    report.verdict("ratio cached/uncached", ratio, GROWING_TARGET)
    report.say(f"    noise: round-by-round median {paired:.3f} (IQR {q1:.3f}..{q3:.3f})")
    report.figures.update(
        {
            "growing_conversation_turns": turns,
            "growing_conversation_uncached_us": us(medians["no_cache"]),
            "growing_conversation_cached_us": us(medians["shared_cache"]),
            "growing_conversation_ratio": round(ratio, 4),
            "growing_conversation_met": ratio <= GROWING_TARGET,
        }
    )


# --------------------------------------------------------------------------------------------------
# 4: memory retained by a cache filled far past its bounds.


def fill_text(rng: random.Random, i: int) -> str:
    """A unique mixed English/Chinese text of 5..300 chars (~100 on average, so both bounds bind)."""
    size = rng.choice((5, 20, 40, 80, 150, 300))
    parts = [f"{i}:"]
    length = len(parts[0])
    while length < size:
        piece = en_sentence(rng) if rng.random() < 0.5 else zh_sentence(rng)
        parts.append(piece)
        length += len(piece) + 1
    return " ".join(parts)[:size]


def emoji_text(i: int, size: int) -> str:
    """``size`` chars of Chinese with one emoji: the emoji makes CPython store all of it 4 bytes a char."""
    return (f"{i}:" + "数据缓存" * size)[: size - 1] + "🙂"


#: CJK Extension B (outside the BMP): CPython stores these 4 bytes a char, and UTF-8 takes 4 more.
ASTRAL_POOL = "".join(chr(0x20000 + k) for k in range(0xA6D0))


def astral_text(i: int, size: int) -> str:
    """``size`` chars, all but the unique ``i:`` head outside the BMP (a slice of ``ASTRAL_POOL``)."""
    head = f"{i}:"
    start = (i * 7919) % (len(ASTRAL_POOL) - size)
    return head + ASTRAL_POOL[start : start + size - len(head)]


def measure_cache_memory(max_entries: int, max_chars: int, texts: Callable[[int], str], count: int) -> dict:
    """Fill a cache with ``count`` texts; tracemalloc the memory freed when the cache is dropped.

    The texts are made inside the traced window and dropped by the caller, so the cache holds the only
    reference: what it retains is exactly what ``del cache`` gives back.
    """
    enc = get_encoding("o200k_base")
    tiktoken_core = os.path.join("tiktoken", "core.py")
    gc.collect()
    tracemalloc.start()
    try:
        cache = TokenCountCache(max_entries=max_entries, max_chars=max_chars)
        for i in range(count):
            cache.count(enc, texts(i))
        gc.collect()
        filled = tracemalloc.get_traced_memory()[0]
        # What survives of allocations made inside tiktoken's encode_ordinary: the UTF-8 copy CPython caches
        # inside each str when tiktoken's Rust core reads it (PyUnicode_AsUTF8AndSize), kept by the cache.
        snapshot = tracemalloc.take_snapshot()
        utf8 = sum(t.size for t in snapshot.traces if t.traceback[0].filename.endswith(tiktoken_core))
        del snapshot
        stats = {
            "entries": len(cache),
            "chars": cache.chars,
            "bound": cache.memory_bound_bytes(),
            "getsizeof_estimate": cache.memory_used_bytes(),
            "utf8_copies": utf8,
        }
        del cache
        gc.collect()
        stats["retained"] = filled - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return stats


def bench_memory(report: Report, quick: bool) -> None:
    max_entries, max_chars = 2000, 200_000
    count = 8_000 if quick else 30_000
    rng = random.Random(4242)
    mixed = measure_cache_memory(max_entries, max_chars, lambda i: fill_text(rng, i), count)
    met = mixed["retained"] <= mixed["bound"]
    report.say(
        f"\n[cache memory] TokenCountCache(max_entries={max_entries}, max_chars={max_chars}) after {count} unique "
        f"mixed English/Chinese texts of 5..300 chars"
    )
    report.say(
        f"  held: {mixed['entries']} entries, {mixed['chars']} chars; retained (tracemalloc) {mixed['retained']:,} B "
        f"(of which UTF-8 copies {mixed['utf8_copies']:,} B); memory_used_bytes() says {mixed['getsizeof_estimate']:,} B"
    )
    report.say(
        f"  stated bound memory_bound_bytes(): {mixed['bound']:,} B  -> retained <= bound: {'MET' if met else 'NOT MET'}"
    )
    report.figures.update(
        {
            "cache_entries": mixed["entries"],
            "cache_chars": mixed["chars"],
            "cache_memory_bytes": mixed["retained"],
            "cache_memory_utf8_copies_bytes": mixed["utf8_copies"],
            "cache_memory_getsizeof_bytes": mixed["getsizeof_estimate"],
            "cache_memory_bound_bytes": mixed["bound"],
            "cache_memory_met": met,
        }
    )
    # The stated bound's own worst case: both bounds full at once (max_entries texts of max_chars/max_entries
    # chars), every char stored at 4 bytes. Informational: it checks the constants behind the bound.
    size = max_chars // max_entries
    for key, label, make in (
        ("emoji", "Chinese + 1 emoji", lambda i: emoji_text(i, size)),
        ("astral", "astral-plane CJK", lambda i: astral_text(i, size)),
    ):
        worst = measure_cache_memory(max_entries, max_chars, make, 3 * max_entries)
        worst_met = worst["retained"] <= worst["bound"]
        per_entry = (worst["retained"] - 4 * worst["chars"] - worst["utf8_copies"]) / max(1, worst["entries"])
        report.say(
            f"  worst case, {label}: {worst['entries']} entries x {size} chars = {worst['chars']} chars: retained "
            f"{worst['retained']:,} B (UTF-8 copies {worst['utf8_copies']:,} B) vs bound {worst['bound']:,} B -> "
            f"{'within' if worst_met else 'OVER'} ({worst['retained'] / worst['bound']:.2f}x); "
            f"~{per_entry:.0f} B a entry besides chars and UTF-8"
        )
        report.figures.update(
            {
                f"cache_worst_{key}_memory_bytes": worst["retained"],
                f"cache_worst_{key}_utf8_copies_bytes": worst["utf8_copies"],
                f"cache_worst_{key}_entry_overhead_bytes": round(per_entry, 1),
                f"cache_worst_{key}_within_bound": worst_met,
            }
        )
    default_bound = DEFAULT_CACHE.memory_bound_bytes()
    report.say(
        f"  DEFAULT_CACHE: max_entries={DEFAULT_CACHE.max_entries}, max_chars={DEFAULT_CACHE.max_chars}, "
        f"stated bound {default_bound:,} B ({default_bound / 2**20:.1f} MiB)"
    )
    report.figures["default_cache_bound_bytes"] = default_bound
    report.figures["default_cache_worst_astral_bytes"] = None
    if not quick:  # the same worst case at the default cache's own bounds (a few seconds, ~50 MB)
        entries, chars = DEFAULT_CACHE.max_entries, DEFAULT_CACHE.max_chars
        size = chars // entries
        worst = measure_cache_memory(entries, chars, lambda i: astral_text(i, size), entries + entries // 5)
        report.say(
            f"  a TokenCountCache() with the default bounds, astral-plane worst case ({worst['entries']} entries x "
            f"{size} chars): retained {worst['retained']:,} B ({worst['retained'] / 2**20:.1f} MiB) vs bound "
            f"{worst['bound']:,} B -> {'within' if worst['retained'] <= worst['bound'] else 'OVER'} "
            f"({worst['retained'] / worst['bound']:.2f}x)"
        )
        report.figures["default_cache_worst_astral_bytes"] = worst["retained"]


# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run of a few seconds")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    report = Report(args.json_only)
    # Many short rounds rather than a few long ones: the median then shrugs off bursts of load on the
    # other core. A round times every candidate once; the growing conversation is one conversation a block.
    rounds = 9 if args.quick else 121
    block_seconds = 0.004
    growing_rounds = 3 if args.quick else 15
    turns = 40

    try:
        tiktoken_version = md.version("tiktoken")
    except md.PackageNotFoundError:  # pragma: no cover - metadata missing in odd installs
        tiktoken_version = getattr(tiktoken, "__version__", "unknown")
    report.figures.update(
        {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "tiktoken": tiktoken_version,
            "quick": args.quick,
            "rounds": rounds,
            "growing_rounds": growing_rounds,
        }
    )
    report.say(
        f"bench_counting: Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus, "
        f"tiktoken {tiktoken_version}, {rounds} rounds of ~{block_seconds * 1000:.0f} ms a candidate"
        f"{' (quick)' if args.quick else ''}"
    )
    started = time.perf_counter()
    litellm = load_litellm(report)
    if litellm is not None:
        report.figures["litellm"] = md.version("litellm")
        report.say(f"litellm {report.figures['litellm']} found: timed as a peer")
    else:
        report.figures["litellm"] = None
    # Move everything imported so far (litellm brings a big heap) out of the collector's reach, so the
    # gc.collect() between timed blocks stays cheap; timing itself runs with gc disabled.
    gc.collect()
    gc.freeze()

    bench_request(report, litellm, rounds, block_seconds)
    bench_growing(report, turns, growing_rounds)
    bench_memory(report, args.quick)

    report.figures["count_mismatches"] = len(report.mismatches)
    report.figures["seconds"] = round(time.perf_counter() - started, 1)
    verdict = f"{len(report.mismatches)} COUNT MISMATCH(ES)" if report.mismatches else "ALL COUNTS MATCH raw tiktoken"
    report.say(f"\n{verdict} ({report.figures['seconds']} s)")
    print(json.dumps(report.figures, ensure_ascii=False), flush=True)
    return 1 if report.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
