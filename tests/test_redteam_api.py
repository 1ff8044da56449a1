"""Hostile arguments to every public call of the ledger, and top-up amounts compared by value, on SQLite, PostgreSQL
and MariaDB.

What is held here:

* **every public call of ``Meter`` and of ``metering/ledger/imports.py``**, each argument in turn given hostile
  values (None, bools, NaN, infinities, floats, integers beyond 64 bits, -1, 0, text where a number is expected,
  a list where text is expected, bytes, a dict, NUL and lone-surrogate text, 100,000 characters, naive and
  overflowing datetimes), the other arguments valid: the call raises a typed error (a ``BillingError``:
  ``InvalidField``, ``InvalidUsage``, ``RequestError``, ``NotFound``, ``KeyRejected``, ``PriceNotFound``...)
  that names the argument (its ``field``, else its message), never a raw TypeError / ValueError /
  AttributeError / driver error, and nothing is written (row counts of every table, balances, key and hold
  states compared before and after; the calls that keep refused usage, ``settle`` / ``record_usage`` / the
  import's, may add a quarantine row and nothing else). One table (``CASES``) drives it on each database; a
  hypothesis test throws random values at random rows of the table on SQLite (typed error or success, and a
  refusal writes nothing).
* **top-up idempotency by value**: ``10``, ``"10"``, ``"10.0"``, ``Decimal("1e1")`` and ``"10.00"`` under one
  reference are one top-up (the retry returns the first credit), another value is a ``DuplicateReference``;
  ``topup_orders.amount`` is stored as one canonical text per value; rows stored before (``"10.0"``,
  ``"1E+1"``) still compare by value; the command line's ``--amount 1e1`` likewise.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select, update
from sqlmodel import SQLModel
from typer.testing import CliRunner

from metering.errors import RequestError
from metering.ledger import DuplicateReference, HoldTicket, Meter, imports
from metering.ledger.meter import CODES, EVENTS, HOLDS, KEYS, ORDERS, USERS
from metering.ledger.tables import QuarantinedUsage
from pricing.errors import BillingError
from pricing.recharge import amount_text
from pricing.usage import UsageRecord

QUARANTINE = QuarantinedUsage.__table__  # type: ignore[attr-defined]
NOW = datetime.now(UTC)
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
USAGE = UsageRecord(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=5)
SECRET = "sk-" + "Z" * 40
#: Arguments that are a JSON body: their errors name a path inside it.
BODIES = ("body", "request_body", "response")

#: The hostile values, by name. ``far`` is past the last datetime once in UTC; ``naive`` has no time zone.
HOSTILE: dict[str, Any] = {
    "none": None, "true": True, "false": False, "nan": math.nan, "inf": math.inf, "float": 1.5, "huge": 2**64 + 1,
    "negative": -1, "zero": 0, "digits": "12", "empty": "", "list": ["x"], "bytes": b"x", "dict": {"a": 1},
    "nul": "a\0b", "surrogate": "a\ud800b", "long": "x" * 100_000, "naive": datetime(2025, 1, 1),
    "far": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
}


@dataclass
class Ctx:
    """What a valid call needs: a funded user, its key (secret and id), an open hold, an unused code."""

    url: str
    meter: Meter
    uid: int
    secret: str
    key_id: int
    hold: HoldTicket
    code: str


@dataclass(frozen=True)
class Case:
    """One argument of one call: ``run(meter, ctx, value)`` calls it with ``value`` there, the rest valid.

    ``valid``: hostile names that are valid values of this argument (not tried here); ``names``: what the
    error may name besides the argument (``KeyRejected`` names the key); ``keeps``: the call stores refused
    usage in quarantine (that row is the one write allowed).
    """

    call: str
    arg: str
    run: Callable[[Meter, Ctx, Any], Any]
    valid: frozenset[str] = frozenset()
    names: tuple[str, ...] = ()
    keeps: bool = False


def rid() -> str:
    """A request id no call has used (so a call that wrongly succeeds is never a retry of an earlier one)."""
    global _RIDS
    _RIDS += 1
    return f"hostile-{_RIDS}"


_RIDS = 0


def case(call: str, arg: str, run: Callable[[Meter, Ctx, Any], Any], valid: str = "", names: tuple[str, ...] = (),
         keeps: bool = False) -> Case:
    return Case(call, arg, run, frozenset(valid.split()), names, keeps)


def _with(value: Any) -> Any:
    with imports.one_transaction(value):
        pass


def _committing(meter: Meter, value: Any) -> Any:
    with imports.one_transaction(meter, commit=value):
        pass


TEXT_OK = "digits"  # "12" is a valid identifier, name, note...

CASES: list[Case] = [
    # ------------------------------------------------------------ Meter: opening
    case("Meter", "engine", lambda m, c, v: Meter(v, m.prices)),
    case("Meter", "prices", lambda m, c, v: Meter(m.engine, v)),
    case("Meter", "hold_ttl", lambda m, c, v: Meter(m.engine, m.prices, v)),
    case("Meter.open", "url", lambda m, c, v: Meter.open(v)),
    case("Meter.open", "prices", lambda m, c, v: Meter.open(c.url, prices=v), valid="none"),
    case("Meter.open", "hold_ttl", lambda m, c, v: Meter.open(c.url, hold_ttl=v)),
    # ------------------------------------------------------------ users and keys
    case("create_user", "name", lambda m, c, v: m.create_user(v)),
    case("create_user", "group", lambda m, c, v: m.create_user("new-user", v), names=("group",)),
    case("user", "user_id", lambda m, c, v: m.user(v)),
    case("balance", "user_id", lambda m, c, v: m.balance(v)),
    case("find_user", "name_or_id", lambda m, c, v: m.find_user(v), names=("user",)),
    case("keys", "user_id", lambda m, c, v: m.keys(v), valid="none"),
    case("create_key", "user_id", lambda m, c, v: m.create_key(v, "k2")),
    case("create_key", "name", lambda m, c, v: m.create_key(c.uid, v), valid="digits empty"),
    case("create_key", "limit_quota", lambda m, c, v: m.create_key(c.uid, "k2", limit_quota=v), valid="none zero"),
    case("create_key", "models", lambda m, c, v: m.create_key(c.uid, "k2", models=v), valid="none"),
    case("create_key", "models[0]", lambda m, c, v: m.create_key(c.uid, "k2", models=[v])),
    case("create_key", "expires_at", lambda m, c, v: m.create_key(c.uid, "k2", expires_at=v), valid="none"),
    case("key_usage", "secret", lambda m, c, v: m.key_usage(v), names=("key",)),
    case("revoke_key", "key_id", lambda m, c, v: m.revoke_key(v)),
    # ------------------------------------------------------------ credits
    case("grant", "user_id", lambda m, c, v: m.grant(v, "signup")),
    case("grant", "kind", lambda m, c, v: m.grant(c.uid, v), names=("grant",)),
    case("topup", "user_id", lambda m, c, v: m.topup(v, "10", "USD", "t-ref")),
    case("topup", "amount", lambda m, c, v: m.topup(c.uid, v, "USD", "t-ref"), valid="digits"),
    case("topup", "currency", lambda m, c, v: m.topup(c.uid, "10", v, "t-ref"), names=("recharge rate",)),
    case("topup", "reference", lambda m, c, v: m.topup(c.uid, "10", "USD", v), valid=TEXT_OK),
    case("topup", "at", lambda m, c, v: m.topup(c.uid, "10", "USD", "t-ref", at=v), valid="none"),
    case("adjust", "user_id", lambda m, c, v: m.adjust(v, 5, "a-ref", "note")),
    case("adjust", "amount", lambda m, c, v: m.adjust(c.uid, v, "a-ref", "note"), valid="zero negative"),
    case("adjust", "reference", lambda m, c, v: m.adjust(c.uid, 5, v, "note"), valid=TEXT_OK),
    case("adjust", "note", lambda m, c, v: m.adjust(c.uid, 5, "a-ref", v), valid="digits empty"),
    case("create_redemption_codes", "count", lambda m, c, v: m.create_redemption_codes(v, 5)),
    case("create_redemption_codes", "quota_units", lambda m, c, v: m.create_redemption_codes(1, v)),
    case("create_redemption_codes", "batch", lambda m, c, v: m.create_redemption_codes(1, 5, v), valid="none digits"),
    case("redeem", "user_id", lambda m, c, v: m.redeem(v, c.code)),
    case("redeem", "code", lambda m, c, v: m.redeem(c.uid, v)),  # one answer for every refusal: NotFound
    # ------------------------------------------------------------ holds and settlement
    case("estimate", "body", lambda m, c, v: m.estimate(v, "gpt-4o", "default", NOW)),
    case("estimate", "model", lambda m, c, v: m.estimate(BODY, v, "default", NOW)),
    case("estimate", "group", lambda m, c, v: m.estimate(BODY, "gpt-4o", v, NOW)),
    case("estimate", "at", lambda m, c, v: m.estimate(BODY, "gpt-4o", "default", v)),
    case("authorize", "secret", lambda m, c, v: m.authorize(v, BODY, rid()), names=("key",)),
    case("authorize", "request_body", lambda m, c, v: m.authorize(c.secret, v, rid()), names=("model",)),
    case("authorize", "request_id", lambda m, c, v: m.authorize(c.secret, BODY, v), valid=TEXT_OK),
    case("authorize", "model", lambda m, c, v: m.authorize(c.secret, BODY, rid(), model=v), valid="none empty",
         names=("model",)),
    case("authorize", "at", lambda m, c, v: m.authorize(c.secret, BODY, rid(), at=v), valid="none"),
    case("authorize", "channel", lambda m, c, v: m.authorize(c.secret, BODY, rid(), channel=v), valid="none digits"),
    case("aauthorize", "request_id", lambda m, c, v: asyncio.run(m.aauthorize(c.secret, BODY, v)), valid=TEXT_OK),
    case("hold", "request_id", lambda m, c, v: m.hold(v), names=("hold",)),
    case("release", "hold", lambda m, c, v: m.release(v)),
    case("arelease", "hold", lambda m, c, v: asyncio.run(m.arelease(v))),
    case("expire_holds", "now", lambda m, c, v: m.expire_holds(v), valid="none"),
    case("keep_alive", "hold", lambda m, c, v: m.keep_alive(v)),
    case("keep_alive", "now", lambda m, c, v: m.keep_alive(c.hold, v), valid="none"),
    case("check_key", "secret", lambda m, c, v: m.check_key(v), names=("key",)),
    case("check_key", "model", lambda m, c, v: m.check_key(c.secret, v), valid="none digits"),
    case("approve_capped", "quarantine_id", lambda m, c, v: m.approve_capped(v)),
    case("accumulator", "hold", lambda m, c, v: m.accumulator(v)),
    case("settle", "hold", lambda m, c, v: m.settle(v, usage=USAGE), keeps=True),
    case("asettle", "hold", lambda m, c, v: asyncio.run(m.asettle(v, usage=USAGE)), keeps=True),
    case("settle", "usage", lambda m, c, v: m.settle(c.hold, usage=v), keeps=True),
    case("settle", "response", lambda m, c, v: m.settle(c.hold, response=v), keeps=True, names=("usage",)),
    case("settle", "stream", lambda m, c, v: m.settle(c.hold, stream=v), keeps=True, names=("usage",)),
    case("settle", "channel", lambda m, c, v: m.settle(c.hold, usage=USAGE, channel=v), valid="none digits", keeps=True),
    case("record_usage", "secret", lambda m, c, v: m.record_usage(v, rid(), USAGE), names=("key",), keeps=True),
    case("record_usage", "request_id", lambda m, c, v: m.record_usage(c.secret, v, USAGE), valid=TEXT_OK, keeps=True),
    case("record_usage", "usage", lambda m, c, v: m.record_usage(c.secret, rid(), v), keeps=True),
    case("record_usage", "at", lambda m, c, v: m.record_usage(c.secret, rid(), USAGE, at=v), valid="none", keeps=True),
    case("record_usage", "outcome", lambda m, c, v: m.record_usage(c.secret, rid(), USAGE, outcome=v), keeps=True),
    case("record_usage", "channel", lambda m, c, v: m.record_usage(c.secret, rid(), USAGE, channel=v),
         valid="none digits", keeps=True),
    case("fold_deferred", "limit", lambda m, c, v: m.fold_deferred(v)),
    case("fold_deferred", "per_transaction", lambda m, c, v: m.fold_deferred(per_transaction=v)),
    # ------------------------------------------------------------ imports.py
    case("one_transaction", "meter", lambda m, c, v: _with(v)),
    case("one_transaction", "commit", lambda m, c, v: _committing(m, v), valid="true false"),
    case("links", "meter", lambda m, c, v: imports.links(v, "s", "user")),
    case("links", "source", lambda m, c, v: imports.links(m, v, "user"), valid=TEXT_OK),
    case("links", "kind", lambda m, c, v: imports.links(m, "s", v), valid=TEXT_OK),
    case("cursor", "source", lambda m, c, v: imports.cursor(m, v, "logs"), valid=TEXT_OK),
    case("cursor", "name", lambda m, c, v: imports.cursor(m, "s", v), valid=TEXT_OK),
    case("lock_cursor", "meter", lambda m, c, v: imports.lock_cursor(v, "s", "logs")),
    case("lock_cursor", "source", lambda m, c, v: imports.lock_cursor(m, v, "logs"), valid=TEXT_OK),
    case("lock_cursor", "name", lambda m, c, v: imports.lock_cursor(m, "s", v), valid=TEXT_OK),
    case("set_cursor", "meter", lambda m, c, v: imports.set_cursor(v, "s", "logs", 5)),
    case("set_cursor", "source", lambda m, c, v: imports.set_cursor(m, v, "logs", 5), valid=TEXT_OK),
    case("set_cursor", "name", lambda m, c, v: imports.set_cursor(m, "s", v, 5), valid=TEXT_OK),
    case("set_cursor", "value", lambda m, c, v: imports.set_cursor(m, "s", "logs", v), valid="zero"),
    case("create_linked_user", "meter", lambda m, c, v: imports.create_linked_user(v, "iu", "default", source="s",
                                                                                   external_id="1")),
    case("create_linked_user", "name", lambda m, c, v: imports.create_linked_user(m, v, "default", source="s",
                                                                                  external_id="1")),
    case("create_linked_user", "group", lambda m, c, v: imports.create_linked_user(m, "iu", v, source="s", external_id="1"),
         names=("group",)),
    case("create_linked_user", "source", lambda m, c, v: imports.create_linked_user(m, "iu", "default", source=v,
                                                                                    external_id="1"), valid=TEXT_OK),
    case("create_linked_user", "external_id", lambda m, c, v: imports.create_linked_user(m, "iu", "default", source="s",
                                                                                         external_id=v), valid=TEXT_OK),
    *[case("create_key_from_secret", arg, (lambda arg: lambda m, c, v: imports.create_key_from_secret(
        m, **{**{"user_id": c.uid, "name": "ik", "secret": SECRET, "source": "s", "external_id": "9"}, arg: v}))(arg),
        valid=valid) for arg, valid in (
        ("user_id", ""), ("name", "digits empty"), ("secret", ""), ("source", TEXT_OK), ("external_id", TEXT_OK),
        ("kind", TEXT_OK), ("revoked", "true false"), ("limit_quota", "none zero"), ("models", "none list"),
        ("expires_at", "none"))],
    case("create_key_from_secret", "meter", lambda m, c, v: imports.create_key_from_secret(
        v, c.uid, "ik", SECRET, source="s", external_id="9")),
    case("set_key_room", "key_id", lambda m, c, v: imports.set_key_room(m, v, 5)),
    case("set_key_room", "room", lambda m, c, v: imports.set_key_room(m, c.key_id, v), valid="zero negative"),
    case("known_request_ids", "request_ids", lambda m, c, v: imports.known_request_ids(m, v), valid="list dict"),
    case("known_request_ids", "meter", lambda m, c, v: imports.known_request_ids(v, ["x"])),
    case("usage_record", "model", lambda m, c, v: imports.usage_record(m, v, 10, 5), valid=TEXT_OK),
    case("usage_record", "input_tokens", lambda m, c, v: imports.usage_record(m, "gpt-4o", v, 5), valid="zero"),
    case("usage_record", "cached_tokens", lambda m, c, v: imports.usage_record(m, "gpt-4o", 10, 5, v),
         valid="none false zero"),
    *[case("record_usage_for_key", arg, (lambda arg: lambda m, c, v: imports.record_usage_for_key(
        m, **{**{"key_id": c.key_id, "request_id": rid(), "model": "gpt-4o", "input_tokens": 10, "output_tokens": 5,
                 "at": NOW}, arg: v}))(arg), valid=valid, keeps=True) for arg, valid in (
        ("key_id", ""), ("request_id", TEXT_OK), ("model", ""), ("input_tokens", "zero"), ("output_tokens", "zero"),
        ("at", "none"), ("channel", "none digits"), ("cached_tokens", "none false zero"))],
    case("record_usage_many", "items", lambda m, c, v: imports.record_usage_many(m, v)),
    case("record_usage_many", "key_id", lambda m, c, v: imports.record_usage_many(
        m, [imports.ImportedUsage(v, rid(), "gpt-4o", 10, 5, NOW)]), keeps=True),
]


# ---------------------------------------------------------------------- what "nothing written" compares


def state(engine: Engine) -> dict[str, Any]:
    """Row counts of every table, balances, keys' states and counters, open holds, pending events, redeemed
    codes and quarantine attempts, read in one query."""
    parts: dict[str, Any] = {t.name: select(func.count()).select_from(t) for t in SQLModel.metadata.sorted_tables}
    parts |= {
        "balances": select(func.coalesce(func.sum(USERS.c.balance), 0)),
        "revoked": select(func.count()).select_from(KEYS).where(KEYS.c.status == "revoked"),
        "key counters": select(func.coalesce(func.sum(func.coalesce(KEYS.c.limit_quota, 0) + KEYS.c.used_quota
                                                      + KEYS.c.reserved_quota), 0)),
        "open holds": select(func.count()).select_from(HOLDS).where(HOLDS.c.status == "open"),
        "pending": select(func.count()).select_from(EVENTS).where(EVENTS.c.status == "pending"),
        "redeemed": select(func.count()).select_from(CODES).where(CODES.c.redeemed_by.is_not(None)),
        "attempts": select(func.coalesce(func.sum(QUARANTINE.c.attempts), 0)),
    }
    query = select(*(q.scalar_subquery().label(name.replace(" ", "_")) for name, q in parts.items()))
    with engine.connect() as connection:
        row = connection.execute(query).one()
    return {name: int(value) for name, value in zip(parts, row)}


def without_quarantine(found: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in found.items() if k not in ("quarantined_usage", "attempts")}


@pytest.fixture
def ctx(meter: Meter, ledger_url: str) -> Iterator[Ctx]:
    uid = meter.create_user("alice")
    meter.adjust(uid, 10**9, "fund", "test funds")
    secret = meter.create_key(uid, "k")
    key_id = meter.keys(uid)[0]["id"]
    hold = meter.authorize(secret, BODY, "ctx-hold")
    (code,) = meter.create_redemption_codes(1, 1_000)
    yield Ctx(ledger_url, meter, uid, secret, key_id, hold, code)


def attempt(item: Case, meter: Meter, context: Ctx, value: Any) -> Any:
    """The call's result, or the exception it raised (a list of results gives its first exception)."""
    try:
        result = item.run(meter, context, value)
    except Exception as exc:  # noqa: BLE001 (judged by the caller)
        return exc
    if isinstance(result, Meter):
        result.close()
    if isinstance(result, list) and result and isinstance(result[0], Exception):
        return result[0]  # record_usage_many reports a refused row in its place
    return result


