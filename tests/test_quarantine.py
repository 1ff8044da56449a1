"""Rejected usage is kept, never dropped (docs/ledger.md, "Rejected usage"), on SQLite, PostgreSQL and MariaDB.

What is tested: a usage ``settle`` or ``record_usage`` refuses is stored in ``quarantined_usage`` with its
reason, field and payload, while the caller still gets the typed error; nothing else is written (balances,
holds, usage events, entries, key counters unchanged; the hold stays open); the same rejection retried is
one row with ``attempts`` counted, another payload another row; a stream's invalid usage chunk is billed
from the local count and kept as ``replaced``; what is stored is bounded, storable everywhere (NUL, lone
surrogates) and never holds a secret; the command line lists the rows and the audit counts them; a
quarantine that cannot be written still lets the typed error through.

Figures: gpt-4o at $2.50 in / $10 out per 1M tokens and 500,000 units per USD, so an input token is 1.25
units and an output token 5 (tests/test_ledger.py's docstring has the derivation); BODY counts 8 prompt
tokens, and max_tokens=100 reserves 10 + 500 = 510 units.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from metering.completion import ResponseError
from metering.ledger import InvalidField, KeyRejected, Meter, SettleConflict
from metering.ledger import quarantine
from metering.ledger.tables import (
    ApiKey, DailyRollup, Hold, LedgerEntry, QuarantinedUsage, RedemptionCode, TopupOrder, UsageEvent, User,
)
from pricing.errors import UnknownModel
from pricing.usage import InvalidUsage, UsageRecord

MODEL = "gpt-4o"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
HOLD_UNITS = 510
QUARANTINE = QuarantinedUsage.__table__  # type: ignore[attr-defined]
#: Every table a refused usage must leave alone.
LEDGER_TABLES = [t.__table__ for t in (User, ApiKey, Hold, UsageEvent, LedgerEntry, TopupOrder, RedemptionCode,  # type: ignore[attr-defined]
                                       DailyRollup)]


def snapshot(meter: Meter) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every ledger table (the quarantine excepted), in id order: what "nothing written" compares."""
    with meter.engine.connect() as connection:
        return {
            table.name: [tuple(row) for row in connection.execute(select(table).order_by(*table.primary_key.columns))]
            for table in LEDGER_TABLES
        }


def rows(meter: Meter) -> list[dict[str, Any]]:
    return quarantine.listing(meter._read)


def funded_key(meter: Meter, units: int = 1_000_000, name: str = "alice") -> tuple[int, str]:
    uid = meter.create_user(name)
    assert meter.adjust(uid, units, f"fund-{name}", "test funding")
    return uid, meter.create_key(uid, "k")


def test_a_refused_settle_is_kept_with_its_reason_and_nothing_else_is_written(meter: Meter) -> None:
    uid, secret = funded_key(meter)
    hold = meter.authorize(secret, BODY, "req-1")
    before = snapshot(meter)
    bad = {"model": MODEL, "choices": [{"message": {"role": "assistant", "content": "private answer"}}],
           "usage": {"prompt_tokens": 8, "completion_tokens": -3}}
    with pytest.raises(InvalidUsage) as refused:
        meter.settle(hold, response=bad)
    assert refused.value.field == "usage.completion_tokens"
    assert snapshot(meter) == before  # no event, no entry, no balance move; the hold is still open
    assert meter.balance(uid) == 1_000_000 - HOLD_UNITS
    assert meter.hold("req-1").id == hold.id and meter.audit().ok
    (row,) = rows(meter)
    assert row["source"] == "settle_response" and row["action"] == "refused" and row["error"] == "InvalidUsage"
    assert (row["request_id"], row["user_id"], row["key_id"], row["hold_id"], row["model"]) == (
        "req-1", uid, hold.key_id, hold.id, MODEL)
    assert row["field"] == "usage.completion_tokens" and "must not be negative" in row["reason"]
    assert row["attempts"] == 1 and row["settled"] is False
    payload = json.loads(row["payload"])
    assert payload["usage"] == {"prompt_tokens": 8, "completion_tokens": -3}
    assert "private answer" not in row["payload"]  # the generated text is not billing data

    # The same rejection retried: one row, two attempts. Another payload: another row.
    with pytest.raises(InvalidUsage):
        meter.settle(hold, response=bad)
    (row,) = rows(meter)
    assert row["attempts"] == 2 and row["last_seen_at"] >= row["created_at"]
    with pytest.raises(InvalidUsage):
        meter.settle(hold, usage=None, response={**bad, "usage": {"prompt_tokens": "8"}})
    assert [r["field"] for r in rows(meter)] == ["usage.prompt_tokens", "usage.completion_tokens"]
    assert snapshot(meter) == before

    # The caller settles with usage it stands behind: billed once; the rows now say so.
    receipt = meter.settle(hold, usage=UsageRecord(provider="openai", model=MODEL, input_tokens=8, output_tokens=3))
    assert receipt.quota == 25 and meter.balance(uid) == 1_000_000 - 25
    assert all(r["settled"] for r in rows(meter)) and meter.audit().ok


