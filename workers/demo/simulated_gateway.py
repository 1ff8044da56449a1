"""The demo's gateway: customers, keys and days of traffic pushed through the real Meter API.

Each request is a generated OpenAI or Claude body, authorized (real prompt counting, a hold), then
settled with a response body or a stream (fed to a ``StreamAccumulator`` in odd-sized chunks), released
when the upstream fails, cut when the client hangs up, or left open when the gateway "crashes" (the
close expires it). Some keys have limits and hit them; one user has only the signup grant and runs dry.
A batch key reports usage in deferred mode (``record_usage``: the worker folds it).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from metering.completion import count_generated
from metering.counting import count_request
from metering.ledger import Meter, QuotaExceeded
from metering.models import resolve_model
from pricing.usage import UsageRecord, UsageSource
import workers.demo.traffic as traffic
from workers.calendar import BusinessCalendar


@dataclass(frozen=True)
class Customer:
    """A demo customer: credits, keys (name, limit or None), model mix and habits."""

    name: str
    grants: tuple[str, ...]
    topups: tuple[tuple[str, str], ...]  # (amount, currency)
    keys: tuple[tuple[str, int | None], ...]
    models: tuple[tuple[str, int], ...]  # (model, weight)
    weight: int  # share of the traffic
    knowledge: float = 0.0  # share of requests that attach the (cached) knowledge base
    stream: float = 0.4  # share of streamed requests
    deferred_key: str | None = None  # a key that reports usage afterwards (deferred mode)


CUSTOMERS = (
    Customer("张伟", ("signup", "github_star"), (("50", "CNY"),), (("prod", None), ("ci-bot", 200_000)),
             (("gpt-4o", 5), ("gpt-4o-mini", 3)), weight=30, knowledge=0.3, stream=0.5),
    Customer("李娜", ("signup",), (("100", "CNY"), ("30", "CNY")), (("app", None),),
             (("claude-sonnet-4", 4), ("claude-3-5-sonnet", 2), ("claude-3-5-haiku", 2)), weight=25, knowledge=0.4, stream=0.6),
    Customer("王芳", ("signup",), (("5", "CNY"),), (("trial", 50_000),),
             (("gpt-4o-mini", 5), ("gpt-4o", 1)), weight=12, stream=0.3),
    Customer("Alice Martin", ("signup", "github_star"), (("20", "USDT"),), (("backend", None), ("batch", None)),
             (("gpt-4o", 3), ("claude-sonnet-4", 2), ("gpt-4o-mini", 2)), weight=20, knowledge=0.2, deferred_key="batch"),
    Customer("José García", ("signup",), (("10", "USDT"),), (("default", None),),
             (("claude-3-5-haiku", 3), ("gpt-4o-mini", 2)), weight=8, stream=0.5),
    Customer("bob-dev", ("signup",), (), (("free", None),), (("gpt-4o", 2), ("claude-sonnet-4", 1)), weight=5, stream=0.3),
)
CHANNELS = {"openai": (("openai-official", 7), ("azure-east", 3)),
            "anthropic": (("anthropic-official", 6), ("aws-bedrock", 4))}
#: Requests per day on average (every day alike: the demo gives the same figures whatever the date).
REQUESTS_PER_DAY = 300
#: Relative traffic per hour of the day in the business time zone.
HOURLY = (1, 0.8, 0.5, 0.3, 0.3, 0.3, 0.5, 1, 2, 4, 5, 5, 3, 4, 5, 5, 5, 4, 3, 4, 5, 5, 4, 2)
#: Outcome shares: the upstream fails (released), the client cuts a stream, the gateway dies mid-call.
FAILURE, CUT, CRASH = 0.04, 0.05, 0.01
#: Share of OpenAI responses whose upstream prompt count disagrees with ours (an upstream that adds a prompt).
TOKEN_MISMATCH = 0.02


@dataclass
class TrafficStats:
    """What the simulated gateway saw."""

    outcomes: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    by_channel: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # QuotaExceeded by scope (user | key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"outcomes": dict(sorted(self.outcomes.items())), "by_model": dict(sorted(self.by_model.items())),
                "by_channel": dict(sorted(self.by_channel.items())), "refused": dict(sorted(self.refused.items())),
                "attempted": sum(self.outcomes.values()) + sum(self.refused.values())}


@dataclass
class Account:
    """A customer in the ledger: its user id and its keys' secrets."""

    customer: Customer
    user_id: int
    secrets: dict[str, str]


