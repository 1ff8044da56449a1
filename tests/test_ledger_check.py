"""The close's quick ledger check (workers.close.invariants) never hides what ``metering audit`` would find.

The close asks the database a few aggregate questions instead of reading every entry into Python, and
runs ``metering.ledger.audit.run_audit`` only when an answer is not the sound one. Its contract: the
violations it reports are exactly ``run_audit``'s. Each case below breaks one invariant of
docs/ledger.md on a ledger booked through the real Meter API (and, where the break would also upset
another invariant, repairs that one, so each check is caught on its own), on every database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, text

from metering.ledger.audit import run_audit
from metering.ledger.meter import Meter
from tests.traffic import FIRST_DAY, book_customers, book_day
from workers.close.invariants import LedgerCheck, sound


def one(connection: Connection, sql: str) -> dict[str, Any]:
    row = connection.execute(text(sql)).mappings().first()
    assert row is not None, f"the booked ledger has no row for: {sql}"
    return dict(row)


def run(connection: Connection, sql: str, **params: Any) -> None:
    connection.execute(text(sql), params)


UNLIMITED_CHARGE = """SELECT l.id AS entry, l.amount, l.user_id AS uid, e.id AS event, e.request_id FROM ledger_entries l
    JOIN usage_events e ON e.id = l.usage_event_id JOIN api_keys k ON k.id = e.key_id
    WHERE l.kind = 'charge' AND k.limit_quota IS NULL ORDER BY l.id"""
RELEASED_HOLD = """SELECT h.id AS hold, l.id AS entry, l.amount, h.user_id AS uid FROM holds h
    JOIN ledger_entries l ON l.hold_id = h.id AND l.kind = 'release' JOIN api_keys k ON k.id = h.key_id
    WHERE h.status = 'released' AND k.limit_quota IS NULL ORDER BY h.id"""


def missing_charge(c: Connection) -> None:
    """Check 2: a charged event loses its charge entry (the balance follows, so check 1 still holds)."""
    row = one(c, UNLIMITED_CHARGE)
    run(c, "DELETE FROM ledger_entries WHERE id = :id", id=row["entry"])
    run(c, "UPDATE users SET balance = balance - :amount WHERE id = :uid", amount=row["amount"], uid=row["uid"])


def charged_twice(c: Connection) -> None:
    """Check 2: a second (zero) charge entry for one event."""
    row = one(c, UNLIMITED_CHARGE)
    run(c, "INSERT INTO ledger_entries (user_id, kind, amount, usage_event_id, reference, created_at) "
           "SELECT user_id, 'charge', 0, usage_event_id, 'again', created_at FROM ledger_entries WHERE id = :id",
        id=row["entry"])


def charged_but_pending(c: Connection) -> None:
    """Check 2: an event still marked pending although its charge was posted."""
    run(c, "UPDATE usage_events SET status = 'pending' WHERE id = :id", id=one(c, UNLIMITED_CHARGE)["event"])


def unresolved_release(c: Connection) -> None:
    """Check 3: a released hold loses its release entry (balance repaired)."""
    row = one(c, RELEASED_HOLD)
    run(c, "DELETE FROM ledger_entries WHERE id = :id", id=row["entry"])
    run(c, "UPDATE users SET balance = balance - :amount WHERE id = :uid", amount=row["amount"], uid=row["uid"])


def reopened_hold(c: Connection) -> None:
    """Check 3: a hold marked open again after its release."""
    run(c, "UPDATE holds SET status = 'open' WHERE id = :id", id=one(c, RELEASED_HOLD)["hold"])


def reserved_counter(c: Connection) -> None:
    """Check 4: a limited key's reserved counter off by one."""
    run(c, "UPDATE api_keys SET reserved_quota = reserved_quota + 1 WHERE limit_quota IS NOT NULL")


def used_counter(c: Connection) -> None:
    """Check 4: a limited key's used counter off by one."""
    run(c, "UPDATE api_keys SET used_quota = used_quota + 1 WHERE limit_quota IS NOT NULL")


def balance_off(c: Connection) -> None:
    """Check 1: a balance one unit above its entries."""
    run(c, "UPDATE users SET balance = balance + 1 WHERE id = :uid", uid=one(c, UNLIMITED_CHARGE)["uid"])