def named(item: Case, error: BaseException) -> bool:
    """Whether ``error`` names the argument: its field (or a body error's path), else its message."""
    if item.arg in BODIES and isinstance(error, RequestError):
        return True  # a body's error names the path inside it (``messages[0].content``, ``choices``)
    field = getattr(error, "field", None)
    path = ".".join(map(str, getattr(error, "path", ()) or ()))
    words = (item.arg, item.arg.split("[")[0], *item.names)
    return any(w and (w in (field or "") or w in path or w in str(error)) for w in words)


def judge(item: Case, key: str, result: Any, before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """What is wrong with one hostile call, or None."""
    label = f"{item.call}({item.arg}={key})"
    if not isinstance(result, BaseException):
        return f"{label} was accepted: {result!r}"[:300]
    if not isinstance(result, BillingError):
        return f"{label} raised an untyped {type(result).__name__}: {result}"[:300]
    if not named(item, result):
        return f"{label}: {type(result).__name__} does not name {item.arg}: {result}"[:300]
    changed = without_quarantine(after) != without_quarantine(before) if item.keeps else after != before
    if changed:
        return f"{label} wrote: {before} -> {after}"
    return None


def test_every_public_call_refuses_hostile_arguments_typed_and_named_and_writes_nothing(ctx: Ctx) -> None:
    meter = ctx.meter
    problems: list[str] = []
    tried = 0
    before = state(meter.engine)
    for item in CASES:
        for key, value in HOSTILE.items():
            if key in item.valid:
                continue
            tried += 1
            result = attempt(item, meter, ctx, value)
            after = state(meter.engine)
            problem = judge(item, key, result, before, after)
            if problem:
                problems.append(problem)
            before = after
    assert not problems, f"{len(problems)} of {tried} hostile calls:\n" + "\n".join(problems)
    assert tried > 1_000 and meter.audit().ok
    assert meter.hold("ctx-hold").id == ctx.hold.id and meter.balance(ctx.uid) == 10**9 - ctx.hold.amount


VALUES = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
    st.integers(-3, 3), st.text(max_size=12), st.sampled_from(["a\0", "\ud800", "\udfff x", " x", "x ", "", "0", "00"]),
    st.binary(max_size=6), st.lists(st.integers(), max_size=2), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.decimals(allow_nan=True),
    st.datetimes(), st.datetimes(timezones=st.just(UTC)), st.timedeltas(),
)


