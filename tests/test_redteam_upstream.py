"""Red team, hostile or buggy upstream: its usage is checked against the request's worst case before it is charged.

What is tested (issue 13, part 2; the rule is docs/ledger.md, "Upstream usage is checked"), on SQLite,
PostgreSQL and MariaDB:

- Output above the worst case (every choice at its budget), web searches above the uses held, and an input
  above the band (an exact count plus a tenth plus 1,024 tokens; an estimate's twice plus 1,024) are charged
  at the worst case; the reported usage and the quota not charged are kept in quarantine (action ``capped``)
  in the charge's own transaction, once, whatever the settle's retries.
- Inside the band an input is charged in full (the overage rule: an estimate's miss is real usage).
- An operator approves the rest with one adjustment (``Meter.approve_capped``, ``metering quarantine
  approve``), once; approving anything else is a typed error.
- The stored figures are the charged ones: the nightly close re-prices them to the unit (no discrepancy).
- An upstream that reports absurd figures for every request cannot empty the balances: each charge stays
  within its hold, the audit stays clean.

Figures: gpt-4o at $2.50 / $10 per 1M tokens (OpenAI pricing): 1.25 and 5 units a token (500,000 = $1);
Claude Sonnet 4 at $3 / $15 per 1M and $10 per 1,000 web searches (Anthropic pricing): 1.5 / 7.5 / 5,000 units.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from metering.ledger import InvalidField, Meter, NotFound, SettleConflict, quarantine
from metering.ledger.tables import UsageEvent
from pricing.usage import UsageRecord, UsageSource
from workers.calendar import BusinessCalendar
from workers.cli.main import app
from workers.close.nightly import close_day

EVENTS = UsageEvent.__table__  # type: ignore[attr-defined]
GPT4O = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]}  # 8 tokens
PROMPT = 8


def units_4o(input_tokens: int, output_tokens: int) -> int:
    return math.ceil(Fraction(5, 4) * input_tokens + 5 * output_tokens)


def funded(meter: Meter, amount: int = 10**8, name: str = "alice") -> tuple[int, str]:
    uid = meter.create_user(name)
    meter.adjust(uid, amount, f"fund-{name}", "test funding")
    return uid, meter.create_key(uid, "k")


def reported(input_tokens: int, output_tokens: int, **more: int) -> UsageRecord:
    return UsageRecord(provider="openai", model="gpt-4o", input_tokens=input_tokens, output_tokens=output_tokens,
                       **more)


def capped_rows(meter: Meter) -> list[dict[str, Any]]:
    return [row for row in quarantine.listing(meter._read) if row["action"] == "capped"]


def test_output_beyond_every_choice_s_budget_is_charged_at_the_worst_case(meter: Meter) -> None:
    uid, secret = funded(meter)
    hold = meter.authorize(secret, {**GPT4O, "n": 2}, "req-1")  # 2 choices x 100
    assert hold.amount == units_4o(PROMPT, 200) == 1_010
    receipt = meter.settle(hold, usage=reported(PROMPT, 1_000_000))
    assert receipt.quota == 1_010 and receipt.overage == 0
    assert meter.balance(uid) == 10**8 - 1_010
    [row] = capped_rows(meter)
    assert (row["source"], row["request_id"], row["field"], row["settled"]) == ("settle_usage", "req-1", "output_tokens", True)
    assert row["uncharged_quota"] == units_4o(PROMPT, 1_000_000) - 1_010
    assert json.loads(row["payload"])["output_tokens"] == 1_000_000  # the reported figures are kept
    assert "output 1000000 tokens" in row["reason"]
    # A retry of the same settle: the first receipt, no second row; another usage is a conflict.
    assert meter.settle(hold, usage=reported(PROMPT, 1_000_000)) == receipt
    with pytest.raises(SettleConflict):
        meter.settle(hold, usage=reported(PROMPT, 999_999))
    assert len(capped_rows(meter)) == 1
    assert meter.audit().ok


def test_an_input_beyond_the_band_is_capped_and_inside_it_charged_in_full(meter: Meter) -> None:
    uid, secret = funded(meter)
    band = PROMPT + PROMPT // 10 + 1_024  # an exact (local) count's band: 1,032
    inside = meter.authorize(secret, GPT4O, "req-inside")
    assert meter.settle(inside, usage=reported(band, 100)).quota == units_4o(band, 100)  # an overage, charged
    beyond = meter.authorize(secret, GPT4O, "req-beyond")
    receipt = meter.settle(beyond, usage=reported(band - 10, 100, cached_input_tokens=11))  # total band + 1
    # The input brought back to the hold's 8, the dearest bucket leaving first: 8 cached (0.625 a token) + 100 out.
    assert receipt.quota == math.ceil(Fraction(5, 8) * PROMPT + 5 * 100) == 505 <= beyond.amount
    with meter.engine.connect() as connection:
        stored = connection.execute(select(EVENTS.c.input_tokens, EVENTS.c.cached_input_tokens, EVENTS.c.output_tokens)
                                    .where(EVENTS.c.request_id == "req-beyond")).one()
    assert tuple(stored) == (0, PROMPT, 100)  # uncached input leaves first, then cached
    [row] = capped_rows(meter)
    assert row["field"] == "input_tokens" and row["uncharged_quota"] > 0
    assert meter.audit().ok


def test_an_estimated_prompt_has_the_wider_band_and_searches_are_held_by_their_uses(meter: Meter) -> None:
    _, secret = funded(meter)
    body = {"model": "claude-sonnet-4", "max_tokens": 1_000, "messages": [{"role": "user", "content": "news?"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]}
    hold = meter.authorize(secret, body, "req-search")
    assert hold.prompt_source == "estimated" and hold.max_web_searches == 2
    assert hold.max_input_tokens == hold.prompt_tokens + 2 * 32_000
    within = UsageRecord(provider="anthropic", model="claude-sonnet-4", input_tokens=2 * hold.max_input_tokens + 1_024,
                         output_tokens=1_000, web_search_requests=2)
    assert meter.settle(hold, usage=within).quota > hold.amount  # twice the estimate plus 1,024: charged in full
    other = meter.authorize(secret, body, "req-search-2")
    searches = UsageRecord(provider="anthropic", model="claude-sonnet-4", input_tokens=10, output_tokens=10,
                           web_search_requests=50)
    charged = meter.settle(other, usage=searches)
    assert charged.quota == math.ceil(Fraction(3, 2) * 10 + Fraction(15, 2) * 10 + 2 * 5_000)  # 2 searches, not 50
    [row] = capped_rows(meter)
    assert row["field"] == "web_search_requests" and row["uncharged_quota"] == 48 * 5_000
    assert meter.audit().ok


def test_a_stream_s_and_a_response_s_absurd_usage_are_capped_too(meter: Meter) -> None:
    _, secret = funded(meter)
    hold = meter.authorize(secret, {**GPT4O, "stream": True}, "req-stream")
    accumulator = meter.accumulator(hold)
    chunks = [{"choices": [{"index": 0, "delta": {"content": "hi"}}]},
              {"choices": [], "usage": {"prompt_tokens": PROMPT, "completion_tokens": 10**12}}]
    accumulator.feed(b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n")
    assert meter.settle(hold, stream=accumulator).quota == hold.amount
    answered = meter.authorize(secret, GPT4O, "req-response")
    response = {"model": "gpt-4o", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 10**9, "completion_tokens": 7}}
    assert meter.settle(answered, response=response).quota == units_4o(PROMPT, 7)
    rows = {row["request_id"]: row for row in capped_rows(meter)}
    assert (rows["req-stream"]["source"], rows["req-response"]["source"]) == ("settle_stream", "settle_response")
    assert meter.audit().ok


def test_a_local_count_beyond_the_budget_is_capped_without_a_row(meter: Meter) -> None:
    """Delivered text re-encoded may count more than the model's own tokens: the provider bills no more."""
    _, secret = funded(meter)
    hold = meter.authorize(secret, {**GPT4O, "max_tokens": 2}, "req-local")
    receipt = meter.settle(hold, usage=UsageRecord(provider="openai", model="gpt-4o", input_tokens=PROMPT,
                                                   output_tokens=5, source=UsageSource.LOCAL))
    assert receipt.quota == hold.amount and capped_rows(meter) == []


