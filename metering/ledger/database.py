"""Engines for the three supported databases, set up for a ledger.

SQLite (the embedded default): WAL journal, a busy timeout, foreign keys on, and every transaction
opened with ``BEGIN IMMEDIATE`` so writers queue for the lock up front instead of failing on upgrade
(SQLAlchemy's documented recipe for pysqlite); a connection given the ``READ_ONLY`` execution option
opens a plain (deferred) ``BEGIN`` instead, a snapshot that takes no write lock. A database file on a
network filesystem is refused: SQLite's locking is not reliable there. A new database file is created
readable and writable by its owner only (0600, whatever the umask; its -wal and -shm files take the
same mode, which SQLite copies from the database file); an existing file keeps the mode its operator
gave it. PostgreSQL (psycopg 3) and
MySQL/MariaDB (PyMySQL) use their defaults (READ COMMITTED / REPEATABLE READ): every balance change is a
conditional UPDATE whose WHERE is re-checked on the latest row under its row lock, which is what makes it
safe under concurrency. Their pooled connections are not pinged at checkout (a round trip per
transaction); they are recycled after ``POOL_RECYCLE_SECONDS``, and the ledger runs a transaction again
once when its connection turns out to have been dropped before the commit.

Every engine hides statement parameters from its log lines and error messages (``hide_parameters``):
the parameters include the sha256 of API keys and redemption codes, which must never reach a log.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from metering.ledger.errors import UnsafeDatabase

#: Environment variable naming the database URL (the command line's --db overrides it).
DB_ENV = "METERING_DB"
DEFAULT_DB_URL = "sqlite:///metering.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Filesystem types on which SQLite must not run (from /proc/mounts).
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smbfs", "smb3", "9p", "afs", "ceph", "glusterfs", "fuse.sshfs", "fuse.s3fs", "lustre", "davfs"}
)
#: Server connections older than this are replaced (servers and proxies close idle ones: MySQL's wait_timeout).
POOL_RECYCLE_SECONDS = 1800
#: Execution option of a read-only connection: on SQLite its transactions open with a deferred BEGIN.
READ_ONLY = "ledger_read_only"
#: Mode of a new SQLite database file: its owner only (it holds balances, names and the keys' hashes).
SQLITE_FILE_MODE = 0o600
#: Driver to use when a URL names only the database kind.
DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql"}


def normalize_url(url: str) -> str:
    """Pick our driver for ``postgresql://`` and ``mysql://`` URLs (others are kept as given)."""
    parsed = make_url(url)
    driver = DEFAULT_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False) if driver else url


def filesystem_type(path: Path, mounts_text: str | None = None) -> str | None:
    """The filesystem type holding ``path`` according to /proc/mounts (None where there is none)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return None
    mounts = mounts_text.splitlines()
    target = str(path.resolve())
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            mount_point = fields[1].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) > len(best):
                best, kind = mount_point, fields[2]
    return kind


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; True if it was created here.

    SQLite would create the file with 0644 (0666 less a usual umask): anyone on the machine could read
    every balance and name. An empty file is an empty database to SQLite. A file that exists already is
    left as it is: its mode is the operator's choice (e.g. 0640 for a backup group), and SQLite gives the
    -wal and -shm files that same mode.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE)
    except FileExistsError:
        return False  # another process (or the operator) created it: never re-moded
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, SQLITE_FILE_MODE)  # exactly 0600: a umask like 0277 would have left it unwritable
    finally:
        os.close(fd)
    return True


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (sqlite:///path, postgresql://..., mysql://...), configured for the ledger."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url, pool_recycle=POOL_RECYCLE_SECONDS, pool_size=5, max_overflow=10, hide_parameters=True
        )
    database = parsed.database
    if database and database != ":memory:":
        directory = Path(database).expanduser().resolve().parent
        kind = filesystem_type(directory)
        if kind in NETWORK_FILESYSTEMS:
            raise UnsafeDatabase(f"{database} is on a network filesystem ({kind}): SQLite's locks are not reliable there")
        os.makedirs(directory, exist_ok=True)
        if str(parsed.query.get("uri", "")).lower() not in ("true", "1"):  # a file: URI is opened as the operator wrote it
            create_private_file(Path(os.path.abspath(database)))  # the very path pysqlite opens
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, hide_parameters=True
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed charge survives a power cut, not only a crash
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):  # type: ignore[no-untyped-def]
        # Writers take the write lock up front; a reader's deferred BEGIN reads a snapshot and blocks no one.
        sql = "BEGIN" if connection.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE"
        try:  # on the DBAPI connection: SQLAlchemy's execution path would cost several times the BEGIN itself
            connection.connection.driver_connection.execute(sql)
        except sqlite3.Error as exc:  # e.g. "database is locked" after the busy timeout: raised as SQLAlchemy would
            connection._handle_dbapi_exception(exc, sql, (), None, None)

    return engine


def missing_directory(url: str) -> Path | None:
    """The directory a SQLite URL's file would be in, when it does not exist; None otherwise.

    ``make_engine`` creates that directory (a library caller asked for the file); the command line refuses
    such a URL instead, so a mistyped ``--db`` creates nothing. The path is the one pysqlite would open
    (no ``~`` expansion); a ``file:`` URI is left to SQLite, which creates no directory.
    """
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if str(parsed.query.get("uri", "")).lower() in ("true", "1"):
        return None
    directory = Path(os.path.abspath(database)).parent
    return None if directory.is_dir() else directory


def database_url(explicit: str | None = None) -> str:
    """``explicit``, else ``$METERING_DB``, else ``sqlite:///metering.db``."""
    return explicit or os.environ.get(DB_ENV) or DEFAULT_DB_URL