def test_refused_record_usage_is_kept_with_the_key_it_named(meter: Meter) -> None:
    uid, secret = funded_key(meter)
    key_id = meter.keys(uid)[0]["id"]
    good = UsageRecord(provider="openai", model=MODEL, input_tokens=10, output_tokens=2)
    before = snapshot(meter)
    with pytest.raises(UnknownModel):
        meter.record_usage(secret, "d-1", UsageRecord(provider="openai", model="gpt-99", input_tokens=1))
    with pytest.raises(InvalidField) as naive:
        meter.record_usage(secret, "d-2", good, at=datetime(2026, 1, 1))  # no time zone
    assert naive.value.field == "at"
    with pytest.raises(InvalidField):
        meter.record_usage(secret, "d-3", good, outcome="exploded")
    with pytest.raises(KeyRejected):
        meter.record_usage(secret + "x", "d-4", good)
    assert snapshot(meter) == before
    by_request = {r["request_id"]: r for r in rows(meter)}
    assert set(by_request) == {"d-1", "d-2", "d-3", "d-4"}
    assert all(r["source"] == "record_usage" and r["action"] == "refused" for r in by_request.values())
    assert (by_request["d-1"]["field"], by_request["d-1"]["user_id"], by_request["d-1"]["key_id"]) == ("model", uid, key_id)
    assert (by_request["d-2"]["field"], by_request["d-3"]["field"]) == ("at", "outcome")
    assert (by_request["d-4"]["user_id"], by_request["d-4"]["key_id"], by_request["d-4"]["field"]) == (None, None, "key")
    assert json.loads(by_request["d-2"]["payload"])["usage"]["input_tokens"] == 10

    # A conflicting retry of a recorded request: the first stays billed, the second is kept for review.
    assert meter.record_usage(secret, "d-5", good).quota == 23
    recorded = snapshot(meter)
    with pytest.raises(SettleConflict):
        meter.record_usage(secret, "d-5", UsageRecord(provider="openai", model=MODEL, input_tokens=10, output_tokens=9))
    assert snapshot(meter) == recorded
    conflict = next(r for r in rows(meter) if r["request_id"] == "d-5")
    assert conflict["error"] == "SettleConflict" and conflict["field"] == "usage" and conflict["settled"] is True
    assert json.loads(conflict["payload"])["usage"]["output_tokens"] == 9
    assert meter.audit().ok


