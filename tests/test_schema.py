"""The ledger's schema: Alembic migrations, run by ``schema.upgrade`` on every start, on every database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlmodel import SQLModel

from metering import Meter
from metering.ledger import schema
from metering.ledger.database import make_engine
from tests.wheel import build_wheel

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"users", "api_keys", "holds", "usage_events", "ledger_entries", "topup_orders", "grants", "redemption_codes",
          "day_closes", "daily_rollups", "discrepancies", "quarantined_usage", "import_links"}

#: A process that gets ready (imports, engine, first connection), says so, waits for "go", then upgrades.
UPGRADER = """
import sys, time
from pathlib import Path
from metering.ledger.database import make_engine
from metering.ledger.schema import upgrade
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
engine = make_engine(url)
engine.connect().close()
ready.touch()
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.001)
print(upgrade(engine))
engine.dispose()
"""


def _engine(url: str) -> Engine:
    return make_engine(url)


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, SQLModel.metadata))


def _versions(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def _upgraders(url: str, tmp_path: Path, count: int) -> list[subprocess.Popen[str]]:
    """``count`` processes released together into ``upgrade``."""
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{n}" for n in range(count)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADER, url, str(ready), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        for ready in readies
    ]
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready in readies):
        assert time.monotonic() < deadline, [p.poll() for p in processes]
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.01)
    go.touch()
    return processes


def test_the_revisions_form_one_chain_and_run_without_an_ini() -> None:
    scripts = ScriptDirectory.from_config(schema.alembic_config())
    chain = [script.revision for script in scripts.walk_revisions()]
    assert chain == ["0005", "0004", "0003", "0002", "0001"] and schema.head_revision() == "0005"
    assert not (ROOT / "alembic.ini").exists()  # the Config is built in code
    assert (schema.MIGRATIONS / "env.py").is_file()
    assert (schema.MIGRATIONS / "versions" / "0001_initial.py").is_file()


def test_upgrading_a_0004_database_adds_the_hold_bounds(ledger_url: str) -> None:
    """0005 adds the holds' worst-case columns (NULL for older holds: settled as before, never capped) and the
    quarantine's ``uncharged_quota``; its downgrade drops exactly those columns."""
    engine = _engine(ledger_url)
    try:
        with engine.begin() as connection:
            command.upgrade(schema.alembic_config(connection), "0004")
        assert "keep_until" not in {c["name"] for c in inspect(engine).get_columns("holds")}
        assert schema.upgrade(engine) == schema.head_revision() and _differences(engine) == []
        added = {"max_input_tokens", "max_output_tokens", "max_web_searches", "keep_until"}
        assert added <= {c["name"] for c in inspect(engine).get_columns("holds")}
        assert "uncharged_quota" in {c["name"] for c in inspect(engine).get_columns("quarantined_usage")}
        with engine.begin() as connection:
            command.downgrade(schema.alembic_config(connection), "0004")
        assert not added & {c["name"] for c in inspect(engine).get_columns("holds")}
        assert schema.upgrade(engine) == schema.head_revision() and _differences(engine) == []
    finally:
        engine.dispose()


def test_upgrading_a_0001_database_keeps_its_rows_and_adds_the_worker_tables(ledger_url: str) -> None:
    engine = _engine(ledger_url)
    try:
        with engine.begin() as connection:
            command.upgrade(schema.alembic_config(connection), "0001")
            connection.execute(text("INSERT INTO users (name, price_group, balance, created_at) "
                                    "VALUES ('old', 'default', 7, '2026-01-01 00:00:00')"))
        assert schema.upgrade(engine) == schema.head_revision()
        assert {"day_closes", "daily_rollups", "discrepancies"} <= set(inspect(engine).get_table_names())
        assert "channel" in {c["name"] for c in inspect(engine).get_columns("holds")}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT balance FROM users WHERE name = 'old'")).scalar() == 7
        assert _differences(engine) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(("before", "table"), [("0002", "quarantined_usage"), ("0003", "import_links")])
def test_upgrading_an_older_database_keeps_its_rows_and_adds_the_next_table(
    ledger_url: str, before: str, table: str
) -> None:
    """0003 adds the quarantine, 0004 the import links; each downgrade drops only its own table."""
    engine = _engine(ledger_url)
    try:
        with engine.begin() as connection:
            command.upgrade(schema.alembic_config(connection), before)
            connection.execute(text("INSERT INTO users (name, price_group, balance, created_at) "
                                    "VALUES ('old', 'default', 7, '2026-01-01 00:00:00')"))
        assert table not in inspect(engine).get_table_names()
        assert schema.upgrade(engine) == schema.head_revision()
        assert table in inspect(engine).get_table_names()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT balance FROM users WHERE name = 'old'")).scalar() == 7
        assert _differences(engine) == []
        with engine.begin() as connection:
            command.downgrade(schema.alembic_config(connection), before)
        assert table not in inspect(engine).get_table_names()
        assert {"users", "day_closes"} <= set(inspect(engine).get_table_names())
        assert schema.upgrade(engine) == schema.head_revision() and _differences(engine) == []
    finally:
        engine.dispose()