def _weighted(rng: random.Random, choices: tuple[tuple[Any, float], ...]) -> Any:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def open_accounts(meter: Meter, calendar: BusinessCalendar, first_day: date) -> list[Account]:
    """Create the customers with their grants, promotion top-ups and keys."""
    start, _ = calendar.bounds(first_day)
    paid_at = start.replace(tzinfo=timezone.utc) - timedelta(hours=2)
    accounts = []
    for number, customer in enumerate(CUSTOMERS, start=1):
        user_id = meter.create_user(customer.name)
        for kind in customer.grants:
            meter.grant(user_id, kind)
        for order, (amount, currency) in enumerate(customer.topups, start=1):
            meter.topup(user_id, amount, currency, f"demo-order-{number}-{order}", at=paid_at)
        secrets = {name: meter.create_key(user_id, name, limit_quota=limit) for name, limit in customer.keys}
        accounts.append(Account(customer, user_id, secrets))
    return accounts


def request_times(rng: random.Random, calendar: BusinessCalendar, day: date) -> list[datetime]:
    """The day's request times (aware UTC), following the hourly profile, in order."""
    start, _ = calendar.bounds(day)
    count = max(1, int(rng.gauss(REQUESTS_PER_DAY, REQUESTS_PER_DAY * 0.08)))
    hours = rng.choices(range(24), weights=HOURLY, k=count)
    offsets = sorted(hour * 3600 + rng.randrange(3600) + rng.random() for hour in hours)
    return [start.replace(tzinfo=timezone.utc) + timedelta(seconds=offset) for offset in offsets]


