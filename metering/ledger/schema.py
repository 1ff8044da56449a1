"""Create or upgrade the ledger's schema: Alembic migrations in ``metering/ledger/migrations``.

``upgrade(engine)`` runs ``alembic upgrade head`` in code (no alembic.ini at run time): the Alembic
``Config`` points at the migrations inside the package and gets our connection through
``config.attributes["connection"]``. It is safe to call on every start and from several processes at
once, because the whole upgrade runs under one database-wide lock, so only one process migrates and the
others then find the schema at head and do nothing:

- PostgreSQL: ``pg_advisory_xact_lock`` in the migrating transaction (DDL is transactional there, so
  the tables and the version row commit together and the lock is released by that commit);
- MySQL / MariaDB: ``GET_LOCK`` on the connection, held across the migration (DDL commits implicitly
  there), released with ``RELEASE_LOCK``; the migrating transaction begins after the lock is held, so
  it reads the version the previous holder committed;
- SQLite: the migrating transaction is ``BEGIN IMMEDIATE`` (the database's write lock; engines from
  ``make_engine`` open every transaction so, and a plain engine gets it here), and DDL is transactional.

A database whose tables were made by the former ``create_all`` (every table of the first migration,
no ``alembic_version``) is adopted: stamped at the first revision, then upgraded.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

import metering.ledger.tables  # noqa: F401  (registers the tables on SQLModel.metadata, for env.py)

#: Where the migrations live (inside the package: they ship with it).
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The lock's name (MySQL) and key (PostgreSQL advisory locks take a bigint): "metering" in ASCII.
LOCK_NAME = "metering.schema"
PG_LOCK_KEY = 0x6D65746572696E67
#: Seconds a MySQL / MariaDB process waits for another one's migration before giving up.
MYSQL_LOCK_TIMEOUT = 600
#: The first revision's tables (a database holding all of them and no version table is adopted).
BASELINE = "0001"
BASELINE_TABLES = frozenset(
    {"users", "api_keys", "holds", "usage_events", "ledger_entries", "topup_orders", "grants", "redemption_codes"}
)


class SchemaError(RuntimeError):
    """The schema cannot be brought to head safely (a half-made schema, a lock not obtained)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` built in code: the packaged migrations, and ``connection`` to run them on."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Bring the database to the current schema under a database-wide lock; idempotent. Returns the revision."""
    backend = engine.dialect.name
    if backend in ("mysql", "mariadb"):
        return _upgrade_mysql(engine)
    with engine.begin() as connection:
        if backend == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        elif backend == "sqlite":
            _ensure_sqlite_write_lock(connection)
        return _migrate(connection)


def _upgrade_mysql(engine: Engine) -> str:
    with engine.connect() as connection:
        got = connection.execute(
            text("SELECT GET_LOCK(:name, :timeout)"), {"name": LOCK_NAME, "timeout": MYSQL_LOCK_TIMEOUT}
        ).scalar()
        connection.commit()  # end the transaction that took the lock: the migration's reads start after it
        if got != 1:
            raise SchemaError(f"could not take the schema lock {LOCK_NAME!r} within {MYSQL_LOCK_TIMEOUT} s")
        try:
            with connection.begin():
                return _migrate(connection)
        finally:
            connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
            connection.commit()


def _ensure_sqlite_write_lock(connection: Connection) -> None:
    """Hold SQLite's write lock for the whole migration (make_engine's BEGIN IMMEDIATE already does)."""
    raw = connection.connection.driver_connection
    if not getattr(raw, "in_transaction", True):
        # A plain pysqlite engine defers BEGIN to the first write; take the lock now.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _migrate(connection: Connection) -> str:
    """Stamp a create_all-made database at the baseline if needed, then upgrade to head (in ``connection``'s transaction)."""
    config = alembic_config(connection)
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables:
        present = BASELINE_TABLES & tables
        if present == BASELINE_TABLES:
            command.stamp(config, BASELINE)
        elif present:
            raise SchemaError(
                f"the database holds some ledger tables ({', '.join(sorted(present))}) but not all, and no "
                "alembic_version: it was not made by this package; refusing to migrate it"
            )
    command.upgrade(config, "head")
    revision = MigrationContext.configure(connection).get_current_revision()
    assert revision is not None
    return revision


__all__ = ["SchemaError", "alembic_config", "current_revision", "head_revision", "upgrade"]
