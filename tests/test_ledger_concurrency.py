"""Real processes racing one ledger, on every database: nothing is reserved, charged or credited twice.

Six worker processes (``multiprocessing`` "spawn", started once for the module and reused, since one
start costs ~1.5 s of CPU here) each open their own ``Meter.open(url)`` for every race, wait on a
shared barrier so that they start together, and then hammer the same user, hold, request id, code,
top-up reference or key. The workers return plain tuples (``QuotaExceeded`` cannot be unpickled).

Price arithmetic used by every figure below (data/price_table.yaml, docs/price-table.md):
500,000 units = $1; gpt-4o is $2.50 per 1M input tokens and $10 per 1M output tokens; the signup grant
is $0.2 = 100,000 units; a USD top-up buys $1 of credit per dollar, so $10 = 5,000,000 units.
``BODY`` ("hello" to gpt-4o) counts 8 prompt tokens (the cookbook framing, as in test_ledger_smoke).
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from metering import DuplicateReference, Meter, QuotaExceeded
from metering.counting import count_request
from metering.ledger.tables import (
    GrantRecord,
    Hold,
    LedgerEntry,
    RedemptionCode,
    TopupOrder,
    UsageEvent,
)
from pricing.usage import UsageRecord

WORKERS = 6
BARRIER_TIMEOUT = 60.0  # the first race also waits for the workers to start
RACE_TIMEOUT = 120.0

MAX_TOKENS = 2_498
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": MAX_TOKENS}
#: Worst case of BODY: 8 x $2.50 + 2,498 x $10 per 1M = (20 + 24,980) / 1M = $0.025 -> x 500,000 = 12,500 units
#: exactly (no rounding), so a settle with WORST charges exactly the hold.
HOLD = 12_500
WORST = UsageRecord(provider="openai", model="gpt-4o", input_tokens=8, output_tokens=MAX_TOKENS)
SIGNUP = 100_000  # grants.signup: $0.2 x 500,000
TOPUP_USD, TOPUP_UNITS = "10", 5_000_000  # recharge rate "usd": $1 of credit per USD -> $10 x 500,000
TOPUP_AT = datetime(2026, 6, 1, tzinfo=UTC)  # inside the "usd" rate's window (from 2026-01-01)

HOLDS, ENTRIES, EVENTS = Hold.__table__, LedgerEntry.__table__, UsageEvent.__table__  # type: ignore[attr-defined]
CODES, ORDERS, GRANTS = RedemptionCode.__table__, TopupOrder.__table__, GrantRecord.__table__  # type: ignore[attr-defined]

# ---------------------------------------------------------------------------------------------- worker side

_BARRIER: Any = None
_PRICES: Any = None


def _init_worker(barrier: Any) -> None:
    """Runs once in each spawned worker: load what every race needs before any race starts."""
    global _BARRIER, _PRICES
    import psycopg  # noqa: F401  (the drivers, imported now rather than inside a race)
    import pymysql  # noqa: F401

    from pricing.table import load_price_table

    _BARRIER = barrier
    _PRICES = load_price_table()
    count_request(BODY, "gpt-4o")  # loads the o200k_base tokenizer


def _task(job: str, url: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One worker's part of a race: its own Meter, the barrier, then the job."""
    meter: Meter | None = None
    failure: Exception | None = None
    try:
        meter = Meter.open(url, prices=_PRICES)
    except Exception as exc:  # noqa: BLE001 (reported to the test after the barrier, not a hang)
        failure = exc
    _BARRIER.wait(timeout=BARRIER_TIMEOUT)
    if meter is None:
        return [("error", f"Meter.open: {type(failure).__name__}: {failure}")]
    try:
        return JOBS[job](meter, *args)
    except Exception as exc:  # noqa: BLE001 (any exception the job does not expect fails the test)
        return [("error", f"{type(exc).__name__}: {exc}")]
    finally:
        meter.close()


def _spend(meter: Meter, secret: str, worker: int, attempts: int, leave_odd_open: bool) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for attempt in range(attempts):
        try:
            hold = meter.authorize(secret, BODY, f"spend-{worker}-{attempt}")
        except QuotaExceeded as exc:
            out.append(("refused", exc.scope, exc.needed, exc.available))
            continue
        if leave_odd_open and attempt % 2:
            out.append(("held", hold.request_id, hold.amount))
            continue
        receipt = meter.settle(hold, usage=WORST)
        out.append(("charged", hold.amount, receipt.quota, receipt.overage))
    return out


def _settle_same(meter: Meter, hold: Any, usage: UsageRecord, repeats: int) -> list[tuple[Any, ...]]:
    return [("receipt", meter.settle(hold, usage=usage)) for _ in range(repeats)]