def test_the_rest_is_approved_once_by_an_operator(meter: Meter, ledger_url: str) -> None:
    uid, secret = funded(meter)
    hold = meter.authorize(secret, GPT4O, "req-1")
    meter.settle(hold, usage=reported(PROMPT, 300))  # 200 output tokens beyond max_tokens: 1,000 units kept
    [row] = capped_rows(meter)
    assert row["uncharged_quota"] == 1_000
    before = meter.balance(uid)
    runner = CliRunner()
    approved = runner.invoke(app, ["quarantine", "approve", str(row["id"]), "--db", ledger_url, "--json"])
    assert approved.exit_code == 0, approved.output
    assert json.loads(approved.stdout) == {"id": row["id"], "charged": 1_000}
    assert meter.balance(uid) == before - 1_000
    assert meter.approve_capped(row["id"]) == 0  # once
    again = runner.invoke(app, ["quarantine", "approve", str(row["id"]), "--db", ledger_url])
    assert again.exit_code == 0 and "nothing charged now" in again.stdout
    with pytest.raises(NotFound):
        meter.approve_capped(row["id"] + 100)
    for bad in (0, -1, True, "1", 2**40):
        with pytest.raises(InvalidField, match="quarantine_id"):
            meter.approve_capped(bad)  # type: ignore[arg-type]
    refused = runner.invoke(app, ["quarantine", "approve", "0", "--db", ledger_url])
    assert refused.exit_code == 2 and "ID" in refused.stderr
    listed = runner.invoke(app, ["quarantine", "list", "--db", ledger_url, "--json"])
    assert json.loads(listed.stdout)[0]["uncharged_quota"] == 1_000
    assert meter.balance(uid) == before - 1_000 and meter.audit().ok


def test_an_absurd_upstream_cannot_empty_the_balances(meter: Meter) -> None:
    """Every answer reports 10^12 output tokens: each request is charged its hold, nothing more."""
    users = [funded(meter, 5_000, f"user{i}") for i in range(3)]
    charged = 0
    for i in range(12):
        uid, secret = users[i % 3]
        hold = meter.authorize(secret, GPT4O, f"req-{i}")
        charged += meter.settle(hold, usage=reported(PROMPT, 10**12)).quota
    assert charged == 12 * units_4o(PROMPT, 100)
    assert all(meter.balance(uid) == 5_000 - 4 * 510 >= 0 for uid, _ in users)
    assert len(capped_rows(meter)) == 12 and meter.audit().ok


def test_the_close_re_prices_a_capped_charge_to_the_unit(meter: Meter) -> None:
    calendar = BusinessCalendar.from_env("UTC")
    day = datetime(2026, 11, 20, tzinfo=timezone.utc)
    _, secret = funded(meter)
    hold = meter.authorize(secret, GPT4O, "req-capped", at=day + timedelta(hours=3))
    meter.settle(hold, usage=reported(5_000, 10**9))
    result = close_day(meter, day.date(), calendar=calendar, now=day + timedelta(days=2))
    assert result.status == "closed"
    assert "price" not in (result.discrepancies or {})  # the stored figures are the charged ones