@pytest.fixture(scope="module")
def sqlite_ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    url = f"sqlite:///{tmp_path_factory.mktemp('hostile')}/ledger.db"
    meter = Meter.open(url)
    uid = meter.create_user("alice")
    meter.adjust(uid, 10**9, "fund", "test funds")
    secret = meter.create_key(uid, "k")
    hold = meter.authorize(secret, BODY, "ctx-hold")
    (code,) = meter.create_redemption_codes(1, 1_000)
    yield Ctx(url, meter, uid, secret, meter.keys(uid)[0]["id"], hold, code)
    meter.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(index=st.integers(0, len(CASES) - 1), value=VALUES)
def test_random_values_anywhere_are_a_result_or_a_typed_error_that_writes_nothing(
    sqlite_ctx: Ctx, index: int, value: Any,
) -> None:
    item = CASES[index]
    before = state(sqlite_ctx.meter.engine)
    result = attempt(item, sqlite_ctx.meter, sqlite_ctx, value)
    after = state(sqlite_ctx.meter.engine)
    if isinstance(result, BaseException):
        assert isinstance(result, BillingError), f"{item.call}({item.arg}={value!r}) raised {result!r}"
        if item.keeps:
            assert without_quarantine(after) == without_quarantine(before), (item.call, item.arg, value)
        else:
            assert after == before, (item.call, item.arg, value)


