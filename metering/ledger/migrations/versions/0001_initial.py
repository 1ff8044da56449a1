"""The ledger's first schema: exactly the tables of ``metering/ledger/tables.py`` as of this revision.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Generated with Alembic's autogenerate against an empty SQLite database, then reviewed: every indexed
or unique VARCHAR has a length (MariaDB needs one), quota amounts are BIGINT, times naive-UTC DATETIME (microseconds on
MariaDB), VARCHARs compared exactly (utf8mb4_bin on MariaDB).
Constraint names not given in tables.py are left to each database (as ``create_all`` did), so a
database made by the former ``create_all`` is this revision exactly (``schema.upgrade`` stamps it).
This file is frozen: later changes to tables.py go in new revisions, never here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here, not imported from tables.py, so this revision never changes with later code.
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")  # microseconds on MariaDB too


def _text(length: int) -> sa.types.TypeEngine:
    """VARCHAR compared exactly (MariaDB's default collation ignores case and trailing spaces)."""
    return sa.String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", _text(190), nullable=False),
        sa.Column("price_group", _text(64), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", _text(190), nullable=False),
        sa.Column("secret_hash", _text(64), nullable=False),
        sa.Column("display_prefix", _text(32), nullable=False),
        sa.Column("status", _text(16), nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=True),
        sa.Column("allowed_models", sa.Text(), nullable=True),
        sa.Column("limit_quota", sa.BigInteger(), nullable=True),
        sa.Column("used_quota", sa.BigInteger(), nullable=False),
        sa.Column("reserved_quota", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secret_hash"),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"], unique=False)
    op.create_table(
        "grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", _text(64), nullable=False),
        sa.Column("quota", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "kind", name="uq_grants_user_kind"),
    )
    op.create_table(
        "redemption_codes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code_hash", _text(64), nullable=False),
        sa.Column("batch", _text(64), nullable=False),
        sa.Column("quota", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_by", sa.Integer(), nullable=True),
        sa.Column("redeemed_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["redeemed_by"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code_hash"),
    )
    op.create_index(op.f("ix_redemption_codes_batch"), "redemption_codes", ["batch"], unique=False)
    op.create_table(
        "topup_orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reference", _text(190), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("amount", _text(64), nullable=False),
        sa.Column("currency", _text(8), nullable=False),
        sa.Column("rate_id", _text(64), nullable=False),
        sa.Column("usd_credit", _text(64), nullable=False),
        sa.Column("quota", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("reference"),
    )
    op.create_index(op.f("ix_topup_orders_user_id"), "topup_orders", ["user_id"], unique=False)
    op.create_table(
        "holds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", _text(190), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("model", _text(190), nullable=False),
        sa.Column("price_group", _text(64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("prompt_source", _text(16), nullable=False),
        sa.Column("limited_key", sa.Boolean(), nullable=False),
        sa.Column("status", _text(16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("resolved_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(op.f("ix_holds_expires_at"), "holds", ["expires_at"], unique=False)
    op.create_index(op.f("ix_holds_key_id"), "holds", ["key_id"], unique=False)
    op.create_index(op.f("ix_holds_status"), "holds", ["status"], unique=False)
    op.create_index(op.f("ix_holds_user_id"), "holds", ["user_id"], unique=False)
    op.create_table(
        "usage_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", _text(190), nullable=False),
        sa.Column("hold_id", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("model", _text(190), nullable=False),
        sa.Column("price_group", _text(64), nullable=False),
        sa.Column("status", _text(16), nullable=False),
        sa.Column("outcome", _text(16), nullable=False),
        sa.Column("source", _text(16), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_5m_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_1h_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.Column("web_search_requests", sa.BigInteger(), nullable=False),
        sa.Column("quota", sa.BigInteger(), nullable=False),
        sa.Column("usd", _text(64), nullable=False),
        sa.Column("price_version", TIMESTAMP, nullable=False),
        sa.Column("payload_hash", _text(64), nullable=False),
        sa.Column("occurred_at", TIMESTAMP, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["hold_id"], ["holds.id"]),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(op.f("ix_usage_events_key_id"), "usage_events", ["key_id"], unique=False)
    op.create_index(op.f("ix_usage_events_occurred_at"), "usage_events", ["occurred_at"], unique=False)
    op.create_index(op.f("ix_usage_events_status"), "usage_events", ["status"], unique=False)
    op.create_index(op.f("ix_usage_events_user_id"), "usage_events", ["user_id"], unique=False)
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("kind", _text(16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("hold_id", sa.Integer(), nullable=True),
        sa.Column("usage_event_id", sa.Integer(), nullable=True),
        sa.Column("reference", _text(190), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["hold_id"], ["holds.id"]),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.ForeignKeyConstraint(["usage_event_id"], ["usage_events.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        # (kind, reference) unique: one charge per request id, one release per hold, one credit per order.
        sa.UniqueConstraint("kind", "reference", name="uq_ledger_entries_kind_reference"),
    )
    op.create_index("ix_ledger_entries_hold_kind", "ledger_entries", ["hold_id", "kind"], unique=False)
    op.create_index(op.f("ix_ledger_entries_usage_event_id"), "ledger_entries", ["usage_event_id"], unique=False)
    op.create_index(op.f("ix_ledger_entries_user_id"), "ledger_entries", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_table("ledger_entries")
    op.drop_table("usage_events")
    op.drop_table("holds")
    op.drop_table("topup_orders")
    op.drop_table("redemption_codes")
    op.drop_table("grants")
    op.drop_table("api_keys")
    op.drop_table("users")