def test_a_stream_with_an_invalid_usage_chunk_is_billed_locally_and_the_chunk_kept(meter: Meter) -> None:
    uid, secret = funded_key(meter)
    hold = meter.authorize(secret, BODY, "req-s")
    accumulator = meter.accumulator(hold)
    bad_usage = {"prompt_tokens": 8, "completion_tokens": 10**30}  # absurd: an overflowed counter
    for event in ({"choices": [{"index": 0, "delta": {"content": "Hello there"}}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": bad_usage}):
        accumulator.feed(f"data: {json.dumps(event)}\n\n".encode())
    accumulator.feed(b"data: [DONE]\n\n")
    receipt = meter.settle(hold, stream=accumulator)
    # Billed from the local count: 8 prompt tokens and "Hello there" = 2 o200k tokens -> ceil(10 + 10) = 20.
    assert (receipt.quota, receipt.source) == (20, "local")
    (row,) = rows(meter)
    assert (row["source"], row["action"], row["field"], row["settled"]) == ("settle_stream", "replaced",
                                                                             "usage.completion_tokens", True)
    assert json.loads(row["payload"])["usage"] == bad_usage
    assert meter.settle(hold, stream=accumulator) == receipt  # a retry: same receipt, the row counted once more
    (row,) = rows(meter)
    assert row["attempts"] == 2 and meter.balance(uid) == 1_000_000 - 20 and meter.audit().ok


def test_what_is_stored_is_bounded_storable_and_never_a_secret(meter: Meter) -> None:
    uid, secret = funded_key(meter)
    hold = meter.authorize(secret, BODY, "req-x\u00e9")
    response = {
        "model": MODEL, "api_key": secret, "headers": {"Authorization": f"Bearer {secret}"}, "password": "hunter2-plain",
        "note": f"leaked {secret} and rc-{'A' * 24}", "nul": "a\x00b", "surrogate": "x\ud800y", "emoji": "\U0001f600",
        "usage": {"prompt_tokens": 8, "completion_tokens": "3", "padding": "z" * 100_000},
    }
    with pytest.raises(InvalidUsage):
        meter.settle(hold, response=response)
    (row,) = rows(meter)
    assert len(row["payload"]) <= quarantine.MAX_PAYLOAD_CHARS and row["payload"].endswith("characters not stored]")
    with meter.engine.connect() as connection:
        stored = " ".join(str(v) for v in connection.execute(select(QUARANTINE)).one())
    assert secret not in stored and secret[7:] not in stored and "rc-AAAA" not in stored
    assert "hunter2-plain" not in stored  # a secret-named key's value, whatever its shape
    assert "[redacted]" in row["payload"] and row["request_id"] == "req-x\u00e9"
    payload = row["payload"]
    assert "\\u0000" in payload and "\\ud800" in payload and "\\ud83d\\ude00" in payload  # escaped, not lost


def test_a_bad_ticket_or_argument_is_kept_too(meter: Meter) -> None:
    uid, secret = funded_key(meter)
    hold = meter.authorize(secret, BODY, "req-t")
    before = snapshot(meter)
    usage = UsageRecord(provider="openai", model=MODEL, input_tokens=8, output_tokens=1)
    with pytest.raises(InvalidField) as channel:
        meter.settle(hold, usage=usage, channel="c" * 65)
    assert channel.value.field == "channel"
    with pytest.raises(InvalidUsage):
        meter.settle(hold, usage={"input_tokens": 8})  # type: ignore[arg-type]
    with pytest.raises(ResponseError):
        meter.settle(hold, response={"model": MODEL, "choices": "nope"})  # no usage, and nothing to count
    assert snapshot(meter) == before
    assert sorted(r["field"] for r in rows(meter)) == ["channel", "choices", "usage"]


def test_a_quarantine_that_cannot_be_written_still_raises_the_rejection(tmp_path: Path) -> None:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        _, secret = funded_key(meter)
        hold = meter.authorize(secret, BODY, "req-q")
        with meter.engine.begin() as connection:
            connection.execute(text("DROP TABLE quarantined_usage"))
        with pytest.raises(InvalidUsage) as refused:
            meter.settle(hold, response={"usage": {"prompt_tokens": -1}})
        assert any("could not be quarantined" in note for note in refused.value.__notes__)
    finally:
        meter.close()


def test_the_command_line_lists_them_and_the_audit_counts_them(tmp_path: Path) -> None:
    from workers.cli.main import app

    url = f"sqlite:///{tmp_path}/ledger.db"
    meter = Meter.open(url)
    try:
        _, secret = funded_key(meter)
        hold = meter.authorize(secret, BODY, "req-c")
        for bad in ({"prompt_tokens": -1, "completion_tokens": 1}, {"prompt_tokens": 1.5, "completion_tokens": 1}):
            with pytest.raises(InvalidUsage):
                meter.settle(hold, response={"usage": bad})
    finally:
        meter.close()
    runner = CliRunner()
    listed = runner.invoke(app, ["quarantine", "list", "--json", "--db", url])
    assert listed.exit_code == 0, listed.stderr
    assert [r["field"] for r in json.loads(listed.stdout)] == ["usage.prompt_tokens", "usage.prompt_tokens"]
    assert len(json.loads(runner.invoke(app, ["quarantine", "list", "--json", "--limit", "1", "--db", url]).stdout)) == 1
    assert json.loads(runner.invoke(app, ["quarantine", "list", "--json", "--request-id", "other", "--db", url]).stdout) == []
    table = runner.invoke(app, ["quarantine", "list", "--db", url], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "settle_response" in table.stdout and "req-c" in table.stdout
    audit = runner.invoke(app, ["audit", "--json", "--db", url])
    assert audit.exit_code == 0 and json.loads(audit.stdout) == {"ok": True, "violations": [], "quarantined": 2}
    human = runner.invoke(app, ["audit", "--db", url])
    assert human.exit_code == 0 and human.stdout.splitlines() == [
        "ok", "note: 2 rejected usage payloads in quarantine (metering quarantine list)"]
    nobody = runner.invoke(app, ["quarantine", "list", "--user", "nobody", "--db", url])
    assert nobody.exit_code == 2 and nobody.stderr.startswith("error: --user: no user 'nobody'")
    assert runner.invoke(app, ["quarantine", "list", "--limit", "0", "--db", url]).exit_code == 2


def test_a_late_settle_of_an_expired_hold_is_still_refused_and_kept(meter: Meter) -> None:
    """The rule holds whatever the hold's state: after expiry nothing is charged for a refused usage either."""
    uid, secret = funded_key(meter)
    hold = meter.authorize(secret, BODY, "req-e", at=datetime.now(UTC) - timedelta(hours=1))
    assert meter.expire_holds() == 1 and meter.balance(uid) == 1_000_000
    before = snapshot(meter)
    with pytest.raises(InvalidUsage):
        meter.settle(hold, response={"usage": {"prompt_tokens": 8, "completion_tokens": True}})
    assert snapshot(meter) == before
    (row,) = rows(meter)
    assert row["field"] == "usage.completion_tokens" and row["hold_id"] == hold.id
    with meter.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(QUARANTINE)).scalar_one() == 1
