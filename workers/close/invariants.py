"""The ledger's invariants for a close: ``metering.ledger.audit.run_audit``, behind a fast check that all is well.

``run_audit`` reads a row into Python for every usage event and every ledger entry, so it can report each
violation with its details: on a ledger of millions of rows that alone takes longer than the rest of a
close. ``LedgerCheck`` asks first, in a few queries whose work the database does (one pass over the
entries grouped by user and key, filters that return at most one row), whether anything is broken at all. Only if something is (or the quick
check fails for any reason) does ``violations`` run ``run_audit`` for the report. Either way the list
is ``run_audit``'s own: empty when the ledger is sound, every violation otherwise.

The quick check runs on its own connection in a background thread while the close scans the day
(``LedgerCheck(engine)`` starts it; ``violations(connection)`` waits for it). Its verdict holds for any
snapshot: every committed transaction keeps the invariants, so a sound ledger is sound a moment later. It restates audit.py's
checks, so it is trusted only for the ``run_audit`` it was written against: ``AUDITED_SOURCE`` is the
sha256 of that function's source, and when the ledger's audit changes, the quick check steps aside
(with a warning) and every close runs ``run_audit`` in full until this module is brought up to date.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, case, func, literal_column, or_, select
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from metering.ledger import audit
from metering.ledger.audit import KIND_SIGNS, run_audit
from metering.ledger.database import READ_ONLY
from metering.ledger.tables import ApiKey, Hold, LedgerEntry, UsageEvent, User

if TYPE_CHECKING:
    from metering.ledger.meter import Violation

log = logging.getLogger("metering.worker")

USERS, KEYS, HOLDS = User.__table__, ApiKey.__table__, Hold.__table__  # type: ignore[attr-defined]
EVENTS, ENTRIES = UsageEvent.__table__, LedgerEntry.__table__  # type: ignore[attr-defined]
#: sha256 of the source of the ``run_audit`` whose checks ``_sound`` restates.
AUDITED_SOURCE = "9414ada6a523aa11ee590be7eb0c918e6145f0dfac81de0562684d9f5d9f3306"


def quick_check_applies() -> bool:
    """Whether the ledger's audit is still the one the quick check restates."""
    try:
        source = inspect.getsource(audit.run_audit)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(source.encode()).hexdigest() == AUDITED_SOURCE


class LedgerCheck:
    """The quick check, started at once in a background thread on its own connection."""

    def __init__(self, engine: Engine) -> None:
        self._sound: bool | None = None
        self._thread: threading.Thread | None = None
        if not quick_check_applies():
            log.warning("metering.ledger.audit.run_audit changed: the close runs it in full (update workers/close/invariants.py)")
            self._sound = False
            return
        if isinstance(engine.pool, (SingletonThreadPool, StaticPool)):
            return  # an in-memory SQLite database, which no other connection sees: checked in ``violations``
        self._thread = threading.Thread(target=self._run, args=(engine,), name="close-ledger-check", daemon=True)
        self._thread.start()

    def _run(self, engine: Engine) -> None:
        try:
            with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
                self._sound = sound(connection)
        except Exception:  # noqa: BLE001 (whatever went wrong, run_audit will run and say it)
            log.exception("the quick ledger check failed; running the full audit")
            self._sound = False

    def violations(self, connection: Connection) -> Iterator["Violation"]:
        """``run_audit(connection)``'s violations: none when the quick check found the ledger sound."""
        if self._thread is not None:
            self._thread.join()
        elif self._sound is None:
            self._sound = sound(connection)
        if self._sound:
            return iter(())
        return run_audit(connection)


def sound(connection: Connection) -> bool:
    """True only if ``run_audit`` would find nothing (its five checks, each asked so that the database does the work)."""
    if connection.execute(_holds().limit(1)).first() is not None:
        return False
    return _entries_sound(connection) and _charges_sound(connection)


