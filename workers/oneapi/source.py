"""Reading a one-api (songquanpeng/one-api) or new-api (QuantumNous/new-api) database into typed rows, read only.

What is read: ``users``, ``tokens`` and ``logs``, as the projects' GORM models define them (model/user.go,
model/token.go, model/log.go). The columns present are detected, so both projects and their versions work:

* one-api logs name their key by ``token_name`` (and carry ``channel_id``, ``elapsed_time``, ``is_stream``,
  ``system_prompt_reset`` in recent versions); new-api logs add ``token_id``, ``use_time``, ``is_stream``,
  ``group``, ``other`` (JSON) and soft-deleted users and tokens (``deleted_at``).
* one-api tokens limit models by ``models`` (comma-separated); new-api by ``model_limits_enabled`` and
  ``model_limits``.

``--from`` is a SQLAlchemy URL or one-api's own ``SQL_DSN``: a Go MySQL DSN (``user:pass@tcp(host:3306)/db?...``),
``postgres://...``, or a bare SQLite file path (``one-api.db``). The source is never written: SQLite is opened
with ``mode=ro``, PostgreSQL and MySQL sessions are set read only, and only SELECTs are issued. Logs are read in
batches by id (keyset pagination), so memory stays constant whatever the table's size.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, MetaData, Table, create_engine, event, func, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from pricing import json_source

#: one-api's log types (model/log.go); new-api adds error (5) and refund (6).
LOG_TYPES = {0: "unknown", 1: "topup", 2: "consume", 3: "manage", 4: "system", 5: "error", 6: "refund"}
CONSUME = 2
#: one-api's token statuses (model/token.go).
TOKEN_ENABLED, TOKEN_DISABLED, TOKEN_EXPIRED, TOKEN_EXHAUSTED = 1, 2, 3, 4
USER_ENABLED = 1
#: Columns without which an import cannot be done; everything else is optional.
REQUIRED = {
    "users": ("id", "username", "quota"),
    "tokens": ("id", "user_id", "key", "name", "status", "expired_time", "remain_quota", "unlimited_quota"),
    "logs": ("id", "user_id", "created_at", "type", "model_name", "quota", "prompt_tokens", "completion_tokens"),
}
OPTIONAL = {
    "users": ("group", "status", "deleted_at"),
    "tokens": ("used_quota", "models", "model_limits_enabled", "model_limits", "deleted_at"),
    "logs": ("token_id", "token_name", "channel_id", "channel", "other"),
}
CONNECT_TIMEOUT_SECONDS = 10
_GO_MYSQL_DSN = re.compile(r"^(?P<cred>.*)@(?:(?P<net>\w+)\((?P<addr>[^)]*)\))?/(?P<db>[^?]*)(?:\?(?P<params>.*))?$")


class SourceError(ValueError):
    """The source database cannot be read as a one-api / new-api database; ``field`` names the flag at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class SourceUser:
    """One row of ``users``: ``quota`` is the remaining balance in one-api's units (500,000 = $1)."""

    id: int
    username: str
    quota: int
    group: str
    enabled: bool
    deleted: bool


@dataclass(frozen=True, slots=True)
class SourceToken:
    """One row of ``tokens``: clients authenticate with ``"sk-" + key``; ``expired_time`` -1 is never."""

    id: int
    user_id: int
    key: str
    name: str
    status: int
    expired_time: int
    remain_quota: int
    unlimited_quota: bool
    used_quota: int
    models: tuple[str, ...] | None
    deleted: bool


@dataclass(frozen=True, slots=True)
class SourceLog:
    """One row of ``logs`` (the figures as stored, unchecked: the import validates them)."""

    id: int
    user_id: Any
    created_at: Any
    type: Any
    model_name: Any
    quota: Any
    prompt_tokens: Any
    completion_tokens: Any
    token_id: int | None
    token_name: str | None
    channel_id: int | None
    #: new-api's ``other.cache_tokens`` (prompt-cache reads) when the log has one, as stored; else None.
    cache_tokens: Any = None


def source_url(value: str) -> str:
    """A SQLAlchemy URL for ``--from`` (a URL or one-api's SQL_DSN forms); ``SourceError`` naming ``--from``."""
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise SourceError("--from", "is empty: give a database URL, a MySQL DSN or a SQLite file")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("postgres", "postgresql"):
            return _checked("postgresql+psycopg://" + rest)
        if scheme in ("mysql", "mariadb"):
            return _checked("mysql+pymysql://" + rest)
        if scheme.startswith(("postgresql+", "mysql+", "mariadb+")):
            return _checked(text)
        if scheme.startswith("sqlite"):
            try:
                database = make_url(text).database
            except ArgumentError as exc:
                raise SourceError("--from", f"not a valid URL: {exc}") from None
            if not database or database == ":memory:":
                raise SourceError("--from", "a SQLite URL must name a file")
            return _sqlite_read_only(database)
        raise SourceError("--from", f"unsupported database {scheme!r} (one-api uses SQLite, MySQL or PostgreSQL)")
    match = _GO_MYSQL_DSN.match(text)
    if match and not Path(text).expanduser().is_file():  # an existing file named like a DSN is a SQLite file
        return _go_mysql(match)
    return _sqlite_read_only(text)


