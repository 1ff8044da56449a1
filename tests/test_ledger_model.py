"""The ledger against a model: random sequences of operations on the real ``Meter`` and on a plain
in-memory ledger written here (dicts of balances, holds and key counters), compared after every step.

Operations: create users, top up (sometimes reusing a reference), grant, adjust, create limited and
unlimited keys, revoke, authorize (sometimes retrying a request id), settle with random usage (often
above the hold: the overage rule), release, let time pass and expire holds, redemption codes, and
deferred usage with its fold. After every step: balances, hold states and key counters equal the
model's, ``audit()`` is ok, every charge was made once, and no balance is below zero by more than the
charges that nothing reserved (overages, late settlements, deferred charges) and debit adjustments.

Figures (see tests/test_ledger.py): gpt-4o is 1.25 units per input token, 0.625 per cached input
token, 5 per output token, a charge is the ceiling; BODY has 8 prompt tokens, so a hold for
``max_tokens`` is 10 + 5 x max_tokens. Top-ups are USD at 1:1 (500,000 units per $1); grants: signup
$0.2 = 100,000 units, github_star $1 = 500,000 units.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from metering.ledger import (
    DuplicateReference,
    HoldTicket,
    KeyRejected,
    Meter,
    QuotaExceeded,
    Receipt,
    SettleConflict,
)
from metering.ledger.tables import Hold, LedgerEntry
from pricing.table import PriceTable, load_price_table
from pricing.usage import UsageRecord
from tests.databases import fresh_database

HOLDS, ENTRIES = Hold.__table__, LedgerEntry.__table__  # type: ignore[attr-defined]
MODEL = "gpt-4o"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
TTL = timedelta(minutes=10)
GRANTS = {"signup": 100_000, "github_star": 500_000}
#: Hold sizes: mostly affordable (15 to 1,510 units), sometimes far above any balance (up to 150,010).
MAX_TOKENS = st.one_of(st.integers(1, 300), st.integers(1, 300), st.integers(300, 30_000))
LIMITS = st.one_of(st.none(), st.integers(0, 100_000))  # half of the keys have a limit
RETRY = st.sampled_from([False, False, False, True])  # a quarter of the calls retry an earlier request id
TOPUPS = {"0.001": 500, "0.002": 1_000, "0.01": 5_000, "0.1": 50_000}  # USD -> units at 500,000 per $1


@functools.cache
def prices() -> PriceTable:
    """The bundled price table, loaded once for every run of the machine."""
    return load_price_table()


def units(input_tokens: int, output_tokens: int, cached: int = 0) -> int:
    """gpt-4o quota: ceil(1.25 x input + 0.625 x cached + 5 x output)."""
    return math.ceil(Fraction(5, 4) * input_tokens + Fraction(5, 8) * cached + 5 * output_tokens)


def hold_units(max_tokens: int) -> int:
    return units(PROMPT, max_tokens)  # BODY's 8 prompt tokens + the worst-case output


#: BODY's prompt tokens (the hold's input) and the band beyond which a reported input is capped to them.
PROMPT = 8
BAND = PROMPT + PROMPT // 10 + 1_024  # docs/ledger.md, "Upstream usage is checked": an exact count's band


def charged_units(used: UsageRecord, max_tokens: int) -> int:
    """What settle charges for ``used`` on a hold of ``max_tokens``: the output capped at the budget, an input
    beyond the band capped at the hold's (uncached input leaves first, then cached), the rest charged in full."""
    output = min(used.output_tokens, max_tokens)
    inp, cached = used.input_tokens, used.cached_input_tokens
    if inp + cached > BAND:
        excess = inp + cached - PROMPT
        taken = min(inp, excess)
        inp, cached = inp - taken, cached - min(cached, excess - taken)
    return units(inp, output, cached)