def _entries_sound(connection: Connection) -> bool:
    """Checks 1, 4 and 5 from one pass over the entries, grouped by (user, key)."""
    # Grouped by ``user_id + 0`` and ``key_id + 0``: on SQLite one scan and a sort beat walking an index
    # with a table look-up per entry.
    kind, amount = ENTRIES.c.kind, ENTRIES.c.amount
    owner = (ENTRIES.c.user_id + literal_column("0")).label("owner")
    key = (ENTRIES.c.key_id + literal_column("0")).label("key")
    credits = [name for name, sign in KIND_SIGNS.items() if sign > 0]
    debits = [name for name, sign in KIND_SIGNS.items() if sign < 0]
    # 5. Entries are of known kinds, with the sign of their kind; and (for check 2) only charges name an event.
    wrong = or_(
        kind.is_(None), amount.is_(None), kind.not_in(list(KIND_SIGNS)),
        and_(kind.in_(credits), amount < 0), and_(kind.in_(debits), amount > 0),
        and_(ENTRIES.c.usage_event_id.is_not(None), kind != "charge"),
    )
    rows = connection.execute(select(
        owner, key, func.coalesce(func.sum(amount), 0), func.sum(case((kind == "charge", -amount), else_=0)),
        func.sum(case((wrong, 1), else_=0)),
    ).group_by(owner, key))
    totals: dict[Any, int] = {}
    used: dict[Any, int] = {}
    for user_id, key_id, total, charged, wrongs in rows:
        if wrongs:
            return False
        totals[user_id] = totals.get(user_id, 0) + int(total)
        used[key_id] = used.get(key_id, 0) + int(charged or 0)
    # 1. Each user's balance equals the sum of its entries.
    for user_id, balance in connection.execute(select(USERS.c.id, USERS.c.balance)):
        if balance is None or int(balance) != totals.get(user_id, 0):
            return False
    # 4. A limited key's reserved counter equals its open holds, its used counter its charges.
    open_holds = select(HOLDS.c.key_id, func.sum(HOLDS.c.amount).label("reserved")).where(
        HOLDS.c.status == "open", HOLDS.c.limited_key.is_(True)
    ).group_by(HOLDS.c.key_id).subquery()
    limited = select(KEYS.c.id, KEYS.c.reserved_quota, KEYS.c.used_quota, func.coalesce(open_holds.c.reserved, 0)).outerjoin(
        open_holds, open_holds.c.key_id == KEYS.c.id
    ).where(KEYS.c.limit_quota.is_not(None))
    for key_id, reserved, in_use, expected_reserved in connection.execute(limited):
        if reserved is None or in_use is None or int(reserved) != int(expected_reserved) or int(in_use) != used.get(key_id, 0):
            return False
    return True


def _charges_sound(connection: Connection) -> bool:
    """2. Each charged usage event has exactly one charge entry, a pending one none.

    Counted over every entry naming an event, which are its charges while no other kind of entry names
    an event (``_entries_sound`` makes sure none does). When the event ids are dense (no event was ever
    deleted: SQLite hands out ids without gaps), every id an entry names is an event, and three index-only
    counts settle it: no event is named twice, no event that is not charged is named, and as many events
    are named as are charged. Otherwise one query matches each event with its count."""
    named = ENTRIES.c.usage_event_id
    events, low, high = connection.execute(select(func.count(), func.min(EVENTS.c.id), func.max(EVENTS.c.id))).one()
    if not events:
        return True
    if events != high - low + 1:
        return connection.execute(_charges(connection.dialect.name).limit(1)).first() is None
    naming, first, last = connection.execute(select(func.count(), func.min(named), func.max(named)).where(named.is_not(None))).one()
    if naming and (first < low or last > high):
        return connection.execute(_charges(connection.dialect.name).limit(1)).first() is None
    if connection.execute(select(named).where(named.is_not(None)).group_by(named).having(func.count() > 1).limit(1)).first():
        return False  # an event named twice
    status = EVENTS.c.status
    others = select(EVENTS.c.id).where(or_(status < "charged", status > "charged", status.is_(None)))
    uncharged = connection.execute(select(func.count()).select_from(others.subquery())).scalar_one()
    if uncharged and connection.execute(select(named).where(named.in_(others)).limit(1)).first():
        return False  # an event that is not charged, named
    return int(naming) == int(events) - int(uncharged)


def _charges(backend: str) -> Any:
    """Check 2 as one query: the events whose count of naming entries is not the one their status wants."""
    expected = case((EVENTS.c.status == "charged", 1), else_=0)
    if backend == "sqlite":
        named = select(func.count()).where(ENTRIES.c.usage_event_id == EVENTS.c.id).scalar_subquery()
        return select(EVENTS.c.id).where(named != expected)
    per_event = select(ENTRIES.c.usage_event_id, func.count().label("n")).where(
        ENTRIES.c.usage_event_id.is_not(None)
    ).group_by(ENTRIES.c.usage_event_id).subquery()
    return select(EVENTS.c.id).outerjoin(per_event, per_event.c.usage_event_id == EVENTS.c.id).where(
        func.coalesce(per_event.c.n, 0) != expected
    )


def _holds() -> Any:
    """3. Each hold has exactly one hold entry, and one release unless it is open."""
    per_hold = select(
        ENTRIES.c.hold_id,
        func.sum(case((ENTRIES.c.kind == "hold", 1), else_=0)).label("holds"),
        func.sum(case((ENTRIES.c.kind == "release", 1), else_=0)).label("releases"),
    ).where(ENTRIES.c.hold_id.is_not(None)).group_by(ENTRIES.c.hold_id).subquery()
    return select(HOLDS.c.id).outerjoin(per_hold, per_hold.c.hold_id == HOLDS.c.id).where(or_(
        func.coalesce(per_hold.c.holds, 0) != 1,
        func.coalesce(per_hold.c.releases, 0) != case((HOLDS.c.status == "open", 0), else_=1),
    ))
