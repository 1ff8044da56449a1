"""Rejected usage kept, never dropped: the ``quarantined_usage`` table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

A usage payload the ledger refuses (settle or record_usage with invalid figures, an unknown model, a
conflicting retry...) is stored here with the reason, in its own transaction, while the caller still gets
the typed error (metering/ledger/quarantine.py, docs/ledger.md "Rejected usage"). No foreign keys: a refused
call may name a user, key or hold that does not exist. Frozen like 0001 and 0002.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _text(length: int) -> sa.types.TypeEngine:
    """VARCHAR compared exactly (MariaDB's default collation ignores case and trailing spaces)."""
    return sa.String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "quarantined_usage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", _text(64), nullable=False),
        sa.Column("source", _text(32), nullable=False),
        sa.Column("action", _text(16), nullable=False),
        sa.Column("request_id", _text(190), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("hold_id", sa.Integer(), nullable=True),
        sa.Column("model", _text(190), nullable=True),
        sa.Column("error", _text(64), nullable=False),
        sa.Column("field", _text(190), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("attempts", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("last_seen_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("fingerprint"),
    )
    op.create_index(op.f("ix_quarantined_usage_request_id"), "quarantined_usage", ["request_id"], unique=False)
    op.create_index(op.f("ix_quarantined_usage_user_id"), "quarantined_usage", ["user_id"], unique=False)
    op.create_index(op.f("ix_quarantined_usage_created_at"), "quarantined_usage", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_table("quarantined_usage")  # its indexes go with it
