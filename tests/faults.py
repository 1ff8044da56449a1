"""A fault harness for the ledger's storage boundary: seeded, replayable faults and a reference model.

``Faults`` attaches to a Meter's engine and sees every statement the ledger sends, in order: the hot
statements run on the DBAPI cursor (``Db._run``, traced while ``traced()`` is active), SQLAlchemy's own
statements (``before_cursor_execute``) and every COMMIT (the dialect's ``do_commit``). Armed with a kind
and a seeded index, it injects one fault there:

- ``drop``: the connection dies before that statement, mid-transaction. PostgreSQL: ``pg_terminate_backend``
  of the session's backend pid from another connection; MariaDB: ``KILL CONNECTION``; SQLite (embedded, no
  server connection to lose): the connection is closed under the ledger, which rolls its transaction back.
  At a COMMIT this is the other ambiguous case: the COMMIT fails and was in fact not applied.
- ``ambiguous`` (indexes COMMITs only): the COMMIT is applied, then the connection is lost before its answer
  arrives (closed, and the driver's own disconnect error raised). The caller cannot know it committed.
- ``kill``: the process SIGKILLs itself before that statement. Only in a forked child (``in_child``); the
  test process refuses to kill itself.

Lock timeouts are not a hook: ``short_lock_waits`` makes an engine give up a lock wait quickly and
``Blocker`` holds a user's row lock (SQLite: the database's write lock) from another connection.

``Books`` is the reference model: balances, holds and their states, key counters, charges, credits and
codes as plain dicts, with the ledger's rules (docs/ledger.md) written out, and ``read_books`` reads the
same picture from the database. ``Scenario`` drives seeded operations (authorize, settle, release,
topup, redeem, grant, record_usage, fold_deferred, expire_holds) each under a seeded fault, and checks
after each one that the database equals the model either before or after the operation (never a half
state; for the multi-transaction fold and expiry, before plus a subset of their items), that the audit
is ok, and that retrying the same call without a fault ends exactly at the model's state after it.

Figures: gpt-4o prices and the pricing helpers come from tests/test_ledger_model.py (1.25 units per input
token, 0.625 per cached, 5 per output; a hold for ``max_tokens`` is 10 + 5 x max_tokens; top-ups at
500,000 units per USD; grants signup 100,000 and github_star 500,000 units).
"""

from __future__ import annotations

import copy
import os
import random
import signal
import sqlite3
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url

from metering.ledger import DuplicateReference, HoldTicket, LedgerBusy, Meter, QuotaExceeded, Receipt
from metering.ledger.database import make_engine
from metering.ledger.meter import secret_hash
from metering.ledger.statements import Db
from metering.ledger.tables import ApiKey, Hold, LedgerEntry, RedemptionCode, UsageEvent, User
from pricing.usage import UsageRecord
from tests.test_ledger_model import (
    BODY, GRANTS, TOPUPS, TTL, charged_units, hold_units, prices, settle_input, units, usage,
)

USERS, KEYS, HOLDS = User.__table__, ApiKey.__table__, Hold.__table__  # type: ignore[attr-defined]
EVENTS, ENTRIES, CODES = UsageEvent.__table__, LedgerEntry.__table__, RedemptionCode.__table__  # type: ignore[attr-defined]
FAULT_KINDS = ("drop", "ambiguous", "kill")
#: Every kind of call a scenario makes; ``OP_WEIGHTS`` draws authorize and settle most often, as a gateway does.
OP_KINDS = ("authorize", "settle", "release", "topup", "redeem", "grant", "record", "fold", "expire")
OP_WEIGHTS = ("authorize",) * 4 + ("settle",) * 3 + OP_KINDS[2:]
SOAK = os.environ.get("METERING_SOAK", "") not in ("", "0")


# ---------------------------------------------------------------------------------------------- the hook


@dataclass(frozen=True)
class Fired:
    """One fault injected: its kind, the statement index it fired at, and the start of that statement."""

    kind: str
    index: int
    statement: str
    wrote: bool = False  # the transaction cut short had written (an INSERT or UPDATE since its last COMMIT)


_TRACED: dict[Engine, "Faults"] = {}
_REAL_RUN = Db._run


def _traced_run(self: Db, rendered: Any, params: Any) -> Any:
    """``Db._run`` with the engine's ``Faults`` told first (a hot statement goes nowhere else SQLAlchemy sees)."""
    faults = _TRACED.get(self.connection.engine)
    if faults is not None:
        if self._cursor is None:  # as _run would: made now, so that a fault below hits the execute, inside its try
            self._cursor = self.connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        faults.before(rendered.sql, self.connection.connection.driver_connection)
    return _REAL_RUN(self, rendered, params)


@contextmanager
def traced() -> Iterator[None]:
    """Route the ledger's hot statements through the registered ``Faults`` for the duration."""
    Db._run = _traced_run  # type: ignore[method-assign]
    try:
        yield
    finally:
        Db._run = _REAL_RUN  # type: ignore[method-assign]


