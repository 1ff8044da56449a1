"""Deterministic gateway traffic for the worker's tests: the same seed books the same rows, in the same order."""

from __future__ import annotations

import random
from datetime import date, datetime, time, timedelta
from typing import Any

from metering.ledger.meter import Meter
from metering.streams import StreamResult
from pricing.usage import UsageRecord
from workers.calendar import BusinessCalendar

CALENDAR = BusinessCalendar("Asia/Shanghai")
FIRST_DAY = date(2026, 11, 2)
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5")
CHANNELS = ("openai-official", "azure-east", None)


def body(model: str, words: int) -> dict[str, Any]:
    """A small chat body of ``words`` words."""
    return {"model": model, "max_tokens": 200, "messages": [{"role": "user", "content": " ".join(["hello"] * words)}]}


def moment(day: date, seconds: int) -> datetime:
    """``seconds`` after the start of ``day`` in the business time zone, as an aware datetime."""
    return datetime.combine(day, time(0), CALENDAR.zone) + timedelta(seconds=seconds)


def book_customers(meter: Meter) -> list[str]:
    """Three users (CNY payer, USDT payer, grant only) with a key each; returns the secrets."""
    secrets = []
    for number, (name, currency) in enumerate((("张伟", "CNY"), ("acme, inc.", "USDT"), ("free-rider", None))):
        uid = meter.create_user(name)
        meter.grant(uid, "signup")
        if currency:
            meter.topup(uid, "50", currency, f"order-{number}", at=moment(FIRST_DAY, 60))
        secrets.append(meter.create_key(uid, f"key-{number}", limit_quota=None if number != 1 else 10**9))
    return secrets


def book_day(meter: Meter, secrets: list[str], day: date, requests: int, seed: int) -> dict[str, int]:
    """``requests`` requests spread over ``day``: settled, aborted streams, failures (released); returns counts."""
    rng = random.Random(f"{seed}-{day}")
    counts = {"succeeded": 0, "aborted": 0, "failed": 0}
    for number in range(requests):
        model = rng.choice(MODELS)
        at = moment(day, 120 + number * (86_000 // max(requests, 1)))
        hold = meter.authorize(rng.choice(secrets), body(model, rng.randint(1, 40)), f"{day}-{number}", at=at,
                               channel=rng.choice(CHANNELS))
        usage = UsageRecord.from_openai(model, {"prompt_tokens": hold.prompt_tokens, "completion_tokens": rng.randint(1, 150)}) \
            if not model.startswith("claude") else UsageRecord.from_anthropic(
                model, {"input_tokens": hold.prompt_tokens, "output_tokens": rng.randint(1, 150)})
        roll = rng.random()
        if roll < 0.1:
            meter.release(hold)
            counts["failed"] += 1
        elif roll < 0.2:
            cut = StreamResult("aborted", usage, "", (), None, None, 0, 3)
            meter.settle(hold, stream=cut)
            counts["aborted"] += 1
        else:
            meter.settle(hold, usage=usage)
            counts["succeeded"] += 1
    return counts


def after(day: date, hours: int = 1) -> datetime:
    """An aware time ``hours`` after ``day`` ends (the day is complete by then)."""
    return moment(day + timedelta(days=1), hours * 3600)