def unknown_kind(c: Connection) -> None:
    """Check 5: an entry of a kind the ledger does not know."""
    uid = one(c, UNLIMITED_CHARGE)["uid"]
    run(c, "INSERT INTO ledger_entries (user_id, kind, amount, created_at) VALUES (:uid, 'bonus', 0, '2026-11-02')", uid=uid)


def wrong_sign(c: Connection) -> None:
    """Check 5: a grant with a negative amount (balance repaired)."""
    uid = one(c, UNLIMITED_CHARGE)["uid"]
    run(c, "INSERT INTO ledger_entries (user_id, kind, amount, created_at) VALUES (:uid, 'grant', -1, '2026-11-02')", uid=uid)
    run(c, "UPDATE users SET balance = balance - 1 WHERE id = :uid", uid=uid)


def deleted_event_then_double_charge(c: Connection) -> None:
    """Event ids with a gap (an event and its charge removed, balance repaired), then check 2 broken elsewhere."""
    first = one(c, UNLIMITED_CHARGE)
    run(c, "DELETE FROM ledger_entries WHERE id = :id", id=first["entry"])
    run(c, "UPDATE users SET balance = balance - :amount WHERE id = :uid", amount=first["amount"], uid=first["uid"])
    run(c, "DELETE FROM usage_events WHERE id = :id", id=first["event"])
    charged_twice(c)


BROKEN: dict[str, Callable[[Connection], None]] = {
    f.__name__: f for f in (missing_charge, charged_twice, charged_but_pending, unresolved_release, reopened_hold,
                            reserved_counter, used_counter, balance_off, unknown_kind, wrong_sign,
                            deleted_event_then_double_charge)
}


def deleted_event(c: Connection) -> None:
    """Event ids with a gap, everything else sound (the quick check's slower branch must still say sound)."""
    first = one(c, UNLIMITED_CHARGE)
    run(c, "DELETE FROM ledger_entries WHERE id = :id", id=first["entry"])
    run(c, "UPDATE users SET balance = balance - :amount WHERE id = :uid", amount=first["amount"], uid=first["uid"])
    run(c, "DELETE FROM usage_events WHERE id = :id", id=first["event"])


def booked(meter: Meter) -> Meter:
    secrets = book_customers(meter)
    book_day(meter, secrets, FIRST_DAY, 40, seed=3)
    return meter


def verdicts(meter: Meter) -> tuple[bool, list[Any], list[Any]]:
    """(the quick check's verdict, what the close reports, what ``run_audit`` finds), from committed data."""
    check = LedgerCheck(meter.engine)
    with meter.engine.connect() as connection:
        return sound(connection), list(check.violations(connection)), list(run_audit(connection))


def test_a_sound_ledger_passes_the_quick_check(meter: Meter) -> None:
    quick, reported, audited = verdicts(booked(meter))
    assert quick and reported == audited == []


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_every_broken_invariant_is_reported_as_run_audit_reports_it(meter: Meter, name: str) -> None:
    booked(meter)
    with meter.engine.begin() as connection:
        BROKEN[name](connection)
    quick, reported, audited = verdicts(meter)
    assert audited, f"{name}: the case must break an invariant run_audit checks"
    assert not quick
    assert reported == audited


def test_gaps_in_event_ids_alone_leave_the_ledger_sound(meter: Meter) -> None:
    booked(meter)
    with meter.engine.begin() as connection:
        deleted_event(connection)
    quick, reported, audited = verdicts(meter)
    assert quick and reported == audited == []


def test_an_entry_other_than_a_charge_naming_an_event_sends_the_close_to_the_full_audit(meter: Meter) -> None:
    """Not a violation run_audit reports, but outside what the quick check's counting assumes: it must not say sound."""
    booked(meter)
    with meter.engine.begin() as connection:
        row = one(connection, UNLIMITED_CHARGE)
        run(connection, "INSERT INTO ledger_entries (user_id, kind, amount, usage_event_id, created_at) "
                        "VALUES (:uid, 'adjustment', 0, :event, '2026-11-02')", uid=row["uid"], event=row["event"])
    quick, reported, audited = verdicts(meter)
    assert not quick and reported == audited