def _authorize_same(meter: Meter, secret: str, request_id: str, repeats: int) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for _ in range(repeats):
        ticket = meter.authorize(secret, BODY, request_id)
        out.append(("hold", ticket.id, ticket.amount, ticket.request_id, ticket.user_id))
    return out


def _redeem_all(meter: Meter, user_id: int, codes: list[str], worker: int) -> list[tuple[Any, ...]]:
    # Three starting points (two workers each), so every code is contested by two workers at once and
    # later by the rest.
    offset = (worker % 3) * len(codes) // 3
    order = list(range(offset, len(codes))) + list(range(offset))
    out: list[tuple[Any, ...]] = []
    for index in order:
        try:
            out.append(("credited", index, user_id, meter.redeem(user_id, codes[index])))
        except DuplicateReference:
            out.append(("used", index, user_id, 0))
    return out


def _topup_same(meter: Meter, user_id: int, reference: str, repeats: int) -> list[tuple[Any, ...]]:
    return [("credited", meter.topup(user_id, TOPUP_USD, "USD", reference, at=TOPUP_AT)) for _ in range(repeats)]


def _grant_same(meter: Meter, user_id: int, repeats: int) -> list[tuple[Any, ...]]:
    return [("granted", meter.grant(user_id, "signup")) for _ in range(repeats)]


JOBS: dict[str, Callable[..., list[tuple[Any, ...]]]] = {
    "spend": _spend, "settle_same": _settle_same, "authorize_same": _authorize_same, "redeem_all": _redeem_all,
    "topup_same": _topup_same, "grant_same": _grant_same,
}

# ---------------------------------------------------------------------------------------------- test side