# ---------------------------------------------------------------------- top-ups compared by value


def orders(meter: Meter) -> list[tuple[str, str, int]]:
    with meter.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(select(ORDERS.c.reference, ORDERS.c.amount, ORDERS.c.quota)
                                                    .order_by(ORDERS.c.id))]


def test_one_amount_in_any_form_is_one_top_up_and_another_amount_a_duplicate_reference(meter: Meter) -> None:
    uid = meter.create_user("alice")
    first = meter.topup(uid, 10, "USD", "order-1")
    for form in ("10", "10.0", Decimal("1e1"), "10.00", Decimal("10.000"), "1E+1", " 10 ", "+10", "010"):
        assert meter.topup(uid, form, "USD", "order-1") == first, form
    for other in ("10.01", 11, Decimal("9.99999999"), "1e2"):
        with pytest.raises(DuplicateReference):
            meter.topup(uid, other, "USD", "order-1")
    with pytest.raises(DuplicateReference):
        meter.topup(uid, "10", "USDT", "order-1")  # the same value in another currency is another order
    meter.topup(uid, Decimal("0.50"), "USD", "order-2")
    meter.topup(uid, "1.2300E+3", "USD", "order-3")
    assert orders(meter) == [("order-1", "10", first), ("order-2", "0.5", 250_000), ("order-3", "1230", 615_000_000)]
    assert meter.balance(uid) == first + 250_000 + 615_000_000 and meter.audit().ok