def _checked(url: str) -> str:
    try:
        make_url(url)
    except ArgumentError as exc:
        raise SourceError("--from", f"not a valid URL: {exc}") from None
    return url


def _go_mysql(match: re.Match[str]) -> str:
    """A Go MySQL DSN (one-api's SQL_DSN) as a PyMySQL URL: the user, password, address and database kept."""
    user, _, password = match["cred"].partition(":")
    net, addr = (match["net"] or "tcp").lower(), match["addr"] or ""
    query: dict[str, str] = {}
    for param in (match["params"] or "").split("&"):
        name, _, setting = param.partition("=")
        if name == "charset" and setting:
            query["charset"] = setting.split(",")[0]  # Go accepts a list; PyMySQL one name
    host: str | None = "127.0.0.1"
    port: int | None = 3306
    if net == "unix":
        host, port = None, None
        query["unix_socket"] = addr
    elif net == "tcp":
        if addr:
            host_text, _, port_text = addr.rpartition(":") if ":" in addr else (addr, "", "")
            host = host_text.strip("[]") or "127.0.0.1"
            if port_text:
                if not port_text.isdigit():
                    raise SourceError("--from", f"bad port {port_text!r} in the MySQL DSN")
                port = int(port_text)
    else:
        raise SourceError("--from", f"unsupported MySQL DSN network {net!r} (tcp or unix)")
    if not match["db"]:
        raise SourceError("--from", "the MySQL DSN names no database (…/dbname)")
    url = URL.create("mysql+pymysql", username=user or None, password=password or None, host=host, port=port,
                     database=match["db"], query=query)
    return url.render_as_string(hide_password=False)


def _sqlite_read_only(path_text: str) -> str:
    """A read-only SQLite URI for an existing file (SQLite would otherwise create an empty database)."""
    if path_text.startswith("file:"):
        raise SourceError("--from", "give the SQLite file's path, not a file: URI")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise SourceError("--from", f"no such SQLite file: {path_text} (a URL needs a scheme: postgres://, mysql://)")
    return f"sqlite:///file:{quote(str(path.resolve()), safe='/')}?mode=ro&uri=true"


def default_source_name(url: str) -> str:
    """A name for the deployment, from its URL without the password: the SQLite file's stem, else host-database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = (parsed.database or "one-api").removeprefix("file:").split("?")[0]
        name = Path(database).stem
    else:
        name = f"{parsed.host or 'socket'}-{parsed.database or ''}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:64] or "one-api"


def check_source_name(name: str) -> str:
    """``--source``: 1 to 64 letters, digits, ``.``, ``_`` or ``-`` (it is part of every request id)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name or ""):
        raise SourceError("--source", f"must be 1 to 64 letters, digits, '.', '_' or '-', got {name!r}")
    return name


