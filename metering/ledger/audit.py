"""The ledger's invariants (docs/ledger.md), checked with SQL over the whole database.

1. Each user's balance equals the sum of its entries.
2. Each charged usage event has exactly one charge entry; a pending one has none.
3. Each hold has exactly one ``hold`` entry, and at most one ``release``: none while open, one once
   settled, released or expired.
4. A limited key's reserved counter equals its open holds, and its used counter its charges.
5. Entries are of known kinds, and the sign each kind must have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlalchemy import Connection, case, func, select

from metering.ledger.tables import ApiKey, Hold, LedgerEntry, UsageEvent, User

if TYPE_CHECKING:
    from metering.ledger.meter import Violation

USERS, KEYS, HOLDS = User.__table__, ApiKey.__table__, Hold.__table__  # type: ignore[attr-defined]
EVENTS, ENTRIES = UsageEvent.__table__, LedgerEntry.__table__  # type: ignore[attr-defined]
#: Entry kind -> the sign its amount must have (+1 credit, -1 debit).
KIND_SIGNS = {"grant": 1, "topup": 1, "redemption": 1, "release": 1, "hold": -1, "charge": -1, "adjustment": 0}


def run_audit(connection: Connection) -> Iterator["Violation"]:
    """Yield every violation of the invariants."""
    from metering.ledger.meter import Violation  # noqa: F811 (the meter imports this module lazily)

    sums = select(ENTRIES.c.user_id, func.coalesce(func.sum(ENTRIES.c.amount), 0).label("total")).group_by(
        ENTRIES.c.user_id
    ).subquery()
    rows = connection.execute(
        select(USERS.c.id, USERS.c.balance, func.coalesce(sums.c.total, 0)).outerjoin(sums, sums.c.user_id == USERS.c.id)
    )
    for user_id, balance, total in rows:
        if int(balance) != int(total):
            yield Violation("balance equals the sum of entries", f"user {user_id}", f"balance {balance}, entries {total}")

    charges = select(ENTRIES.c.usage_event_id, func.count().label("n")).where(ENTRIES.c.kind == "charge").group_by(
        ENTRIES.c.usage_event_id
    ).subquery()
    rows = connection.execute(
        select(EVENTS.c.request_id, EVENTS.c.status, func.coalesce(charges.c.n, 0)).outerjoin(
            charges, charges.c.usage_event_id == EVENTS.c.id
        )
    )
    for request_id, status, n in rows:
        expected = 1 if status == "charged" else 0
        if n != expected:
            yield Violation("each usage event is charged exactly once", f"request {request_id}", f"{n} charges ({status})")

    per_hold = select(
        ENTRIES.c.hold_id,
        func.sum(case((ENTRIES.c.kind == "hold", 1), else_=0)).label("holds"),
        func.sum(case((ENTRIES.c.kind == "release", 1), else_=0)).label("releases"),
    ).where(ENTRIES.c.hold_id.is_not(None)).group_by(ENTRIES.c.hold_id).subquery()
    rows = connection.execute(
        select(HOLDS.c.id, HOLDS.c.status, func.coalesce(per_hold.c.holds, 0), func.coalesce(per_hold.c.releases, 0))
        .outerjoin(per_hold, per_hold.c.hold_id == HOLDS.c.id)
    )
    for hold_id, status, holds, releases in rows:
        expected = 0 if status == "open" else 1
        if holds != 1 or releases != expected:
            yield Violation(
                "each hold is taken once and resolved at most once", f"hold {hold_id}",
                f"{holds} hold entries, {releases} releases, status {status}",
            )

    open_holds = select(HOLDS.c.key_id, func.sum(HOLDS.c.amount).label("reserved")).where(
        HOLDS.c.status == "open", HOLDS.c.limited_key.is_(True)
    ).group_by(HOLDS.c.key_id).subquery()
    key_charges = select(ENTRIES.c.key_id, func.sum(-ENTRIES.c.amount).label("used")).where(
        ENTRIES.c.kind == "charge"
    ).group_by(ENTRIES.c.key_id).subquery()
    rows = connection.execute(
        select(KEYS.c.id, KEYS.c.reserved_quota, KEYS.c.used_quota, func.coalesce(open_holds.c.reserved, 0),
               func.coalesce(key_charges.c.used, 0))
        .outerjoin(open_holds, open_holds.c.key_id == KEYS.c.id)
        .outerjoin(key_charges, key_charges.c.key_id == KEYS.c.id)
        .where(KEYS.c.limit_quota.is_not(None))
    )
    for key_id, reserved, used, expected_reserved, expected_used in rows:
        if int(reserved) != int(expected_reserved) or int(used) != int(expected_used):
            yield Violation(
                "a limited key's counters equal its holds and charges", f"key {key_id}",
                f"reserved {reserved} (holds {expected_reserved}), used {used} (charges {expected_used})",
            )

    rows = connection.execute(select(ENTRIES.c.id, ENTRIES.c.kind, ENTRIES.c.amount))
    for entry_id, kind, amount in rows:
        sign = KIND_SIGNS.get(kind)
        if sign is None or (sign > 0 and amount < 0) or (sign < 0 and amount > 0):
            yield Violation("entries have a known kind and its sign", f"entry {entry_id}", f"{kind} {amount}")