@pytest.mark.parametrize("stored", ["10.0", "1E+1", "10.00000000", "0010"])
def test_a_row_stored_before_amounts_were_canonical_still_compares_by_value(meter: Meter, stored: str) -> None:
    uid = meter.create_user("alice")
    units = meter.topup(uid, "10", "USD", "old-order")
    with meter.engine.begin() as connection:
        connection.execute(update(ORDERS).where(ORDERS.c.reference == "old-order").values(amount=stored))
    assert meter.topup(uid, Decimal("1e1"), "USD", "old-order") == units
    assert meter.topup(uid, "10.00", "USD", "old-order") == units
    with pytest.raises(DuplicateReference):
        meter.topup(uid, "10.5", "USD", "old-order")
    assert len(orders(meter)) == 1 and meter.balance(uid) == units


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.decimals(min_value=Decimal("0.01"), max_value=Decimal(10**6), places=2, allow_nan=False),
       zeros=st.integers(0, 5), data=st.data())
def test_every_text_of_a_value_is_the_same_top_up_stored_canonically(
    sqlite_ctx: Ctx, value: Decimal, zeros: int, data: st.DataObject,
) -> None:
    meter, reference = sqlite_ctx.meter, f"prop-{rid()}"  # a new order for every example, replays included
    forms = [value, str(value), f"{value:f}" + ("0" * zeros if "." in f"{value:f}" else ""), f"{value:E}",
             Decimal(value).normalize(), format(value, "e")]
    first = meter.topup(sqlite_ctx.uid, data.draw(st.sampled_from(forms)), "USD", reference)
    for form in forms:
        assert meter.topup(sqlite_ctx.uid, form, "USD", reference) == first
    with pytest.raises(DuplicateReference):
        meter.topup(sqlite_ctx.uid, value + Decimal("0.01"), "USD", reference)
    with meter.engine.connect() as connection:
        stored = connection.execute(select(ORDERS.c.amount).where(ORDERS.c.reference == reference)).scalar_one()
    assert stored == amount_text(value) and "E" not in stored and "e" not in stored
    assert Decimal(stored) == value and (stored == stored.rstrip("0").rstrip(".") or "." not in stored)