class Gateway:
    """Serves generated requests through the meter (``stale`` prices the requests of a stale instance)."""

    def __init__(self, meter: Meter, rng: random.Random, accounts: list[Account]) -> None:
        self.meter = meter
        self.rng = rng
        self.accounts = accounts
        self.stats = TrafficStats()
        self._cache_warm: set[tuple[int, str, date]] = set()
        self._knowledge_tokens: dict[str, int] = {}

    def serve(self, number: int, at: datetime, day: date, meter: Meter | None = None) -> None:
        """One request at ``at`` (``meter``: the instance that serves it, default the gateway's)."""
        rng = self.rng
        account = rng.choices(self.accounts, weights=[a.customer.weight for a in self.accounts])[0]
        customer = account.customer
        key = rng.choice(list(account.secrets))
        model = _weighted(rng, customer.models)
        provider = resolve_model(model).provider
        channel = _weighted(rng, CHANNELS[provider])
        knowledge = rng.random() < customer.knowledge
        request_id = f"demo-{day.isoformat()}-{number:05d}"
        if key == customer.deferred_key:
            self._deferred(account, key, model, channel, request_id, at, knowledge)
            return
        stream = rng.random() < customer.stream
        make_body = traffic.anthropic_body if provider == "anthropic" else traffic.openai_body
        body = make_body(rng, model, knowledge=knowledge, stream=stream)
        try:
            hold = (meter or self.meter).authorize(account.secrets[key], body, request_id, at=at, channel=channel)
        except QuotaExceeded as exc:
            self.stats.refused[exc.scope] += 1
            return
        self.stats.by_model[model] += 1
        self.stats.by_channel[channel] += 1
        outcome = self._outcome(stream)
        cached = self._cached(account.user_id, model, day, knowledge)
        self.stats.outcomes[self._finish(meter or self.meter, hold, body, provider, stream, outcome, cached)] += 1

    def _outcome(self, stream: bool) -> str:
        draw = self.rng.random()
        if draw < FAILURE:
            return "failed"
        if draw < FAILURE + CRASH:
            return "crashed"
        if stream and draw < FAILURE + CRASH + CUT:
            return "cut"
        return "completed"

    def _cached(self, user_id: int, model: str, day: date, knowledge: bool) -> tuple[int, bool]:
        """(knowledge-base tokens, whether the prompt cache is warm) for this request."""
        if not knowledge:
            return 0, False
        if model not in self._knowledge_tokens:
            body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": traffic.KNOWLEDGE_BASE}]}
            self._knowledge_tokens[model] = _true_count(count_request(body, model).prompt_tokens, model) - 8
        warm = (user_id, model, day) in self._cache_warm
        self._cache_warm.add((user_id, model, day))
        return self._knowledge_tokens[model], warm

    def _finish(self, meter: Meter, hold: Any, body: dict[str, Any], provider: str, stream: bool, outcome: str,
                cached: tuple[int, bool]) -> str:
        rng = self.rng
        if outcome == "crashed":
            return "left open (expires)"  # the close expires it: an unbilled hold, counted as aborted
        text = traffic.answer_text(rng)
        usage = self._usage(hold, provider, text, cached)
        if outcome == "failed" and not (stream and provider == "anthropic"):
            meter.release(hold)  # a 5xx before any byte: nothing to bill
            return "failed (released)"
        if not stream:
            if provider == "anthropic":
                response = traffic.anthropic_response(hold.model, text, usage)
            else:
                response = traffic.openai_response(hold.model, text, None if rng.random() < 0.03 else usage)
            meter.settle(hold, response=response)
            return "completed"
        if provider == "anthropic":
            events = traffic.anthropic_sse(rng, hold.model, text, usage, overloaded=outcome == "failed")
        else:
            include = bool(body.get("stream_options", {}).get("include_usage"))
            events = traffic.openai_sse(rng, hold.model, text, usage if include else None)
        data = traffic.cut(rng, events) if outcome == "cut" else b"".join(events)
        accumulator = meter.accumulator(hold)
        position = 0
        while position < len(data):  # bytes arrive off the socket in odd sizes
            size = rng.randint(64, 1500)
            accumulator.feed(data[position:position + size])
            position += size
        result = accumulator.finish()
        if result.status == "error":
            meter.release(hold)  # the upstream failed mid-stream: the user pays nothing
            return "failed (released)"
        meter.settle(hold, stream=result)
        return "aborted (cut stream)" if result.status == "aborted" else "completed (stream)"

    def _usage(self, hold: Any, provider: str, text: str, cached: tuple[int, bool]) -> dict[str, Any]:
        """The upstream's usage object for this reply."""
        output = count_generated([text], resolve_model("gpt-4o"))[0]  # the provider's own count of the reply
        knowledge, warm = cached
        if provider == "anthropic":
            total = _true_count(hold.prompt_tokens, hold.model)
            reused = min(knowledge, total - 1)
            return traffic.anthropic_usage(total - reused, reused if warm else 0, 0 if warm else reused, output)
        prompt = hold.prompt_tokens
        if self.rng.random() < TOKEN_MISMATCH:
            prompt += self.rng.randint(150, 400)  # an upstream that prepends its own system prompt
        hit = min(knowledge, prompt) // 128 * 128 if warm and prompt >= 1024 else 0  # OpenAI caches in 128s
        return traffic.openai_usage(prompt, hit, output)

    def _deferred(self, account: Account, key: str, model: str, channel: str, request_id: str, at: datetime,
                  knowledge: bool) -> None:
        """A batch job's usage, reported afterwards (deferred mode): recorded now, folded by the worker."""
        provider = resolve_model(model).provider
        make_body = traffic.anthropic_body if provider == "anthropic" else traffic.openai_body
        prompt = count_request(make_body(self.rng, model, knowledge=knowledge, stream=False), model).prompt_tokens
        output = count_generated([traffic.answer_text(self.rng)], resolve_model("gpt-4o"))[0]
        if provider == "anthropic":
            usage = UsageRecord.from_anthropic(model, traffic.anthropic_usage(_true_count(prompt, model), 0, 0, output),
                                               source=UsageSource.UPSTREAM)
        else:
            usage = UsageRecord.from_openai(model, traffic.openai_usage(prompt, 0, output), source=UsageSource.UPSTREAM)
        self.meter.record_usage(account.secrets[key], request_id, usage, at=at, channel=channel)
        self.stats.by_model[model] += 1
        self.stats.by_channel[channel] += 1
        self.stats.outcomes["deferred (folded)"] += 1


def _true_count(local: int, model: str) -> int:
    """The provider's own prompt count behind our count (Claude's offline estimate carries a safety factor)."""
    factor = resolve_model(model).spec.claude_safety_factor
    return local if factor is None else max(1, math.floor(local / factor))


def run_traffic(
    gateway: Gateway, calendar: BusinessCalendar, days: list[date], stale: Meter, stale_from: datetime,
    stale_until: datetime, progress: Callable[[str, int, int | None], None] | None = None,
) -> None:
    """Serve every day's requests in time order; between ``stale_from`` and ``stale_until`` the ``stale``
    instance (old price table: it had not reloaded it yet) serves them."""
    for index, day in enumerate(days, start=1):
        times = request_times(gateway.rng, calendar, day)
        label = f"Traffic, day {index}/{len(days)} ({day})"
        for number, at in enumerate(times, start=1):
            instance = stale if stale_from <= at < stale_until else None
            gateway.serve(number, at, day, instance)
            if progress is not None and (number % 25 == 0 or number == len(times)):
                progress(label, number, len(times))