class Faults:
    """Counts the statements an engine sends and injects the armed fault at the seeded one."""

    def __init__(self, engine: Engine, *, in_child: bool = False) -> None:
        self.engine = engine
        self.backend = engine.dialect.name  # sqlite | postgresql | mysql
        self.in_child = in_child
        self.statements = 0  # statements seen since the last reset (COMMITs included)
        self.commits = 0
        self.wrote = False  # an INSERT or UPDATE since the last COMMIT
        self.commit_at: list[int] = []  # the statement index of each COMMIT since the last reset
        self.armed: tuple[str, int] | None = None
        self.fired: list[Fired] = []
        self._admin: Engine | None = None
        event.listen(engine, "before_cursor_execute", self._core)
        real_commit = engine.dialect.do_commit

        def do_commit(dbapi_connection: Any) -> None:  # the dialect's COMMIT, seen (and faulted) first
            self._commit(dbapi_connection, real_commit)

        engine.dialect.do_commit = do_commit  # type: ignore[method-assign]
        real_rollback = engine.dialect.do_rollback

        def do_rollback(dbapi_connection: Any) -> None:  # a rollback forgets what its transaction wrote
            self._rollback(dbapi_connection, real_rollback)

        engine.dialect.do_rollback = do_rollback  # type: ignore[method-assign]
        _TRACED[engine] = self

    def killed_in_child(self, meter: Meter, at: int, attempt: Callable[[], str | None]) -> bool:
        """Run ``attempt`` in a forked child that SIGKILLs itself before statement ``at``: True when the kill
        landed, False when the child finished first. ``attempt`` returns what went wrong, or None; the child
        never returns into pytest. A child that ends any other way fails the test (its output says why)."""
        meter.engine.dispose()  # no pooled connection may be shared with the child
        if self._admin is not None:
            self._admin.dispose()
        pid = os.fork()
        if pid == 0:  # the child: its own connections, the inherited hooks
            code = 0
            try:
                # A fresh pool (SQLAlchemy's recipe for a forked process), the dialect already initialized.
                meter.engine.dispose(close=False)
                self.in_child = True
                self.arm("kill", at)
                problem = attempt()
                if problem is not None:
                    print(f"child: {problem}", flush=True)
                    code = 3
            except BaseException:  # noqa: BLE001 (reported through the exit status)
                traceback.print_exc()
                code = 4
            os._exit(code)
        return child_was_killed(pid, "the child")

    def arm(self, kind: str, at: int) -> None:
        """Inject ``kind`` at statement ``at`` (``ambiguous``: at COMMIT ``at``), counting from now."""
        assert kind in FAULT_KINDS, kind
        if kind == "kill" and not self.in_child:
            raise RuntimeError("a kill is only ever armed in a forked child, never in the test process")
        self.reset()
        self.armed = (kind, at)

    def reset(self) -> None:
        """Disarm and count from zero."""
        self.armed, self.statements, self.commits, self.wrote = None, 0, 0, False
        self.commit_at = []

    def close(self) -> None:
        """Detach from the engine."""
        _TRACED.pop(self.engine, None)
        event.remove(self.engine, "before_cursor_execute", self._core)
        if self._admin is not None:
            self._admin.dispose()

    # -------------------------------------------------------------------------------------------- hooks

    def _core(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.before(statement, conn.connection.driver_connection)

    def before(self, statement: str, driver: Any) -> None:
        """Called before every statement but a COMMIT; fires a ``drop`` or ``kill`` armed for it."""
        index = self.statements
        self.statements += 1
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE"):
            self.wrote = True
        if self.armed is not None and self.armed[0] != "ambiguous" and self.armed[1] == index:
            self._fire(self.armed[0], index, statement, driver)

    def _commit(self, dbapi_connection: Any, real_commit: Callable[[Any], None]) -> None:
        index, commit = self.statements, self.commits
        self.statements += 1
        self.commits += 1
        self.commit_at.append(index)
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        armed = self.armed
        if armed is not None and armed[0] != "ambiguous" and armed[1] == index:
            self._fire(armed[0], index, "COMMIT", driver)  # a drop: the COMMIT below fails, not applied
        wrote, self.wrote = self.wrote, False
        real_commit(dbapi_connection)
        if armed is not None and armed[0] == "ambiguous" and armed[1] == commit:
            self.armed = None
            self.fired.append(Fired("ambiguous", commit, "COMMIT", wrote))
            raise self._lost(driver)  # applied, and its answer lost with the connection

    def _rollback(self, dbapi_connection: Any, real_rollback: Callable[[Any], None]) -> None:
        self.wrote = False  # what a rolled-back transaction wrote is gone
        real_rollback(dbapi_connection)

    def _fire(self, kind: str, index: int, statement: str, driver: Any) -> None:
        self.armed = None
        self.fired.append(Fired(kind, index, " ".join(statement.split())[:60], self.wrote))
        if kind == "kill":
            assert self.in_child
            os.kill(os.getpid(), signal.SIGKILL)
        self._drop(driver)

    # -------------------------------------------------------------------------------------------- faults

    def _admin_engine(self) -> Engine:
        if self._admin is None:
            self._admin = create_engine(self.engine.url, isolation_level="AUTOCOMMIT")
        return self._admin

    def _drop(self, driver: Any) -> None:
        """The session's connection dies, as a server restart or a network cut does it."""
        if self.backend == "sqlite":
            driver.close()  # the open transaction rolls back; every later use raises "closed database"
            return
        with self._admin_engine().connect() as admin:
            if self.backend == "postgresql":
                gone = admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": driver.info.backend_pid})
                assert gone.scalar_one() is True
                return
            thread = int(driver.thread_id())
            admin.execute(text(f"KILL CONNECTION {thread}"))
            for _ in range(500):  # KILL returns before the server has dropped the session: wait for it
                if not admin.execute(text("SELECT 1 FROM information_schema.processlist WHERE id = :id"),
                                     {"id": thread}).first():
                    return
                time.sleep(0.01)
            raise AssertionError(f"MariaDB session {thread} survived KILL CONNECTION")

    def _lost(self, driver: Any) -> Exception:
        """Close the connection and return the driver's own error for a connection lost mid-call."""
        driver.close()
        note = "(injected by tests/faults.py after the COMMIT was applied)"
        if self.backend == "postgresql":
            import psycopg

            return psycopg.OperationalError(f"server closed the connection unexpectedly {note}")
        if self.backend == "mysql":
            import pymysql

            return pymysql.err.OperationalError(2013, f"Lost connection to server during query {note}")
        return sqlite3.ProgrammingError("Cannot operate on a closed database.")


# ---------------------------------------------------------------------------------------------- lock waits


def child_was_killed(pid: int, what: str) -> bool:
    """Wait for a forked child: True when the injected kill ended it, False when it finished cleanly."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return True
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{what} ended with status {status}"
    return False


def short_lock_waits(engine: Engine) -> None:
    """Make every new connection of ``engine`` give up a lock wait at once (or after 20 ms)."""

    @event.listens_for(engine, "connect")
    def _short(dbapi_connection: Any, _record: Any) -> None:
        if engine.dialect.name == "sqlite":
            dbapi_connection.execute("PRAGMA busy_timeout = 20")
            return
        cursor = dbapi_connection.cursor()
        if engine.dialect.name == "postgresql":
            cursor.execute("SET lock_timeout = '20ms'")
        else:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 0")  # MariaDB: fail at once, no wait
        cursor.close()
        dbapi_connection.commit()


class Blocker:
    """Another connection holding ``user``'s row lock (SQLite: the write lock) until ``release``."""

    def __init__(self, url: str, user: int) -> None:
        self.backend = make_url(url).get_backend_name()
        self.released = threading.Event()
        if self.backend == "sqlite":
            self.connection: Any = sqlite3.connect(make_url(url).database, isolation_level=None)
            self.connection.execute("BEGIN IMMEDIATE")
            return
        engine_url = make_engine(url).url
        if self.backend == "postgresql":
            import psycopg

            self.connection = psycopg.connect(engine_url.set(drivername="postgresql").render_as_string(hide_password=False))
            self.connection.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user,))
        else:
            import pymysql

            self.connection = pymysql.connect(host=engine_url.host, port=engine_url.port or 3306, user=engine_url.username,
                                              password=engine_url.password or "", database=engine_url.database)
            cursor = self.connection.cursor()
            cursor.execute("BEGIN")
            cursor.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user,))

    def release(self) -> None:
        """Roll back: the lock is free."""
        if not self.released.is_set():
            self.released.set()
            self.connection.rollback()
            self.connection.close()


