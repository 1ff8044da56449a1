"""What a hold reserved, figure by figure, and how long it may be kept alive; capped usage kept with its rest.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

``holds`` gains the worst case it reserved (input tokens, output tokens over all choices, billed server
tool uses) so that ``settle`` can check the upstream's figures against it (docs/ledger.md, "Upstream usage is
checked"), and ``keep_until``: the latest a keep-alive may move its expiry to. Holds taken before this
revision have NULLs and are settled as before. ``quarantined_usage`` gains ``uncharged_quota``: for a
usage capped at its hold's worst case, the part not charged, which an operator may approve. Frozen like
0001-0004.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("max_input_tokens", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("max_output_tokens", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("max_web_searches", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("keep_until", TIMESTAMP, nullable=True))
    with op.batch_alter_table("quarantined_usage") as batch:
        batch.add_column(sa.Column("uncharged_quota", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("quarantined_usage") as batch:
        batch.drop_column("uncharged_quota")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("keep_until")
        batch.drop_column("max_web_searches")
        batch.drop_column("max_output_tokens")
        batch.drop_column("max_input_tokens")
