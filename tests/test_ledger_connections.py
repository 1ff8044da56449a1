"""How the ledger uses its connections: SQLite reads take no write lock, a dropped server connection is
replaced and the transaction run again, and the hot statements (run on the DBAPI cursor) raise the same
SQLAlchemy errors and read the same values as SQLAlchemy's own statements.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import IntegrityError

from metering import Meter
from metering.ledger.statements import INSERT_ENTRY, KEY_BY_SECRET, Db
from pricing.usage import UsageRecord
from tests.databases import fresh_database

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
USAGE = UsageRecord(provider="openai", model="gpt-4o-mini", input_tokens=8, output_tokens=10)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_sqlite_reads_do_not_wait_for_the_write_lock(tmp_path) -> None:
    path = tmp_path / "ledger.db"
    meter = Meter.open(f"sqlite:///{path}")
    uid = meter.create_user("alice")
    meter.topup(uid, "1", "USD", "order-1")
    secret = meter.create_key(uid, "k")
    first = meter.authorize(secret, BODY, "req-1")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process is writing (the busy timeout is 30 s)
    try:
        reads = lambda: (meter.balance(uid), meter.keys(uid), meter.hold("req-1"), meter.audit().ok,  # noqa: E731
                         meter.authorize(secret, BODY, "req-1"))  # a retried authorize only reads
        thread, out = _in_thread(reads)
        thread.join(5)
        assert not thread.is_alive(), "a read waited for the write lock"
        balance, keys, hold, audit_ok, again = out[0]
        assert hold == again == first and audit_ok and balance == 500_000 - first.amount and len(keys) == 1
        writer, written = _in_thread(lambda: meter.authorize(secret, BODY, "req-2"))
        writer.join(0.5)
        assert writer.is_alive()  # ...while a write does wait for it
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    writer.join(10)
    assert written[0].request_id == "req-2"
    assert meter.audit().ok
    meter.close()


def test_authorize_is_one_checkout_and_one_write_transaction_on_sqlite(tmp_path) -> None:
    """The authorize reads run on the same connection before its BEGIN IMMEDIATE; settle is one transaction."""
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    uid = meter.create_user("alice")
    meter.topup(uid, "1", "USD", "order-1")
    secret = meter.create_key(uid, "k")
    begins: list[str] = []
    checkouts: list[int] = []

    def checkout(dbapi_connection: sqlite3.Connection, *_: Any) -> None:
        checkouts.append(1)
        dbapi_connection.set_trace_callback(lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None)

    event.listen(meter.engine.pool, "checkout", checkout)
    hold = meter.authorize(secret, BODY, "req-1")
    assert (len(checkouts), begins) == (1, ["BEGIN IMMEDIATE"])
    meter.settle(hold, usage=USAGE)
    assert (len(checkouts), begins) == (2, ["BEGIN IMMEDIATE"] * 2)
    meter.balance(uid)
    assert begins[-1] == "BEGIN"  # a read: deferred, no write lock
    meter.close()


def _drop_server_connections(url: str) -> int:
    """Close every server connection to the database of ``url`` but our own; how many."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            if admin.dialect.name == "postgresql":
                return len(connection.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )).all())
            ids = connection.execute(text(
                "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()"
            )).scalars().all()
            for pid in ids:
                connection.execute(text(f"KILL {int(pid)}"))
            return len(ids)
    finally:
        admin.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # SQLite has no server connection to lose
def test_a_dropped_connection_is_replaced_and_the_call_retried(backend: str, server_databases: Any, tmp_path: Any) -> None:
    ledger_url = fresh_database(backend, server_databases, tmp_path)
    meter = Meter.open(ledger_url)
    uid = meter.create_user("alice")
    meter.topup(uid, "1", "USD", "order-1")
    secret = meter.create_key(uid, "k", limit_quota=400_000)
    invalidated: list[BaseException | None] = []
    event.listen(meter.engine.pool, "invalidate", lambda _conn, _record, exc: invalidated.append(exc))
    hold = meter.authorize(secret, BODY, "req-0")
    calls: list[Callable[[], Any]] = [
        lambda: meter.authorize(secret, BODY, "req-1"),  # the reads, then the write transaction
        lambda: meter.settle(meter.hold("req-1"), usage=USAGE),  # a read, then a write transaction
        lambda: meter.release(hold),
        lambda: meter.balance(uid),
        lambda: meter.audit(),
    ]
    for call in calls:
        before = len(invalidated)
        assert _drop_server_connections(ledger_url) >= 1  # the pool's connection, idle between calls
        call()
        assert len(invalidated) > before  # the dead connection was found, dropped, and the call went on
    assert meter.balance(uid) == 500_000 - 4  # req-1 charged 4 units; req-0 released
    assert meter.keys(uid)[0]["reserved_quota"] == 0 and meter.keys(uid)[0]["used_quota"] == 4
    assert meter.audit().ok
    meter.close()


