"""The ledger's tables (SQLModel). Append-only where it matters: entries, usage events, orders, grants.

All quota amounts are integer quota units (BigInteger); all times are stored as naive UTC.
Invariants over these tables are written once in docs/ledger.md and checked by ``metering.ledger.audit``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects import mysql
from sqlmodel import Field, SQLModel


#: Timestamps to the microsecond everywhere (MySQL/MariaDB's DATETIME would drop the fraction).
TIMESTAMP = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def text(length: int) -> String:
    """A VARCHAR compared exactly everywhere: MySQL/MariaDB's default collation would match request ids
    ``req-A``, ``req-a`` and ``req-a `` as one (case-insensitive, trailing spaces ignored)."""
    return String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql", "mariadb")


def _time(*, nullable: bool = False, index: bool = False) -> object:
    """A naive-UTC timestamp column (the ledger converts at its edges; SQLite keeps no time zone)."""
    return Field(default=None if nullable else ..., sa_column=Column(TIMESTAMP, nullable=nullable, index=index))


def _quota(default: int | None = 0, *, nullable: bool = False) -> object:
    return Field(default=default, sa_column=Column(BigInteger, nullable=nullable, default=default))


class User(SQLModel, table=True):
    """A customer account: its pricing group and its balance (always the sum of its entries)."""

    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(text(190), nullable=False, unique=True))
    group: str = Field(default="default", sa_column=Column("price_group", text(64), nullable=False))
    balance: int = _quota()
    created_at: datetime = _time()


class ApiKey(SQLModel, table=True):
    """An API key: only the sha256 of its secret is stored; the secret is shown once, at creation."""

    __tablename__ = "api_keys"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    name: str = Field(sa_column=Column(text(190), nullable=False))
    secret_hash: str = Field(sa_column=Column(text(64), nullable=False, unique=True))
    display_prefix: str = Field(sa_column=Column(text(32), nullable=False))
    status: str = Field(default="enabled", sa_column=Column(text(16), nullable=False))  # enabled | revoked
    expires_at: datetime | None = _time(nullable=True)
    allowed_models: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON list; None = all
    limit_quota: int | None = _quota(None, nullable=True)  # None = unlimited
    used_quota: int = _quota()  # charges (limited keys only)
    reserved_quota: int = _quota()  # open holds (limited keys only)
    created_at: datetime = _time()


class Hold(SQLModel, table=True):
    """Quota reserved before an upstream call; resolved once: settled, released or expired."""

    __tablename__ = "holds"
    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(sa_column=Column(text(190), nullable=False, unique=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    key_id: int = Field(foreign_key="api_keys.id", index=True)
    model: str = Field(sa_column=Column(text(190), nullable=False))
    price_group: str = Field(sa_column=Column(text(64), nullable=False))
    amount: int = _quota()
    prompt_tokens: int = _quota()
    prompt_source: str = Field(default="local", sa_column=Column(text(16), nullable=False))
    limited_key: bool = False  # whether the key's reserved counter holds this amount
    status: str = Field(default="open", sa_column=Column(text(16), nullable=False, index=True))
    created_at: datetime = _time(index=True)  # the request's time: the usage is priced at it
    expires_at: datetime = _time(index=True)
    resolved_at: datetime | None = _time(nullable=True)
    channel: str | None = Field(default=None, sa_column=Column(text(64), nullable=True))  # upstream channel (0002)
    # The worst case reserved, figure by figure (0005; NULL for older holds): settle checks the upstream's
    # figures against it. ``keep_until``: the latest a keep-alive may move ``expires_at`` to.
    max_input_tokens: int | None = _quota(None, nullable=True)
    max_output_tokens: int | None = _quota(None, nullable=True)
    max_web_searches: int | None = _quota(None, nullable=True)
    keep_until: datetime | None = _time(nullable=True)


class UsageEvent(SQLModel, table=True):
    """One request's usage (one per request id), priced; ``status`` pending (deferred) or charged."""

    __tablename__ = "usage_events"
    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(sa_column=Column(text(190), nullable=False, unique=True))
    hold_id: int | None = Field(default=None, foreign_key="holds.id")
    user_id: int = Field(foreign_key="users.id", index=True)
    key_id: int = Field(foreign_key="api_keys.id", index=True)
    model: str = Field(sa_column=Column(text(190), nullable=False))
    price_group: str = Field(sa_column=Column(text(64), nullable=False))
    status: str = Field(default="charged", sa_column=Column(text(16), nullable=False, index=True))
    outcome: str = Field(default="completed", sa_column=Column(text(16), nullable=False))  # stream status
    source: str = Field(sa_column=Column(text(16), nullable=False))  # upstream | local | estimated
    input_tokens: int = _quota()
    cached_input_tokens: int = _quota()
    cache_write_5m_tokens: int = _quota()
    cache_write_1h_tokens: int = _quota()
    output_tokens: int = _quota()
    reasoning_tokens: int = _quota()
    images: int = _quota()
    web_search_requests: int = _quota()
    quota: int = _quota()
    usd: str = Field(sa_column=Column(text(64), nullable=False))  # exact decimal text
    price_version: datetime = _time()
    payload_hash: str = Field(sa_column=Column(text(64), nullable=False))
    occurred_at: datetime = _time(index=True)
    created_at: datetime = _time()
    channel: str | None = Field(default=None, sa_column=Column(text(64), nullable=True))  # upstream channel (0002)