def is_lock_wait(exc: BaseException) -> bool:
    """Whether a database error is a lock wait given up (PostgreSQL 55P03, MariaDB 1205, SQLite busy)."""
    orig = getattr(exc, "orig", exc)
    errno = orig.args[0] if getattr(orig, "args", None) else None  # PyMySQL's sqlstate for 1205 is HY000
    return getattr(orig, "sqlstate", None) == "55P03" or errno == 1205 or "database is locked" in str(orig).lower()


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class KeyState:
    """A key as the model sees it."""

    user: int
    secret: str
    limit: int | None
    used: int = 0
    reserved: int = 0


@dataclass
class HoldState:
    """A hold as the model sees it, by request id."""

    user: int
    key: int
    amount: int
    max_tokens: int
    expires_at: datetime
    status: str = "open"  # open | settled | released | expired
    charged: tuple[int, int] | None = None  # (quota, overage) of its charge
    usage: UsageRecord | None = None


@dataclass
class DeferredState:
    """A deferred usage event as the model sees it."""

    key: int
    quota: int
    folded: bool = False


@dataclass
class Books:
    """The ledger's reference model: what every balance, hold, counter, charge and credit must be."""

    clock: datetime
    balance: dict[int, int] = field(default_factory=dict)
    unreserved: dict[int, int] = field(default_factory=dict)  # charges nothing reserved (the overage rule)
    keys: dict[int, KeyState] = field(default_factory=dict)
    holds: dict[str, HoldState] = field(default_factory=dict)
    deferred: dict[str, DeferredState] = field(default_factory=dict)
    orders: dict[str, tuple[int, str]] = field(default_factory=dict)  # reference -> (user, USD amount)
    grants: set[tuple[int, str]] = field(default_factory=set)
    codes: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # code -> (units, redeemed by)

    def copy(self) -> "Books":
        """An independent copy (to predict an operation's effect without committing to it)."""
        return copy.deepcopy(self)

    def authorize(self, key: int, request_id: str, max_tokens: int) -> tuple[Any, ...]:
        """Reserve the worst case if both the balance and the key's room cover it."""
        if request_id in self.holds:
            return ("hold", self.holds[request_id].amount)
        k = self.keys[key]
        amount, balance = hold_units(max_tokens), self.balance[k.user]
        room = None if k.limit is None else k.limit - k.used - k.reserved
        if balance < amount:
            return ("refused", "user", amount, max(balance, 0))
        if room is not None and room < amount:
            return ("refused", "key", amount, max(room, 0))
        self.balance[k.user] -= amount
        if k.limit is not None:
            k.reserved += amount
        self.holds[request_id] = HoldState(k.user, key, amount, max_tokens, self.clock + TTL)
        return ("hold", amount)

    def settle(self, request_id: str, used: UsageRecord) -> tuple[Any, ...]:
        """Charge once; an open hold is released in the same step, a resolved one is not released again."""
        h = self.holds[request_id]
        if h.charged is not None:
            return ("receipt", *h.charged)
        quota = charged_units(used, h.max_tokens)
        k = self.keys[h.key]
        if h.status == "open":
            self.balance[h.user] += h.amount - quota
            if k.limit is not None:
                k.reserved -= h.amount
            h.status, overage = "settled", max(0, quota - h.amount)
        else:
            self.balance[h.user] -= quota
            overage = quota  # a late settle: nothing was reserved for it any more
        if k.limit is not None:
            k.used += quota
        self.unreserved[h.user] += overage
        h.charged, h.usage = (quota, overage), used
        return ("receipt", quota, overage)

    def resolve(self, request_id: str, status: str) -> tuple[Any, ...]:
        """Release or expire: the amount comes back once."""
        h = self.holds[request_id]
        if h.status != "open":
            return ("bool", False)
        self.balance[h.user] += h.amount
        k = self.keys[h.key]
        if k.limit is not None:
            k.reserved -= h.amount
        h.status = status
        return ("bool", True)

    def due(self) -> list[str]:
        """Open holds past their TTL at the model's clock."""
        return [rid for rid, h in self.holds.items() if h.status == "open" and h.expires_at <= self.clock]

    def expire(self, minutes: int) -> tuple[Any, ...]:
        """Let time pass, then expire every hold due."""
        self.clock += timedelta(minutes=minutes)
        due = self.due()
        for rid in due:
            self.resolve(rid, "expired")
        return ("int", len(due))

    def credit(self, user: int, units_: int) -> None:
        """A credit entry moves the balance by its amount."""
        self.balance[user] += units_

    def topup(self, user: int, amount: str, reference: str) -> tuple[Any, ...]:
        """Once per reference; the same reference for other content is refused."""
        if reference in self.orders:
            return ("int", TOPUPS[amount]) if self.orders[reference] == (user, amount) else ("duplicate",)
        self.orders[reference] = (user, amount)
        self.credit(user, TOPUPS[amount])
        return ("int", TOPUPS[amount])

    def redeem(self, user: int, code: str) -> tuple[Any, ...]:
        """Once per code."""
        worth, redeemed_by = self.codes[code]
        if redeemed_by is not None:
            return ("duplicate",)
        self.codes[code] = (worth, user)
        self.credit(user, worth)
        return ("int", worth)

    def grant(self, user: int, kind: str) -> tuple[Any, ...]:
        """Once per user and kind; 0 the second time."""
        if (user, kind) in self.grants:
            return ("int", 0)
        self.grants.add((user, kind))
        self.credit(user, GRANTS[kind])
        return ("int", GRANTS[kind])

    def record(self, key: int, request_id: str, used: UsageRecord) -> tuple[Any, ...]:
        """A pending deferred event: nothing moves until the fold."""
        quota = units(used.input_tokens, used.output_tokens, used.cached_input_tokens)
        self.deferred.setdefault(request_id, DeferredState(key, quota))
        return ("receipt", self.deferred[request_id].quota, 0)

    def pending(self) -> list[str]:
        """Deferred events not folded yet."""
        return [rid for rid, d in self.deferred.items() if not d.folded]

    def fold_one(self, request_id: str) -> None:
        """Charge one deferred event (nothing was reserved: all of it counts toward the overage rule)."""
        d = self.deferred[request_id]
        k = self.keys[d.key]
        self.balance[k.user] -= d.quota
        self.unreserved[k.user] += d.quota
        if k.limit is not None:
            k.used += d.quota
        d.folded = True

    def fold(self) -> tuple[Any, ...]:
        """Charge every pending deferred event."""
        pending = self.pending()
        for rid in pending:
            self.fold_one(rid)
        return ("int", len(pending))

    def snapshot(self) -> dict[str, Any]:
        """The model as ``read_books`` reads the database."""
        charges = {rid: h.charged[0] for rid, h in self.holds.items() if h.charged is not None}
        charges |= {rid: d.quota for rid, d in self.deferred.items() if d.folded}
        events = {rid: "charged" for rid, h in self.holds.items() if h.charged is not None}
        events |= {rid: "charged" if d.folded else "pending" for rid, d in self.deferred.items()}
        credits = {f"grant:{user}:{kind}": GRANTS[kind] for user, kind in self.grants}
        credits |= {f"topup:{reference}": TOPUPS[amount] for reference, (_, amount) in self.orders.items()}
        credits |= {f"redemption:{secret_hash(code)}": worth for code, (worth, by) in self.codes.items() if by is not None}
        entries = Counter({
            "hold": len(self.holds), "release": sum(h.status != "open" for h in self.holds.values()),
            "charge": len(charges), "grant": len(self.grants), "topup": len(self.orders),
            "redemption": sum(by is not None for _, by in self.codes.values()),
        })
        return {
            "balances": dict(self.balance),
            "keys": {kid: (k.used, k.reserved) for kid, k in self.keys.items() if k.limit is not None},
            "holds": {rid: (h.status, h.amount) for rid, h in self.holds.items()},
            "events": events, "charges": charges, "credits": credits, "entries": +entries,
            "codes": {secret_hash(code): by for code, (_, by) in self.codes.items()},
        }


