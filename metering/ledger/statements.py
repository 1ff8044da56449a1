"""The ledger's hot statements: built once with SQLAlchemy Core, rendered once per dialect, run on the
pooled connection's DBAPI cursor.

Building a Core statement per call, and SQLAlchemy's execution path for it, cost more than the database
itself on SQLite (BENCHMARKS.md, "Ledger"). So each statement of authorize / settle / release is a
module constant with ``bindparam`` names (``p_...``: an UPDATE may not bind a column's own name), compiled
once per dialect to the driver's SQL and parameter order, with the column types' bind and result
processors (SQLite stores DateTime as text, MySQL Boolean as an integer). ``Db`` runs them on the cursor
of a SQLAlchemy ``Connection``, whose pool, transactions (``BEGIN IMMEDIATE`` on SQLite) and events stay
SQLAlchemy's, and a driver error goes through the handler of SQLAlchemy's own statements (wrapped as
``IntegrityError``, ``OperationalError``...; a dropped connection is invalidated with the pool and the
error says ``connection_invalidated``). Anything else goes through ``Db.execute``: ``Connection.execute``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import Executable

from metering.ledger.tables import ApiKey, Hold, LedgerEntry, RedemptionCode, UsageEvent, User

USERS, KEYS, HOLDS = User.__table__, ApiKey.__table__, Hold.__table__  # type: ignore[attr-defined]
EVENTS, ENTRIES = UsageEvent.__table__, LedgerEntry.__table__  # type: ignore[attr-defined]
CODES = RedemptionCode.__table__  # type: ignore[attr-defined]


class Hot:
    """A statement of the hot path; ``columns`` names an INSERT's columns (its binds take their names)."""

    __slots__ = ("statement", "columns")

    def __init__(self, statement: Executable, columns: tuple[str, ...] = ()) -> None:
        self.statement, self.columns = statement, columns


def _insert(table: Any, columns: tuple[str, ...]) -> Hot:
    return Hot(insert(table), columns)


def _p(name: str) -> Any:
    return bindparam(name)


