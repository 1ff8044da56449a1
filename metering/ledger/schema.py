"""Create or upgrade the ledger's schema (Alembic migrations in ``metering/ledger/migrations``)."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import SQLModel

import metering.ledger.tables  # noqa: F401  (registers the tables on SQLModel.metadata)


def upgrade(engine: Engine) -> None:
    """Bring the database to the current schema; safe to call on every start (idempotent)."""
    SQLModel.metadata.create_all(engine)
