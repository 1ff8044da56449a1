"""The ledger's semantics: holds and their TTL, the overage rule, key limits, key rejections (and the secret
never leaking), exactly-once settlement, local/stream settlement, deferred mode and credits.

Database-specific behaviour (conditional updates, unique constraints, timestamps, collations,
concurrency) runs on all three databases through ``ledger_url``; behaviour that only goes through
the same SQL as elsewhere (local counts, stream settlement, error bodies) runs on SQLite only.

Where the figures come from (every number asserted below is derived from these):

* data/price_table.yaml, gpt-4o version effective 2024-10-02: input $2.50, cached input $1.25, output
  $10.00 per 1M tokens; quota: 500,000 units = $1. So one input token is 1.25 units, one cached input
  token 0.625 units, one output token 5 units, and a charge is ceil(exact cost) (pricing/quote.py).
* BODY ("hello" in one user message) counts 8 prompt tokens for gpt-4o: 3 per message + 1 for the role
  + 1 for "hello" + 3 of reply priming (OpenAI cookbook framing, metering/openai_prompt.py).
* A hold is the worst case: 8 prompt tokens + max_tokens output = ceil(8 x 1.25 + 5 x max_tokens) =
  10 + 5 x max_tokens units; max_tokens=100 -> 510 units, max_tokens=1 -> 15 units.
* Credits: top-ups of USD at 1:1 (recharge rate ``usd``): "1" USD -> 500,000 units, "0.001" -> 500 units;
  grants signup = $0.2 -> 100,000 units. ``adjust`` credits an exact number of units.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from sqlalchemy import func, select

from metering import count_request
from metering.encodings import get_encoding
from metering.ledger import (
    DuplicateReference,
    HoldTicket,
    KeyRejected,
    Meter,
    NotFound,
    QuotaExceeded,
    SettleConflict,
)
from metering.ledger.meter import SECRET_PREFIX
from metering.ledger.tables import (
    ApiKey,
    GrantRecord,
    Hold,
    LedgerEntry,
    RedemptionCode,
    TopupOrder,
    UsageEvent,
    User,
)
from metering.streams import StreamAccumulator
from pricing.usage import UsageRecord

HOLDS, ENTRIES, EVENTS = Hold.__table__, LedgerEntry.__table__, UsageEvent.__table__  # type: ignore[attr-defined]
ALL_TABLES = [t.__table__ for t in (User, ApiKey, Hold, UsageEvent, LedgerEntry, TopupOrder, GrantRecord, RedemptionCode)]  # type: ignore[attr-defined]

MODEL = "gpt-4o"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
PROMPT_TOKENS = 8  # see the module docstring


def units(input_tokens: int, output_tokens: int, cached: int = 0) -> int:
    """gpt-4o quota: ceil(1.25 x input + 0.625 x cached input + 5 x output) (see the module docstring)."""
    return math.ceil(Fraction(5, 4) * input_tokens + Fraction(5, 8) * cached + 5 * output_tokens)


def hold_units(max_tokens: int) -> int:
    """The worst case reserved for BODY with ``max_tokens``: 10 + 5 x max_tokens."""
    return units(PROMPT_TOKENS, max_tokens)


def body(max_tokens: int = 100) -> dict[str, Any]:
    return {**BODY, "max_tokens": max_tokens}


def usage(input_tokens: int, output_tokens: int, cached: int = 0) -> UsageRecord:
    return UsageRecord(provider="openai", model=MODEL, input_tokens=input_tokens, cached_input_tokens=cached,
                       output_tokens=output_tokens)


@pytest.fixture
def sqlite_meter(tmp_path: Any) -> Any:
    """A Meter on an empty SQLite file (behaviour that is not database-specific)."""
    m = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    yield m
    m.close()


def funded(meter: Meter, units_: int, name: str = "alice") -> int:
    """A user credited exactly ``units_`` units (one adjustment)."""
    uid = meter.create_user(name)
    if units_:
        assert meter.adjust(uid, units_, f"fund-{name}", "test funding")
    return uid


def key_row(meter: Meter, key_id: int) -> dict[str, Any]:
    listing = meter.keys()
    return next(k for k in listing if k["id"] == key_id)


def only_key(meter: Meter, uid: int) -> dict[str, Any]:
    (row,) = meter.keys(uid)
    return row


def hold_status(meter: Meter, hold_id: int) -> str:
    with meter.engine.connect() as c:
        return c.execute(select(HOLDS.c.status).where(HOLDS.c.id == hold_id)).scalar_one()


def entries_of_hold(meter: Meter, hold_id: int) -> list[tuple[str, int]]:
    with meter.engine.connect() as c:
        rows = c.execute(select(ENTRIES.c.kind, ENTRIES.c.amount).where(ENTRIES.c.hold_id == hold_id).order_by(ENTRIES.c.id))
        return [(kind, int(amount)) for kind, amount in rows]


def count_charges(meter: Meter, request_id: str) -> int:
    with meter.engine.connect() as c:
        return c.execute(
            select(func.count()).select_from(ENTRIES).where(ENTRIES.c.kind == "charge", ENTRIES.c.reference == f"charge:{request_id}")
        ).scalar_one()


def assert_audit_ok(meter: Meter) -> None:
    report = meter.audit()
    assert report.ok, report.violations


# ============================================================================ holds and their TTL


def test_a_hold_expires_after_its_ttl_and_is_returned_once(meter: Meter) -> None:
    uid = funded(meter, 500_000)
    secret = meter.create_key(uid, "limited", limit_quota=10_000)
    hold = meter.authorize(secret, BODY, "req-1")
    assert hold.amount == 510  # 10 + 5 x 100
    assert hold.expires_at - hold.created_at == timedelta(minutes=10)  # DEFAULT_HOLD_TTL
    assert meter.balance(uid) == 500_000 - 510
    assert only_key(meter, uid)["reserved_quota"] == 510

    assert meter.expire_holds(now=hold.expires_at - timedelta(seconds=1)) == 0  # not yet
    assert meter.balance(uid) == 499_490 and hold_status(meter, hold.id) == "open"
    assert meter.expire_holds(now=hold.expires_at) == 1  # at the TTL
    assert meter.balance(uid) == 500_000 and hold_status(meter, hold.id) == "expired"
    assert only_key(meter, uid)["reserved_quota"] == 0

    # Returned once: a second sweep, a release and a later sweep change nothing.
    assert meter.expire_holds(now=hold.expires_at + timedelta(hours=1)) == 0
    assert meter.release(hold) is False
    assert meter.balance(uid) == 500_000
    assert entries_of_hold(meter, hold.id) == [("hold", -510), ("release", 510)]
    assert_audit_ok(meter)


def test_hold_ttl_setting_and_the_real_clock(ledger_url: str) -> None:
    meter = Meter.open(ledger_url, hold_ttl=timedelta(seconds=30))
    try:
        uid = funded(meter, 500_000)
        secret = meter.create_key(uid, "k")
        hold = meter.authorize(secret, BODY, "req-1")
        assert hold.expires_at - hold.created_at == timedelta(seconds=30)
        assert meter.expire_holds() == 0  # now < created + 30 s
        assert meter.expire_holds(now=hold.created_at + timedelta(seconds=31)) == 1
        assert meter.balance(uid) == 500_000
    finally:
        meter.close()
    instant = Meter.open(ledger_url, hold_ttl=timedelta(0))  # same database: expires at once
    try:
        uid = instant.find_user("alice")
        secret = instant.create_key(uid, "k2")
        hold = instant.authorize(secret, BODY, "req-2")
        assert instant.balance(uid) == 500_000 - 510
        assert instant.expire_holds() == 1  # the real clock, no ``now``
        assert instant.balance(uid) == 500_000
        assert_audit_ok(instant)
    finally:
        instant.close()


def test_a_settle_after_expiry_charges_exactly_once_and_never_releases_twice(meter: Meter) -> None:
    uid = funded(meter, 500_000)
    secret = meter.create_key(uid, "limited", limit_quota=10_000)
    hold = meter.authorize(secret, BODY, "req-1")
    assert meter.expire_holds(now=hold.expires_at + timedelta(minutes=1)) == 1
    assert meter.balance(uid) == 500_000

    receipt = meter.settle(hold, usage=usage(8, 3))
    assert receipt.quota == units(8, 3) == 25  # 8 x 1.25 + 3 x 5
    assert receipt.overage == 25  # nothing was reserved for it any more
    assert meter.balance(uid) == 500_000 - 25
    assert meter.settle(hold, usage=usage(8, 3)) == receipt  # retried: the same receipt, no second charge
    assert meter.release(hold) is False and meter.expire_holds(now=hold.expires_at + timedelta(days=1)) == 0
    assert meter.balance(uid) == 500_000 - 25
    assert entries_of_hold(meter, hold.id) == [("hold", -510), ("release", 510), ("charge", -25)]
    assert hold_status(meter, hold.id) == "expired"
    assert count_charges(meter, "req-1") == 1
    key = only_key(meter, uid)
    assert (key["reserved_quota"], key["used_quota"]) == (0, 25)
    assert_audit_ok(meter)


def test_a_settle_after_release_charges_once(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 1_000)
    hold = meter.authorize(meter.create_key(uid, "k"), BODY, "req-1")
    assert meter.release(hold) and not meter.release(hold)
    assert meter.settle(hold, usage=usage(8, 3)).quota == 25
    assert meter.balance(uid) == 1_000 - 25
    assert entries_of_hold(meter, hold.id) == [("hold", -510), ("release", 510), ("charge", -25)]
    assert_audit_ok(meter)


def test_a_settle_after_expiry_reports_its_unreserved_charge_as_overage(meter: Meter) -> None:
    # The overage rule: "the balance may go below zero by that overage only". After expiry the hold is
    # back in the balance, so nothing is reserved for the charge: all of it is overage (docs/ledger.md).
    uid = funded(meter, 510)
    secret = meter.create_key(uid, "k")
    late = meter.authorize(secret, BODY, "req-late")  # 510 reserved: balance 0
    assert meter.expire_holds(now=late.expires_at) == 1  # balance 510 again
    meter.authorize(secret, BODY, "req-other")  # spends it: balance 0
    receipt = meter.settle(late, usage=usage(8, 3))  # 25 units charged with nothing reserved
    assert (receipt.quota, receipt.overage) == (25, 25)
    assert meter.balance(uid) == -25 == -receipt.overage  # below zero by the overage only
    assert meter.settle(meter.hold("req-late"), usage=usage(8, 3)) == receipt  # a retry reports the same
    with pytest.raises(QuotaExceeded):
        meter.authorize(secret, body(1), "req-refused")
    released = meter.authorize(meter.create_key(funded(meter, 1_000, "bob"), "b"), BODY, "req-released")
    assert meter.release(released)
    assert meter.settle(released, usage=usage(808, 100)).overage == 1_510  # released first: all unreserved too
    assert_audit_ok(meter)


# ============================================================================ the overage rule


def test_overage_is_charged_in_full_then_authorizations_wait_for_a_topup(meter: Meter) -> None:
    uid = funded(meter, 510)  # exactly one hold of max_tokens=100
    secret = meter.create_key(uid, "k")
    hold = meter.authorize(secret, BODY, "req-1")
    assert hold.amount == 510 and meter.balance(uid) == 0

    # 808 input tokens where 8 were counted: inside the band (8 + 8 // 10 + 1,024, docs/ledger.md), a miss is
    # charged in full; output beyond max_tokens never is (test_redteam_upstream.py).
    receipt = meter.settle(hold, usage=usage(808, 100))
    assert receipt.quota == units(808, 100) == 1_510  # 1,010 + 500: charged in full
    assert receipt.overage == 1_510 - 510 == 1_000
    assert meter.balance(uid) == 510 - 1_510 == -receipt.overage  # below zero by the overage only
    assert_audit_ok(meter)

    for attempt, needed in enumerate((15, 510)):  # max_tokens=1 -> 15 units; 100 -> 510
        with pytest.raises(QuotaExceeded) as refused:
            meter.authorize(secret, body(1 if needed == 15 else 100), f"refused-{attempt}")
        assert (refused.value.needed, refused.value.available, refused.value.scope) == (needed, 0, "user")
    assert meter.balance(uid) == -1_000  # a refusal takes nothing

    assert meter.topup(uid, "0.002", "USD", "order-1") == 1_000  # $0.002 -> 1,000 units: balance 0
    with pytest.raises(QuotaExceeded) as still:
        meter.authorize(secret, body(1), "refused-2")
    assert (still.value.needed, still.value.available) == (15, 0)
    assert meter.topup(uid, "0.001", "USD", "order-2") == 500  # balance 500
    small = meter.authorize(secret, body(1), "req-2")
    assert small.amount == 15 and meter.balance(uid) == 485
    assert_audit_ok(meter)


def test_usage_below_the_hold_returns_the_rest(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 1_000)
    hold = meter.authorize(meter.create_key(uid, "k"), BODY, "req-1")
    receipt = meter.settle(hold, usage=usage(8, 0, cached=0))
    assert receipt.quota == 10 and receipt.overage == 0  # 8 x 1.25
    assert meter.balance(uid) == 990
    assert entries_of_hold(meter, hold.id) == [("hold", -510), ("release", 510), ("charge", -10)]


# ============================================================================ key counters and limits


def usage_events_of_key(meter: Meter, key_id: int) -> list[tuple[str, int]]:
    with meter.engine.connect() as c:
        rows = c.execute(select(EVENTS.c.request_id, EVENTS.c.quota).where(EVENTS.c.key_id == key_id).order_by(EVENTS.c.id))
        return [(r, int(q)) for r, q in rows]


def test_unlimited_keys_keep_their_counters_at_zero_and_their_usage_in_events(meter: Meter) -> None:
    uid = funded(meter, 500_000)
    first, second = meter.create_key(uid, "first"), meter.create_key(uid, "second")
    a = meter.authorize(first, BODY, "a")
    b = meter.authorize(second, BODY, "b")
    c = meter.authorize(first, BODY, "c")
    meter.settle(a, usage=usage(8, 3))  # 25
    meter.settle(b, usage=usage(808, 100))  # 1,510: overage does not touch an unlimited key either
    meter.release(c)
    for row in meter.keys(uid):
        assert (row["limit_quota"], row["used_quota"], row["reserved_quota"]) == (None, 0, 0)
    assert usage_events_of_key(meter, a.key_id) == [("a", 25)]
    assert usage_events_of_key(meter, b.key_id) == [("b", 1_510)]
    assert meter.balance(uid) == 500_000 - 25 - 1_510
    assert_audit_ok(meter)


def test_limited_key_counters_follow_holds_and_charges_and_the_limit_is_enforced(meter: Meter) -> None:
    uid = funded(meter, 500_000)  # the user can pay; only the key's limit refuses
    secret = meter.create_key(uid, "limited", limit_quota=1_000)
    key_id = only_key(meter, uid)["id"]

    def counters() -> tuple[int, int]:
        row = key_row(meter, key_id)
        return row["reserved_quota"], row["used_quota"]

    first = meter.authorize(secret, BODY, "r1")
    assert counters() == (510, 0)
    with pytest.raises(QuotaExceeded) as refused:  # room 1,000 - 510 = 490 < 510
        meter.authorize(secret, BODY, "r2")
    assert (refused.value.needed, refused.value.available, refused.value.scope) == (510, 490, "key")
    assert meter.balance(uid) == 500_000 - 510  # the refused hold took nothing from the user either

    meter.settle(first, usage=usage(8, 3))
    assert counters() == (0, 25)
    second = meter.authorize(secret, BODY, "r2")  # room 975
    assert counters() == (510, 25)
    assert meter.release(second) and not meter.release(second)
    assert counters() == (0, 25)
    with pytest.raises(QuotaExceeded) as too_big:  # max_tokens=200 -> 1,010 > 975
        meter.authorize(secret, body(200), "r3")
    assert (too_big.value.needed, too_big.value.available) == (1_010, 975)
    expiring = meter.authorize(secret, BODY, "r4")
    assert meter.expire_holds(now=expiring.expires_at) == 1
    assert counters() == (0, 25)

    # Overage on a limited key: used may pass the limit; then the key refuses everything.
    over = meter.authorize(secret, body(190), "r5")  # 960 <= 975
    meter.settle(over, usage=usage(848, 190))  # 2,010 (input inside the band: charged in full)
    assert counters() == (0, 2_035)
    with pytest.raises(QuotaExceeded) as exhausted:
        meter.authorize(secret, body(1), "r6")
    assert (exhausted.value.needed, exhausted.value.available, exhausted.value.scope) == (15, 0, "key")
    assert meter.balance(uid) == 500_000 - 25 - 2_010
    assert_audit_ok(meter)


def test_a_zero_limit_key_refuses_everything(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 500_000)
    secret = meter.create_key(uid, "zero", limit_quota=0)
    with pytest.raises(QuotaExceeded) as refused:
        meter.authorize(secret, body(1), "r1")
    assert (refused.value.needed, refused.value.available, refused.value.scope) == (15, 0, "key")
    with pytest.raises(ValueError):
        meter.create_key(uid, "negative", limit_quota=-1)


# ============================================================================ key rejections and the secret


def test_key_rejections(meter: Meter) -> None:
    uid = funded(meter, 500_000)
    good = meter.create_key(uid, "good")
    revoked = meter.create_key(uid, "revoked")
    expired = meter.create_key(uid, "expired", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    later = meter.create_key(uid, "later", expires_at=datetime.now(UTC) + timedelta(days=1))
    only_mini = meter.create_key(uid, "mini", models=["gpt-4o-mini"])
    ids = {row["name"]: row["id"] for row in meter.keys(uid)}
    assert meter.revoke_key(ids["revoked"]) is True and meter.revoke_key(ids["revoked"]) is False

    cases = [
        (SECRET_PREFIX + "x" * 43, 401, "invalid_api_key"),  # unknown
        (revoked, 401, "invalid_api_key"),
        (expired, 401, "invalid_api_key"),
        (only_mini, 403, "model_not_allowed"),
    ]
    for n, (secret, status, code) in enumerate(cases):
        with pytest.raises(KeyRejected) as rejected:
            meter.authorize(secret, BODY, f"rejected-{n}")
        answer_status, answer = rejected.value.openai_error()
        assert answer_status == status == rejected.value.http_status
        assert answer["error"]["code"] == code and answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["param"] is None and answer["error"]["message"] == str(rejected.value)
    with pytest.raises(KeyRejected) as no_model:
        meter.authorize(good, {"messages": BODY["messages"]}, "no-model")
    assert no_model.value.openai_error()[0] == 400
    assert meter.balance(uid) == 500_000  # no rejection took a hold
    with meter.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(HOLDS)).scalar_one() == 0

    assert meter.authorize(good, BODY, "ok-1").amount == 510
    assert meter.authorize(later, BODY, "ok-2").amount == 510
    mini = meter.authorize(only_mini, {**BODY, "model": "gpt-4o-mini"}, "ok-3")
    assert mini.model == "gpt-4o-mini"
    rows = {row["name"]: row for row in meter.keys(uid)}
    assert rows["revoked"]["status"] == "revoked" and rows["good"]["status"] == "enabled"
    assert rows["mini"]["models"] == ["gpt-4o-mini"] and rows["good"]["models"] is None
    assert rows["expired"]["expires_at"] is not None
    # The same rejections in deferred mode.
    with pytest.raises(KeyRejected):
        meter.record_usage(revoked, "deferred-1", usage(8, 3))
    with pytest.raises(KeyRejected) as wrong_model:
        meter.record_usage(only_mini, "deferred-2", usage(8, 3))
    assert wrong_model.value.http_status == 403


def test_the_secret_never_appears_in_errors_logs_key_listings_or_the_database(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: everything, SQLAlchemy's echo of SQL and parameters included
    for name in ("sqlalchemy.engine", "sqlalchemy.pool", "metering"):
        caplog.set_level(logging.DEBUG, logger=name)
    meter = Meter.open(ledger_url)
    try:
        uid = funded(meter, 510)
        secret = meter.create_key(uid, "k", models=["gpt-4o"])
        unknown = SECRET_PREFIX + "Zq9" * 14
        revoked = meter.create_key(uid, "r")
        meter.revoke_key(only_named(meter, "r"))
        texts: list[str] = []

        def rejected(call: Any) -> None:
            with pytest.raises((KeyRejected, QuotaExceeded)) as info:
                call()
            exc = info.value
            texts.extend([str(exc), repr(exc), json.dumps(exc.openai_error()), "".join(traceback.format_exception(exc)),
                          repr(vars(exc))])

        hold = meter.authorize(secret, BODY, "req-1")  # takes the whole balance
        texts.append(repr(hold))
        texts.append(repr(meter.settle(hold, usage=usage(8, 3))))
        rejected(lambda: meter.authorize(secret, {**BODY, "model": "gpt-4o-mini"}, "req-2"))  # model not allowed
        rejected(lambda: meter.authorize(secret, body(1000), "req-3"))  # quota
        rejected(lambda: meter.authorize(unknown, BODY, "req-4"))
        rejected(lambda: meter.authorize(revoked, BODY, "req-5"))
        rejected(lambda: meter.record_usage(unknown, "req-6", usage(1, 1)))
        texts.append(repr(meter.record_usage(secret, "req-7", usage(1, 1))))
        texts.append(json.dumps(meter.keys(), default=str))
        with meter.engine.connect() as c:  # every row of every table: only the hash is stored
            for table in ALL_TABLES:
                texts.append(repr(c.execute(select(table)).all()))
        texts.append(caplog.text)
        assert "INSERT INTO api_keys" in caplog.text  # the SQL echo was captured...
        assert "[SQL parameters hidden due to hide_parameters=True]" in caplog.text  # ...without its parameters
        everything = "\n".join(texts)
        for s in (secret, unknown, revoked):
            body_part = s[len(SECRET_PREFIX):]
            assert s not in everything and body_part not in everything
            assert body_part[:12] not in everything  # not even a long piece (the listing shows 4 characters)
        listing = meter.keys()
        assert all(row["prefix"].endswith("...") and len(row["prefix"]) == len(SECRET_PREFIX) + 7 for row in listing)
    finally:
        meter.close()


def only_named(meter: Meter, name: str) -> int:
    listing = meter.keys()
    (key_id,) = [row["id"] for row in listing if row["name"] == name]
    return key_id


# ============================================================================ exactly-once settlement


def test_settle_conflicts_and_retries(meter: Meter) -> None:
    uid = funded(meter, 500_000)
    secret = meter.create_key(uid, "k", limit_quota=10_000)
    hold = meter.authorize(secret, BODY, "req-1")
    receipt = meter.settle(hold, usage=usage(8, 3))
    assert (receipt.quota, receipt.request_id, receipt.hold_id, receipt.outcome) == (25, "req-1", hold.id, "completed")
    assert meter.settle(hold, usage=usage(8, 3)) == receipt  # same usage: the first receipt
    assert meter.settle(meter.hold("req-1"), usage=usage(8, 3)) == receipt  # from a ticket fetched again
    with pytest.raises(SettleConflict) as conflict:
        meter.settle(hold, usage=usage(8, 4))
    assert conflict.value.openai_error()[0] == 409
    cut = _stream_cut_after_its_usage(8, 3)
    assert cut.status == "aborted" and cut.usage == usage(8, 3)
    with pytest.raises(SettleConflict):  # the same counts with another outcome: a different payload too
        meter.settle(hold, stream=cut)
    assert meter.balance(uid) == 500_000 - 25 and count_charges(meter, "req-1") == 1
    assert only_key(meter, uid)["used_quota"] == 25
    assert_audit_ok(meter)


def _stream_cut_after_its_usage(prompt_tokens: int, completion_tokens: int) -> Any:
    """A stream whose usage chunk arrived but that ended with neither finish_reason nor [DONE]: aborted."""
    acc = StreamAccumulator(MODEL, prompt=count_request(BODY, MODEL))
    acc.feed(sse(chunk({"content": "Hi"}), usage_chunk(prompt_tokens, completion_tokens)))
    return acc.finish()


def test_authorize_retried_with_the_same_request_id_reserves_once(meter: Meter) -> None:
    uid = funded(meter, 500_000)
    secret = meter.create_key(uid, "k", limit_quota=10_000)
    hold = meter.authorize(secret, BODY, "req-1")
    again = meter.authorize(secret, BODY, "req-1")
    different_body = meter.authorize(secret, body(5), "req-1")  # a retry is the same request, whatever it says
    assert again.id == different_body.id == hold.id
    assert again.amount == different_body.amount == hold.amount == 510
    assert meter.balance(uid) == 500_000 - 510 and only_key(meter, uid)["reserved_quota"] == 510
    with pytest.raises(SettleConflict):  # the same request id from another key
        meter.authorize(meter.create_key(uid, "other"), BODY, "req-1")
    meter.settle(hold, usage=usage(8, 3))
    assert meter.authorize(secret, BODY, "req-1").id == hold.id  # even after settlement: no new hold
    assert meter.balance(uid) == 500_000 - 25
    assert_audit_ok(meter)


def test_authorize_retry_returns_an_equal_ticket(meter: Meter) -> None:
    # Microseconds survive the round trip on every database (MariaDB's plain DATETIME would drop them).
    uid = funded(meter, 500_000)
    secret = meter.create_key(uid, "k")
    at = datetime(2026, 3, 1, 12, 0, 0, 123_456, tzinfo=UTC)
    hold = meter.authorize(secret, BODY, "req-1", at=at)
    assert hold.created_at == at and hold.expires_at == at + timedelta(minutes=10)
    assert meter.authorize(secret, BODY, "req-1") == hold
    assert meter.hold("req-1") == hold
    assert meter.expire_holds(now=hold.expires_at - timedelta(microseconds=1)) == 0
    assert meter.expire_holds(now=hold.expires_at) == 1


def test_request_ids_references_and_names_are_case_sensitive(meter: Meter) -> None:
    # MariaDB's default collation is case-insensitive; the ledger's identifier columns are not.
    uid = meter.create_user("alice")
    assert meter.create_user("Alice") != uid
    # Payment ids are case-sensitive (e.g. base62): two orders, two credits.
    assert meter.topup(uid, "1", "USD", "pay_AbC") == 500_000
    assert meter.topup(uid, "1", "USD", "pay_abc") == 500_000
    assert meter.balance(uid) == 1_000_000
    secret = meter.create_key(uid, "k")
    upper = meter.authorize(secret, BODY, "req-A")
    lower = meter.authorize(secret, body(1), "req-a")
    assert (upper.request_id, lower.request_id) == ("req-A", "req-a") and upper.id != lower.id
    assert meter.balance(uid) == 1_000_000 - 510 - 15
    assert meter.adjust(uid, 1, "Ticket", "n") and meter.adjust(uid, 1, "ticket", "n")
    assert meter.balance(uid) == 1_000_000 - 525 + 2
    assert_audit_ok(meter)


def test_identifiers_with_surrounding_spaces_are_refused(tmp_path: Any) -> None:
    """MariaDB's collations compare 'pay_abc' and 'pay_abc ' as equal, so such ids are refused everywhere:
    a retried payment can never be mistaken for a new one (or the reverse) on any database."""
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        uid = meter.create_user("alice")
        assert meter.topup(uid, "1", "USD", "pay_abc") == 500_000
        with pytest.raises(ValueError, match="reference"):
            meter.topup(uid, "1", "USD", "pay_abc ")
        secret = meter.create_key(uid, "k")
        with pytest.raises(ValueError, match="request_id"):
            meter.authorize(secret, BODY, " req-a")
        with pytest.raises(ValueError, match="name"):
            meter.create_user("bob ")
        with pytest.raises(ValueError, match="reference"):
            meter.adjust(uid, 5, "adj-1 ", "spaces")
        assert meter.balance(uid) == 500_000  # nothing moved
    finally:
        meter.close()


# ============================================================================ settling from a response or a stream


def sse(*events: Any) -> bytes:
    """SSE bytes: a dict is a ``data:`` JSON event, a str a raw data value (``[DONE]``)."""
    return b"".join(
        ("data: " + (e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)) + "\n\n").encode() for e in events
    )


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """A chat.completion.chunk (OpenAI's "The chat completion chunk object")."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1764300000, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], "usage": None}


def usage_chunk(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    """The include_usage chunk (stream_options: {"include_usage": true}): empty choices, the request's usage."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1764300000, "model": "gpt-4o-2024-08-06",
            "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens,
                                     "prompt_tokens_details": {"cached_tokens": cached},
                                     "completion_tokens_details": {"reasoning_tokens": 0}}}


O200K = get_encoding("o200k_base")


def test_settle_from_a_response_without_usage_counts_locally_with_the_holds_prompt(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 1_000)
    hold = meter.authorize(meter.create_key(uid, "k"), BODY, "req-1")
    assert hold.prompt_tokens == PROMPT_TOKENS and hold.prompt_source == "local"
    response = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}]}
    output = len(O200K.encode_ordinary("Hi!"))
    assert output == 2  # "Hi" "!"
    receipt = meter.settle(hold, response=response)
    assert receipt.quota == units(8, 2) == 20  # 8 x 1.25 + 2 x 5
    assert receipt.source == "local" and receipt.outcome == "completed"
    assert meter.balance(uid) == 1_000 - 20
    with meter.engine.connect() as c:
        row = c.execute(select(EVENTS).where(EVENTS.c.request_id == "req-1")).mappings().one()
    assert (row["input_tokens"], row["output_tokens"], row["source"]) == (8, 2, "local")
    # A response with upstream usage bills the upstream figures instead.
    upstream = meter.authorize(meter.create_key(uid, "k2"), BODY, "req-2")
    receipt = meter.settle(upstream, response={**response, "usage": {"prompt_tokens": 9, "completion_tokens": 4}})
    assert receipt.quota == units(9, 4) == 32 and receipt.source == "upstream"  # ceil(11.25 + 20)


def test_settle_from_a_stream_with_an_include_usage_chunk(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 1_000)
    hold = meter.authorize(meter.create_key(uid, "k"), BODY, "req-1")
    data = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), chunk({"content": " there"}),
               chunk({}, "stop"), usage_chunk(8, 2, cached=4), "[DONE]")
    acc = StreamAccumulator(MODEL, prompt=count_request(BODY, MODEL))
    for start in range(0, len(data), 7):  # split anywhere, even inside UTF-8 and JSON
        acc.feed(data[start:start + 7])
    receipt = meter.settle(hold, stream=acc)
    # Upstream figures: 4 uncached + 4 cached input, 2 output: 4 x 1.25 + 4 x 0.625 + 2 x 5 = 17.5 -> 18.
    assert receipt.quota == units(4, 2, cached=4) == 18
    assert (receipt.outcome, receipt.source) == ("completed", "upstream")
    assert meter.balance(uid) == 1_000 - 18
    assert meter.settle(hold, stream=acc) == receipt  # the accumulator's result is final: a retry is the same
    assert_audit_ok(meter)


def test_settle_from_a_cut_stream_bills_what_got_through(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 1_000)
    hold = meter.authorize(meter.create_key(uid, "k"), BODY, "req-1")
    acc = StreamAccumulator(MODEL, prompt=count_request(BODY, MODEL))
    acc.feed(sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), chunk({"content": " there"})))
    acc.feed(b'data: {"id": "chatcmpl-1", "choi')  # the connection drops mid-event
    result = acc.finish()
    assert result.status == "aborted" and result.text == "Hello there"
    output = len(O200K.encode_ordinary("Hello there"))
    assert output == 2  # "Hello" " there"
    receipt = meter.settle(hold, stream=result)  # a StreamResult works as well as the accumulator
    assert receipt.quota == units(8, 2) == 20  # the prompt's 8 tokens + 2 delivered output tokens
    assert (receipt.outcome, receipt.source) == ("aborted", "local")
    assert meter.balance(uid) == 1_000 - 20
    with meter.engine.connect() as c:
        assert c.execute(select(EVENTS.c.outcome).where(EVENTS.c.request_id == "req-1")).scalar_one() == "aborted"
    assert_audit_ok(meter)


def test_settle_takes_exactly_one_source(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 1_000)
    hold = meter.authorize(meter.create_key(uid, "k"), BODY, "req-1")
    with pytest.raises(ValueError):
        meter.settle(hold)
    with pytest.raises(ValueError):
        meter.settle(hold, usage=usage(1, 1), response={"choices": []})
    assert meter.balance(uid) == 490 and hold_status(meter, hold.id) == "open"


# ============================================================================ release and QuotaExceeded


def test_release_returns_the_hold_exactly_once(meter: Meter) -> None:
    uid = funded(meter, 1_000)
    secret = meter.create_key(uid, "k", limit_quota=600)
    hold = meter.authorize(secret, BODY, "req-1")
    assert meter.balance(uid) == 490 and only_key(meter, uid)["reserved_quota"] == 510
    assert meter.release(hold) is True
    assert meter.release(hold) is False and meter.release(meter.hold("req-1")) is False
    assert meter.balance(uid) == 1_000 and only_key(meter, uid)["reserved_quota"] == 0
    assert entries_of_hold(meter, hold.id) == [("hold", -510), ("release", 510)]
    assert meter.expire_holds(now=hold.expires_at) == 0  # a released hold does not expire again
    settled = meter.authorize(secret, BODY, "req-2")
    meter.settle(settled, usage=usage(8, 3))
    assert meter.release(settled) is False and meter.balance(uid) == 1_000 - 25
    assert_audit_ok(meter)


def test_quota_exceeded_carries_the_figures_and_an_openai_error(sqlite_meter: Meter) -> None:
    meter = sqlite_meter
    uid = funded(meter, 300)
    secret = meter.create_key(uid, "k")
    with pytest.raises(QuotaExceeded) as refused:
        meter.authorize(secret, BODY, "req-1")
    exc = refused.value
    assert (exc.needed, exc.available, exc.scope) == (510, 300, "user")
    status, answer = exc.openai_error()
    assert status == 429
    assert answer == {"error": {"message": str(exc), "type": "insufficient_quota", "param": None,
                                "code": "insufficient_quota"}}
    assert "510" in str(exc) and "300" in str(exc)
    keyed = meter.create_key(uid, "limited", limit_quota=100)
    with pytest.raises(QuotaExceeded) as by_key:
        meter.authorize(keyed, body(40), "req-2")  # 10 + 200 = 210 <= 300 but > 100
    assert (by_key.value.needed, by_key.value.available, by_key.value.scope) == (210, 100, "key")
    assert "limit" in str(by_key.value) and by_key.value.openai_error()[0] == 429
    assert meter.balance(uid) == 300


# ============================================================================ deferred mode


def test_deferred_mode_records_once_and_folds_each_event_once(meter: Meter) -> None:
    uid = funded(meter, 1_000)
    unlimited = meter.create_key(uid, "u")
    limited = meter.create_key(uid, "l", limit_quota=50_000)
    first = meter.record_usage(unlimited, "d-1", usage(8, 3))  # 25
    assert first.quota == 25 and first.hold_id is None and first.overage == 0
    assert meter.record_usage(unlimited, "d-1", usage(8, 3)) == first  # recorded once
    with pytest.raises(SettleConflict):
        meter.record_usage(unlimited, "d-1", usage(8, 4))
    assert meter.record_usage(limited, "d-2", usage(100, 100)).quota == units(100, 100) == 625  # 125 + 500
    assert meter.record_usage(limited, "d-3", usage(0, 0, cached=3)).quota == 2  # ceil(1.875)
    assert meter.balance(uid) == 1_000  # nothing charged before the fold
    with meter.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(EVENTS)).scalar_one() == 3
    assert_audit_ok(meter)

    assert meter.fold_deferred() == 3
    assert meter.balance(uid) == 1_000 - 25 - 625 - 2
    assert meter.fold_deferred() == 0 and meter.balance(uid) == 348  # folding again charges nothing more
    rows = {row["name"]: row for row in meter.keys(uid)}
    assert (rows["l"]["used_quota"], rows["l"]["reserved_quota"]) == (627, 0)
    assert (rows["u"]["used_quota"], rows["u"]["reserved_quota"]) == (0, 0)
    assert meter.record_usage(unlimited, "d-1", usage(8, 3)) == first  # a retry after the fold: still once
    assert meter.fold_deferred() == 0
    for request_id in ("d-1", "d-2", "d-3"):
        assert count_charges(meter, request_id) == 1
    assert meter.record_usage(unlimited, "d-4", usage(1, 1)).quota == 7  # ceil(6.25)
    assert meter.fold_deferred(limit=10) == 1 and meter.balance(uid) == 341
    assert_audit_ok(meter)


# ============================================================================ credits


def test_topup_references_redemption_codes_adjustments_and_grants(meter: Meter) -> None:
    alice, bob = meter.create_user("alice"), meter.create_user("bob")
    assert meter.topup(alice, "1", "USD", "order-1") == 500_000
    assert meter.topup(alice, "1", "USD", "order-1") == 500_000  # a retried webhook: credited once
    assert meter.topup(alice, 1, "USD", "order-1") == 500_000  # the same amount as an int
    with pytest.raises(DuplicateReference) as other_amount:
        meter.topup(alice, "2", "USD", "order-1")
    assert other_amount.value.openai_error()[0] == 409
    with pytest.raises(DuplicateReference):
        meter.topup(bob, "1", "USD", "order-1")  # the same reference for another user
    with pytest.raises(DuplicateReference):
        meter.topup(alice, "1", "USDT", "order-1")  # or another currency
    assert meter.balance(alice) == 500_000 and meter.balance(bob) == 0

    codes = meter.create_redemption_codes(2, 1_234, batch="b1")
    assert len(set(codes)) == 2
    assert meter.redeem(bob, codes[0]) == 1_234
    with pytest.raises(DuplicateReference):
        meter.redeem(bob, codes[0])
    with pytest.raises(DuplicateReference):
        meter.redeem(alice, codes[0])
    with pytest.raises(NotFound):
        meter.redeem(alice, "rc-not-a-code")
    assert meter.redeem(alice, codes[1]) == 1_234
    assert (meter.balance(alice), meter.balance(bob)) == (501_234, 1_234)

    assert meter.adjust(bob, -234, "ticket-7", "refund correction") is True
    assert meter.adjust(bob, -234, "ticket-7", "refund correction") is False  # once per reference
    assert meter.balance(bob) == 1_000
    assert meter.grant(bob, "signup") == 100_000 and meter.grant(bob, "signup") == 0  # $0.2, once
    assert meter.balance(bob) == 101_000
    assert_audit_ok(meter)


def test_reused_references_with_other_content_and_unknown_users_are_typed_errors(meter: Meter) -> None:
    uid, other = meter.create_user("alice"), meter.create_user("bob")
    assert meter.adjust(uid, 100, "ticket-1", "goodwill") is True
    assert meter.adjust(uid, 100, "ticket-1", "goodwill") is False  # a retry: posted once
    for user, amount, note in ((uid, 5_000, "goodwill"), (other, 100, "goodwill"), (uid, 100, "another note")):
        with pytest.raises(DuplicateReference):
            meter.adjust(user, amount, "ticket-1", note)
    missing = other + 1_000
    for call in (lambda: meter.adjust(missing, 100, "ticket-2", "no such user"),  # not "posted before"
                 lambda: meter.topup(missing, "1", "USD", "order-9"), lambda: meter.grant(missing, "signup"),
                 lambda: meter.redeem(missing, meter.create_redemption_codes(1, 10)[0])):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(DuplicateReference):
        meter.create_user("alice")
    with pytest.raises(ValueError):
        meter.create_user("123")  # digits name a user id
    assert (meter.balance(uid), meter.balance(other)) == (100, 0)
    assert_audit_ok(meter)


# ============================================================================ concurrency


def _parallel(count: int, work: Any) -> list[Any]:
    barrier = threading.Barrier(count)

    def run(i: int) -> Any:
        barrier.wait()
        try:
            return work(i)
        except Exception as exc:  # noqa: BLE001 (returned for the assertions)
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_authorizations_never_reserve_more_than_there_is(meter: Meter) -> None:
    uid = funded(meter, 3 * 510 + 100)  # room for exactly three 510-unit holds
    secret = meter.create_key(uid, "k")
    results = _parallel(8, lambda i: meter.authorize(secret, BODY, f"req-{i}"))
    assert sum(isinstance(r, HoldTicket) for r in results) == 3, results
    assert all(isinstance(r, (HoldTicket, QuotaExceeded)) for r in results), results
    assert meter.balance(uid) == 100
    # The same against a key limit.
    rich = funded(meter, 500_000, "bob")
    limited = meter.create_key(rich, "l", limit_quota=2 * 510 + 100)
    results = _parallel(8, lambda i: meter.authorize(limited, BODY, f"bob-{i}"))
    assert sum(isinstance(r, HoldTicket) for r in results) == 2, results
    assert only_key(meter, rich)["reserved_quota"] == 1_020
    assert_audit_ok(meter)


def test_concurrent_retries_reserve_and_charge_once(meter: Meter) -> None:
    uid = funded(meter, 500_000)
    secret = meter.create_key(uid, "k", limit_quota=100_000)
    holds = _parallel(6, lambda i: meter.authorize(secret, BODY, "req-1"))
    assert all(isinstance(h, HoldTicket) for h in holds), holds
    assert len({h.id for h in holds}) == 1
    assert meter.balance(uid) == 500_000 - 510
    receipts = _parallel(6, lambda i: meter.settle(holds[0], usage=usage(8, 3)))
    assert all(r == receipts[0] for r in receipts), receipts
    assert meter.balance(uid) == 500_000 - 25 and count_charges(meter, "req-1") == 1
    codes = meter.create_redemption_codes(1, 777)
    users = [meter.create_user(f"u{i}") for i in range(4)]
    redeemed = _parallel(4, lambda i: meter.redeem(users[i], codes[0]))
    assert sum(r == 777 for r in redeemed) == 1 and sum(isinstance(r, DuplicateReference) for r in redeemed) == 3
    assert sum(meter.balance(u) for u in users) == 777
    assert_audit_ok(meter)


def test_key_usage_is_what_the_key_spent_and_what_it_can_still_spend(meter: Meter) -> None:
    uid = funded(meter, 10_000)
    open_key = meter.create_key(uid, "open", models=["gpt-4o-mini"])  # a model list does not hide the balance
    capped = meter.create_key(uid, "capped", limit_quota=3_000)
    receipt = meter.settle(meter.authorize(capped, body(100), "ku-1"), usage=usage(PROMPT_TOKENS, 20))
    assert receipt.quota == units(PROMPT_TOKENS, 20)  # 10 + 100 = 110 units (module docstring)
    held = meter.authorize(capped, body(100), "ku-2")  # an open hold counts against what is left
    capped_now = meter.key_usage(capped)
    assert capped_now["used"] == 110
    assert capped_now["remaining"] == 3_000 - 110 - held.amount  # the key's limit binds before the balance
    open_now = meter.key_usage(open_key)
    assert (open_now["used"], open_now["remaining"]) == (0, 10_000 - 110 - held.amount)  # the balance binds
    meter.release(held)
    meter.revoke_key(meter.keys(uid)[1]["id"])
    with pytest.raises(KeyRejected):
        meter.key_usage(capped)
    with pytest.raises(KeyRejected):
        meter.key_usage("sk-mtr-unknown")