def settle_input(draw_int: Any) -> tuple[int, int]:
    """(input, cached) as an upstream may report them: near the count, inside the band (charged in full: the
    overage rule), or beyond it (capped)."""
    return draw_int(*([(0, 40), (700, 1_000), (1_000, 1_100)][draw_int(0, 2)])), draw_int(0, 20)


def usage(input_tokens: int, output_tokens: int, cached: int) -> UsageRecord:
    return UsageRecord(provider="openai", model=MODEL, input_tokens=input_tokens, cached_input_tokens=cached,
                       output_tokens=output_tokens)


@dataclass
class KeyModel:
    user: int
    secret: str
    limit: int | None
    used: int = 0
    reserved: int = 0
    revoked: bool = False


@dataclass
class HoldModel:
    ticket: HoldTicket
    user: int
    key: int
    amount: int
    max_tokens: int
    expires_at: datetime
    status: str = "open"  # open | settled | released | expired
    usage: UsageRecord | None = None  # the usage it was charged for
    receipt: Receipt | None = None


@dataclass
class DeferredModel:
    key: int
    usage: UsageRecord
    receipt: Receipt
    folded: bool = False


class LedgerMachine(RuleBasedStateMachine):
    """The real Meter and the model side by side; ``url_factory`` gives an empty database per run."""

    users = Bundle("users")
    keys = Bundle("keys")
    holds = Bundle("holds")
    codes = Bundle("codes")

    def __init__(self, url_factory: Callable[[], str]) -> None:
        super().__init__()
        self.url = url_factory()
        self.meter = Meter.open(self.url, prices=prices(), hold_ttl=TTL)
        self.counter = itertools.count(1)
        self.clock = datetime.now(UTC)  # a virtual clock: holds are taken and expired at it
        self.balance: dict[int, int] = {}
        self.unreserved: dict[int, int] = {}  # per user: charges nothing reserved + debit adjustments
        self.grants: set[tuple[int, str]] = set()
        self.orders: dict[str, tuple[int, str]] = {}  # reference -> (user, amount)
        self.adjustments: dict[str, tuple[int, int]] = {}  # reference -> (user, amount)
        self.key: dict[int, KeyModel] = {}
        self.hold: dict[int, HoldModel] = {}
        self.by_request: dict[str, int] = {}  # request id -> hold id
        self.code: dict[str, tuple[int, int | None]] = {}  # code -> (units, redeemed by)
        self.deferred: dict[str, DeferredModel] = {}
        self.charges = 0  # charge entries the ledger must hold: settled requests + folded deferred events

    def teardown(self) -> None:
        self.meter.close()
        if self.url.startswith("sqlite:///"):  # one file per run: drop it now rather than at the end
            path = self.url.removeprefix("sqlite:///")
            for suffix in ("", "-wal", "-shm"):
                Path(path + suffix).unlink(missing_ok=True)

    # ------------------------------------------------------------------ credits

    @initialize(target=users, funds=st.sampled_from(["0.01", "0.1"]))
    def a_funded_user(self, funds: str) -> int:
        uid = self.create_user()
        self.topup(uid, funds, reuse=False, data=None)
        return uid

    @initialize(target=keys, funds=st.sampled_from(["0.01", "0.1"]), limit=st.integers(0, 100_000))
    def a_customer_with_two_keys(self, funds: str, limit: int) -> Any:
        uid = self.create_user()
        self.topup(uid, funds, reuse=False, data=None)
        return multiple(self.create_key(uid, limit), self.create_key(uid, None))

    @initialize(target=codes, worth=st.integers(1, 5_000))
    def some_codes(self, worth: int) -> Any:
        made = self.meter.create_redemption_codes(3, worth)
        assert len(set(made)) == 3
        for code in made:
            self.code[code] = (worth, None)
        return multiple(*made)

    @precondition(lambda self: len(self.balance) < 5)  # a few users, many operations on them
    @rule(target=users)
    def create_user(self) -> int:
        uid = self.meter.create_user(f"user-{next(self.counter)}")
        self.balance[uid] = 0
        self.unreserved[uid] = 0
        return uid

    @rule(user=users, kind=st.sampled_from(["topup", "grant", "adjust", "redeem"]), data=st.data())
    def credit(self, user: int, kind: str, data: st.DataObject) -> None:
        if kind == "topup":
            self.topup(user, data.draw(st.sampled_from(sorted(TOPUPS)), label="amount"), data.draw(st.booleans()), data)
        elif kind == "grant":
            self.grant(user, data.draw(st.sampled_from(sorted(GRANTS)), label="grant"))
        elif kind == "adjust":
            self.adjust(user, data.draw(st.integers(-500, 3_000), label="adjustment"), data.draw(st.booleans()), data)
        elif self.code:
            self.redeem(user, data.draw(st.sampled_from(sorted(self.code)), label="code"))

    def topup(self, user: int, amount: str, reuse: bool, data: st.DataObject | None) -> None:
        if reuse and self.orders and data is not None:
            reference = data.draw(st.sampled_from(sorted(self.orders)), label="reused reference")
        else:
            reference = f"order-{next(self.counter)}"
        if reference in self.orders and self.orders[reference] != (user, amount):
            with pytest.raises(DuplicateReference):
                self.meter.topup(user, amount, "USD", reference)
            return
        assert self.meter.topup(user, amount, "USD", reference) == TOPUPS[amount]
        if reference not in self.orders:  # a retried webhook credits nothing more
            self.orders[reference] = (user, amount)
            self.balance[user] += TOPUPS[amount]

    def grant(self, user: int, kind: str) -> None:
        expected = 0 if (user, kind) in self.grants else GRANTS[kind]
        assert self.meter.grant(user, kind) == expected
        self.grants.add((user, kind))
        self.balance[user] += expected

    def adjust(self, user: int, amount: int, reuse: bool, data: st.DataObject) -> None:
        if reuse and self.adjustments:
            reference = data.draw(st.sampled_from(sorted(self.adjustments)), label="reused adjustment")
            if data.draw(st.booleans(), label="the same adjustment"):
                user, amount = self.adjustments[reference]
        else:
            reference = f"adj-{next(self.counter)}"
        if reference in self.adjustments:  # a retry: posted once; other content: refused
            if self.adjustments[reference] == (user, amount):
                assert self.meter.adjust(user, amount, reference, "model test") is False
            else:
                with pytest.raises(DuplicateReference):
                    self.meter.adjust(user, amount, reference, "model test")
            return
        assert self.meter.adjust(user, amount, reference, "model test") is True
        self.adjustments[reference] = (user, amount)
        self.balance[user] += amount
        self.unreserved[user] += max(0, -amount)  # a debit adjustment is not an overage

    def redeem(self, user: int, code: str) -> None:
        worth, redeemed_by = self.code[code]
        if redeemed_by is not None:
            with pytest.raises(DuplicateReference):
                self.meter.redeem(user, code)
            return
        assert self.meter.redeem(user, code) == worth
        self.code[code] = (worth, user)
        self.balance[user] += worth

    # ------------------------------------------------------------------ keys

    @precondition(lambda self: len(self.key) < 8)
    @rule(target=keys, user=users, limit=LIMITS)
    def create_key(self, user: int, limit: int | None) -> int:
        secret = self.meter.create_key(user, f"key-{next(self.counter)}", limit_quota=limit)
        key_id = max(row["id"] for row in self.meter.keys(user))
        self.key[key_id] = KeyModel(user, secret, limit)
        return key_id

    @rule(key=consumes(keys))
    def revoke(self, key: int) -> None:
        """Revoke a key for good (it leaves the bundle; its open holds can still be settled or released)."""
        k = self.key[key]
        assert self.meter.revoke_key(key) is True and self.meter.revoke_key(key) is False
        k.revoked = True
        with pytest.raises(KeyRejected):
            self.meter.authorize(k.secret, {**BODY, "max_tokens": 1}, f"req-{next(self.counter)}", at=self.clock)
        with pytest.raises(KeyRejected):
            self.meter.record_usage(k.secret, f"deferred-{next(self.counter)}", usage(1, 1, 0), at=self.clock)

    # ------------------------------------------------------------------ holds

    # authorize and settle are each two rules, so that they are drawn about twice as often as the others.
    @rule(target=holds, key=keys, max_tokens=MAX_TOKENS, retry=RETRY, data=st.data())
    def authorize(self, key: int, max_tokens: int, retry: bool, data: st.DataObject) -> Any:
        return self._authorize(key, max_tokens, retry, data)

    @rule(target=holds, key=keys, max_tokens=MAX_TOKENS, retry=RETRY, data=st.data())
    def authorize_more(self, key: int, max_tokens: int, retry: bool, data: st.DataObject) -> Any:
        return self._authorize(key, max_tokens, retry, data)

    def _authorize(self, key: int, max_tokens: int, retry: bool, data: st.DataObject) -> Any:
        k = self.key[key]
        if retry and self.by_request:
            request_id = data.draw(st.sampled_from(sorted(self.by_request)), label="retried request id")
        else:
            request_id = f"req-{next(self.counter)}"
        call = lambda: self.meter.authorize(k.secret, {**BODY, "max_tokens": max_tokens}, request_id, at=self.clock)
        if request_id in self.by_request:  # a retry: the first hold, whatever the body says, or a conflict
            first = self.hold[self.by_request[request_id]]
            if first.key != key:
                with pytest.raises(SettleConflict):
                    call()
            else:
                assert call() == first.ticket
            event("authorize retried")
            return multiple()
        amount = hold_units(max_tokens)
        balance = self.balance[k.user]
        room = None if k.limit is None else k.limit - k.used - k.reserved
        if balance < amount or (room is not None and room < amount):
            with pytest.raises(QuotaExceeded) as refused:
                call()
            scope, available = ("user", balance) if balance < amount else ("key", room)
            assert (refused.value.needed, refused.value.available, refused.value.scope) == (amount, max(available, 0), scope)
            event(f"authorize refused ({scope})")
            return multiple()
        ticket = call()
        assert (ticket.amount, ticket.request_id, ticket.key_id, ticket.user_id) == (amount, request_id, key, k.user)
        assert ticket.expires_at == self.clock + TTL
        self.balance[k.user] -= amount
        assert self.balance[k.user] >= 0  # a hold is only taken from quota that is there
        if k.limit is not None:
            k.reserved += amount
        self.hold[ticket.id] = HoldModel(ticket, k.user, key, amount, max_tokens, self.clock + TTL)
        self.by_request[request_id] = ticket.id
        event("authorized")
        return ticket.id

    # settle consumes its hold (else the bundle's bias would mostly retry the first one); settle_again
    # does not, so it retries settlements and settles holds that were released or expired.
    @rule(hold=consumes(holds), same_as_before=st.booleans(), data=st.data())
    def settle(self, hold: int, same_as_before: bool, data: st.DataObject) -> None:
        self._settle(hold, same_as_before, data)

    @rule(hold=holds, same_as_before=st.booleans(), data=st.data())
    def settle_again(self, hold: int, same_as_before: bool, data: st.DataObject) -> None:
        self._settle(hold, same_as_before, data)

    def _settle(self, hold: int, same_as_before: bool, data: st.DataObject) -> None:
        h = self.hold[hold]
        if h.usage is not None and same_as_before:
            used = h.usage
        else:
            input_tokens, cached = settle_input(lambda a, b: data.draw(st.integers(a, b)))
            # Within max_tokens, or above it (capped at it) as often.
            output = data.draw(st.one_of(st.integers(0, h.max_tokens), st.integers(h.max_tokens, 3 * h.max_tokens + 20)),
                               label="output")
            used = usage(input_tokens, output, cached)
        if h.usage is not None:  # settled before: the first receipt for the same usage, else a conflict
            event("settle retried")
            if used == h.usage:
                assert self.meter.settle(h.ticket, usage=used) == h.receipt
            else:
                with pytest.raises(SettleConflict):
                    self.meter.settle(h.ticket, usage=used)
            return
        quota = charged_units(used, h.max_tokens)
        before = self.balance[h.user]
        receipt = self.meter.settle(h.ticket, usage=used)
        assert (receipt.quota, receipt.hold_id, receipt.request_id) == (quota, hold, h.ticket.request_id)
        k = self.key[h.key]
        if h.status == "open":
            reserved = h.amount
            self.balance[h.user] += h.amount - quota
            if k.limit is not None:
                k.reserved -= h.amount
            h.status = "settled"
        else:
            # Settled after expiry or release: charged once, in full, and the hold is not released again;
            # nothing is reserved for it any more, so all of it is overage.
            reserved = 0
            self.balance[h.user] -= quota
            event(f"settled after the hold was {h.status}")
        overage = max(0, quota - reserved)
        assert receipt.overage == overage
        if h.status == "settled":
            event("settled with overage" if overage else "settled within the hold")
        self.unreserved[h.user] += overage
        # The overage rule: a charge takes the balance below zero by its overage only.
        assert self.balance[h.user] >= min(before, 0) - overage
        if k.limit is not None:
            k.used += quota
        h.usage, h.receipt = used, receipt
        self.charges += 1

    @rule(target=holds, key=keys, max_tokens=MAX_TOKENS, then=st.sampled_from(["settle", "release", "keep"]),
          data=st.data())
    def request(self, key: int, max_tokens: int, then: str, data: st.DataObject) -> Any:
        """A whole request in one step: authorize, then settle or release at once (or keep the hold open)."""
        hold = self._authorize(key, max_tokens, False, data)
        if isinstance(hold, int):
            if then == "settle":
                self._settle(hold, False, data)
            elif then == "release":
                self._release(hold)
        return hold

    @rule(hold=holds)
    def release(self, hold: int) -> None:
        self._release(hold)

    def _release(self, hold: int) -> None:
        h = self.hold[hold]
        assert self.meter.release(h.ticket) is (h.status == "open")
        if h.status == "open":
            self._return(h, "released")

    @rule(minutes=st.sampled_from([1, 5, 9, 10, 11, 30]))  # the TTL is 10 minutes
    def let_time_pass(self, minutes: int) -> None:
        self.clock += timedelta(minutes=minutes)
        due = [h for h in self.hold.values() if h.status == "open" and h.expires_at <= self.clock]
        assert self.meter.expire_holds(now=self.clock) == len(due)
        for h in due:
            self._return(h, "expired")
        if due:
            event("holds expired")
        if any(self.key[h.key].limit is not None for h in due):
            event("holds of a limited key expired")

    def _return(self, h: HoldModel, status: str) -> None:
        self.balance[h.user] += h.amount
        k = self.key[h.key]
        if k.limit is not None:
            k.reserved -= h.amount
        h.status = status

    # ------------------------------------------------------------------ deferred mode

    @rule(key=keys, input_tokens=st.integers(0, 40), output=st.integers(0, 500), retry=RETRY, data=st.data())
    def record_usage(self, key: int, input_tokens: int, output: int, retry: bool, data: st.DataObject) -> None:
        k = self.key[key]
        used = usage(input_tokens, output, 0)
        own = sorted(r for r, d in self.deferred.items() if d.key == key)
        if retry and own:
            request_id = data.draw(st.sampled_from(own), label="retried deferred id")
            if data.draw(st.booleans(), label="same usage"):
                used = self.deferred[request_id].usage
        else:
            request_id = f"deferred-{next(self.counter)}"
        if request_id in self.deferred:
            first = self.deferred[request_id]
            if used == first.usage:
                assert self.meter.record_usage(k.secret, request_id, used, at=self.clock) == first.receipt
            else:
                with pytest.raises(SettleConflict):
                    self.meter.record_usage(k.secret, request_id, used, at=self.clock)
            return
        receipt = self.meter.record_usage(k.secret, request_id, used, at=self.clock)
        assert (receipt.quota, receipt.hold_id) == (units(input_tokens, output), None)
        self.deferred[request_id] = DeferredModel(key, used, receipt)

    @precondition(lambda self: any(not d.folded for d in self.deferred.values()))
    @rule(per_transaction=st.sampled_from([1, 2, 500]))
    def fold(self, per_transaction: int) -> None:
        pending = [d for d in self.deferred.values() if not d.folded]
        assert self.meter.fold_deferred(per_transaction=per_transaction) == len(pending)
        for d in pending:
            k = self.key[d.key]
            self.balance[k.user] -= d.receipt.quota
            self.unreserved[k.user] += d.receipt.quota  # deferred mode reserves nothing
            if k.limit is not None:
                k.used += d.receipt.quota
            d.folded = True
            self.charges += 1

    # ------------------------------------------------------------------ the comparison

    @invariant()
    def the_ledger_equals_the_model(self) -> None:
        meter = self.meter
        assert {u["id"]: u["balance"] for u in meter.users()} == self.balance
        listing = meter.keys()
        assert {row["id"]: (row["status"], row["limit_quota"], row["used_quota"], row["reserved_quota"]) for row in listing} == {
            key_id: ("revoked" if k.revoked else "enabled", k.limit, k.used if k.limit is not None else 0,
                     k.reserved if k.limit is not None else 0)
            for key_id, k in self.key.items()
        }
        with meter.engine.connect() as connection:
            states = dict(connection.execute(select(HOLDS.c.id, HOLDS.c.status)).all())
            charges, charged = connection.execute(
                select(func.count(), func.coalesce(func.sum(ENTRIES.c.amount), 0)).where(ENTRIES.c.kind == "charge")
            ).one()
        assert states == {hold_id: h.status for hold_id, h in self.hold.items()}
        assert charges == self.charges  # each settled request and folded event charged once
        expected = sum(h.receipt.quota for h in self.hold.values() if h.receipt is not None) + sum(
            d.receipt.quota for d in self.deferred.values() if d.folded
        )
        assert -int(charged) == expected
        for user, balance in self.balance.items():
            assert balance >= -self.unreserved[user], f"user {user} is below zero by more than its unreserved charges"
            if balance < 0:
                event("a balance below zero")
        report = meter.audit()
        assert report.ok, report.violations