def read_books(engine: Engine) -> dict[str, Any]:
    """What the database holds, in the shape of ``Books.snapshot``."""
    with engine.connect() as c:
        code_hash = dict(c.execute(select(CODES.c.id, CODES.c.code_hash)).all())
        credits, charges, entries = {}, {}, Counter()
        for kind, reference, amount in c.execute(select(ENTRIES.c.kind, ENTRIES.c.reference, ENTRIES.c.amount)):
            entries[kind] += 1
            if kind == "charge":
                charges[reference.removeprefix("charge:")] = -int(amount)
            elif kind == "redemption":
                credits[f"redemption:{code_hash[int(reference.removeprefix('redemption:'))]}"] = int(amount)
            elif kind in ("grant", "topup"):
                credits[reference] = int(amount)
        return {
            "balances": {uid: int(b) for uid, b in c.execute(select(USERS.c.id, USERS.c.balance))},
            "keys": {kid: (int(u), int(r)) for kid, u, r in c.execute(
                select(KEYS.c.id, KEYS.c.used_quota, KEYS.c.reserved_quota).where(KEYS.c.limit_quota.is_not(None)))},
            "holds": {rid: (s, int(a)) for rid, s, a in c.execute(select(HOLDS.c.request_id, HOLDS.c.status, HOLDS.c.amount))},
            "events": dict(c.execute(select(EVENTS.c.request_id, EVENTS.c.status)).all()),
            "charges": charges, "credits": credits, "entries": +entries,
            "codes": dict(c.execute(select(CODES.c.code_hash, CODES.c.redeemed_by)).all()),
        }


