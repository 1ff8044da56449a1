"""Alembic environment for the ledger: online only, on the connection ``metering.ledger.schema`` passes.

``schema.upgrade(engine)`` builds the Config in code, takes the schema lock, opens the transaction and
puts the connection in ``config.attributes["connection"]``; this script only runs the migrations in it
(the caller commits). During development, the alembic command line works with an ini holding
``[alembic]``, ``script_location = metering/ledger/migrations`` and ``path_separator = os``, and a scratch
database: ``alembic -c dev.ini -x url=sqlite:///scratch.db upgrade head``, then
``alembic -c dev.ini -x url=sqlite:///scratch.db revision --autogenerate -m "..."`` (review the result:
it must run on SQLite, PostgreSQL and MariaDB), or ``... check`` to see that tables.py needs no revision.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import metering.ledger.tables  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def run_migrations(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite's ALTER TABLE needs batch mode
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the ledger's migrations run online only (metering db upgrade)")

connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:  # the alembic command line, during development
    from metering.ledger.database import make_engine

    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database with -x url=...")
    engine = make_engine(url)
    with engine.begin() as outer:
        run_migrations(outer)
    engine.dispose()