MODEL_SETTINGS: dict[str, Any] = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


def test_the_ledger_follows_the_model_on_sqlite(tmp_path: Path) -> None:
    # A SQLite file on tmpfs when there is one: the ledger syncs every commit (synchronous=FULL), which on a
    # disk costs more than everything else the test does.
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    runs = itertools.count()
    with tempfile.TemporaryDirectory(dir=base, prefix="ledger-model-") as directory:
        run_state_machine_as_test(
            lambda: LedgerMachine(lambda: f"sqlite:///{directory}/ledger-{next(runs)}.db"),
            settings=settings(max_examples=40, stateful_step_count=30, **MODEL_SETTINGS),
        )


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_the_ledger_follows_the_model_on_a_server(backend: str, server_databases: Any, tmp_path: Path) -> None:
    """Fewer runs: each starts from an empty schema on the server, which costs ~0.3 s (PostgreSQL) to ~1 s (MariaDB)."""
    fresh_database(backend, server_databases, tmp_path)  # skips (or fails under CI) when the server is down
    run_state_machine_as_test(
        lambda: LedgerMachine(lambda: fresh_database(backend, server_databases, tmp_path)),
        settings=settings(max_examples=8 if backend == "postgresql" else 5, stateful_step_count=25, **MODEL_SETTINGS),
    )