class Racers:
    """The module's worker processes (spawned once) and the barrier they start each race on."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.barrier = context.Barrier(WORKERS)
        self.pool = context.Pool(WORKERS, initializer=_init_worker, initargs=(self.barrier,))

    def stop(self) -> None:
        self.pool.terminate()  # only the processes this pool started
        self.pool.join()

    def race(
        self, url: str, job: str, args_of: Callable[[int], tuple[Any, ...]], probe: Callable[[], Any] | None = None
    ) -> tuple[list[list[tuple[Any, ...]]], list[Any]]:
        """Run ``job`` in every worker at once; (each worker's outcomes, the probe's samples taken meanwhile)."""
        pending = [self.pool.apply_async(_task, (job, url, args_of(worker))) for worker in range(WORKERS)]
        samples: list[Any] = []
        deadline = time.monotonic() + RACE_TIMEOUT
        try:
            while not all(result.ready() for result in pending):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {job} race did not finish in {RACE_TIMEOUT:.0f} s")
                if probe is not None:
                    samples.append(probe())
                time.sleep(0.005)
            outcomes = [result.get(timeout=5) for result in pending]
        except BaseException:
            self.stop()  # a stuck or broken race must not leak into the next test
            self._start()
            raise
        errors = [o for per_worker in outcomes for o in per_worker if o[0] == "error"]
        assert not errors, errors
        return outcomes, samples


@pytest.fixture(scope="module")
def racers() -> Iterator[Racers]:
    pool = Racers()
    yield pool
    pool.stop()


def _flat(outcomes: list[list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    return [outcome for per_worker in outcomes for outcome in per_worker]


def _count(meter: Meter, table: Any, *where: Any) -> int:
    with meter.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def _assert_audit_ok(meter: Meter) -> None:
    report = meter.audit()
    assert report.ok, report.violations


def _dry_hold(meter: Meter, secret: str, user_id: int) -> int:
    """The hold of BODY, measured: authorize then release (the balance is back where it was)."""
    before = meter.balance(user_id)
    ticket = meter.authorize(secret, BODY, f"dry-{user_id}")
    assert meter.release(ticket) and meter.balance(user_id) == before
    return ticket.amount


# ---------------------------------------------------------------------------------------------- the races


def test_racing_spenders_get_exactly_what_the_balance_covers(racers: Racers, meter: Meter, ledger_url: str) -> None:
    uid = meter.create_user("spender")
    assert meter.grant(uid, "signup") == SIGNUP
    secret = meter.create_key(uid, "k")
    assert _dry_hold(meter, secret, uid) == HOLD  # the price arithmetic of HOLD, measured
    covered = SIGNUP // HOLD  # 100,000 // 12,500 = 8 requests, with nothing left over
    assert (covered, SIGNUP % HOLD) == (8, 0)
    attempts = 5  # 6 workers x 5 = 30 attempts for 8 requests

    outcomes, balances = racers.race(
        ledger_url, "spend", lambda w: (secret, w, attempts, False), probe=lambda: meter.balance(uid)
    )

    flat = _flat(outcomes)
    charged = [o for o in flat if o[0] == "charged"]
    refused = [o for o in flat if o[0] == "refused"]
    assert len(flat) == WORKERS * attempts
    assert len(charged) == covered and len(refused) == WORKERS * attempts - covered  # 8 and 22
    assert set(charged) == {("charged", HOLD, HOLD, 0)}  # charged exactly the hold, no overage
    # A refusal only happens once the 8 holds took the balance to 100,000 - 8 x 12,500 = 0.
    assert set(refused) == {("refused", "user", HOLD, 0)}
    assert all(b >= 0 for b in balances), min(balances)  # never overdrawn while racing
    assert meter.balance(uid) == SIGNUP - covered * HOLD == 0
    assert _count(meter, HOLDS, HOLDS.c.status == "settled") == covered
    assert _count(meter, ENTRIES, ENTRIES.c.kind == "charge") == covered
    _assert_audit_ok(meter)


def test_one_settle_sent_by_every_process_charges_once(racers: Racers, meter: Meter, ledger_url: str) -> None:
    uid = meter.create_user("settler")
    assert meter.grant(uid, "signup") == SIGNUP
    secret = meter.create_key(uid, "k")
    hold = meter.authorize(secret, BODY, "req-settle")
    assert hold.amount == HOLD and meter.balance(uid) == SIGNUP - HOLD  # 87,500 while the call runs
    usage = UsageRecord(provider="openai", model="gpt-4o", input_tokens=8, output_tokens=3)
    charge = 25  # 8 x $2.50 + 3 x $10 per 1M = $0.00005 -> x 500,000 = 25 units

    outcomes, _ = racers.race(ledger_url, "settle_same", lambda w: (hold, usage, 2))

    receipts = [o[1] for o in _flat(outcomes)]
    assert len(receipts) == WORKERS * 2 and len(set(receipts)) == 1  # every process, every retry: one receipt
    receipt = receipts[0]
    assert (receipt.request_id, receipt.hold_id, receipt.quota, receipt.overage) == ("req-settle", hold.id, charge, 0)
    assert meter.settle(hold, usage=usage) == receipt
    # The hold went back once and the charge was taken once: 100,000 - 12,500 + 12,500 - 25.
    assert meter.balance(uid) == SIGNUP - charge == 99_975
    assert _count(meter, EVENTS, EVENTS.c.request_id == "req-settle") == 1
    assert _count(meter, ENTRIES, ENTRIES.c.kind == "charge", ENTRIES.c.hold_id == hold.id) == 1
    assert _count(meter, ENTRIES, ENTRIES.c.kind == "release", ENTRIES.c.hold_id == hold.id) == 1
    _assert_audit_ok(meter)


def test_one_authorize_retried_by_every_process_reserves_once(racers: Racers, meter: Meter, ledger_url: str) -> None:
    uid = meter.create_user("retrier")
    assert meter.grant(uid, "signup") == SIGNUP
    secret = meter.create_key(uid, "k")

    outcomes, _ = racers.race(ledger_url, "authorize_same", lambda w: (secret, "req-same", 2))

    tickets = set(_flat(outcomes))
    assert len(_flat(outcomes)) == WORKERS * 2 and len(tickets) == 1, tickets  # one hold id for all 12 calls
    (_, hold_id, amount, request_id, user_id), = tickets
    assert (amount, request_id, user_id) == (HOLD, "req-same", uid)
    assert meter.balance(uid) == SIGNUP - HOLD == 87_500  # reserved once
    assert _count(meter, HOLDS) == 1 and meter.hold("req-same").id == hold_id
    assert _count(meter, ENTRIES, ENTRIES.c.kind == "hold") == 1
    _assert_audit_ok(meter)
    assert meter.release(meter.hold("req-same")) and meter.balance(uid) == SIGNUP
    _assert_audit_ok(meter)


def test_redemption_codes_raced_by_several_users_credit_once_each(racers: Racers, meter: Meter, ledger_url: str) -> None:
    users = [meter.create_user(f"redeemer-{w}") for w in range(WORKERS)]
    count, worth = 24, 1_000
    codes = meter.create_redemption_codes(count, worth, batch="race")

    outcomes, _ = racers.race(ledger_url, "redeem_all", lambda w: (users[w], codes, w))

    flat = _flat(outcomes)
    assert len(flat) == WORKERS * count  # every worker tried every code
    winners = Counter(o[1] for o in flat if o[0] == "credited")
    assert winners == Counter({index: 1 for index in range(count)})  # each code credited exactly once
    assert Counter(o[1] for o in flat if o[0] == "used") == Counter({index: WORKERS - 1 for index in range(count)})
    assert all(o[3] == worth for o in flat if o[0] == "credited")
    credited = sum(o[3] for o in flat)
    assert credited == count * worth == 24_000  # 24 codes x 1,000 units
    assert sum(meter.balance(u) for u in users) == credited
    for user in users:  # each user has exactly what it won
        assert meter.balance(user) == worth * sum(1 for o in flat if o[0] == "credited" and o[2] == user)
    assert _count(meter, CODES, CODES.c.redeemed_by.is_(None)) == 0
    assert _count(meter, ENTRIES, ENTRIES.c.kind == "redemption") == count
    _assert_audit_ok(meter)


def test_one_topup_reference_from_every_process_credits_once(racers: Racers, meter: Meter, ledger_url: str) -> None:
    uid = meter.create_user("payer")

    outcomes, _ = racers.race(ledger_url, "topup_same", lambda w: (uid, "order-race", 2))

    # Every process and retry gets the same answer, $10 x 500,000 = 5,000,000 units, credited once.
    assert _flat(outcomes) == [("credited", TOPUP_UNITS)] * (WORKERS * 2)
    assert meter.balance(uid) == TOPUP_UNITS
    assert _count(meter, ORDERS, ORDERS.c.reference == "order-race") == 1
    assert _count(meter, ENTRIES, ENTRIES.c.kind == "topup") == 1
    _assert_audit_ok(meter)


def test_one_signup_grant_from_every_process_credits_once(racers: Racers, meter: Meter, ledger_url: str) -> None:
    uid = meter.create_user("newcomer")

    outcomes, _ = racers.race(ledger_url, "grant_same", lambda w: (uid, 2))

    # Exactly one of the 12 calls credits $0.2 x 500,000 = 100,000 units; the 11 others credit 0.
    assert Counter(_flat(outcomes)) == Counter({("granted", SIGNUP): 1, ("granted", 0): WORKERS * 2 - 1})
    assert meter.balance(uid) == SIGNUP
    assert _count(meter, GRANTS, GRANTS.c.user_id == uid) == 1
    assert _count(meter, ENTRIES, ENTRIES.c.kind == "grant") == 1
    _assert_audit_ok(meter)


def test_a_limited_key_raced_never_exceeds_its_limit(racers: Racers, meter: Meter, ledger_url: str) -> None:
    uid = meter.create_user("limited")
    assert meter.topup(uid, TOPUP_USD, "USD", "order-limited", at=TOPUP_AT) == TOPUP_UNITS
    limit = 5 * HOLD + HOLD - 1  # 74,999: room for 5 holds of 12,500 (62,500), 12,499 short of a 6th
    secret = meter.create_key(uid, "k", limit_quota=limit)
    fits = limit // HOLD
    assert fits == 5
    attempts = 5  # 30 attempts x 12,500 = 375,000 < 5,000,000: the user's balance never refuses, only the key
    keys_seen: list[tuple[int, int]] = []

    def probe() -> None:
        (key,) = meter.keys(uid)
        keys_seen.append((key["reserved_quota"], key["used_quota"]))

    # Odd attempts keep their hold open, even ones settle it at the worst case: both count against the limit.
    outcomes, _ = racers.race(ledger_url, "spend", lambda w: (secret, w, attempts, True), probe=probe)

    flat = _flat(outcomes)
    held = [o for o in flat if o[0] == "held"]
    charged = [o for o in flat if o[0] == "charged"]
    refused = [o for o in flat if o[0] == "refused"]
    assert len(held) + len(charged) == fits and len(refused) == WORKERS * attempts - fits  # 5 and 25
    assert all(o[2] == HOLD for o in held) and set(charged) <= {("charged", HOLD, HOLD, 0)}
    # A refusal only happens once 5 x 12,500 are reserved or used: 74,999 - 62,500 = 12,499 left.
    assert set(refused) == {("refused", "key", HOLD, limit - fits * HOLD)}
    assert keys_seen and all(reserved + used <= limit for reserved, used in keys_seen), max(map(sum, keys_seen))
    (key,) = meter.keys(uid)
    assert (key["reserved_quota"], key["used_quota"]) == (len(held) * HOLD, len(charged) * HOLD)
    assert meter.balance(uid) == TOPUP_UNITS - fits * HOLD == 4_937_500
    _assert_audit_ok(meter)
    for _, request_id, _ in held:  # the calls that never settled: their holds go back
        assert meter.release(meter.hold(request_id))
    (key,) = meter.keys(uid)
    assert (key["reserved_quota"], key["used_quota"]) == (0, len(charged) * HOLD)
    assert meter.balance(uid) == TOPUP_UNITS - len(charged) * HOLD
    _assert_audit_ok(meter)

