"""What an import from another gateway made of each foreign row: the ``import_links`` table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

``metering import one-api`` (workers/oneapi/importer.py) keeps here, per (source, kind, external id), the id
of the user or key it created (and its read cursor), so a second run creates nothing again. Frozen like
0001-0003.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _text(length: int) -> sa.types.TypeEngine:
    """VARCHAR compared exactly (MariaDB's default collation ignores case and trailing spaces)."""
    return sa.String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "import_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", _text(64), nullable=False),
        sa.Column("kind", _text(32), nullable=False),
        sa.Column("external_id", _text(190), nullable=False),
        sa.Column("local_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "kind", "external_id", name="uq_import_links_source_kind_external"),
    )


def downgrade() -> None:
    op.drop_table("import_links")