def test_hot_statements_raise_sqlalchemy_errors_and_read_typed_values(ledger_url: str) -> None:
    meter = Meter.open(ledger_url)
    uid = meter.create_user("alice")
    expires = datetime.now(UTC) + timedelta(days=1)
    secret = meter.create_key(uid, "k", limit_quota=7, expires_at=expires)
    from metering.ledger.meter import secret_hash

    with meter.engine.connect() as connection:
        db = Db(connection, meter._statements)
        row = db.row(KEY_BY_SECRET, p_secret_hash=secret_hash(secret))
        assert row is not None and row["limit_quota"] == 7 and row["price_group"] == "default"
        assert row["expires_at"] == expires.astimezone(UTC).replace(tzinfo=None)  # a datetime, on SQLite too
        assert db.row(KEY_BY_SECRET, p_secret_hash="0" * 64) is None
        with connection.begin():
            entry = {"user_id": uid, "key_id": None, "kind": "adjustment", "amount": 5, "hold_id": None,
                     "usage_event_id": None, "reference": "adjustment:x", "note": None, "created_at": datetime(2026, 1, 1)}
            assert db.insert(INSERT_ENTRY, entry) >= 1
            with pytest.raises(IntegrityError):  # the (kind, reference) unique constraint, as SQLAlchemy raises it
                db.insert(INSERT_ENTRY, entry)
            connection.rollback()
    assert meter.audit().ok
    meter.close()


@pytest.mark.parametrize("usage", [
    USAGE,
    UsageRecord(provider="anthropic", model="claude-sonnet-4-5", input_tokens=50, cached_input_tokens=100_000,
                cache_write_5m_tokens=248, cache_write_1h_tokens=200, output_tokens=503, reasoning_tokens=3, images=2,
                web_search_requests=1, source="estimated", extra={"raw": {"nested": [1, 2]}}),
])
def test_the_payload_hash_is_the_hash_of_to_dict_without_extra(usage: UsageRecord) -> None:
    """Stored payload hashes are compared on every retried settle: the fast hash must equal the original one."""
    import hashlib
    import json

    from metering.ledger.meter import _payload_hash

    for outcome in ("completed", "aborted"):
        data = usage.to_dict()
        data.pop("extra", None)
        data["outcome"] = outcome
        assert _payload_hash(usage, outcome) == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def test_the_hot_inserts_carry_the_channel_and_a_forged_ticket_is_refused(ledger_url: str) -> None:
    import dataclasses

    meter = Meter.open(ledger_url)
    uid, other = meter.create_user("alice"), meter.create_user("bob")
    meter.topup(uid, "1", "USD", "order-1")
    secret = meter.create_key(uid, "k")
    first = meter.authorize(secret, BODY, "req-1", channel="azure-1")
    assert meter.hold("req-1").channel == "azure-1"
    meter.settle(first, usage=USAGE)  # the hold's channel
    meter.settle(meter.authorize(secret, BODY, "req-2", channel="azure-1"), usage=USAGE, channel="openai-2")
    meter.record_usage(secret, "req-3", USAGE, channel="deferred-3")
    with meter.engine.connect() as connection:
        channels = dict(connection.execute(text("SELECT request_id, channel FROM usage_events")).all())
    assert channels == {"req-1": "azure-1", "req-2": "openai-2", "req-3": "deferred-3"}
    # Settle moves the balance by both entries in one UPDATE: a ticket naming another user than its hold is refused.
    forged = dataclasses.replace(meter.authorize(secret, BODY, "req-4"), user_id=other)
    with pytest.raises(ValueError, match="another user, key or worst case"):
        meter.settle(forged, usage=USAGE)
    # Nor a ticket claiming a larger worst case than its hold reserved (settle caps the upstream's figures by it).
    inflated = dataclasses.replace(meter.hold("req-4"), max_output_tokens=10**12)
    with pytest.raises(ValueError, match="another user, key or worst case"):
        meter.settle(inflated, usage=USAGE)
    assert meter.balance(other) == 0 and meter.audit().ok
    meter.close()
