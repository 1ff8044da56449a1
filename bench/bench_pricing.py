"""Pricing bench: what ``quota()`` costs a record, next to a hand-written floor and litellm.

Figures (see BENCHMARKS.md, "Pricing", for the targets and the last figures seen):

1. ``quota(table, usage, at)`` over 10,000 normalized usage records: a mix of 11 models (OpenAI with
   cached tokens, Anthropic with cache reads and 5m/1h cache writes, some long-context Sonnet 4 / 4.5
   requests above 200K input), event times spread over the 30 days before 2026-11-28, group "default".
   Target: >= 1,000,000 records/s on one core.
2. The floor: a dict lookup of the record's model in per-token integer rates precomputed once (already
   multiplied by units_per_usd) plus the arithmetic (sum of count x rate, one ceiling division), in a
   function called per record. No version, group or long-context lookup. Target: quota <= 5x the floor.
   A/A control: the floor timed a second time.
3. Optional peer: ``litellm.cost_per_token`` for the same usage when ``import litellm`` works.
   Target: quota >= 100x faster. Also ``price()`` per record (the full exact result), informational.

Every candidate's timed block is one Python loop over records (so a candidate pays its own call per
record, not a lambda's). Fast candidates run all the records each block; slow ones (price, litellm) a
rotating slice of about ``block_seconds``. Rounds interleave the candidates in a shuffled order, gc
disabled; a figure is the median over rounds of the time per record. Exits 1 if ``quota()`` differs
from ``price().quota`` on any record, or from the floor on a record the floor can price (latest
version, no long-context tier). The LAST line of stdout is one JSON object with every figure.

    .venv/bin/python bench/bench_pricing.py [--quick] [--json-only]
    LITELLM_LOCAL_MODEL_COST_MAP=True /tmp/benchvenv/bin/python bench/bench_pricing.py   # with litellm
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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

from pricing.quote import price, quota
from pricing.table import PriceTable, load_price_table
from pricing.usage import UsageRecord

RATE_TARGET = 1_000_000  # quota() records per second, one core
FLOOR_TARGET = 5.0  # quota() time / floor time
LITELLM_TARGET = 100.0  # litellm.cost_per_token time / quota() time
NOW = datetime(2026, 11, 28, tzinfo=UTC).timestamp()  # fixed, so runs price the same records
DAY = 86_400.0
# (model as the upstream names it, provider, weight): 11 models, dated aliases and bare names mixed.
MIX = (
    ("gpt-4o-2024-08-06", "openai", 14), ("gpt-4o-mini", "openai", 14), ("gpt-4.1", "openai", 8),
    ("gpt-4.1-mini", "openai", 8), ("o3", "openai", 5), ("gpt-5", "openai", 8), ("gpt-5-mini", "openai", 10),
    ("claude-sonnet-4-20250514", "anthropic", 10), ("claude-sonnet-4-5", "anthropic", 10),
    ("claude-opus-4-5", "anthropic", 4), ("claude-haiku-4-5", "anthropic", 9),
)
REASONING = {"o3", "gpt-5", "gpt-5-mini"}


def make_records(n: int, seed: int = 20261128) -> list[tuple[UsageRecord, float]]:
    """``n`` (record, event timestamp) pairs, built through from_openai / from_anthropic as the worker does."""
    rng = random.Random(seed)
    models = [m for m in MIX for _ in range(m[2])]
    out = []
    for _ in range(n):
        model, provider, _w = rng.choice(models)
        output = int(rng.lognormvariate(5.5, 1.0)) + 1
        if provider == "openai":
            prompt = int(rng.lognormvariate(7.5, 1.2)) + 20
            cached = 128 * rng.randrange(8, prompt // 128 + 1) if prompt >= 1024 and rng.random() < 0.5 else 0
            usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": output}
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
            if model in REASONING:  # reasoning tokens are part of completion_tokens
                reasoning = int(rng.lognormvariate(6.5, 1.0))
                usage["completion_tokens"] = output + reasoning
                usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
            record = UsageRecord.from_openai(model, usage)
        else:
            usage = {"input_tokens": int(rng.lognormvariate(6.0, 1.3)) + 1, "output_tokens": output}
            if rng.random() < 0.6:
                usage["cache_read_input_tokens"] = int(rng.lognormvariate(9.5, 1.0))
            if rng.random() < 0.3:
                w5, w1 = int(rng.lognormvariate(8.0, 1.0)), (int(rng.lognormvariate(8.0, 1.0)) if rng.random() < 0.3 else 0)
                usage["cache_creation_input_tokens"] = w5 + w1
                usage["cache_creation"] = {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}
            if model.startswith("claude-sonnet-4") and rng.random() < 0.1:  # long context: above 200K input
                usage["cache_read_input_tokens"] = rng.randint(200_001, 800_000)
            if rng.random() < 0.03:
                usage["server_tool_use"] = {"web_search_requests": rng.randint(1, 4)}
            record = UsageRecord.from_anthropic(model, usage)
        out.append((record, NOW - rng.uniform(0, 30 * DAY)))
    return out


def floor_table(table: PriceTable, models: Sequence[str]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Model name as given -> (latest base rates x units_per_usd, denominator), computed once."""
    plan = {}
    for model in models:
        latest = table.resolve(model)[0].versions[-1]
        plan[model] = (tuple(rate * table.units_per_usd for rate in latest.rates), latest.denominator)
    return plan