def _read_only_engine(url: str) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # Every transaction of these sessions is read only: the server itself refuses a write.
        return create_engine(url, hide_parameters=True, connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECONDS, "options": "-c default_transaction_read_only=on"})
    if backend in ("mysql", "mariadb"):
        engine = create_engine(url, hide_parameters=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET SESSION TRANSACTION READ ONLY")

        return engine
    return create_engine(url, hide_parameters=True)


class OneApiSource:
    """An open one-api / new-api database: its flavor, its users and tokens, and its logs in batches."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = _read_only_engine(url)
            names = set(inspect(self.engine).get_table_names())
        except (ArgumentError, NoSuchModuleError) as exc:
            raise SourceError("--from", f"not a usable database URL: {exc}") from None
        except SQLAlchemyError as exc:
            raise SourceError("--from", f"cannot read the database: {_first_line(exc)}") from None
        self.tables: dict[str, Table] = {}
        self.columns: dict[str, set[str]] = {}
        self.selects: dict[str, list[Any]] = {}
        for name, required in REQUIRED.items():
            if name not in names:
                raise SourceError("--from", f"no {name} table: not a one-api / new-api database")
            columns = {c["name"] for c in inspect(self.engine).get_columns(name)}
            missing = [c for c in required if c not in columns]
            if missing:
                raise SourceError("--from", f"{name}.{missing[0]}: column missing (not a one-api / new-api schema)")
            wanted = [c for c in (*required, *OPTIONAL[name]) if c in columns]
            # Reflected, so the dialect quotes ``group`` and ``key`` (reserved words) and reads its own types.
            self.tables[name] = Table(name, MetaData(), autoload_with=self.engine)
            self.columns[name] = set(wanted)
            self.selects[name] = [self.tables[name].c[c] for c in wanted]
        #: new-api's logs name the key by id; one-api's only by name.
        self.flavor = "new-api" if "token_id" in self.columns["logs"] else "one-api"

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    def _rows(self, query: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(query).mappings())

    def users(self) -> list[SourceUser]:
        """Every user, by id (users are few next to logs: they are read at once)."""
        t, has = self.tables["users"], self.columns["users"]
        rows = self._rows(select(*self.selects["users"]).order_by(t.c.id))
        return [
            SourceUser(
                id=int(r["id"]), username=str(r["username"] or ""), quota=int(r["quota"] or 0),
                group=str(r["group"]) if "group" in has and r["group"] else "default",
                enabled=int(r["status"] or USER_ENABLED) == USER_ENABLED if "status" in has else True,
                deleted="deleted_at" in has and r["deleted_at"] is not None,
            )
            for r in rows
        ]

    def tokens(self) -> list[SourceToken]:
        """Every token, by id."""
        t, has = self.tables["tokens"], self.columns["tokens"]
        return [self._token(r, has) for r in self._rows(select(*self.selects["tokens"]).order_by(t.c.id))]

    @staticmethod
    def _token(r: Any, has: set[str]) -> SourceToken:
        models: tuple[str, ...] | None = None
        if "model_limits_enabled" in has:  # new-api: a list only when enabled
            if r["model_limits_enabled"] and r.get("model_limits"):
                models = _names(r["model_limits"])
        elif "models" in has and r["models"]:  # one-api: empty means every model
            models = _names(r["models"])
        return SourceToken(
            id=int(r["id"]), user_id=int(r["user_id"]), key=str(r["key"] or "").strip(), name=str(r["name"] or ""),
            status=int(r["status"] or TOKEN_ENABLED), expired_time=int(r["expired_time"] if r["expired_time"] is not None else -1),
            remain_quota=int(r["remain_quota"] or 0), unlimited_quota=bool(r["unlimited_quota"]),
            used_quota=int(r["used_quota"] or 0) if "used_quota" in has else 0, models=models or None,
            deleted="deleted_at" in has and r["deleted_at"] is not None,
        )

    def count_logs(self, after: int) -> int:
        """How many logs have an id above ``after`` (the progress bar's total)."""
        t = self.tables["logs"]
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(t).where(t.c.id > after)).scalar_one())

    def logs(self, after: int, batch: int = 2_000) -> Iterator[list[SourceLog]]:
        """Logs with an id above ``after``, by id, ``batch`` rows at a time (only the billing columns are read)."""
        t, has = self.tables["logs"], self.columns["logs"]
        channel = "channel_id" if "channel_id" in has else ("channel" if "channel" in has else None)
        while True:
            rows = self._rows(select(*self.selects["logs"]).where(t.c.id > after).order_by(t.c.id).limit(batch))
            if not rows:
                return
            yield [
                SourceLog(
                    id=int(r["id"]), user_id=r["user_id"], created_at=r["created_at"], type=r["type"],
                    model_name=r["model_name"], quota=r["quota"], prompt_tokens=r["prompt_tokens"],
                    completion_tokens=r["completion_tokens"],
                    token_id=int(r["token_id"]) if "token_id" in has and r["token_id"] else None,
                    token_name=str(r["token_name"]) if "token_name" in has and r["token_name"] is not None else None,
                    channel_id=int(r[channel]) if channel and r[channel] else None,
                    cache_tokens=cache_tokens_of(r["other"]) if "other" in has else None,
                )
                for r in rows
            ]
            after = int(rows[-1]["id"])


def cache_tokens_of(other: Any) -> Any:
    """``cache_tokens`` of new-api's ``other`` JSON (None when absent, 0, or the text is not a JSON object)."""
    if not other:
        return None
    try:
        parsed = json_source.loads(other)  # a column of another system's database: bounded like a file
    except (TypeError, ValueError):
        return None  # other is free-form for some log kinds; no cache figure is then claimed
    value = parsed.get("cache_tokens") if isinstance(parsed, dict) else None
    return value if value not in (None, 0) else None


def _names(text: Any) -> tuple[str, ...]:
    return tuple(sorted({part.strip() for part in str(text).split(",") if part.strip()}))


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


__all__ = [
    "CONSUME", "LOG_TYPES", "OneApiSource", "SourceError", "SourceLog", "SourceToken", "SourceUser",
    "cache_tokens_of", "check_source_name", "default_source_name", "source_url",
]