def difference(actual: dict[str, Any], expected: dict[str, Any]) -> str:
    """The parts of two snapshots that differ, for an assertion message."""
    lines = []
    for part in expected:
        if actual.get(part) != expected[part]:
            a, e = actual.get(part, {}), expected[part]
            keys = sorted({*a, *e}, key=str)
            lines.append(f"{part}: " + ", ".join(f"{k}: {a.get(k)} (model {e.get(k)})" for k in keys if a.get(k) != e.get(k)))
    return "; ".join(lines) or "no difference"


# ---------------------------------------------------------------------------------------------- outcomes


def outcome(result: Any) -> tuple[Any, ...]:
    """A call's result (or the exception it raised) in the model's terms."""
    if isinstance(result, HoldTicket):
        return ("hold", result.amount)
    if isinstance(result, Receipt):
        return ("receipt", result.quota, result.overage)
    if isinstance(result, QuotaExceeded):
        return ("refused", result.scope, result.needed, result.available)
    if isinstance(result, DuplicateReference):
        return ("duplicate",)
    if isinstance(result, LedgerBusy):
        return ("busy", result.maybe_applied)
    if isinstance(result, bool):
        return ("bool", result)
    if isinstance(result, int):
        return ("int", result)
    return ("unexpected", type(result).__name__, str(result)[:300])


#: What a call returns when an earlier attempt of it was applied already (the retry's "first result").
def done_variants(kind: str, predicted: tuple[Any, ...]) -> set[tuple[Any, ...]]:
    """Every result a retry may give once the first attempt took effect (besides ``predicted`` itself)."""
    if kind == "release" and predicted == ("bool", True):
        return {("bool", False)}
    if kind == "redeem" and predicted[0] == "int":
        return {("duplicate",)}  # documented: a used code is a DuplicateReference, even for its redeemer
    if kind == "grant":
        return {("int", 0)}
    if kind in ("fold", "expire"):
        return {("int", n) for n in range(predicted[1] + 1)}  # the items a faulted attempt did not reach
    return set()


# ---------------------------------------------------------------------------------------------- scenario


@dataclass
class Op:
    """One ledger call: what it does to a Meter and what the model predicts for it."""

    kind: str
    label: str
    call: Callable[[Meter], Any]
    predict: Callable[[Books], tuple[Any, ...]]
    items: Callable[[Books], list[str]] | None = None  # multi-transaction ops: the request ids it works through
    user: int | None = None  # the user whose row the call locks (None: several or none)


@dataclass
class Figures:
    """What a run did, for docs/reliability.md."""

    operations: int = 0
    faults: Counter[str] = field(default_factory=Counter)  # injected, by kind
    armed_not_reached: int = 0  # armed past the last statement: the call ran clean
    busy: Counter[str] = field(default_factory=Counter)  # LedgerBusy surfaced, by fault kind
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: int = 0

    def add(self, other: "Figures") -> None:
        """Sum another run's figures into these."""
        self.operations += other.operations
        self.faults.update(other.faults)
        self.armed_not_reached += other.armed_not_reached
        self.busy.update(other.busy)
        self.outcomes.update(other.outcomes)
        self.violations += other.violations