#: The key of a request, with its user's price group: only the columns authorize and record_usage check, and
#: what the user and the key had available when it was read (the cheap refusal before a body is counted).
KEY_BY_SECRET = Hot(
    select(KEYS.c.id, KEYS.c.user_id, KEYS.c.status, KEYS.c.display_prefix, KEYS.c.expires_at, KEYS.c.allowed_models,
           KEYS.c.limit_quota, KEYS.c.used_quota, KEYS.c.reserved_quota, USERS.c.price_group, USERS.c.balance,
           KEYS.c.secret_hash)  # the hash: compared again in constant time
    .join(USERS, USERS.c.id == KEYS.c.user_id).where(KEYS.c.secret_hash == _p("p_secret_hash"))
)
#: A redemption code by its hash (``redeem`` compares the hash again in constant time).
CODE_BY_HASH = Hot(select(CODES.c.id, CODES.c.quota, CODES.c.code_hash).where(CODES.c.code_hash == _p("p_code_hash")))
HOLD_BY_REQUEST = Hot(select(HOLDS).where(HOLDS.c.request_id == _p("p_request_id")))
#: What resolving a hold needs of it.
HOLD_BY_ID = Hot(
    select(HOLDS.c.id, HOLDS.c.user_id, HOLDS.c.key_id, HOLDS.c.amount, HOLDS.c.limited_key, HOLDS.c.max_input_tokens,
           HOLDS.c.max_output_tokens, HOLDS.c.max_web_searches)
    .where(HOLDS.c.id == _p("p_id"))
)
#: The user's row lock (FOR NO KEY UPDATE on PostgreSQL, FOR UPDATE on MySQL, nothing on SQLite).
LOCK_USER = Hot(select(USERS.c.id).where(USERS.c.id == _p("p_user_id")).with_for_update(key_share=True))
#: A hold's reservation: only while the balance covers it (the database re-checks under the row lock).
TAKE = Hot(
    update(USERS).where(USERS.c.id == _p("p_user_id"), USERS.c.balance >= _p("p_amount"))
    .values(balance=USERS.c.balance - _p("p_amount"))
)
#: A limited key's side of the reservation: only while the key's room covers it.
RESERVE = Hot(
    update(KEYS).where(
        KEYS.c.id == _p("p_key_id"), KEYS.c.limit_quota - KEYS.c.used_quota - KEYS.c.reserved_quota >= _p("p_amount")
    ).values(reserved_quota=KEYS.c.reserved_quota + _p("p_amount"))
)
#: What a refused hold reports as left, read with a (shared) lock: on MySQL a plain read would see the
#: transaction's snapshot, which authorize's first read took before any wait for the row lock.
BALANCE_NOW = Hot(
    select(USERS.c.balance).where(USERS.c.id == _p("p_user_id")).with_for_update(read=True, key_share=True)
)
KEY_ROOM_NOW = Hot(
    select((KEYS.c.limit_quota - KEYS.c.used_quota - KEYS.c.reserved_quota).label("room"))
    .where(KEYS.c.id == _p("p_key_id")).with_for_update(read=True, key_share=True)
)
MOVE_BALANCE = Hot(update(USERS).where(USERS.c.id == _p("p_user_id")).values(balance=USERS.c.balance + _p("p_delta")))
#: A limited key's counters after a resolution: ``p_released`` leaves reserved, ``p_used`` joins used.
MOVE_KEY = Hot(
    update(KEYS).where(KEYS.c.id == _p("p_key_id")).values(
        reserved_quota=KEYS.c.reserved_quota - _p("p_released"), used_quota=KEYS.c.used_quota + _p("p_used")
    )
)
#: Resolve a hold once: only the transaction that finds it open changes it.
RESOLVE_HOLD = Hot(
    update(HOLDS).where(HOLDS.c.id == _p("p_id"), HOLDS.c.status == "open")
    .values(status=_p("p_status"), resolved_at=_p("p_at"))
)
#: Expire a hold: only if it is still open and still due (a keep-alive may have moved its expiry meanwhile).
EXPIRE_HOLD = Hot(
    update(HOLDS).where(HOLDS.c.id == _p("p_id"), HOLDS.c.status == "open", HOLDS.c.expires_at <= _p("p_cutoff"))
    .values(status="expired", resolved_at=_p("p_at"))
)
#: Keep an open hold alive: its expiry moves forward to ``p_until`` (never back).
KEEP_ALIVE = Hot(
    update(HOLDS).where(HOLDS.c.id == _p("p_id"), HOLDS.c.status == "open", HOLDS.c.expires_at < _p("p_until"))
    .values(expires_at=_p("p_until"))
)
#: A settle after the hold expired or was released: only the time of the charge is noted.
NOTE_LATE_SETTLE = Hot(update(HOLDS).where(HOLDS.c.id == _p("p_id")).values(resolved_at=_p("p_at")))
INSERT_HOLD = _insert(HOLDS, (
    "request_id", "user_id", "key_id", "model", "price_group", "amount", "prompt_tokens", "prompt_source",
    "limited_key", "channel", "status", "created_at", "expires_at", "max_input_tokens", "max_output_tokens",
    "max_web_searches", "keep_until",
))
INSERT_ENTRY = _insert(ENTRIES, (
    "user_id", "key_id", "kind", "amount", "hold_id", "usage_event_id", "reference", "note", "created_at",
))
#: Every column of a usage event but its id: ``meter._event_values`` builds exactly these.
EVENT_COLUMNS = (
    "request_id", "hold_id", "user_id", "key_id", "model", "price_group", "status", "outcome", "source", "channel",
    "input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "output_tokens",
    "reasoning_tokens", "images", "web_search_requests", "quota", "usd", "price_version", "payload_hash",
    "occurred_at", "created_at",
)
INSERT_EVENT = _insert(EVENTS, EVENT_COLUMNS)