def test_upgrade_creates_the_tables_and_a_second_upgrade_is_a_no_op(ledger_url: str) -> None:
    engine = _engine(ledger_url)
    try:
        assert schema.current_revision(engine) is None
        assert schema.upgrade(engine) == schema.head_revision()
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
        statements: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        assert schema.upgrade(engine) == schema.head_revision()
        changes = [s for s in statements if s.split()[0].upper() in ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")]
        assert changes == [], changes
        assert _versions(engine) == [schema.head_revision()]
        assert schema.current_revision(engine) == schema.head_revision()
    finally:
        engine.dispose()


def test_the_migrated_schema_is_exactly_the_tables_module(ledger_url: str) -> None:
    engine = _engine(ledger_url)
    try:
        schema.upgrade(engine)
        assert _differences(engine) == []
        inspector = inspect(engine)
        for table in SQLModel.metadata.sorted_tables:
            columns = {c["name"]: c for c in inspector.get_columns(table.name)}
            assert set(columns) == {c.name for c in table.columns}, table.name
            for column in table.columns:
                assert columns[column.name]["nullable"] == column.nullable, (table.name, column.name)
            assert {tuple(inspector.get_pk_constraint(table.name)["constrained_columns"])} == {
                tuple(c.name for c in table.primary_key.columns)
            }
            expected_unique = {
                tuple(sorted(c.name for c in constraint.columns))
                for constraint in table.constraints
                if constraint.__class__.__name__ == "UniqueConstraint"
            } | {(c.name,) for c in table.columns if c.unique}
            found_unique = {tuple(sorted(u["column_names"])) for u in inspector.get_unique_constraints(table.name)} | {
                tuple(sorted(i["column_names"])) for i in inspector.get_indexes(table.name) if i["unique"]
            }
            assert expected_unique == found_unique, table.name
            expected_fks = {(tuple(fk.parent.name for fk in c.elements), c.referred_table.name)
                            for c in table.foreign_key_constraints}
            found_fks = {(tuple(fk["constrained_columns"]), fk["referred_table"]) for fk in inspector.get_foreign_keys(table.name)}
            assert expected_fks == found_fks, table.name
        unique = {u["name"] for u in inspector.get_unique_constraints("ledger_entries")} | {
            i["name"] for i in inspector.get_indexes("ledger_entries") if i["unique"]
        }
        assert "uq_ledger_entries_kind_reference" in unique
    finally:
        engine.dispose()


def _describe(engine: Engine, schema_name: str | None) -> dict[str, object]:
    """Everything the database itself records about the ledger's tables, in comparable form.

    Compiled column types catch what Alembic's comparison does not (a MariaDB collation, DATETIME(6)...).
    """
    inspector = inspect(engine)
    prefix = f"{schema_name}." if schema_name else None

    def default(column: dict[str, object]) -> object:  # PostgreSQL's sequence default names the schema
        value = column.get("default")
        return value.replace(prefix, "") if prefix and isinstance(value, str) else value

    described: dict[str, object] = {}
    for table in sorted(TABLES):
        described[table] = {
            "columns": [
                (c["name"], c["type"].compile(dialect=engine.dialect), c["nullable"], default(c), c.get("comment"))
                for c in inspector.get_columns(table, schema=schema_name)
            ],
            "pk": inspector.get_pk_constraint(table, schema=schema_name)["constrained_columns"],
            "unique": sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table, schema=schema_name)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table, schema=schema_name)),
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                          for f in inspector.get_foreign_keys(table, schema=schema_name)),
        }
    return described


def test_the_migrated_schema_is_what_create_all_makes_from_the_tables(ledger_url: str, tmp_path: Path) -> None:
    """Column by column, on the database itself: the migrations build exactly what tables.py declares."""
    engine = _engine(ledger_url)
    backend = engine.dialect.name
    expected_name = None if backend == "sqlite" else "metering_expected"
    if backend == "mysql":
        expected_name = f"{engine.url.database}_expected"
    other = _engine(f"sqlite:///{tmp_path}/expected.db") if backend == "sqlite" else engine
    try:
        if backend == "postgresql":
            with engine.begin() as connection:
                connection.execute(text(f"DROP SCHEMA IF EXISTS {expected_name} CASCADE"))
                connection.execute(text(f"CREATE SCHEMA {expected_name}"))
        elif backend == "mysql":
            with engine.begin() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {expected_name}"))
                connection.execute(text(f"CREATE DATABASE {expected_name}"))
        schema.upgrade(engine)
        SQLModel.metadata.create_all(other.execution_options(schema_translate_map={None: expected_name}))
        migrated = _describe(engine, None)
        declared = _describe(other, expected_name)
        for table in sorted(TABLES):
            assert migrated[table] == declared[table], table
    finally:
        if backend == "postgresql":
            with engine.begin() as connection:
                connection.execute(text(f"DROP SCHEMA IF EXISTS {expected_name} CASCADE"))
        elif backend == "mysql":
            with engine.begin() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {expected_name}"))
        other.dispose()
        engine.dispose()


