"""The worker's tables (day closes, daily roll-ups, discrepancies) and the upstream channel of a request.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Adds ``channel`` to holds and usage events (nullable: rows written before it name none), an index on
``holds.created_at`` (a close counts the day's failed requests by it), and the three tables the nightly
close writes. Frozen like 0001: later changes go in new revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _text(length: int) -> sa.types.TypeEngine:
    """VARCHAR compared exactly (MariaDB's default collation ignores case and trailing spaces)."""
    return sa.String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql", "mariadb")


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("channel", _text(64), nullable=True))
    with op.batch_alter_table("usage_events") as batch:
        batch.add_column(sa.Column("channel", _text(64), nullable=True))
    op.create_index(op.f("ix_holds_created_at"), "holds", ["created_at"], unique=False)
    op.create_table(
        "day_closes",
        sa.Column("day", _text(10), nullable=False),
        sa.Column("status", _text(16), nullable=False),
        sa.Column("owner", _text(128), nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        _counter("fence"),
        sa.Column("time_zone", _text(64), nullable=False),
        sa.Column("starts_at", TIMESTAMP, nullable=False),
        sa.Column("ends_at", TIMESTAMP, nullable=False),
        sa.Column("watermark_event_id", sa.BigInteger(), nullable=True),
        sa.Column("closed_at", TIMESTAMP, nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("day"),
    )
    op.create_table(
        "daily_rollups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", _text(10), nullable=False),
        sa.Column("occurred_day", _text(10), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("model", _text(190), nullable=False),
        sa.Column("channel", _text(64), nullable=False),
        sa.Column("price_group", _text(64), nullable=False),
        *(_counter(name) for name in (
            "requests", "succeeded", "failed", "aborted", "input_tokens", "cached_input_tokens",
            "cache_write_5m_tokens", "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "images",
            "web_search_requests", "quota",
        )),
        sa.Column("usd", _text(64), nullable=False),
        sa.Column("revenue_cny", _text(64), nullable=False),
        sa.Column("upstream_cost_usd", _text(64), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("day", "occurred_day", "user_id", "key_id", "model", "channel", "price_group",
                            name="uq_daily_rollups_group"),
    )
    op.create_index(op.f("ix_daily_rollups_day"), "daily_rollups", ["day"], unique=False)
    op.create_index(op.f("ix_daily_rollups_user_id"), "daily_rollups", ["user_id"], unique=False)
    op.create_table(
        "discrepancies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", _text(10), nullable=False),
        sa.Column("kind", _text(32), nullable=False),
        sa.Column("subject", _text(190), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("expected", sa.BigInteger(), nullable=True),
        sa.Column("actual", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("adjustment_reference", _text(190), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("day", "kind", "subject", name="uq_discrepancies_day_kind_subject"),
    )
    op.create_index(op.f("ix_discrepancies_day"), "discrepancies", ["day"], unique=False)


def downgrade() -> None:
    op.drop_table("discrepancies")  # their indexes go with them (MariaDB refuses to drop an FK's index first)
    op.drop_table("daily_rollups")
    op.drop_table("day_closes")
    op.drop_index(op.f("ix_holds_created_at"), table_name="holds")
    with op.batch_alter_table("usage_events") as batch:
        batch.drop_column("channel")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("channel")
