"""Load: 8 processes x mixed operations on shared users, keys and codes, on SQLite and PostgreSQL.

Each forked process runs a seeded mix of authorize (a few retried with the same request id), settle (some
above the hold: the overage rule; some retried with the same usage), release (some then settled late),
record_usage, fold_deferred, expire_holds (with a clock 11 minutes ahead: other processes' holds expire
under them), topup (a few retried with the same reference), redeem (codes every process races for) and
grant, on the same 4 users and 8 keys. It keeps its own account of what it was credited and charged.

What must hold: no error reaches a caller but ``QuotaExceeded`` and ``DuplicateReference`` (business
outcomes, counted) and the typed, retryable ``LedgerBusy`` (retried with the same id, counted); the audit
is ok; the charge entries are exactly the settled and folded request ids, each charged once, and sum to
what the callers were charged; each balance equals its top-ups, grants and redemptions less its charges
(every hold is resolved at the end); no balance is below zero, and no limited key past its limit, by more
than the charges nothing reserved (overages, late settles, deferred usage: docs/ledger.md's overage rule).

Scale: 8 x 300 operations in `make test`, 8 x 5,000 under `make soak` (METERING_SOAK=1). Figures (with
METERING_FIGURES=path, one JSON line per database): operations, outcomes, LedgerBusy retries, seconds.
Prices: gpt-4o as in tests/test_ledger_model.py; top-ups at 500,000 units per USD.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from metering.counting import count_request
from metering.ledger import DuplicateReference, LedgerBusy, Meter, QuotaExceeded
from metering.ledger.database import make_engine
from metering.ledger.tables import ApiKey, Hold, LedgerEntry, RedemptionCode, UsageEvent
from tests.databases import scratch_database
from tests.faults import SOAK
from tests.test_ledger_model import BODY, prices, usage

WORKERS = 8
OPERATIONS = 5_000 if SOAK else 300
#: The shared customers: (name, USD topped up at the start). The poor ones get refused (QuotaExceeded).
CUSTOMERS = (("rich", "10"), ("middle", "1"), ("poor", "0.1"), ("broke", "0.01"))
START_UNITS = {"10": 5_000_000, "1": 500_000, "0.1": 50_000, "0.01": 5_000}  # USD x 500,000
KEY_LIMIT = 1_000_000  # each customer's limited key ($2)
CODE_WORTH = 1_000
CODES = max(64, OPERATIONS // 4)
KEYS, HOLDS, EVENTS = ApiKey.__table__, Hold.__table__, UsageEvent.__table__  # type: ignore[attr-defined]
ENTRIES, CODE_ROWS = LedgerEntry.__table__, RedemptionCode.__table__  # type: ignore[attr-defined]
BUSY_RETRIES = 50


# ---------------------------------------------------------------------------------------------- one process


class Worker:
    """One gateway process: its own Meter, a seeded mix of calls, and its own account of their results."""

    def __init__(self, url: str, number: int, keys: list[tuple[int, int, str]], users: list[int], codes: list[str]) -> None:
        self.meter = Meter(make_engine(url), prices())
        self.number, self.keys, self.users, self.codes = number, keys, users, codes
        self.rng = random.Random(f"load-{number}")
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.open: list[Any] = []  # my holds not resolved yet (another process's expiry may resolve them)
        self.settled: list[tuple[Any, Any, Any]] = []  # (hold, usage, receipt): for retried settles
        self.released: list[Any] = []
        self.charges: dict[str, tuple[int, int, int, int]] = {}  # request id -> (user, key, quota, overage)
        self.deferred: dict[str, tuple[int, int, int]] = {}  # request id -> (user, key, quota)
        self.credits: Counter[int] = Counter()  # user -> top-up and grant units credited by my calls
        self.redeemed: dict[int, int] = {}  # code index -> user, for the codes my calls won
        self.references: list[tuple[int, str, str, int]] = []  # (user, amount, reference, units)
        self.serial = 0

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn`` with ``LedgerBusy`` retried (same request id: exactly once); business outcomes returned."""
        for attempt in range(BUSY_RETRIES):
            try:
                return fn()
            except LedgerBusy:
                self.outcomes["LedgerBusy (retried)"] += 1
                time.sleep(0.01 * (attempt + 1))
            except (QuotaExceeded, DuplicateReference) as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 (every other error is a failure of the test)
                self.errors.append(f"{what}: {type(exc).__name__}: {exc}"[:500])
                return exc
        self.errors.append(f"{what}: still LedgerBusy after {BUSY_RETRIES} retries")
        return None

    def run(self, operations: int) -> None:
        """The mix: mostly requests (authorize then settle or release), some credits and deferred usage."""
        for _ in range(operations):
            roll = self.rng.random()
            if roll < 0.30 or not self.open and roll < 0.63:
                self.authorize()
            elif roll < 0.55:
                self.settle()
            elif roll < 0.63:
                self.release()
            elif roll < 0.73:
                self.record()
            elif roll < 0.76:
                self.fold()
            elif roll < 0.84:
                self.topup()
            elif roll < 0.91:
                self.redeem()
            elif roll < 0.95:
                self.grant()
            elif roll < 0.96:
                self.expire()
            else:
                self.retry_authorize()
        for hold, _, _ in self.open:  # every hold resolved at the end: balances then equal credits less charges
            if self.call("final release", lambda h=hold: self.meter.release(h)) is not True:
                self.outcomes["released after another process expired it"] += 1
        self.open.clear()

    def _rid(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.number}-{self.serial}"

    def authorize(self) -> None:
        """A new request on a random shared key (refused when the balance or the key's limit is short)."""
        key_id, user, secret = self.rng.choice(self.keys)
        # Mostly small requests (holds of 15 to 2,010 units), a quarter large ones (10,010 to 100,010 units).
        max_tokens = self.rng.choice([self.rng.randint(1, 400)] * 3 + [self.rng.randint(2_000, 20_000)])
        rid = self._rid("req")
        result = self.call("authorize", lambda: self.meter.authorize(secret, {**BODY, "max_tokens": max_tokens}, rid))
        if isinstance(result, QuotaExceeded):
            self.outcomes[f"QuotaExceeded ({result.scope})"] += 1
        elif result is not None and not isinstance(result, Exception):
            self.outcomes["authorized"] += 1
            self.open.append((result, max_tokens, secret))

    def retry_authorize(self) -> None:
        """An open request authorized again with its request id: the same hold."""
        if not self.open:
            return self.authorize()
        hold, max_tokens, secret = self.rng.choice(self.open)
        again = self.call("authorize retry", lambda: self.meter.authorize(secret, {**BODY, "max_tokens": max_tokens},
                                                                          hold.request_id))
        if again != hold:
            self.errors.append(f"a retried authorize of {hold.request_id} returned {again!r}, not its first hold")
        self.outcomes["authorize retried"] += 1

    def settle(self) -> None:
        """Settle an open hold (a third above the hold), or retry a settle, or settle a released hold late."""
        if self.settled and self.rng.random() < 0.05:  # a retried settle: the first receipt again
            hold, used, receipt = self.rng.choice(self.settled)
            again = self.call("settle retry", lambda: self.meter.settle(hold, usage=used))
            if again != receipt:
                self.errors.append(f"a retried settle of {hold.request_id} returned {again!r}, not {receipt!r}")
            self.outcomes["settle retried"] += 1
            return
        if self.released and self.rng.random() < 0.05:  # a settle after the hold was released: a late settle
            hold = self.released.pop()
            self._settle(hold, hold.amount // 10, "late settle")
            return
        hold, max_tokens, _ = self.open.pop(self.rng.randrange(len(self.open)))
        output = self.rng.choice([self.rng.randint(0, max_tokens), self.rng.randint(0, max_tokens),
                                  self.rng.randint(max_tokens, 2 * max_tokens + 50)])  # a third above: overage
        self._settle(hold, output, "settled")

    def _settle(self, hold: Any, output: int, label: str) -> None:
        used = usage(self.rng.randint(0, 40), output, self.rng.randint(0, 8))
        receipt = self.call("settle", lambda: self.meter.settle(hold, usage=used))
        if receipt is None or isinstance(receipt, Exception):
            return
        self.outcomes[label if receipt.overage == 0 else f"{label} with overage"] += 1
        self.charges[hold.request_id] = (hold.user_id, hold.key_id, receipt.quota, receipt.overage)
        self.settled.append((hold, used, receipt))

    def release(self) -> None:
        """The upstream call failed: release an open hold (False if another process expired it first)."""
        hold, _, _ = self.open.pop(self.rng.randrange(len(self.open)))
        released = self.call("release", lambda: self.meter.release(hold))
        self.outcomes["released" if released is True else "release found it expired"] += 1
        self.released.append(hold)

    def record(self) -> None:
        """Deferred usage on a random shared key."""
        key_id, user, secret = self.rng.choice(self.keys)
        rid, used = self._rid("deferred"), usage(self.rng.randint(0, 40), self.rng.randint(0, 400), 0)
        receipt = self.call("record_usage", lambda: self.meter.record_usage(secret, rid, used))
        if receipt is not None and not isinstance(receipt, Exception):
            self.deferred[rid] = (user, key_id, receipt.quota)
            self.outcomes["recorded"] += 1

    def fold(self) -> None:
        """Fold the pending deferred usage (every process does, at once)."""
        # One event per transaction (the worker's way) or many (an import's): both race the other processes.
        per_transaction = self.rng.choice([1, 5])
        folded = self.call("fold_deferred", lambda: self.meter.fold_deferred(per_transaction=per_transaction))
        self.outcomes["folded"] += folded if isinstance(folded, int) else 0

    def expire(self) -> None:
        """Expire holds with a clock 11 minutes ahead: other processes' open holds too."""
        later = datetime.now(UTC) + timedelta(minutes=11)  # past every hold's 10-minute TTL
        expired = self.call("expire_holds", lambda: self.meter.expire_holds(now=later))
        self.outcomes["expired"] += expired if isinstance(expired, int) else 0

    def topup(self) -> None:
        """A top-up with a new reference, or a retried webhook with one of mine."""
        if self.references and self.rng.random() < 0.1:  # a retried webhook: the same answer, credited once
            user, amount, reference, units = self.rng.choice(self.references)
            again = self.call("topup retry", lambda: self.meter.topup(user, amount, "USD", reference))
            if again != units:
                self.errors.append(f"a retried top-up {reference} returned {again!r}, not {units}")
            self.outcomes["topup retried"] += 1
            return
        user, amount, reference = self.rng.choice(self.users), self.rng.choice(["0.01", "0.1"]), self._rid("order")
        units = self.call("topup", lambda: self.meter.topup(user, amount, "USD", reference))
        if isinstance(units, int):
            self.credits[user] += units
            self.references.append((user, amount, reference, units))
            self.outcomes["topped up"] += 1

    def redeem(self) -> None:
        """Redeem one of the shared codes (every process races for them)."""
        user, index = self.rng.choice(self.users), self.rng.randrange(len(self.codes))
        result = self.call("redeem", lambda: self.meter.redeem(user, self.codes[index]))
        if isinstance(result, DuplicateReference):
            self.outcomes["DuplicateReference (code used)"] += 1
        elif isinstance(result, int):
            self.redeemed[index] = user
            self.outcomes["redeemed"] += 1

    def grant(self) -> None:
        """A grant to a random user (once per user and kind)."""
        user, kind = self.rng.choice(self.users), self.rng.choice(["signup", "github_star"])
        units = self.call("grant", lambda: self.meter.grant(user, kind))
        if isinstance(units, int):
            self.credits[user] += units
            self.outcomes["granted" if units else "grant given before"] += 1

    def report(self) -> dict[str, Any]:
        """Everything the parent checks, as plain data."""
        return {"outcomes": dict(self.outcomes), "errors": self.errors, "charges": self.charges,
                "deferred": self.deferred, "credits": dict(self.credits), "redeemed": self.redeemed}


def _work(url: str, number: int, operations: int, shared: dict[str, Any], barrier: Any, out: Any) -> None:
    """A forked process: wait for the others, run the mix, send the report back."""
    try:
        worker = Worker(url, number, shared["keys"], shared["users"], shared["codes"])
        barrier.wait(timeout=60)
        worker.run(operations)
        worker.meter.close()
        out.put(worker.report())
    except BaseException:  # noqa: BLE001 (the parent fails the test with it)
        out.put({"crash": traceback.format_exc()})


# ---------------------------------------------------------------------------------------------- the test


@pytest.fixture(params=("sqlite", "postgresql"))
def load_url(request: pytest.FixtureRequest, server_databases: Any, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file on tmpfs when there is one (every commit is synced), or PostgreSQL."""
    with scratch_database(request.param, server_databases, tmp_path, "ledger-load-") as url:
        yield url


@pytest.mark.timeout(3_600 if SOAK else 300)
def test_eight_processes_of_mixed_operations_keep_every_invariant(load_url: str) -> None:
    """8 forked processes x OPERATIONS calls on 4 users, 8 keys and CODES codes; then every invariant."""
    backend = load_url.split(":", 1)[0].split("+")[0]
    meter = Meter.open(load_url, prices=prices())
    users = [meter.create_user(name) for name, _ in CUSTOMERS]
    start = {}
    for uid, (name, usd) in zip(users, CUSTOMERS):
        start[uid] = meter.topup(uid, usd, "USD", f"start-{name}")
        assert start[uid] == START_UNITS[usd]
    keys = []
    for uid in users:
        for limit in (KEY_LIMIT, None):
            secret = meter.create_key(uid, f"k-{uid}-{limit}", limit_quota=limit)
            keys.append((max(k["id"] for k in meter.keys(uid)), uid, secret))
    limits = {key_id: limit for key_id, limit in ((k["id"], k["limit_quota"]) for k in meter.keys())}
    codes = meter.create_redemption_codes(CODES, CODE_WORTH)
    meter.engine.dispose()  # nothing pooled is shared with the forked processes
    count_request(BODY, "gpt-4o")  # the tokenizer is loaded once, here, and inherited

    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(WORKERS), context.Queue()
    shared = {"keys": keys, "users": users, "codes": codes}
    processes = [context.Process(target=_work, args=(load_url, n, OPERATIONS, shared, barrier, out)) for n in range(WORKERS)]
    began = time.monotonic()
    for process in processes:
        process.start()
    reports = [out.get(timeout=3_500 if SOAK else 280) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    seconds = time.monotonic() - began
    crashes = [r["crash"] for r in reports if "crash" in r]
    assert not crashes, crashes[0]

    # No error reached a caller but the business outcomes and the typed, retryable LedgerBusy.
    errors = [e for r in reports for e in r["errors"]]
    assert not errors, errors[:10]
    outcomes: Counter[str] = Counter()
    for r in reports:
        outcomes.update(r["outcomes"])
    assert outcomes["QuotaExceeded (user)"] > 0 and outcomes["authorized"] > 0, outcomes  # the mix did both

    folded = meter.fold_deferred()  # what no process folded yet
    report = meter.audit()
    assert report.ok, report.violations[:10]

    charges = {rid: c for r in reports for rid, c in r["charges"].items()}
    deferred = {rid: d for r in reports for rid, d in r["deferred"].items()}
    with meter.engine.connect() as c:
        entries = c.execute(select(ENTRIES.c.reference, ENTRIES.c.user_id, ENTRIES.c.amount)
                            .where(ENTRIES.c.kind == "charge")).all()
        twice = c.execute(select(ENTRIES.c.reference).where(ENTRIES.c.kind == "charge").group_by(ENTRIES.c.reference)
                          .having(func.count() > 1)).all()
        open_holds = c.execute(select(func.count()).select_from(HOLDS).where(HOLDS.c.status == "open")).scalar_one()
        pending = c.execute(select(func.count()).select_from(EVENTS).where(EVENTS.c.status == "pending")).scalar_one()
        redeemed = dict(c.execute(select(CODE_ROWS.c.code_hash, CODE_ROWS.c.redeemed_by)
                                  .where(CODE_ROWS.c.redeemed_by.is_not(None))).all())
        key_rows = {k: (used, reserved) for k, used, reserved in c.execute(
            select(KEYS.c.id, KEYS.c.used_quota, KEYS.c.reserved_quota).where(KEYS.c.limit_quota.is_not(None)))}
    # Each request id charged at most once, the charges are exactly the settled and folded requests, and
    # they sum to what the callers were told they were charged.
    assert twice == [] and len(entries) == len({ref for ref, _, _ in entries})
    assert {ref.removeprefix("charge:") for ref, _, _ in entries} == set(charges) | set(deferred)
    charged = {ref.removeprefix("charge:"): -amount for ref, _, amount in entries}
    assert all(charged[rid] == quota for rid, (_, _, quota, _) in charges.items())
    assert all(charged[rid] == quota for rid, (_, _, quota) in deferred.items())
    assert sum(charged.values()) == sum(c[2] for c in charges.values()) + sum(d[2] for d in deferred.values())
    assert (open_holds, pending) == (0, 0)

    # Each code credited once, to the process that was told so.
    winners = {index: user for r in reports for index, user in r["redeemed"].items()}
    assert sum(len(r["redeemed"]) for r in reports) == len(winners) == len(redeemed)
    from metering.ledger.meter import secret_hash

    assert {secret_hash(codes[i]): u for i, u in winners.items()} == redeemed

    # Each balance is its credits less its charges, and below zero by no more than what nothing reserved.
    credited: Counter[int] = Counter(start)
    for r in reports:
        credited.update({int(u): n for u, n in r["credits"].items()})
    for user in winners.values():
        credited[user] += CODE_WORTH
    spent: Counter[int] = Counter()
    unreserved: Counter[int] = Counter()
    key_used: Counter[int] = Counter()
    key_unreserved: Counter[int] = Counter()
    for user, key, quota, overage in charges.values():
        spent[user] += quota
        unreserved[user] += overage
        key_used[key] += quota
        key_unreserved[key] += overage
    for user, key, quota in deferred.values():
        spent[user] += quota
        unreserved[user] += quota
        key_used[key] += quota
        key_unreserved[key] += quota
    balances = {u["id"]: u["balance"] for u in meter.users()}
    assert balances == {user: credited[user] - spent[user] for user in users}
    assert all(balances[u] >= -unreserved[u] for u in users), (balances, unreserved)
    for key_id, (used, reserved) in key_rows.items():
        assert (used, reserved) == (key_used[key_id], 0)
        assert used <= limits[key_id] + key_unreserved[key_id], (key_id, used, key_unreserved[key_id])
    meter.close()

    operations = WORKERS * OPERATIONS
    path = os.environ.get("METERING_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as figures:
            figures.write(json.dumps({
                "test": f"load [{backend}]", "processes": WORKERS, "operations": operations,
                "seconds": round(seconds, 1), "outcomes": dict(outcomes), "folded_at_the_end": folded,
                "charges": len(entries), "below_zero": sorted(u for u in users if balances[u] < 0), "violations": 0,
            }, sort_keys=True) + "\n")