def test_concurrent_upgrades_from_three_processes(ledger_url: str, tmp_path: Path) -> None:
    processes = _upgraders(ledger_url, tmp_path, 3)
    results = [p.communicate(timeout=120) for p in processes]
    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0, err
        assert out.strip() == schema.head_revision()
    engine = _engine(ledger_url)
    try:
        assert _versions(engine) == [schema.head_revision()]
        assert _differences(engine) == []
    finally:
        engine.dispose()


@pytest.fixture
def schema_lock(ledger_url: str):  # type: ignore[no-untyped-def]
    """Hold the lock ``upgrade`` takes, from the test process, until the test releases it."""
    engine = _engine(ledger_url)
    connection = engine.connect()
    backend = engine.dialect.name
    if backend == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": schema.PG_LOCK_KEY})
        connection.commit()
    elif backend == "sqlite":
        connection.begin()  # make_engine: BEGIN IMMEDIATE, the database's write lock
    else:
        assert connection.execute(text("SELECT GET_LOCK(:name, 5)"), {"name": schema.LOCK_NAME}).scalar() == 1
        connection.commit()

    def release() -> None:
        if backend == "postgresql":
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": schema.PG_LOCK_KEY})
            connection.commit()
        elif backend == "sqlite":
            connection.rollback()
        else:
            connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": schema.LOCK_NAME})
            connection.commit()

    yield ledger_url, release
    connection.close()
    engine.dispose()


def test_upgrade_waits_for_the_schema_lock(schema_lock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, release = schema_lock
    (process,) = _upgraders(url, tmp_path, 1)
    time.sleep(2)
    assert process.poll() is None, process.communicate()  # blocked on the lock, not migrating beside us
    release()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert out.strip() == schema.head_revision()


def test_downgrade_to_base_drops_everything_and_upgrade_rebuilds_it(ledger_url: str) -> None:
    engine = _engine(ledger_url)
    try:
        schema.upgrade(engine)
        with engine.begin() as connection:
            command.downgrade(schema.alembic_config(connection), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert schema.upgrade(engine) == schema.head_revision() and _differences(engine) == []
    finally:
        engine.dispose()


def test_a_database_made_by_create_all_is_adopted_with_its_data(ledger_url: str) -> None:
    engine = _engine(ledger_url)
    try:
        # What schema.upgrade did before the migrations: create_all of the tables of that time, which the
        # first revision reproduces exactly (its docstring); then no version table.
        with engine.begin() as connection:
            command.upgrade(schema.alembic_config(connection), schema.BASELINE)
            connection.execute(text("DROP TABLE alembic_version"))
            connection.execute(text("INSERT INTO users (name, price_group, balance, created_at) "
                                    "VALUES ('old', 'default', 7, '2026-01-01 00:00:00')"))
        assert schema.upgrade(engine) == schema.head_revision()
        assert _versions(engine) == [schema.head_revision()]
        assert _differences(engine) == []
        with engine.connect() as connection:
            assert connection.execute(text("SELECT balance FROM users WHERE name = 'old'")).scalar() == 7
    finally:
        engine.dispose()


def test_a_half_made_schema_is_refused(tmp_path: Path) -> None:
    engine = _engine(f"sqlite:///{tmp_path}/half.db")
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE users (id INTEGER PRIMARY KEY)"))
        with pytest.raises(schema.SchemaError, match="some ledger tables"):
            schema.upgrade(engine)
        assert "alembic_version" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_a_plain_sqlite_engine_is_migrated_under_the_write_lock(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/plain.db")  # not make_engine: no BEGIN IMMEDIATE of its own
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        assert schema.upgrade(engine) == schema.head_revision()
        assert statements[0] == "BEGIN IMMEDIATE"
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_meter_open_migrates_a_new_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/meter.db"
    meter = Meter.open(url)
    try:
        assert schema.current_revision(meter.engine) == schema.head_revision()
        meter.create_user("alice")
    finally:
        meter.close()
    meter = Meter.open(url)  # the next start: a no-op upgrade, the data kept
    try:
        assert [u["name"] for u in meter.users()] == ["alice"]
    finally:
        meter.close()


def test_the_wheel_ships_the_migrations_and_they_run_from_it(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("env.py", "script.py.mako", "versions/0001_initial.py", "versions/0002_worker.py",
                    "versions/0003_quarantine.py"):
        assert f"metering/ledger/migrations/{shipped}" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import metering.ledger.schema as s, metering.ledger.database as d; print(s.__file__); "
            "print(s.upgrade(d.make_engine('sqlite:///here.db')))")
    env = {k: v for k, v in os.environ.items() if k != "METERING_PRICE_TABLE"} | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    location, revision = out.stdout.split()
    assert location.startswith(str(site)) and revision == schema.head_revision()