class Rendered:
    """One statement compiled for one dialect: its SQL, how to pass its parameters, how to read its rows."""

    __slots__ = ("sql", "names", "positional", "fixed", "binds", "columns", "results", "returning", "_in_order",
                 "_positions")

    def __init__(self, hot: Hot, dialect: Dialect) -> None:
        statement = hot.statement
        # psycopg's lastrowid is not the new row's id: PostgreSQL needs RETURNING, the others use lastrowid.
        self.returning = bool(hot.columns) and dialect.name == "postgresql"
        if self.returning:
            statement = statement.returning(statement.table.c.id)  # type: ignore[attr-defined]
        compiled = statement.compile(dialect=dialect, column_keys=list(hot.columns) or None)
        self.sql: str = compiled.string
        self.positional: bool = bool(dialect.positional)
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ()) if self.positional else tuple(binds)
        in_order = itemgetter(*self.names) if self.names else (lambda params: ())
        self._in_order = (lambda params: (in_order(params),)) if len(self.names) == 1 else in_order
        #: Literals of the statement (``status = 'open'``) are binds with a value.
        self.fixed: dict[str, Any] = {name: bind.effective_value for name, bind in binds.items() if not bind.required}
        processors = ((name, bind.type.dialect_impl(dialect).bind_processor(dialect)) for name, bind in binds.items())
        self.binds: tuple[tuple[str, Callable[[Any], Any]], ...] = tuple((n, p) for n, p in processors if p is not None)
        #: For a positional driver, the processors by position (a bind may appear twice: ``TAKE``'s amount).
        processor = dict(self.binds)
        self._positions = tuple((i, processor[n]) for i, n in enumerate(self.names) if n in processor)
        selected = getattr(statement, "selected_columns", ()) if not hot.columns else ()
        self.columns: tuple[str, ...] = tuple(column.name for column in selected)
        self.results: tuple[tuple[int, Callable[[Any], Any]], ...] = tuple(
            (i, p) for i, column in enumerate(selected)
            if (p := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
        )

    def arguments(self, params: Mapping[str, Any]) -> Any:
        """``params`` (by bind name) as the driver takes them."""
        if self.fixed:
            params = {**self.fixed, **params}
        if self.positional:
            if not self._positions:
                return self._in_order(params)
            arguments = list(self._in_order(params))
            for i, process in self._positions:
                arguments[i] = process(arguments[i])
            return arguments
        if self.binds:
            params = dict(params)
            for name, process in self.binds:
                params[name] = process(params[name])
        return params

    def row(self, values: Any) -> dict[str, Any]:
        """A fetched row by column name, in the column types' Python values."""
        if self.results:
            values = list(values)
            for i, process in self.results:
                values[i] = process(values[i])
        return dict(zip(self.columns, values))


class Statements:
    """The hot statements rendered for one dialect (each the first time it runs)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._rendered: dict[Hot, Rendered] = {}

    def __getitem__(self, hot: Hot) -> Rendered:
        rendered = self._rendered.get(hot)
        if rendered is None:
            rendered = self._rendered[hot] = Rendered(hot, self.dialect)
        return rendered


class Db:
    """One pooled connection: the hot statements on its DBAPI cursor, anything else through SQLAlchemy."""

    __slots__ = ("connection", "committing", "_statements", "_cursor")

    def __init__(self, connection: Connection, statements: Statements) -> None:
        self.connection = connection
        self.committing = False  # set once the write transaction's COMMIT has been sent
        self._statements = statements
        self._cursor: Any = None

    def execute(self, statement: Executable, parameters: Any = None) -> Any:
        """``Connection.execute``: for the statements that are not hot."""
        return self.connection.execute(statement, parameters)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The write transaction (``BEGIN IMMEDIATE`` on SQLite); ``committing`` tells a failed COMMIT apart."""
        with self.connection.begin():
            yield
            self.committing = True

    def row(self, hot: Hot, **params: Any) -> dict[str, Any] | None:
        """The one row a SELECT finds, or None."""
        rendered = self._statements[hot]
        # fetchall, not fetchone: it runs the statement to its end, so SQLite ends the read there.
        rows = self._run(rendered, params).fetchall()
        return rendered.row(rows[0]) if rows else None

    def count(self, hot: Hot, **params: Any) -> int:
        """Run an UPDATE; the number of rows it matched (the conditional UPDATEs' answer)."""
        return int(self._run(self._statements[hot], params).rowcount)

    def insert(self, hot: Hot, values: Mapping[str, Any]) -> int:
        """Run an INSERT of ``values`` (its columns); the new row's id."""
        rendered = self._statements[hot]
        cursor = self._run(rendered, values)
        return int(cursor.fetchone()[0] if rendered.returning else cursor.lastrowid)

    def _run(self, rendered: Rendered, params: Mapping[str, Any]) -> Any:
        arguments = rendered.arguments(params)
        if self._cursor is None:
            self._cursor = self.connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            self._cursor.execute(rendered.sql, arguments)
        except BaseException as exc:
            cursor, self._cursor = self._cursor, None
            # SQLAlchemy's handler for its own statements' errors (private; exec_driver_sql goes through it):
            # it raises IntegrityError, OperationalError, ... and on a dropped connection invalidates it and
            # the pool, with ``connection_invalidated`` set (an interrupt mid-statement invalidates it too).
            self.connection._handle_dbapi_exception(exc, rendered.sql, arguments, cursor, None)
        return self._cursor