class LedgerEntry(SQLModel, table=True):
    """One signed movement of a user's balance. Never updated, never deleted."""

    __tablename__ = "ledger_entries"
    # (kind, reference) is unique: the database itself refuses a second charge for a request id, a second
    # release of a hold, a second credit for a top-up order. NULL references (none today) never collide.
    __table_args__ = (
        UniqueConstraint("kind", "reference", name="uq_ledger_entries_kind_reference"),
        Index("ix_ledger_entries_hold_kind", "hold_id", "kind"),
    )
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    key_id: int | None = Field(default=None, foreign_key="api_keys.id")
    kind: str = Field(sa_column=Column(text(16), nullable=False))  # see ENTRY_KINDS in metering.ledger.meter
    amount: int = _quota()
    hold_id: int | None = Field(default=None, foreign_key="holds.id")
    usage_event_id: int | None = Field(default=None, foreign_key="usage_events.id", index=True)
    reference: str | None = Field(default=None, sa_column=Column(text(190), nullable=True))
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _time()


class TopupOrder(SQLModel, table=True):
    """A paid top-up, one per external reference (the payment's id): a retried webhook credits once."""

    __tablename__ = "topup_orders"
    id: int | None = Field(default=None, primary_key=True)
    reference: str = Field(sa_column=Column(text(190), nullable=False, unique=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    amount: str = Field(sa_column=Column(text(64), nullable=False))
    currency: str = Field(sa_column=Column(text(8), nullable=False))
    rate_id: str = Field(sa_column=Column(text(64), nullable=False))
    usd_credit: str = Field(sa_column=Column(text(64), nullable=False))
    quota: int = _quota()
    created_at: datetime = _time()


class GrantRecord(SQLModel, table=True):
    """A grant given: at most one per user and kind."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("user_id", "kind", name="uq_grants_user_kind"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id")
    kind: str = Field(sa_column=Column(text(64), nullable=False))
    quota: int = _quota()
    created_at: datetime = _time()


class RedemptionCode(SQLModel, table=True):
    """A single-use code worth ``quota`` units; only the sha256 of the code is stored."""

    __tablename__ = "redemption_codes"
    id: int | None = Field(default=None, primary_key=True)
    code_hash: str = Field(sa_column=Column(text(64), nullable=False, unique=True))
    batch: str = Field(sa_column=Column(text(64), nullable=False, index=True))
    quota: int = _quota()
    redeemed_by: int | None = Field(default=None, foreign_key="users.id")
    redeemed_at: datetime | None = _time(nullable=True)
    created_at: datetime = _time()


# ---------------------------------------------------------------------- the worker's tables (revision 0002)


class DayClose(SQLModel, table=True):
    """One business day's close: claimed with a lease and a fencing token, closed exactly once.

    ``fence`` grows by one at every claim; the close's final transaction only commits while the row
    still carries the fence it claimed with, so a worker whose lease lapsed cannot write.
    ``watermark_event_id``: every usage event with an id up to it was committed when the close read it.
    """

    __tablename__ = "day_closes"
    day: str = Field(sa_column=Column(text(10), primary_key=True))  # YYYY-MM-DD in the business time zone
    status: str = Field(default="open", sa_column=Column(text(16), nullable=False))  # open | closing | closed
    owner: str | None = Field(default=None, sa_column=Column(text(128), nullable=True))
    lease_expires_at: datetime | None = _time(nullable=True)
    fence: int = _quota()
    time_zone: str = Field(sa_column=Column(text(64), nullable=False))
    starts_at: datetime = _time()  # the day's bounds in UTC
    ends_at: datetime = _time()
    watermark_event_id: int | None = _quota(None, nullable=True)
    closed_at: datetime | None = _time(nullable=True)
    summary: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON totals


class DailyRollup(SQLModel, table=True):
    """The closed day's totals per (day, user, key, model, channel, group); ``occurred_day`` differs from
    ``day`` for late events (they belong to an already closed day and are counted on this one)."""

    __tablename__ = "daily_rollups"
    __table_args__ = (
        UniqueConstraint("day", "occurred_day", "user_id", "key_id", "model", "channel", "price_group",
                         name="uq_daily_rollups_group"),
    )
    id: int | None = Field(default=None, primary_key=True)
    day: str = Field(sa_column=Column(text(10), nullable=False, index=True))
    occurred_day: str = Field(sa_column=Column(text(10), nullable=False))
    user_id: int = Field(foreign_key="users.id", index=True)
    key_id: int = Field(foreign_key="api_keys.id")
    model: str = Field(sa_column=Column(text(190), nullable=False))
    channel: str = Field(default="", sa_column=Column(text(64), nullable=False))  # "" when none was named
    price_group: str = Field(sa_column=Column(text(64), nullable=False))
    requests: int = _quota()
    succeeded: int = _quota()
    failed: int = _quota()  # released holds: the upstream call failed, nothing billed
    aborted: int = _quota()  # streams cut short (billed for what was delivered) and holds that expired unsettled
    input_tokens: int = _quota()
    cached_input_tokens: int = _quota()
    cache_write_5m_tokens: int = _quota()
    cache_write_1h_tokens: int = _quota()
    output_tokens: int = _quota()
    reasoning_tokens: int = _quota()
    images: int = _quota()
    web_search_requests: int = _quota()
    quota: int = _quota()
    usd: str = Field(sa_column=Column(text(64), nullable=False))  # exact decimal text: list value
    revenue_cny: str = Field(sa_column=Column(text(64), nullable=False))  # at the rate the customer paid
    upstream_cost_usd: str | None = Field(default=None, sa_column=Column(text(64), nullable=True))


class Discrepancy(SQLModel, table=True):
    """Something a close found: a price difference, a token difference, a broken invariant, a late event."""

    __tablename__ = "discrepancies"
    __table_args__ = (UniqueConstraint("day", "kind", "subject", name="uq_discrepancies_day_kind_subject"),)
    id: int | None = Field(default=None, primary_key=True)
    day: str = Field(sa_column=Column(text(10), nullable=False, index=True))
    kind: str = Field(sa_column=Column(text(32), nullable=False))  # price | tokens | invariant | late_event
    subject: str = Field(sa_column=Column(text(190), nullable=False))  # a request id, or the invariant's subject
    user_id: int | None = Field(default=None, foreign_key="users.id")
    expected: int | None = _quota(None, nullable=True)
    actual: int | None = _quota(None, nullable=True)
    detail: str = Field(sa_column=Column(Text, nullable=False))
    adjustment_reference: str | None = Field(default=None, sa_column=Column(text(190), nullable=True))
    created_at: datetime = _time()


# ---------------------------------------------------------------------- rejected usage (revision 0003)


class QuarantinedUsage(SQLModel, table=True):
    """A usage payload the ledger refused (invalid figures, an unknown model, a conflicting retry...), kept
    with the reason so finance can resolve the request; see metering/ledger/quarantine.py.

    One row per distinct rejection (``fingerprint``: source, request id, error, field and payload); the
    same rejection retried bumps ``attempts`` and ``last_seen_at`` instead of adding a row. No foreign keys:
    a refused call may name a user, key or hold that does not exist, and its row must be stored anyway.
    """

    __tablename__ = "quarantined_usage"
    id: int | None = Field(default=None, primary_key=True)
    fingerprint: str = Field(sa_column=Column(text(64), nullable=False, unique=True))
    source: str = Field(sa_column=Column(text(32), nullable=False))  # the entry point: settle_response, record_usage...
    action: str = Field(sa_column=Column(text(16), nullable=False))  # refused (nothing charged) | replaced
    request_id: str | None = Field(default=None, sa_column=Column(text(190), nullable=True, index=True))
    user_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True, index=True))
    key_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    hold_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    model: str | None = Field(default=None, sa_column=Column(text(190), nullable=True))
    error: str = Field(sa_column=Column(text(64), nullable=False))  # the error's class name
    field: str | None = Field(default=None, sa_column=Column(text(190), nullable=True))  # the field it names
    reason: str = Field(sa_column=Column(Text, nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))  # bounded, secrets redacted
    attempts: int = _quota(1)
    created_at: datetime = _time(index=True)
    last_seen_at: datetime = _time()
    uncharged_quota: int | None = _quota(None, nullable=True)  # action ``capped``: what was not charged (0005)


# ---------------------------------------------------------------------- imports from other gateways (revision 0004)


class ImportLink(SQLModel, table=True):
    """What an import from another gateway's database made of each foreign row (workers/oneapi/importer.py).

    ``source`` names the deployment imported from, ``kind`` the kind of row (``user``, ``token``,
    ``fallback_key``, ``cursor``...), ``external_id`` its id there and ``local_id`` ours (a user or key id;
    for a ``cursor``, the highest foreign id read). Unique per (source, kind, external_id): a second run finds
    the first run's rows here and creates nothing again.
    """

    __tablename__ = "import_links"
    __table_args__ = (UniqueConstraint("source", "kind", "external_id", name="uq_import_links_source_kind_external"),)
    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(sa_column=Column(text(64), nullable=False))
    kind: str = Field(sa_column=Column(text(32), nullable=False))
    external_id: str = Field(sa_column=Column(text(190), nullable=False))
    local_id: int = _quota()
    created_at: datetime = _time()