def test_the_command_lines_amount_1e1_is_the_same_top_up_as_10(tmp_path: Path) -> None:
    from workers.cli.main import app

    url = f"sqlite:///{tmp_path}/ledger.db"
    meter = Meter.open(url)
    meter.create_user("alice")
    meter.close()
    runner = CliRunner()

    def topup(amount: str) -> Any:
        return runner.invoke(app, ["topup", "alice", "--amount", amount, "--currency", "USD", "--reference", "pay-1",
                                   "--db", url, "--json"], env={"METERING_DB": None, "METERING_PRICE_TABLE": None})

    import json

    first = topup("1e1")
    assert first.exit_code == 0, first.output
    credited = json.loads(first.stdout)
    assert credited["amount"] == "10"
    again = topup("10.00")
    assert again.exit_code == 0 and json.loads(again.stdout)["quota"] == credited["quota"]
    assert json.loads(again.stdout)["balance"] == credited["balance"]  # credited once
    other = topup("11")
    assert other.exit_code == 2 and "pay-1" in other.output
    meter = Meter.open(url)
    try:
        assert orders(meter) == [("pay-1", "10", credited["quota"])]
    finally:
        meter.close()


def test_the_case_table_covers_every_public_call() -> None:
    """Every public method of Meter and every public function of imports.py has a row (a new one must be added)."""
    import inspect

    public = {name for name, member in inspect.getmembers(Meter) if not name.startswith("_") and callable(member)}
    public |= {name for name in imports.__all__ if callable(getattr(imports, name)) and name[0].islower()}
    without_arguments = {"audit", "close", "users"}
    covered = {item.call.removeprefix("Meter.") for item in CASES} | {"open"}
    assert public - without_arguments - covered == set()


def test_hostile_values_are_what_they_say(tmp_path: Path) -> None:
    """The table's values stay hostile: the far time overflows in UTC, the surrogate cannot be encoded."""
    with pytest.raises(OverflowError):
        HOSTILE["far"].astimezone(UTC)
    with pytest.raises(UnicodeEncodeError):
        HOSTILE["surrogate"].encode()
    assert HOSTILE["naive"].tzinfo is None and HOSTILE["huge"] > 2**63
