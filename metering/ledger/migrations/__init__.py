"""Alembic migrations of the ledger's schema; run them with ``metering.ledger.schema.upgrade(engine)``."""
