"""The three databases the ledger is tested on: SQLite (a temp file), PostgreSQL and MariaDB.

Each test session creates its own database on the servers (``metering_test_<pid>``), so test runs in
parallel never share tables, and drops it at the end. Unreachable server: under CI=true the test FAILS
(CI has them); on a laptop it is skipped with the reason. URLs: METERING_TEST_POSTGRES_URL and
METERING_TEST_MYSQL_URL (defaults: the servers this kind of machine runs, trust/empty-password auth).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from metering.ledger.database import normalize_url

if TYPE_CHECKING:
    from metering.ledger.meter import Meter

SERVER_URLS = {
    "postgresql": os.environ.get("METERING_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("METERING_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ("sqlite", "postgresql", "mariadb")


def _unavailable(backend: str, reason: str) -> None:
    message = f"{backend} is not reachable at {SERVER_URLS[backend]} ({reason})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}: CI must run the ledger tests on every database", pytrace=False)
    pytest.skip(f"{message}: start it, or set METERING_TEST_{'POSTGRES' if backend == 'postgresql' else 'MYSQL'}_URL")


@pytest.fixture(scope="session")
def server_databases() -> Iterator[dict[str, str | Exception]]:
    """Per backend: the URL of a database created for this session, or the error that prevented it."""
    made: dict[str, str | Exception] = {}
    name = f"metering_test_{os.getpid()}"
    for backend, url in SERVER_URLS.items():
        admin_url = normalize_url(url)
        try:
            admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
            with admin.connect() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
                connection.execute(text(f"CREATE DATABASE {name}"))
            admin.dispose()
            made[backend] = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        except Exception as exc:  # noqa: BLE001 (any failure means: not available)
            made[backend] = exc
    yield made
    for backend, url in SERVER_URLS.items():
        if isinstance(made[backend], str):
            admin = create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                if backend == "postgresql":  # other sessions (test subprocesses) may still hang on
                    connection.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
                connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            admin.dispose()


def fresh_database(backend: str, server_databases: dict[str, str | Exception], tmp_path: object) -> str:
    """A URL of an empty database of ``backend`` for one test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    made = server_databases[backend]
    if isinstance(made, Exception):
        _unavailable(backend, f"{type(made).__name__}: {made}".splitlines()[0])
    assert isinstance(made, str)
    engine = create_engine(made)
    with engine.begin() as connection:
        if backend == "mariadb":
            connection.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
            tables = connection.execute(text("SHOW TABLES")).scalars().all()
            for table in tables:
                connection.execute(text(f"DROP TABLE `{table}`"))
            connection.execute(text("SET FOREIGN_KEY_CHECKS = 1"))
        else:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return made


@contextmanager
def scratch_database(backend: str, server_databases: dict[str, str | Exception], tmp_path: Path,
                     prefix: str) -> Iterator[str]:
    """An empty database of ``backend``; SQLite's file on tmpfs when there is one (every commit is synced,
    and tests that commit thousands of times should not wait on a disk)."""
    if backend != "sqlite":
        yield fresh_database(backend, server_databases, tmp_path)
        return
    with scratch_directory(tmp_path, prefix) as directory:
        yield f"sqlite:///{directory}/ledger.db"


@contextmanager
def scratch_directory(tmp_path: Path, prefix: str) -> Iterator[Path]:
    """A temporary directory on tmpfs (/dev/shm) when there is one, else under ``tmp_path``; removed after."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    with tempfile.TemporaryDirectory(dir=base, prefix=prefix) as directory:
        yield Path(directory)


@pytest.fixture
def meter(ledger_url: str) -> Iterator["Meter"]:
    """A Meter on an empty database of each backend."""
    from metering.ledger.meter import Meter

    opened = Meter.open(ledger_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, server_databases: dict[str, str | Exception], tmp_path: object) -> str:
    """An empty database URL, once per backend (SQLite, PostgreSQL, MariaDB)."""
    return fresh_database(request.param, server_databases, tmp_path)