def floor_applies(table: PriceTable, usage: UsageRecord, at: float) -> bool:
    entry = table.resolve(usage.model)[0]
    latest = entry.versions[-1]
    above = latest.long_context_above
    return entry.version_at(at) is latest and (above is None or usage.total_input_tokens <= above)


def make_candidates(table: PriceTable, floor_plan: dict, litellm: Any) -> dict[str, Callable[[list], int]]:
    def loop(fn: Callable[[PriceTable, UsageRecord, float], int]) -> Callable[[list], int]:
        def run(batch: list) -> int:  # the call per record inline, as the worker's loop would have it
            t, q, s = table, fn, 0
            for u, at in batch:
                s += q(t, u, at)
            return s

        return run

    def floor(u: UsageRecord) -> int:
        r, d = floor_plan[u.model]
        total = (
            u.input_tokens * r[0] + u.cached_input_tokens * r[1] + u.cache_write_5m_tokens * r[2]
            + u.cache_write_1h_tokens * r[3] + u.output_tokens * r[4] + u.images * r[5] + r[6]
            + u.web_search_requests * r[7]
        )
        return -(-total // d)

    def run_floor(batch: list) -> int:
        f, s = floor, 0
        for u, _at in batch:
            s += f(u)
        return s

    candidates = {"quota": loop(quota), "floor": run_floor, "floor_again": run_floor}
    candidates["price"] = loop(lambda t, u, at: price(t, u, at).quota)
    if litellm is not None:
        cost = litellm.cost_per_token

        def run_litellm(batch: list) -> float:
            s = 0.0
            for u, _at in batch:
                a, b = cost(
                    model=u.model, prompt_tokens=u.total_input_tokens, completion_tokens=u.output_tokens,
                    cache_read_input_tokens=u.cached_input_tokens,
                    cache_creation_input_tokens=u.cache_write_5m_tokens + u.cache_write_1h_tokens,
                )
                s += a + b
            return s

        candidates["litellm"] = run_litellm
    return candidates


def timed(fn: Callable[[list], Any], batch: list) -> int:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        fn(batch)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


def interleaved(candidates: dict, records: list, rounds: int, block_seconds: float) -> dict[str, list[float]]:
    """ns per record of each candidate, one figure a round. Slow candidates run a rotating slice."""
    sizes = {}
    for name, fn in candidates.items():  # warm-up and block sizing
        fn(records[:50])
        per_record = timed(fn, records[:200]) / 200
        sizes[name] = max(20, min(len(records), round(block_seconds * 1e9 / per_record)))
    per_round: dict[str, list[float]] = {name: [] for name in candidates}
    order, offsets = random.Random(1234), dict.fromkeys(candidates, 0)
    for round_index in range(2 + rounds):  # 2 untimed rounds first
        for name in order.sample(list(candidates), len(candidates)):
            size, start = sizes[name], offsets[name]
            batch = (records + records)[start : start + size] if size < len(records) else records
            offsets[name] = (start + size) % len(records)
            gc.collect()
            candidates[name](batch[:1])  # re-warm after whichever candidate ran before
            elapsed = timed(candidates[name], batch)
            if round_index >= 2:
                per_round[name].append(elapsed / len(batch))
    return per_round


def check(table: PriceTable, records: list, floor_plan: dict, candidates: dict) -> tuple[list[str], int]:
    """quota == price().quota everywhere and == the floor where it applies; the mismatches and floor count."""
    bad, applies = [], 0
    for i, (u, at) in enumerate(records):
        q, exact = candidates["quota"]([(u, at)]), price(table, u, at)
        if q != exact.quota:
            bad.append(f"record {i} {u.model}: quota {q} != price().quota {exact.quota}")
        if floor_applies(table, u, at):
            applies += 1
            floor = candidates["floor"]([(u, at)])
            if q != floor:
                bad.append(f"record {i} {u.model}: quota {q} != floor {floor}")
    return bad, applies


def load_litellm(say: Callable[[str], None]) -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch of the cost map
    try:
        import litellm
    except ImportError:
        say("litellm: not installed (see BENCHMARKS.md for the scratch venv)")
        return None
    litellm.suppress_debug_info = True
    return litellm


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run of a few seconds")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)

    def say(line: str = "") -> None:
        if not args.json_only:
            print(line, flush=True)

    rounds, block_seconds, n = (9, 0.004, 2_000) if args.quick else (101, 0.006, 10_000)
    started = time.perf_counter()
    litellm = load_litellm(say)
    table = load_price_table()
    records = make_records(n)
    floor_plan = floor_table(table, sorted({u.model for u, _ in records}))
    candidates = make_candidates(table, floor_plan, litellm)
    gc.collect()
    gc.freeze()
    figures: dict[str, Any] = {
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "quick": args.quick, "rounds": rounds,
        "records": n, "models": len(floor_plan), "litellm": md.version("litellm") if litellm else None,
    }
    unfloored = sum(not floor_applies(table, u, at) for u, at in records)
    say(
        f"bench_pricing: Python {figures['python']} on {figures['machine']}, {figures['cpus']} cpus; {n} records, "
        f"{len(floor_plan)} models, {unfloored} the floor cannot price (long context); {rounds} rounds{' (quick)' if args.quick else ''}"
    )
    mismatches, applies = check(table, records, floor_plan, candidates)
    for line in mismatches[:20]:
        print(f"QUOTA MISMATCH: {line}", file=sys.stderr, flush=True)
    say(f"checks: quota == price().quota on {n} records, == floor on {applies} where "
        f"the floor applies: {len(mismatches)} mismatch(es)")

    per_round = interleaved(candidates, records, rounds, block_seconds)
    med = {name: statistics.median(values) for name, values in per_round.items()}
    ratios = [a / b for a, b in zip(per_round["quota"], per_round["floor"])]
    rate = 1e9 / med["quota"]
    floor_ratio = med["quota"] / med["floor"]
    figures.update(
        {
            "quota_ns": round(med["quota"], 1), "floor_ns": round(med["floor"], 1),
            "price_ns": round(med["price"], 1), "quota_per_second": round(rate),
            "quota_per_second_met": rate >= RATE_TARGET, "floor_ratio": round(floor_ratio, 3),
            "floor_ratio_paired": round(statistics.median(ratios), 3), "floor_ratio_met": floor_ratio <= FLOOR_TARGET,
            "noise_control_ratio": round(med["floor_again"] / med["floor"], 3),
            "price_ratio": round(med["price"] / med["quota"], 2),
        }
    )
    say(f"  quota():  {med['quota']:8.1f} ns/record = {rate:,.0f} records/s  (target >= {RATE_TARGET:,})  "
        f"{'MET' if rate >= RATE_TARGET else 'NOT MET'}")
    say(f"  floor:    {med['floor']:8.1f} ns/record; quota/floor {floor_ratio:.2f}x (round-by-round median "
        f"{figures['floor_ratio_paired']:.2f}; A/A control {figures['noise_control_ratio']:.3f})  (target <= "
        f"{FLOOR_TARGET}x)  {'MET' if floor_ratio <= FLOOR_TARGET else 'NOT MET'}")
    say(f"  price():  {med['price']:8.1f} ns/record ({figures['price_ratio']:.1f}x quota; informational)")
    figures.update({"litellm_ns": None, "litellm_speedup": None, "litellm_met": None, "litellm_agree": None})
    if litellm is not None:
        speedup = med["litellm"] / med["quota"]
        sample = records[:500]  # agreement with our exact USD, informational (litellm's own price data)
        agree = sum(
            abs(candidates["litellm"]([r]) - float(price(table, *r).usd)) <= 1e-9 + 1e-6 * float(price(table, *r).usd)
            for r in sample
        )
        figures.update({"litellm_ns": round(med["litellm"], 1), "litellm_speedup": round(speedup, 1),
                        "litellm_met": speedup >= LITELLM_TARGET, "litellm_agree": f"{agree}/{len(sample)}"})
        say(f"  litellm.cost_per_token: {med['litellm']:8.1f} ns/record; quota() is {speedup:.0f}x faster  "
            f"(target >= {LITELLM_TARGET:.0f}x)  {'MET' if speedup >= LITELLM_TARGET else 'NOT MET'}; "
            f"same USD as ours on {agree}/{len(sample)} records")
    figures["quota_mismatches"] = len(mismatches)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    say(f"{len(mismatches)} QUOTA MISMATCH(ES)" if mismatches else f"ALL QUOTAS MATCH ({figures['seconds']} s)")
    print(json.dumps(figures), flush=True)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