class Scenario:
    """A seeded run: a small ledger, then operations each under a seeded fault, checked against the model."""

    def __init__(self, url: str, seed: int, backend: str) -> None:
        self.url, self.seed, self.backend = url, seed, backend
        self.rng = random.Random(f"faults-{backend}-{seed}")
        self.meter = Meter.open(url, prices=prices(), hold_ttl=TTL)
        self.faults = Faults(self.meter.engine)
        self.books = Books(clock=datetime.now(UTC).replace(microsecond=0))
        self.tickets: dict[str, HoldTicket] = {}
        self.log: list[str] = []
        self.figures = Figures()
        self.counter = 0
        # The statements (and COMMITs) each kind of call was seen to send: where a fault can land.
        self.span: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        """Detach and release the connections."""
        self.faults.close()
        self.meter.close()

    def fail(self, message: str) -> AssertionError:
        """An assertion naming the seed to replay and what the run did."""
        self.figures.violations += 1
        tail = "\n  ".join(self.log[-12:])
        return AssertionError(f"{message}\n  replay: METERING_FAULT_SEED={self.seed} ({self.backend})\n  last steps:\n  {tail}")

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.seed}-{self.counter}"

    # -------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Two users, three keys (one limited), three codes: no faults."""
        m, b = self.meter, self.books
        for name, funds in (("alice", "0.1"), ("bob", "0.01")):
            uid = m.create_user(f"{name}-{self.seed}")
            b.balance[uid], b.unreserved[uid] = 0, 0
            reference = self._next("order")
            assert m.topup(uid, funds, "USD", reference) == b.topup(uid, funds, reference)[1]
        alice, bob = sorted(b.balance)
        for user, limit in ((alice, self.rng.randint(0, 100_000)), (alice, None), (bob, None)):
            secret = m.create_key(user, self._next("key"), limit_quota=limit)
            key_id = max(row["id"] for row in m.keys(user))
            b.keys[key_id] = KeyState(user, secret, limit)
        worth = self.rng.randint(1, 5_000)
        for code in m.create_redemption_codes(3, worth):
            b.codes[code] = (worth, None)
        self.check(read_books(m.engine), b.snapshot(), "after setup")

    # -------------------------------------------------------------------------------------------- ops

    def plan(self, kind: str | None = None) -> Op:
        """The next operation (of ``kind``, else a seeded kind), drawn from the seed and the model's state."""
        rng, b = self.rng, self.books
        kind = kind or rng.choice(OP_WEIGHTS)
        users, keys = sorted(b.balance), sorted(b.keys)
        holds = sorted(b.holds)
        if kind in ("settle", "release") and not holds:
            kind = "authorize"
        if kind == "fold" and not b.pending():
            kind = "record"
        if kind == "authorize":
            key, rid = rng.choice(keys), self._next("req")
            max_tokens = rng.choice([rng.randint(1, 300), rng.randint(1, 300), rng.randint(300, 30_000)])
            secret = b.keys[key].secret
            return Op(kind, f"authorize {rid} key {key} max_tokens {max_tokens}",
                      lambda m: m.authorize(secret, {**BODY, "max_tokens": max_tokens}, rid, at=b.clock),
                      lambda books: books.authorize(key, rid, max_tokens), user=b.keys[key].user)
        if kind == "settle":
            open_ = [r for r in holds if b.holds[r].status == "open"]
            rid = rng.choice(open_) if open_ and rng.random() < 0.8 else rng.choice(holds)
            h = b.holds[rid]
            input_tokens, cached = settle_input(rng.randint)
            used = h.usage or usage(input_tokens, rng.choice(
                [rng.randint(0, h.max_tokens), rng.randint(h.max_tokens, 3 * h.max_tokens + 20)]), cached)
            return Op(kind, f"settle {rid} ({h.status}) {used.input_tokens}/{used.output_tokens}",
                      lambda m: m.settle(self.tickets[rid], usage=used), lambda books: books.settle(rid, used), user=h.user)
        if kind == "release":
            open_ = [r for r in holds if b.holds[r].status == "open"]
            rid = rng.choice(open_) if open_ and rng.random() < 0.8 else rng.choice(holds)
            return Op(kind, f"release {rid} ({b.holds[rid].status})", lambda m: m.release(self.tickets[rid]),
                      lambda books: books.resolve(rid, "released"), user=b.holds[rid].user)
        if kind == "topup":
            user, amount = rng.choice(users), rng.choice(sorted(TOPUPS))
            reference = rng.choice(sorted(b.orders)) if b.orders and rng.random() < 0.2 else self._next("order")
            if reference in b.orders:
                user, amount = b.orders[reference]  # a retried webhook, same content
            return Op(kind, f"topup {user} {amount} {reference}", lambda m: m.topup(user, amount, "USD", reference),
                      lambda books: books.topup(user, amount, reference), user=user)
        if kind == "redeem":
            user = rng.choice(users)
            unused = [c for c, (_, by) in sorted(b.codes.items()) if by is None]
            code = rng.choice(unused) if unused and rng.random() < 0.8 else rng.choice(sorted(b.codes))
            return Op(kind, f"redeem {user} {code[:8]}", lambda m: m.redeem(user, code),
                      lambda books: books.redeem(user, code), user=user)
        if kind == "grant":
            user, grant = rng.choice(users), rng.choice(sorted(GRANTS))
            return Op(kind, f"grant {user} {grant}", lambda m: m.grant(user, grant), lambda books: books.grant(user, grant),
                      user=user)
        if kind == "record":
            key, rid = rng.choice(keys), self._next("deferred")
            used = usage(rng.randint(0, 40), rng.randint(0, 500), 0)
            secret = b.keys[key].secret
            return Op(kind, f"record {rid} key {key}", lambda m: m.record_usage(secret, rid, used, at=b.clock),
                      lambda books: books.record(key, rid, used), user=b.keys[key].user)
        if kind == "fold":
            owners = {b.keys[b.deferred[rid].key].user for rid in b.pending()}
            per_transaction = rng.choice([1, 3])  # the worker's one event per transaction, or an import's batches
            return Op(kind, f"fold {len(b.pending())} by {per_transaction}",
                      lambda m: m.fold_deferred(per_transaction=per_transaction), lambda books: books.fold(),
                      items=lambda books: books.pending(), user=owners.pop() if len(owners) == 1 else None)
        minutes = rng.choice([5, 11])
        later = b.clock + timedelta(minutes=minutes)
        due = [r for r, h in b.holds.items() if h.status == "open" and h.expires_at <= later]
        owners = {b.holds[r].user for r in due}
        return Op(kind, f"expire +{minutes} min", lambda m: m.expire_holds(now=later),
                  lambda books: books.expire(minutes),
                  items=lambda books: [r for r, h in books.holds.items() if h.status == "open" and h.expires_at <= later],
                  user=owners.pop() if len(owners) == 1 else None)

    def ensure(self, kind: str) -> None:
        """Unfaulted steps that give a call of ``kind`` something to work on (funds, an open hold, a code...)."""
        b = self.books
        for user in sorted(b.balance):
            if b.balance[user] < 20_000:
                self.step("topup", "none")
        if kind in ("settle", "release", "expire") and not any(h.status == "open" for h in b.holds.values()):
            for _ in range(3):  # the odd refusal (a hold above the key's limit): try a few
                self.step("authorize", "none")
                if any(h.status == "open" for h in self.books.holds.values()):
                    break
        if kind == "fold" and len({b.keys[b.deferred[rid].key].user for rid in b.pending()}) > 1:
            self.step("fold", "none")  # a locked fold must wait on one user's lock: fold the others' first
        if kind == "fold" and not self.books.pending():
            self.step("record", "none")
        if kind == "redeem" and all(by is not None for _, by in b.codes.values()):
            worth = self.rng.randint(1, 5_000)
            for code in self.meter.create_redemption_codes(3, worth):
                self.books.codes[code] = (worth, None)

    def step(self, kind: str | None = None, fault: str | None = None, at: int | None = None) -> None:
        """One call (of ``kind``, else seeded) under ``fault`` at statement ``at`` (else seeded), checked
        against the model right after it and again after its retry without a fault."""
        op = self.plan(kind)
        if fault is None:
            fault = self.rng.choice(("none", "drop", "ambiguous", "kill", "kill"))
        if at is None:
            statements, commits = self.span.get(op.kind, (12, 2))
            at = self.rng.randrange(commits + 1) if fault == "ambiguous" else self.rng.randrange(statements + 1)
        before = self.books
        after = before.copy()
        predicted = op.predict(after)
        self.log.append(f"{op.label} under {fault}@{at}: model says {predicted}")
        self.figures.operations += 1
        first = self._attempt(op, fault, at)
        self.log[-1] += f", first attempt {first}"
        self.verify(op, fault, at, before, after, predicted, first)

    def verify(self, op: Op, fault: str, at: int, before: Books, after: Books, predicted: tuple[Any, ...],
               first: tuple[Any, ...]) -> None:
        """The state is the model's before or after ``op`` (never half), then a retry ends exactly after it."""
        actual = read_books(self.meter.engine)
        expected = [before.snapshot(), after.snapshot()]
        if op.items is not None:  # a fold or an expiry: one transaction per item, any of them may be done
            partial = before.copy()
            for rid in op.items(before):
                done = actual["events"].get(rid) == "charged" if op.kind == "fold" else actual["holds"][rid][0] == "expired"
                if done:
                    (partial.fold_one(rid) if op.kind == "fold" else partial.resolve(rid, "expired"))
            if op.kind == "expire":
                partial.clock = after.clock
            expected.append(partial.snapshot())
        if actual not in expected:
            raise self.fail(f"half-written state after {op.label} under {fault}@{at}: "
                            f"{difference(actual, expected[-1] if op.items else after.snapshot())}")
        self.audit(f"after {op.label} under {fault}@{at}")
        if first[0] == "unexpected":
            raise self.fail(f"{op.label} under {fault}@{at} raised an untyped error: {first}")
        interrupted = first[0] in ("killed", "busy", "child-done")
        if not interrupted and first != predicted:
            raise self.fail(f"{op.label} under {fault}@{at} returned {first}, the model says {predicted}")

        self.faults.reset()
        retry = outcome(self._call(op.call, self.meter))
        self._keep_ticket(op, retry)
        allowed = {predicted} | done_variants(op.kind, predicted)
        if retry not in allowed:
            raise self.fail(f"the retry of {op.label} (after {fault}@{at}: {first}) returned {retry}, "
                            f"allowed {sorted(allowed, key=str)}")
        self.books = after
        self.figures.outcomes[predicted[0]] += 1
        self.check(read_books(self.meter.engine), after.snapshot(), f"after the retry of {op.label}")
        self.audit(f"after the retry of {op.label}")

    def locked_step(self, kind: str, url: str, hold_on: bool) -> tuple[Any, ...]:
        """``kind`` while another connection holds its user's row lock (the engine gives up lock waits quickly).

        ``hold_on``: the lock is held until the call returns (it must raise ``LedgerBusy`` having written
        nothing); else it is let go at the first lock wait given up (the ledger's own retry must then
        succeed). Returns the first attempt's outcome.
        """
        self.ensure(kind)
        op = self.plan(kind)
        assert op.user is not None, f"{op.label} locks no single user"
        before = self.books
        after = before.copy()
        predicted = op.predict(after)
        self.log.append(f"{op.label} under a lock wait ({'held' if hold_on else 'let go'}): model says {predicted}")
        self.figures.operations += 1
        waits: list[BaseException] = []
        blocker = Blocker(url, op.user)

        def on_error(context: Any) -> None:
            if is_lock_wait(context.original_exception):
                waits.append(context.original_exception)
                if not hold_on:
                    blocker.release()

        event.listen(self.meter.engine, "handle_error", on_error)
        try:
            first = outcome(self._call(op.call, self.meter))
        finally:
            event.remove(self.meter.engine, "handle_error", on_error)
            blocker.release()
        self.log[-1] += f", first attempt {first} after {len(waits)} lock waits"
        if not waits:  # every one of these calls writes under the user's lock: it must have met the blocker
            raise self.fail(f"{op.label} never waited for the lock held by another connection")
        self.figures.faults["lock wait"] += 1 if waits else 0
        if first[0] == "busy":
            self.figures.busy["lock wait"] += 1
        self.verify(op, "lock wait", 0, before, after, predicted, first)
        return first

    def _attempt(self, op: Op, fault: str, at: int) -> tuple[Any, ...]:
        """The first attempt, under the fault: its outcome, ``("killed",)`` or ``("child-done",)``."""
        if fault == "kill":
            return self._in_child(op, at)
        if fault != "none":
            self.faults.arm(fault, at)
        else:
            self.faults.reset()
        fired = len(self.faults.fired)
        result = outcome(self._call(op.call, self.meter))
        if fault == "none":
            self._learn(op.kind)  # a clean run's statements: where a later fault of this kind can land
        if fault != "none":
            if len(self.faults.fired) > fired:
                self.figures.faults[fault] += 1
                if result[0] == "busy":
                    self.figures.busy[fault] += 1
                cut = self.faults.fired[-1]
                if cut.statement == "COMMIT" and cut.wrote and result != ("busy", True):
                    # The caller cannot know whether this write was applied: only LedgerBusy(maybe_applied) says so.
                    raise self.fail(f"{op.label}: a write whose COMMIT failed ({fault}) was reported as {result}")
            else:
                self.figures.armed_not_reached += 1
        self.faults.reset()
        self._keep_ticket(op, result)
        return result

    def _in_child(self, op: Op, at: int) -> tuple[Any, ...]:
        """Run the call in a forked child that SIGKILLs itself before statement ``at``."""

        def attempt() -> str | None:
            result = outcome(self._call(op.call, self.meter))
            return f"{op.label}: {result}" if result[0] == "unexpected" else None

        try:
            killed = self.faults.killed_in_child(self.meter, at, attempt)
        except AssertionError as exc:
            raise self.fail(f"the child running {op.label}: {exc} (see its output above)") from None
        if killed:
            self.figures.faults["kill"] += 1
            return ("killed",)
        self.figures.armed_not_reached += 1
        return ("child-done",)

    @staticmethod
    def _call(call: Callable[[Meter], Any], meter: Meter) -> Any:
        try:
            return call(meter)
        except (QuotaExceeded, DuplicateReference, LedgerBusy) as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 (an untyped error is what the harness looks for)
            return exc

    def _keep_ticket(self, op: Op, result: tuple[Any, ...]) -> None:
        if op.kind == "authorize" and result[0] == "hold":
            rid = op.label.split()[1]
            self.tickets[rid] = self.meter.hold(rid)

    def _learn(self, kind: str) -> None:
        """Remember how many statements and COMMITs this kind of call sends (where the next fault may land)."""
        statements, commits = self.span.get(kind, (0, 0))
        self.span[kind] = (max(statements, self.faults.statements), max(commits, self.faults.commits))

    def check(self, actual: dict[str, Any], expected: dict[str, Any], when: str) -> None:
        """The database equals the model."""
        if actual != expected:
            raise self.fail(f"the ledger differs from the model {when}: {difference(actual, expected)}")

    def audit(self, when: str) -> None:
        """``Meter.audit()`` finds no violation, and no balance is below zero beyond the overage rule."""
        report = self.meter.audit()
        if not report.ok:
            raise self.fail(f"audit {when}: {report.violations}")
        for user, balance in self.books.balance.items():
            if balance < -self.books.unreserved[user]:
                raise self.fail(f"user {user} is below zero by more than its unreserved charges {when}")
