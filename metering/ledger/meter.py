"""``Meter``: the quota ledger a gateway imports. Holds before the call, exact settlement after.

Every balance change is one database transaction that appends ledger entries and moves the balance
by exactly their sum. Reservations are conditional UPDATEs (``... WHERE balance >= :amount``), so under
any concurrency the reserved total never exceeds what is available. Exactly-once is enforced by the
database: a request id has one usage event and one charge entry, a hold one release entry, a top-up
order one credit (unique constraints), and a retry returns the first result. The invariants are in
docs/ledger.md and checked by ``Meter.audit()``.

Overage rule: the worst case is reserved before the call; when the actual cost is higher anyway, the
full actual cost is charged (the service was delivered), the balance may go below zero by that overage
only, and every authorization is refused until a top-up brings it back above the next hold.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import SQLModel

from metering.completion import usage_from_response
from metering.counting import count_request
from metering.ledger import inputs, quarantine
from metering.ledger.database import READ_ONLY, make_engine
from metering.ledger.errors import (
    DuplicateReference, InvalidField, KeyRejected, LedgerBusy, NotFound, QuotaExceeded, SettleConflict, UsageBeyondHold,
)
from metering.ledger.statements import (
    BALANCE_NOW,
    CODE_BY_HASH,
    EXPIRE_HOLD,
    HOLD_BY_ID,
    HOLD_BY_REQUEST,
    INSERT_ENTRY,
    INSERT_EVENT,
    INSERT_HOLD,
    KEEP_ALIVE,
    KEY_BY_SECRET,
    KEY_ROOM_NOW,
    LOCK_USER,
    MOVE_BALANCE,
    MOVE_KEY,
    NOTE_LATE_SETTLE,
    RESERVE,
    RESOLVE_HOLD,
    TAKE,
    Db,
    Statements,
)
from metering.ledger.tables import ApiKey, GrantRecord, Hold, LedgerEntry, RedemptionCode, TopupOrder, UsageEvent, User
from metering.models import resolve_model
from metering.prompt_count import PromptCount
from metering.streams import StreamAccumulator, StreamResult
from metering.worst_case import BodySize, HoldBounds, WorstCase, prompt_lower_bound, scan_body, worst_case
from pricing.errors import BillingError
from pricing.quote import MAX_QUOTA, decimal_text, price, quota
from pricing.recharge import amount_text, grant_quota, quote_topup, same_amount
from pricing.table import PriceTable, load_price_table
from pricing.usage import MAX_COUNT, InvalidUsage, UsageRecord, UsageSource

T = TypeVar("T")
USERS, KEYS, HOLDS = User.__table__, ApiKey.__table__, Hold.__table__  # type: ignore[attr-defined]
EVENTS, ENTRIES = UsageEvent.__table__, LedgerEntry.__table__  # type: ignore[attr-defined]
ORDERS, GRANTS, CODES = TopupOrder.__table__, GrantRecord.__table__, RedemptionCode.__table__  # type: ignore[attr-defined]

#: Entry kinds; ``hold`` moves quota out of the balance before a call, ``release`` moves it back.
ENTRY_KINDS = ("grant", "topup", "redemption", "hold", "release", "charge", "adjustment")
SECRET_PREFIX = "sk-mtr-"
DEFAULT_HOLD_TTL = timedelta(minutes=10)
#: How a request ended (a stream's status; ``record_usage``'s ``outcome``).
OUTCOMES = ("completed", "aborted", "error")
#: Deadlocks and serialization failures are retried this many times (the transaction is all-or-nothing).
MAX_RETRIES = 8
#: Bodies with this many characters of text or more are first checked against the user's balance by their
#: lower bound (``metering.worst_case.prompt_lower_bound``), before they are encoded; smaller ones encode in
#: microseconds, and their refusal then names the exact amount the hold needs.
PRECHECK_MIN_CHARS = 16_384
#: The longest hold TTL a Meter takes (the close waits this long past a day's end before closing it).
MAX_HOLD_TTL = timedelta(days=1)
#: The most redemption codes one ``create_redemption_codes`` call makes (they are returned in one list).
MAX_CODES = 10_000
#: ``fold_deferred``: the most events one call reads (``limit``) and charges in one transaction (``per_transaction``).
MAX_FOLD_LIMIT, MAX_FOLD_PER_TRANSACTION = 1_000_000, 10_000


def utcnow() -> datetime:
    """Now, as the naive UTC datetime the tables store."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _naive_utc(moment: datetime | None, field: str = "at") -> datetime:
    if moment is None:
        return utcnow()
    return inputs.naive_utc(moment, field)  # InvalidField naming ``field``: naive, or out of range once in UTC


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc)


def _identifier(value: str, field: str) -> str:
    """A request id, reference or channel as every database stores and compares it (``inputs.identifier``)."""
    limit = inputs.CHANNEL_MAX_CHARS if field == "channel" else inputs.IDENTIFIER_MAX_CHARS
    return inputs.identifier(value, field, limit)


def secret_hash(secret: str) -> str:
    """sha256 of a secret (keys and codes are 256-bit random: no slow hash is needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


#: Compared against when no row was found, so a miss does the same work as a hit (no stored hash is this).
_NO_SUCH_HASH = "0" * 64
#: The longest user or key name (the columns' VARCHAR(190)).
NAME_MAX_CHARS = inputs.NAME_MAX_CHARS


def _presented_hash(secret: object) -> str:
    """sha256 of the key or code a client presented; what no text string can be hashes to a value no row has.

    ``surrogatepass``: a lone surrogate (possible in a decoded header) hashes like any other text instead
    of raising an encoding error that would carry the whole string.
    """
    if not isinstance(secret, str):
        return _NO_SUCH_HASH
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _matches(stored: str | None, presented: str) -> bool:
    """The stored hash equals the presented one, compared in constant time (a missing row compares too)."""
    return hmac.compare_digest((stored or _NO_SUCH_HASH).encode("ascii"), presented.encode("ascii")) and stored is not None


def _name(value: object, field: str) -> str:
    """A user's or key's name, kept byte for byte: any text every database stores exactly, else ``InvalidField``.

    Quotes, SQL, formula starters, markup, line breaks, emoji and bidi controls are all kept (statements
    bind them as parameters; exports and reports neutralize or escape them). Refused: NUL (PostgreSQL cannot
    store it), lone surrogates (not UTF-8) and more than the columns' 190 characters.
    """
    return inputs.text(value, field, NAME_MAX_CHARS)


def _is_retryable(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    sqlstate = getattr(exc.orig, "sqlstate", None)
    # The MySQL error number is checked as well as the SQLSTATE: PyMySQL >= 1.1 sets ``sqlstate`` too, and a
    # lock wait timeout (1205) is SQLSTATE HY000, a generic state (tests/test_faults.py found it never retried).
    errno = exc.orig.args[0] if getattr(exc.orig, "args", None) else None
    # 55P03 (lock_not_available): a PostgreSQL lock_timeout gave up the wait; like MariaDB's 1205 it wrote
    # nothing (the transaction is rolled back) and the whole transaction can run again.
    return (sqlstate in ("40001", "40P01", "55P03") or errno in (1213, 1205) or "deadlock" in text
            or "database is locked" in text)


@dataclass(frozen=True, slots=True)
class HoldTicket:
    """An open reservation for one request; pass it to ``settle`` or ``release``."""

    id: int
    request_id: str
    user_id: int
    key_id: int
    model: str
    price_group: str
    amount: int
    prompt_tokens: int
    prompt_source: str
    created_at: datetime
    expires_at: datetime
    channel: str | None = None  # the upstream channel the gateway routed to, when it named one
    #: The worst case reserved, figure by figure (None for holds taken before schema 0005): ``settle`` caps
    #: reported figures beyond it. ``keep_until``: the latest ``keep_alive`` may move ``expires_at`` to.
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_web_searches: int | None = None
    keep_until: datetime | None = None

    @property
    def bounds(self) -> HoldBounds | None:
        """What settle checks the reported usage against (None: a hold from before the bounds were kept)."""
        if self.max_input_tokens is None or self.max_output_tokens is None or self.max_web_searches is None:
            return None
        return HoldBounds(self.max_input_tokens, self.max_output_tokens, self.max_web_searches,
                          exact=self.prompt_source == UsageSource.LOCAL)


class HoldEstimate(NamedTuple):
    """What ``Meter.estimate`` finds: the quota to reserve, the prompt count and the rest of the worst case."""

    amount: int
    prompt: PromptCount
    worst: WorstCase


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """A key that may be used now, and what its holder has available (``Meter.check_key``)."""

    user_id: int
    key_id: int
    price_group: str
    available: int  # the user's balance, capped by the key's room when it has a limit; may be <= 0


@dataclass(frozen=True, slots=True)
class Receipt:
    """The charge of one request (the same receipt for every retry of the same settle)."""

    request_id: str
    hold_id: int | None
    model: str
    quota: int
    usd: str
    price_version: str
    overage: int  # charged beyond the hold (the documented overage rule)
    outcome: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant found by the audit."""

    invariant: str
    subject: str
    detail: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    """``ok`` and every violation found."""

    violations: tuple[Violation, ...]

    @property
    def ok(self) -> bool:
        """True when no invariant is broken."""
        return not self.violations


class Meter:
    """The quota ledger over one database, priced by one price table."""

    def __init__(self, engine: Engine, prices: PriceTable, hold_ttl: timedelta = DEFAULT_HOLD_TTL) -> None:
        if not isinstance(engine, Engine):
            raise InvalidField("engine", f"must be a SQLAlchemy Engine, got {type(engine).__name__}")
        if not isinstance(prices, PriceTable):
            raise InvalidField("prices", f"must be a PriceTable, got {type(prices).__name__}")
        inputs.duration(hold_ttl, "hold_ttl", MAX_HOLD_TTL)
        self.engine = engine
        self.prices = prices
        self.hold_ttl = hold_ttl
        self._statements = Statements(engine.dialect)

    @classmethod
    def open(
        cls, url: str = "sqlite:///metering.db", *, prices: PriceTable | None = None, hold_ttl: timedelta = DEFAULT_HOLD_TTL
    ) -> "Meter":
        """Connect, create or upgrade the schema, and load the price table (default: the bundled one)."""
        from sqlalchemy.exc import ArgumentError

        from metering.ledger.schema import upgrade

        inputs.text(url, "url", 4_096)
        if prices is not None and not isinstance(prices, PriceTable):
            raise InvalidField("prices", f"must be a PriceTable or None, got {type(prices).__name__}")
        inputs.duration(hold_ttl, "hold_ttl", MAX_HOLD_TTL)
        try:
            engine = make_engine(url)
        except ArgumentError:  # the URL itself is never echoed: it may hold a password
            raise InvalidField("url", "is not a database URL (sqlite:///path, postgresql://..., mysql://...)") from None
        upgrade(engine)
        return cls(engine, prices or load_price_table(), hold_ttl)

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # ------------------------------------------------------------------ transactions

    def _retrying(self, work: Callable[[Db], T], *, reads_first: bool = False) -> T:
        """Run ``work`` in a write transaction, again from the start after a deadlock or serialization failure.

        Also once more when the pooled connection turns out to have been dropped (a server restart, an idle
        timeout) before the COMMIT was sent: what ``pool_pre_ping`` did, without its round trip on every
        checkout. A failed COMMIT is never repeated: it may have been applied. With ``reads_first``, ``work``
        reads first and opens the write transaction itself (``db.transaction()``), on the same connection.
        """
        dropped = False
        for attempt in range(MAX_RETRIES):
            db: Db | None = None
            try:
                with self.engine.connect() as connection:
                    db = Db(connection, self._statements)
                    if reads_first:
                        return work(db)
                    with db.transaction():
                        return work(db)
            except DBAPIError as exc:
                if exc.connection_invalidated and not dropped and db is not None and not db.committing:
                    dropped = True
                    continue
                if isinstance(exc, IntegrityError):
                    raise
                retryable = _is_retryable(exc)
                # A transient failure the caller can only retry is raised typed (LedgerBusy, 503), never as a
                # raw driver error it cannot tell from a bug: the COMMIT failed (the connection dropped with
                # it, tests/test_faults.py) and may have been applied, so the caller retries with the same
                # request id / reference / code and the unique constraints make it exactly one effect.
                if db is not None and db.committing and not retryable:
                    raise LedgerBusy("the database connection failed at the COMMIT: the call may have been applied; "
                                     "retry it with the same request id", maybe_applied=True) from exc
                if exc.connection_invalidated:
                    raise LedgerBusy("the database connection dropped twice: nothing was applied; retry") from exc
                if not retryable:
                    raise
                if attempt == MAX_RETRIES - 1:
                    raise LedgerBusy(f"the database is busy (lock wait or deadlock, {MAX_RETRIES} attempts): "
                                     "nothing was applied; retry") from exc
                time.sleep(0.005 * (attempt + 1) * (1 + secrets.randbelow(4)))
        raise AssertionError("unreachable")

    def _read(self, work: Callable[[Db], T]) -> T:
        """Run read-only ``work`` on one snapshot (once more if the pooled connection had been dropped).

        On SQLite the snapshot is a deferred BEGIN: a read neither waits for the write lock nor holds
        writers up. It ends with a COMMIT rather than a ROLLBACK: psycopg forgets its prepared statements at
        every ROLLBACK.
        """
        for attempt in range(2):
            try:
                with self.engine.connect() as connection:
                    with connection.execution_options(**{READ_ONLY: True}).begin():
                        return work(Db(connection, self._statements))
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                if attempt:  # dropped twice: typed, like a write's (a read is always safe to retry)
                    raise LedgerBusy("the database connection dropped twice during a read; retry") from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _entry(
        db: Db, user_id: int, kind: str, amount: int, reference: str, *,
        key_id: int | None = None, hold_id: int | None = None, usage_event_id: int | None = None,
        note: str | None = None,
    ) -> None:
        """Append one entry; the same transaction moves the user's balance by exactly its amount."""
        db.insert(INSERT_ENTRY, {
            "user_id": user_id, "key_id": key_id, "kind": kind, "amount": amount, "hold_id": hold_id,
            "usage_event_id": usage_event_id, "reference": reference, "note": note, "created_at": utcnow(),
        })

    @staticmethod
    def _lock_user(db: Db, user_id: int) -> None:
        """Take the user's row lock first (FOR NO KEY UPDATE / FOR UPDATE, a no-op on SQLite's BEGIN IMMEDIATE).

        InnoDB's foreign-key checks take a shared lock on the users row for every insert that names the
        user (holds, usage events, entries, orders, grants, codes); the balance UPDATE that follows must
        then upgrade it, and two transactions of one user upgrading at once deadlock. Locking first
        queues them instead.
        """
        db.row(LOCK_USER, p_user_id=user_id)

    @staticmethod
    def _move_balance(db: Db, user_id: int, delta: int) -> None:
        db.count(MOVE_BALANCE, p_user_id=user_id, p_delta=delta)

    def _credit(self, db: Db, user_id: int, kind: str, amount: int, reference: str, note: str | None = None) -> None:
        self._entry(db, user_id, kind, amount, reference, note=note)
        self._move_balance(db, user_id, amount)

    # ------------------------------------------------------------------ users and keys

    def create_user(self, name: str, group: str = "default") -> int:
        """Create a user in ``group`` (a group of the price table) with a zero balance; returns its id."""
        inputs.text(group, "group", 64)
        self.prices.group_multiplier(group)  # an unknown group is refused here, not at the first request
        _name(name, "name")
        if not name or name != name.strip():
            raise InvalidField("name", "a user name must be non-empty, without leading or trailing spaces")
        if name.isdigit():
            raise InvalidField("name", f"a user name must not be only digits (digits name a user id): {name!r}")

        def work(db: Db) -> int:
            result = db.execute(insert(USERS).values(name=name, price_group=group, balance=0, created_at=utcnow()))
            return int(result.inserted_primary_key[0])

        try:
            return self._retrying(work)
        except IntegrityError:
            raise DuplicateReference(f"user {name!r} already exists") from None

    def user(self, user_id: int) -> dict[str, Any]:
        """A user's id, name, group and balance; ``InvalidField`` for what cannot be an id, ``NotFound``."""
        inputs.row_id(user_id, "user_id")  # a 100-bit id is no user, not a driver's overflow error
        row = self._read(lambda db: db.execute(select(USERS).where(USERS.c.id == user_id)).mappings().first())
        if row is None:
            raise NotFound(f"no user {user_id}")
        return {"id": row["id"], "name": row["name"], "group": row["price_group"], "balance": row["balance"]}

    def find_user(self, name_or_id: str | int) -> int:
        """The id of a user given by id (an int or ASCII digits) or name; ``InvalidField`` for what can be
        neither (an id beyond 64 bits, a name no database stores), ``NotFound`` for no such user."""
        ref = inputs.user_ref(name_or_id, "user")
        query = select(USERS.c.id).where(USERS.c.id == ref if isinstance(ref, int) else USERS.c.name == ref)
        row = self._read(lambda db: db.execute(query).first())
        if row is None:
            raise NotFound(f"no user {name_or_id!r}")
        return int(row[0])

    def users(self) -> list[dict[str, Any]]:
        """Every user, by id."""
        rows = self._read(lambda db: db.execute(select(USERS).order_by(USERS.c.id)).mappings().all())
        return [{"id": r["id"], "name": r["name"], "group": r["price_group"], "balance": r["balance"]} for r in rows]

    def balance(self, user_id: int) -> int:
        """The user's balance in quota units (open holds already taken out)."""
        return int(self.user(user_id)["balance"])

    def create_key(
        self, user_id: int, name: str, limit_quota: int | None = None, models: Sequence[str] | None = None,
        expires_at: datetime | None = None,
    ) -> str:
        """Create an API key; returns its secret, which is shown this once and never stored.

        ``models``: None (every model) or a list of model names the model registry knows (a typo is refused
        here rather than refusing every request later).
        """
        if limit_quota is not None:
            inputs.integer(limit_quota, "limit_quota", 0, MAX_QUOTA)
        _name(name, "name")
        allowed = None if models is None else inputs.model_names(models, "models")
        for index, model in enumerate(allowed or ()):
            try:
                resolve_model(model)
            except BillingError as exc:
                raise InvalidField(f"models[{index}]", str(exc)) from None
        self.user(user_id)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        values = {
            "user_id": user_id, "name": name, "secret_hash": secret_hash(secret),
            "display_prefix": secret[: len(SECRET_PREFIX) + 4] + "...", "status": "enabled",
            "expires_at": None if expires_at is None else _naive_utc(expires_at, "expires_at"),
            "allowed_models": None if allowed is None else json.dumps(allowed),
            "limit_quota": limit_quota, "used_quota": 0, "reserved_quota": 0, "created_at": utcnow(),
        }
        self._retrying(lambda db: db.execute(insert(KEYS).values(**values)).rowcount)
        return secret

    def keys(self, user_id: int | None = None) -> list[dict[str, Any]]:
        """API keys (never their secrets): id, user, name, prefix, status, limit, used, reserved."""
        # Every column but the hash: a row read through SQLAlchemy is echoed by its DEBUG log.
        query = select(*(c for c in KEYS.c if c.name != "secret_hash")).order_by(KEYS.c.id)
        if user_id is not None:
            query = query.where(KEYS.c.user_id == inputs.row_id(user_id, "user_id"))
        rows = self._read(lambda db: db.execute(query).mappings().all())
        return [
            {
                "id": r["id"], "user_id": r["user_id"], "name": r["name"], "prefix": r["display_prefix"],
                "status": r["status"], "limit_quota": r["limit_quota"], "used_quota": r["used_quota"],
                "reserved_quota": r["reserved_quota"],
                "models": None if r["allowed_models"] is None else json.loads(r["allowed_models"]),
                "expires_at": None if r["expires_at"] is None else _aware(r["expires_at"]).isoformat(),
            }
            for r in rows
        ]

    def key_usage(self, secret: str) -> dict[str, Any]:
        """What a key's holder may read of its own account: balance, the key's room and what it has spent.

        ``remaining`` is what the key can still spend (the user's balance, capped by the key's limit when it
        has one); ``used`` is the quota charged to this key so far. Raises ``KeyRejected`` like ``authorize``.
        """
        spent = select(func.coalesce(func.sum(EVENTS.c.quota), 0)).where(EVENTS.c.status == "charged")

        def work(db: Db) -> dict[str, Any]:
            key = self._key(db, secret, None)
            balance = int(db.execute(select(USERS.c.balance).where(USERS.c.id == key["user_id"])).scalar_one())
            used = int(db.execute(spent.where(EVENTS.c.key_id == key["id"])).scalar_one())
            remaining = max(balance, 0)
            if key["limit_quota"] is not None:
                room = select(KEYS.c.limit_quota - KEYS.c.used_quota - KEYS.c.reserved_quota).where(KEYS.c.id == key["id"])
                remaining = min(remaining, max(int(db.execute(room).scalar_one()), 0))
            expires = None if key["expires_at"] is None else _aware(key["expires_at"])
            models = None if key["allowed_models"] is None else json.loads(key["allowed_models"])
            return {"user_id": key["user_id"], "key_id": key["id"], "balance": balance, "remaining": remaining,
                    "used": used, "limit_quota": key["limit_quota"], "expires_at": expires, "models": models}

        return self._read(work)

    def check_key(self, secret: str, model: str | None = None) -> KeyCheck:
        """The key, if it may be used now (for ``model`` when given), and what its holder has available.

        One indexed read, no counting: a gateway calls it before reading a request's body, so an unknown key
        is refused (``KeyRejected``, 401) and an empty balance (``available`` <= 0) answered 429 before any
        body byte is read. ``authorize`` checks all of it again.
        """
        if model is not None:
            inputs.identifier(model, "model", inputs.MODEL_MAX_CHARS)
        key = self._read(lambda db: self._key(db, secret, model))
        return KeyCheck(key["user_id"], key["id"], key["price_group"], _available(key))

    def revoke_key(self, key_id: int) -> bool:
        """Disable a key for good; False when it was already revoked, ``NotFound`` when there is no such key."""
        key = inputs.row_id(key_id, "key_id")
        revoke = update(KEYS).where(KEYS.c.id == key, KEYS.c.status == "enabled").values(status="revoked")
        if self._retrying(lambda db: db.execute(revoke).rowcount == 1):
            return True
        if self._read(lambda db: db.execute(select(KEYS.c.id).where(KEYS.c.id == key)).first()) is None:
            raise NotFound(f"no key {key_id}")
        return False

    def _key(self, db: Db, secret: str, model: str | None) -> dict[str, Any]:
        presented = _presented_hash(secret)
        row = db.row(KEY_BY_SECRET, p_secret_hash=presented)
        # The unique index found the row by its hash; the hash is compared again in constant time (and a
        # miss against a dummy), and an unknown, a wrong and a revoked key get one answer that says nothing
        # of the key (never echoed, not even its prefix): which of the three it was is not the caller's to learn.
        matched = _matches(None if row is None else row["secret_hash"], presented)  # compared even on a miss
        if row is None or not matched or row["status"] != "enabled":
            raise KeyRejected("invalid API key")
        if row["expires_at"] is not None and row["expires_at"] <= utcnow():
            raise KeyRejected(f"API key {row['display_prefix']} has expired")
        if row["allowed_models"] is not None and model is not None:
            allowed = set(json.loads(row["allowed_models"]))
            canonical = resolve_model(model).canonical
            if model not in allowed and canonical not in allowed:
                raise KeyRejected(
                    f"API key {row['display_prefix']} may not use model {model}", http_status=403, code="model_not_allowed"
                )
        return row

    # ------------------------------------------------------------------ credits

    def grant(self, user_id: int, kind: str) -> int:
        """Give the price table's grant ``kind`` once per user; returns the units credited (0 the second time)."""
        inputs.text(kind, "kind", 64)
        units = grant_quota(self.prices, kind)
        self.user(user_id)  # NotFound, not a foreign-key error swallowed as "granted before"

        def work(db: Db) -> int:
            self._lock_user(db, user_id)
            if db.execute(select(GRANTS.c.id).where(GRANTS.c.user_id == user_id, GRANTS.c.kind == kind)).first():
                return 0
            db.execute(insert(GRANTS).values(user_id=user_id, kind=kind, quota=units, created_at=utcnow()))
            self._credit(db, user_id, "grant", units, f"grant:{user_id}:{kind}")
            return units

        try:
            return self._retrying(work)
        except IntegrityError:
            return 0  # a concurrent call granted it first

    def topup(
        self, user_id: int, amount: str | Decimal | int, currency: str, reference: str, at: datetime | None = None
    ) -> int:
        """Credit a paid top-up at the recharge rate in force; once per external ``reference``. Returns units.

        A retry is the same ``user_id``, ``currency`` and ``amount`` by value (``10``, ``"10.00"`` and
        ``Decimal("1e1")`` are one amount, stored as its canonical text); anything else is ``DuplicateReference``.
        """
        _identifier(reference, "reference")
        inputs.identifier(currency, "currency", 8)
        moment = inputs.event_time(at, "at")
        quote = quote_topup(self.prices, amount, currency, moment)
        paid_at = _naive_utc(moment)  # the order's time is the payment's (reports take the paid rate by it)
        self.user(user_id)  # NotFound, not a raw foreign-key IntegrityError
        order = {
            "reference": reference, "user_id": user_id, "amount": amount_text(quote.amount), "currency": currency,
            "rate_id": quote.rate_id, "usd_credit": decimal_text(quote.usd_credit), "quota": quote.quota,
        }

        def work(db: Db) -> int:
            self._lock_user(db, user_id)
            db.execute(insert(ORDERS).values(**order, created_at=paid_at))
            self._credit(db, user_id, "topup", quote.quota, f"topup:{reference}", note=quote.label)
            return quote.quota

        try:
            return self._retrying(work)
        except IntegrityError:
            row = self._read(lambda db: db.execute(select(ORDERS).where(ORDERS.c.reference == reference)).mappings().first())
            if row is None:
                raise
            if (row["user_id"], row["currency"]) != (user_id, currency) or not same_amount(row["amount"], quote.amount):
                raise DuplicateReference(f"top-up reference {reference!r} was used for a different order") from None
            return int(row["quota"])  # a retried webhook: credited once, same answer

    def adjust(self, user_id: int, amount: int, reference: str, note: str) -> bool:
        """Post an adjustment entry once per ``reference``; False when it was posted before."""
        _identifier(reference, "reference")
        if not isinstance(amount, int) or isinstance(amount, bool) or abs(amount) > MAX_QUOTA:
            raise InvalidField("amount", f"must be an integer from -{MAX_QUOTA} to {MAX_QUOTA}")
        inputs.text(note, "note")
        self.user(user_id)  # NotFound, not a foreign-key error swallowed as "posted before"

        def work(db: Db) -> bool:
            self._lock_user(db, user_id)
            self._credit(db, user_id, "adjustment", amount, f"adjustment:{reference}", note=note)
            return True

        try:
            return self._retrying(work)
        except IntegrityError:
            posted = select(ENTRIES).where(ENTRIES.c.kind == "adjustment", ENTRIES.c.reference == f"adjustment:{reference}")
            row = self._read(lambda db: db.execute(posted).mappings().first())
            if row is None:
                raise
            if (row["user_id"], row["amount"], row["note"]) != (user_id, amount, note):
                raise DuplicateReference(f"adjustment reference {reference!r} was used for a different adjustment") from None
            return False  # a retry: posted once

    def create_redemption_codes(self, count: int, quota_units: int, batch: str | None = None) -> list[str]:
        """Create ``count`` single-use codes worth ``quota_units`` each; the codes are returned this once."""
        inputs.integer(count, "count", 1, MAX_CODES)
        inputs.integer(quota_units, "quota_units", 1, MAX_QUOTA)
        if batch is not None:
            inputs.identifier(batch, "batch", 64)
        batch = batch or utcnow().strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
        codes = ["rc-" + secrets.token_urlsafe(18) for _ in range(count)]
        now = utcnow()
        rows = [{"code_hash": secret_hash(c), "batch": batch, "quota": quota_units, "created_at": now} for c in codes]
        self._retrying(lambda db: db.execute(insert(CODES), rows).rowcount)
        return codes

    def redeem(self, user_id: int, code: str) -> int:
        """Redeem a code for ``user_id`` exactly once (under any concurrency); returns the units credited."""
        self.user(user_id)  # NotFound, not a raw foreign-key IntegrityError

        def work(db: Db) -> int:
            self._lock_user(db, user_id)
            presented = _presented_hash(code)
            row = db.row(CODE_BY_HASH, p_code_hash=presented)  # on the driver's cursor: no DEBUG echo of the row
            # As for keys: compared in constant time, an unknown and a wrong code get one answer, never echoed.
            matched = _matches(None if row is None else row["code_hash"], presented)  # compared even on a miss
            if row is None or not matched:
                raise NotFound("invalid redemption code")
            claimed = db.execute(
                update(CODES).where(CODES.c.id == row["id"], CODES.c.redeemed_by.is_(None))
                .values(redeemed_by=user_id, redeemed_at=utcnow())
            )
            if claimed.rowcount != 1:
                raise DuplicateReference("this redemption code was already used")
            self._credit(db, user_id, "redemption", int(row["quota"]), f"redemption:{row['id']}")
            return int(row["quota"])

        return self._retrying(work)

    # ------------------------------------------------------------------ holds

    def estimate(self, body: dict[str, Any], model: str, group: str, at: datetime) -> HoldEstimate:
        """The worst case of a request in quota (metering/worst_case.py): the whole prompt, every choice at its
        output budget (max_completion_tokens / max_tokens, else the model's maximum), server tools' uses."""
        inputs.request_body(body)
        inputs.text(model, "model", inputs.MODEL_MAX_CHARS)
        inputs.text(group, "group", 64)
        inputs.event_time(at, "at", required=True)
        return self._estimate(body, model, group, at, self._worst_case(body, model, at))

    def _estimate(self, body: dict[str, Any], model: str, group: str, at: datetime, worst: WorstCase) -> HoldEstimate:
        prompt = count_request(body, model)
        usage = worst.usage(self.prices.resolve(model)[0].provider, model, prompt.prompt_tokens)
        return HoldEstimate(quota(self.prices, usage, at.timestamp(), group), prompt, worst)  # the integer hot path

    def _worst_case(self, body: dict[str, Any], model: str, at: datetime) -> WorstCase:
        entry, _ = self.prices.resolve(model)
        version = entry.version_at(at.timestamp()).version
        return worst_case(body, resolve_model(model), version.max_output_tokens)

    def _floor(self, body: dict[str, Any], model: str, group: str, at: datetime, worst: WorstCase,
               size: BodySize) -> int:
        """The least the hold of ``body`` can be, from a walk that encodes nothing (``scan_body``'s bound)."""
        messages = body.get("messages")
        lower = prompt_lower_bound(size, len(messages) if isinstance(messages, list) else 0, resolve_model(model))
        usage = worst.usage(self.prices.resolve(model)[0].provider, model, lower)
        return quota(self.prices, usage, at.timestamp(), group)

    def authorize(
        self, secret: str, request_body: dict[str, Any], request_id: str, *, model: str | None = None,
        at: datetime | None = None, channel: str | None = None,
    ) -> HoldTicket:
        """Validate the key and reserve the request's worst case; raises ``QuotaExceeded`` or ``KeyRejected``.

        Retrying with the same ``request_id`` returns the hold already taken, never a second one.
        ``channel`` names the upstream channel (for reports and upstream cost); ``settle`` may name another.
        """
        _identifier(request_id, "request_id")
        if channel is not None:
            _identifier(channel, "channel")
        if model is not None and not isinstance(model, str):
            raise InvalidField("model", f"must be a model name or None (the body's), got {type(model).__name__}")
        model = model or inputs.request_body(request_body).get("model")
        if not isinstance(model, str):
            raise KeyRejected("the request names no model", http_status=400, code="model_required")
        moment = inputs.event_time(at, "at")
        key: dict[str, Any] = {}

        def work(db: Db) -> HoldTicket:
            # One checkout for the reads and the write transaction. The reads come first: on SQLite outside
            # any transaction (no write lock while the prompt is counted); on PostgreSQL and MySQL the driver
            # opens the transaction with the first read (a plain SELECT: no row lock) and the COMMIT ends it.
            nonlocal key
            key = self._key(db, secret, model)
            existing = db.row(HOLD_BY_REQUEST, p_request_id=request_id)
            if existing is not None:
                return self._ticket_for_retry(existing, key)
            # Cheap checks before the body is counted: a user who cannot afford even the least this request
            # can cost is refused without encoding it (the TAKE below re-checks under the lock either way).
            size = scan_body(request_body)  # RequestError naming the path: NaN, a lone surrogate, too deep
            worst = self._worst_case(request_body, model, moment)
            if size.chars >= PRECHECK_MIN_CHARS:
                floor, available = self._floor(request_body, model, key["price_group"], moment, worst, size), _available(key)
                if floor > available:
                    raise QuotaExceeded(floor, max(available, 0), "user" if available == key["balance"] else "key")
            amount, prompt, _ = self._estimate(request_body, model, key["price_group"], moment, worst)
            created = _naive_utc(moment)
            hold = {
                "request_id": request_id, "user_id": key["user_id"], "key_id": key["id"], "model": model,
                "price_group": key["price_group"], "amount": amount, "prompt_tokens": prompt.prompt_tokens,
                "prompt_source": str(prompt.source), "limited_key": key["limit_quota"] is not None,
                "channel": channel, "status": "open", "created_at": created, "expires_at": created + self.hold_ttl,
                "max_input_tokens": min(prompt.prompt_tokens + worst.tool_input_tokens, MAX_COUNT),
                "max_output_tokens": worst.output_tokens, "max_web_searches": worst.web_searches,
                "keep_until": created + max(self.hold_ttl, worst.longest_request),
            }
            with db.transaction():
                if db.count(TAKE, p_user_id=key["user_id"], p_amount=amount) != 1:
                    available = db.row(BALANCE_NOW, p_user_id=key["user_id"])["balance"]  # type: ignore[index]
                    raise QuotaExceeded(amount, max(int(available), 0), "user")
                if hold["limited_key"] and db.count(RESERVE, p_key_id=key["id"], p_amount=amount) != 1:
                    left = db.row(KEY_ROOM_NOW, p_key_id=key["id"])["room"]  # type: ignore[index]
                    raise QuotaExceeded(amount, max(int(left), 0), "key")
                hold["id"] = db.insert(INSERT_HOLD, hold)
                self._entry(db, key["user_id"], "hold", -amount, f"hold:{request_id}", key_id=key["id"], hold_id=hold["id"])
            return _ticket(hold)

        try:
            return self._retrying(work, reads_first=True)
        except IntegrityError:
            row = self._read(lambda db: db.row(HOLD_BY_REQUEST, p_request_id=request_id))
            if row is None:
                raise
            return self._ticket_for_retry(row, key)

    @staticmethod
    def _ticket_for_retry(row: Any, key: dict[str, Any]) -> HoldTicket:
        if row["key_id"] != key["id"]:
            raise SettleConflict(f"request id {row['request_id']!r} was authorized with another key")
        return _ticket(row)

    def hold(self, request_id: str) -> HoldTicket:
        """The hold taken for ``request_id`` (e.g. in another process)."""
        _identifier(request_id, "request_id")
        row = self._read(lambda db: db.row(HOLD_BY_REQUEST, p_request_id=request_id))
        if row is None:
            raise NotFound(f"no hold for request {request_id!r}")
        return _ticket(row)

    def release(self, hold: HoldTicket) -> bool:
        """The upstream call failed: return the hold to the balance, exactly once. False if already resolved."""
        _ticket_given(hold)
        return self._retrying(lambda db: self._resolve_open_hold(db, hold.id, "released"))

    def _resolve_open_hold(self, db: Db, hold_id: int, status: str, cutoff: datetime | None = None) -> bool:
        """Release or expire a hold: its amount back to the balance (and the key), exactly once.

        An expiry (``cutoff``) happens only if the hold is still due: a keep-alive may have moved it since.
        """
        row = db.row(HOLD_BY_ID, p_id=hold_id)
        if row is None:
            raise NotFound(f"no hold {hold_id}")
        self._lock_user(db, row["user_id"])
        if not self._mark_resolved(db, row, status, cutoff):
            return False
        self._move_balance(db, row["user_id"], row["amount"])
        if row["limited_key"]:
            db.count(MOVE_KEY, p_key_id=row["key_id"], p_released=row["amount"], p_used=0)
        return True

    def _mark_resolved(self, db: Db, row: dict[str, Any], status: str, cutoff: datetime | None = None) -> bool:
        """Resolve the hold ``row`` as ``status`` and append its release entry if it is still open (False if not).

        Only the transaction whose conditional UPDATE finds the hold open (and, for an expiry at ``cutoff``,
        still due) writes the entry; the caller, in the same transaction and under the user's lock, moves the
        balance (and a limited key) back.
        """
        if cutoff is not None:
            resolved = db.count(EXPIRE_HOLD, p_id=row["id"], p_cutoff=cutoff, p_at=utcnow())
        else:
            resolved = db.count(RESOLVE_HOLD, p_id=row["id"], p_status=status, p_at=utcnow())
        if resolved != 1:
            return False
        self._entry(db, row["user_id"], "release", row["amount"], f"release:{row['id']}", key_id=row["key_id"],
                    hold_id=row["id"])
        return True

    def expire_holds(self, now: datetime | None = None) -> int:
        """Release every open hold past its TTL (the worker runs this every minute); returns how many."""
        cutoff = _naive_utc(inputs.event_time(now, "now"))  # an aware time from 2000 to a year ahead
        due = select(HOLDS.c.id).where(HOLDS.c.status == "open", HOLDS.c.expires_at <= cutoff)
        ids = self._read(lambda db: db.execute(due).scalars().all())
        return sum(self._retrying(lambda db, i=i: self._resolve_open_hold(db, i, "expired", cutoff)) for i in ids)

    def keep_alive(self, hold: HoldTicket, now: datetime | None = None) -> datetime | None:
        """Keep an open hold from expiring while its upstream call runs; the new expiry, or None once resolved.

        The expiry moves to ``now`` + ``hold_ttl``, never past the hold's ``keep_until`` (its request's longest
        documented run, metering/worst_case.py) and never back. Call it more often than ``hold_ttl`` (the relay
        does every third of it) for as long as the call is open; a gateway that dies stops calling, and the
        hold then expires within one TTL, as before.
        """
        _ticket_given(hold)
        current = _naive_utc(inputs.event_time(now, "now"))
        limit = None if hold.keep_until is None else _naive_utc(hold.keep_until, "keep_until")
        until = current + self.hold_ttl if limit is None else min(current + self.hold_ttl, limit)
        query = select(HOLDS.c.status, HOLDS.c.expires_at).where(HOLDS.c.id == hold.id)

        def work(db: Db) -> datetime | None:
            db.count(KEEP_ALIVE, p_id=hold.id, p_until=until)
            row = db.execute(query).first()
            if row is None:
                raise NotFound(f"no hold {hold.id}")
            return _aware(row.expires_at) if row.status == "open" else None

        return self._retrying(work)

    # ------------------------------------------------------------------ settlement

    @staticmethod
    def accumulator(hold: HoldTicket) -> StreamAccumulator:
        """A stream accumulator for ``hold``'s request that knows its prompt count (for cut streams)."""
        _ticket_given(hold)
        return StreamAccumulator(hold.model, prompt=_prompt_of(hold))

    def settle(
        self, hold: HoldTicket, *, response: dict[str, Any] | None = None, usage: UsageRecord | None = None,
        stream: StreamAccumulator | StreamResult | None = None, channel: str | None = None,
    ) -> Receipt:
        """Charge the actual usage at the request's time, resolving the hold; a retry returns the first receipt.

        Give exactly one of ``response`` (a non-stream response body), ``usage`` or ``stream``. ``channel``
        (default: the one named at authorize) is the upstream channel that served the request. A usage the
        ledger refuses is quarantined with its reason before the typed error is raised; the hold stays open
        (docs/ledger.md, "Rejected usage").
        """
        try:
            receipt = self._settle(hold, response=response, usage=usage, stream=stream, channel=channel)
        except quarantine.REJECTIONS as exc:
            if not getattr(exc, "retryable", False):  # a busy database is retried by the caller, not quarantined
                source, payload = quarantine.settle_payload(response=response, usage=usage, stream=stream)
                self._quarantine(exc, source, payload, request_id=getattr(hold, "request_id", None),
                                 user_id=getattr(hold, "user_id", None), key_id=getattr(hold, "key_id", None),
                                 hold_id=getattr(hold, "id", None), model=getattr(hold, "model", None))
            raise
        if stream is not None:
            # Billed from the local count: the upstream's rejected usage chunks are kept for review.
            for rejected in quarantine.rejected_chunks(stream):
                self._quarantine(rejected.error(), "settle_stream", rejected.data, action="replaced",
                                 request_id=hold.request_id, user_id=hold.user_id, key_id=hold.key_id,
                                 hold_id=hold.id, model=hold.model)
        return receipt

    def _quarantine(self, error: BaseException, source: str, payload: Any, **where: Any) -> None:
        """Keep a rejected usage payload (its own transaction); a failure to do so is noted on ``error``."""
        try:
            quarantine.store(self._retrying, source=source, error=error, payload=payload, **where)
        except Exception as failure:  # noqa: BLE001 (the caller must still get the rejection itself)
            note = f"the rejected usage could not be quarantined: {type(failure).__name__}: {failure}"
            error.add_note(note)
            quarantine.log.error("%s (%s %s: %s)", note, source, where.get("request_id"), error)

    def _settle(
        self, hold: HoldTicket, *, response: dict[str, Any] | None = None, usage: UsageRecord | None = None,
        stream: StreamAccumulator | StreamResult | None = None, channel: str | None = None,
    ) -> Receipt:
        """``settle`` without the quarantine: every check, then the charge."""
        _ticket_given(hold)
        if channel is not None:
            _identifier(channel, "channel")
        if sum(x is not None for x in (response, usage, stream)) != 1:
            raise InvalidField("usage", "give exactly one of response=, usage= or stream=")
        outcome, source = "completed", "settle_usage"
        if stream is not None:
            if not isinstance(stream, (StreamAccumulator, StreamResult)):
                raise InvalidField("stream", f"must be a StreamAccumulator or StreamResult, got {type(stream).__name__}")
            result = stream.finish() if isinstance(stream, StreamAccumulator) else stream
            usage, outcome, source = result.usage, result.status, "settle_stream"
        elif response is not None:
            usage, source = usage_from_response(response, hold.model, prompt=_prompt_of(hold)), "settle_response"
        if not isinstance(usage, UsageRecord):
            raise InvalidUsage("usage", f"must be a UsageRecord, got {type(usage).__name__}")
        return self._charge(hold, usage, outcome, channel or hold.channel, source)

    def _capped(self, hold: HoldTicket, usage: UsageRecord, source: str) -> tuple[UsageRecord, dict[str, Any] | None]:
        """``usage`` within the hold's worst case, and the quarantine row of what was beyond it (None: nothing).

        The reported figures beyond the worst case (docs/ledger.md, "Upstream usage is checked") are charged at
        the worst case; the row keeps the reported usage and the quota not charged, for an operator to approve.
        A local count beyond it (the delivered text re-encoded, a Claude estimate's margin) is capped without a
        row: the provider bills no choice more than its budget, so the excess is our count's slack.
        """
        bounds = hold.bounds
        beyond = [] if bounds is None else bounds.beyond(usage)
        if bounds is None or not beyond:
            return usage, None
        capped = bounds.cap(usage)
        if usage.source is not UsageSource.UPSTREAM:
            return capped, None
        try:
            full = quota(self.prices, usage, hold.created_at.timestamp(), hold.price_group)
        except InvalidUsage:
            full = MAX_QUOTA  # beyond anything one request may be charged: the approval is the operator's call
        reported = "; ".join(text for _, text in beyond)
        error = UsageBeyondHold(beyond[0][0], f"reported {reported}: charged at the worst case, the rest kept")
        row = quarantine.quarantine_row(
            source=source, error=error, payload=usage, action="capped", request_id=hold.request_id,
            user_id=hold.user_id, key_id=hold.key_id, hold_id=hold.id, model=hold.model,
            uncharged_quota=max(full - quota(self.prices, capped, hold.created_at.timestamp(), hold.price_group), 0),
        )
        return capped, row

    def _charge(self, hold: HoldTicket, usage: UsageRecord, outcome: str, channel: str | None,
                source: str = "settle_usage") -> Receipt:
        payload = _payload_hash(usage, outcome)  # of the reported usage: its retry gets the first receipt
        charged, kept = self._capped(hold, usage, source)
        priced = price(self.prices, charged, hold.created_at, hold.price_group)
        event = _event_values(hold.request_id, hold.user_id, hold.key_id, hold.model, hold.price_group, charged,
                              outcome, priced, payload, hold.created_at)
        event["hold_id"], event["channel"] = hold.id, channel

        def work(db: Db) -> Receipt:
            self._lock_user(db, hold.user_id)
            # No look-up of an earlier settle first: the unique request id refuses a second event, and the
            # IntegrityError below answers a retry with the first receipt.
            event_id = db.insert(INSERT_EVENT, event)
            row = db.row(HOLD_BY_ID, p_id=hold.id)
            if row is None:
                raise NotFound(f"no hold {hold.id}")
            if (row["user_id"], row["key_id"]) != (hold.user_id, hold.key_id) or (
                row["max_input_tokens"], row["max_output_tokens"], row["max_web_searches"]
            ) != (hold.max_input_tokens, hold.max_output_tokens, hold.max_web_searches):
                raise ValueError(f"the ticket of hold {hold.id} names another user, key or worst case than the hold")
            if kept is not None:  # in the charge's own transaction: the capped part is never lost nor kept twice
                db.execute(insert(quarantine.QUARANTINE).values(**kept))
            was_open = self._mark_resolved(db, row, "settled")
            if not was_open:
                # Settled after expiry (or release): charge exactly once, never release a second time.
                db.count(NOTE_LATE_SETTLE, p_id=hold.id, p_at=utcnow())
            released = row["amount"] if was_open else 0
            self._entry(db, hold.user_id, "charge", -priced.quota, f"charge:{hold.request_id}",
                        key_id=hold.key_id, hold_id=hold.id, usage_event_id=event_id)
            # One UPDATE moves the balance by the sum of both entries: the release (+hold) and the charge.
            self._move_balance(db, hold.user_id, released - priced.quota)
            if row["limited_key"]:
                db.count(MOVE_KEY, p_key_id=hold.key_id, p_released=released, p_used=priced.quota)
            # A late settle (the hold expired or was released first) has nothing reserved: all of it is overage.
            return _receipt(event | {"id": event_id}, hold.amount if was_open else 0)

        try:
            return self._retrying(work)
        except IntegrityError:
            first = select(EVENTS).where(EVENTS.c.request_id == hold.request_id)
            existing, reserved = self._read(lambda db: (db.execute(first).mappings().first(), _reserved(db, hold)))
            if existing is None:
                raise
            return _receipt_or_conflict(existing, payload, reserved)

    def approve_capped(self, quarantine_id: int) -> int:
        """Charge what a capped settle left uncharged (an operator's decision); once. Returns the units charged now.

        A settle whose reported usage was beyond its hold's worst case charged the worst case and kept the rest
        in quarantine (action ``capped``, ``uncharged_quota``). Approving it posts one debit adjustment of that
        rest, reference ``approve:<quarantine id>``: a second approval charges 0.
        """
        inputs.row_id(quarantine_id, "quarantine_id")
        query = select(quarantine.QUARANTINE).where(quarantine.QUARANTINE.c.id == quarantine_id)
        row = self._read(lambda db: db.execute(query).mappings().first())
        if row is None:
            raise NotFound(f"no quarantined usage {quarantine_id}")
        if row["action"] != "capped" or not row["uncharged_quota"] or row["user_id"] is None:
            raise InvalidField("quarantine_id", f"quarantined usage {quarantine_id} is not a capped charge with a rest")
        amount = int(row["uncharged_quota"])
        note = f"approved: the rest of request {row['request_id']}'s usage beyond its hold (quarantine {quarantine_id})"
        posted = self.adjust(int(row["user_id"]), -amount, f"approve:{quarantine_id}", note)
        return amount if posted else 0

    # ------------------------------------------------------------------ deferred mode

    def record_usage(
        self, secret: str, request_id: str, usage: UsageRecord, *, at: datetime | None = None, outcome: str = "completed",
        channel: str | None = None,
    ) -> Receipt:
        """Deferred mode: record a usage event without a hold; ``fold_deferred`` charges it later.

        A usage the ledger refuses is quarantined with its reason before the typed error is raised.
        """
        try:
            return self._record_usage(secret, request_id, usage, at=at, outcome=outcome, channel=channel)
        except quarantine.REJECTIONS as exc:
            if not getattr(exc, "retryable", False):
                user_id, key_id = self._key_ids(secret)
                payload = {"usage": usage, "at": at, "outcome": outcome, "channel": channel}  # never the key
                self._quarantine(exc, "record_usage", payload, request_id=request_id, user_id=user_id, key_id=key_id,
                                 model=getattr(usage, "model", None))
            raise

    def _key_ids(self, secret: Any) -> tuple[int | None, int | None]:
        """(user id, key id) of a key, for a quarantine row; (None, None) when unknown or unreadable."""
        if not isinstance(secret, str):
            return None, None
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
        try:
            row = self._read(lambda db: db.row(KEY_BY_SECRET, p_secret_hash=digest))
        except Exception:  # noqa: BLE001 (the ids are a courtesy to finance; the rejection is stored anyway)
            return None, None
        return (None, None) if row is None else (row["user_id"], row["id"])

    def _record_usage(
        self, secret: str, request_id: str, usage: UsageRecord, *, at: datetime | None = None, outcome: str = "completed",
        channel: str | None = None,
    ) -> Receipt:
        """``record_usage`` without the quarantine: every check, then the pending event."""
        _identifier(request_id, "request_id")
        if channel is not None:
            _identifier(channel, "channel")
        if not isinstance(usage, UsageRecord):
            raise InvalidUsage("usage", f"must be a UsageRecord, got {type(usage).__name__}")
        if outcome not in OUTCOMES:
            raise InvalidField("outcome", f"must be one of {', '.join(OUTCOMES)}")
        moment = inputs.event_time(at, "at")
        key = self._read(lambda db: self._key(db, secret, usage.model))
        return self._insert_pending(key, request_id, usage, moment, outcome, channel)

    def _insert_pending(
        self, key: Any, request_id: str, usage: UsageRecord, moment: datetime, outcome: str, channel: str | None,
    ) -> Receipt:
        """Price ``usage`` for ``key`` (its id, user and group) and insert it as a pending event, once per request id."""
        event = self._pending_event(key, request_id, usage, moment, outcome, channel)
        payload = event["payload_hash"]
        try:
            event_id = self._retrying(lambda db: db.insert(INSERT_EVENT, event))
            return _receipt(event | {"id": event_id}, None)
        except IntegrityError:
            first = select(EVENTS).where(EVENTS.c.request_id == request_id)
            existing = self._read(lambda db: db.execute(first).mappings().first())
            if existing is None:
                raise
            return _receipt_or_conflict(existing, payload, None)

    def _pending_event(
        self, key: Any, request_id: str, usage: UsageRecord, moment: datetime, outcome: str, channel: str | None,
    ) -> dict[str, Any]:
        """The row of a pending usage event: ``usage`` priced at ``moment`` in ``key``'s group (typed errors first)."""
        priced = price(self.prices, usage, moment, key["price_group"])
        event = _event_values(request_id, key["user_id"], key["id"], usage.model, key["price_group"], usage, outcome,
                              priced, _payload_hash(usage, outcome), moment)
        event["status"], event["channel"] = "pending", channel
        return event

    def fold_deferred(self, limit: int = 10_000, *, per_transaction: int = 1) -> int:
        """Charge pending usage events (the worker runs this every 10 s); returns how many were charged.

        ``per_transaction`` > 1 charges that many events in each transaction (a bulk import's backlog): the
        same entries and balances, far fewer commits; each event is still charged exactly once.
        """
        inputs.integer(limit, "limit", 1, MAX_FOLD_LIMIT)
        inputs.integer(per_transaction, "per_transaction", 1, MAX_FOLD_PER_TRANSACTION)
        pending = select(EVENTS.c.id).where(EVENTS.c.status == "pending").order_by(EVENTS.c.id).limit(limit)
        ids = self._read(lambda db: db.execute(pending).scalars().all())
        if per_transaction > 1:
            chunks = [ids[start:start + per_transaction] for start in range(0, len(ids), per_transaction)]
            return sum(self._retrying(lambda db, chunk=chunk: self._fold_many(db, chunk)) for chunk in chunks)

        def fold(db: Db, event_id: int) -> int:
            claimed = db.execute(
                update(EVENTS).where(EVENTS.c.id == event_id, EVENTS.c.status == "pending").values(status="charged")
            )
            if claimed.rowcount != 1:
                return 0
            row = db.execute(select(EVENTS).where(EVENTS.c.id == event_id)).mappings().one()
            self._lock_user(db, row["user_id"])
            self._entry(db, row["user_id"], "charge", -row["quota"], f"charge:{row['request_id']}",
                        key_id=row["key_id"], usage_event_id=event_id)
            self._move_balance(db, row["user_id"], -row["quota"])
            db.execute(
                update(KEYS).where(KEYS.c.id == row["key_id"], KEYS.c.limit_quota.is_not(None))
                .values(used_quota=KEYS.c.used_quota + row["quota"])
            )
            return 1

        return sum(self._retrying(lambda db, i=i: fold(db, i)) for i in ids)

    def _fold_many(self, db: Db, ids: Sequence[int]) -> int:
        """Charge the events among ``ids`` still pending, in this one transaction (see ``fold_deferred``)."""
        # Row locks on the events first (SQLite: the transaction's write lock), as the one-event fold's claim
        # does; then the users in id order, so two folders never wait on each other in a cycle.
        # By primary key on MariaDB too: its optimizer, with statistics older than a long transaction's own
        # inserts (an import's), walked the status index's 'pending' entries instead, 6x slower per chunk.
        pending = (select(EVENTS.c.id, EVENTS.c.user_id, EVENTS.c.key_id, EVENTS.c.quota, EVENTS.c.request_id)
                   .with_hint(EVENTS, "FORCE INDEX (PRIMARY)", "mysql").with_hint(EVENTS, "FORCE INDEX (PRIMARY)", "mariadb")
                   .where(EVENTS.c.id.in_(ids), EVENTS.c.status == "pending").order_by(EVENTS.c.id).with_for_update())
        rows = db.execute(pending).mappings().all()
        if not rows:
            return 0
        by_user: dict[int, int] = {}
        by_key: dict[int, int] = {}
        for row in rows:
            by_user[row["user_id"]] = by_user.get(row["user_id"], 0) + row["quota"]
            by_key[row["key_id"]] = by_key.get(row["key_id"], 0) + row["quota"]
        for user_id in sorted(by_user):
            self._lock_user(db, user_id)
        claim = update(EVENTS).where(EVENTS.c.id.in_([r["id"] for r in rows]), EVENTS.c.status == "pending")
        if db.execute(claim.values(status="charged")).rowcount != len(rows):
            raise RuntimeError("pending events changed under their row locks")  # the locks make this impossible
        now = utcnow()
        db.execute(insert(ENTRIES), [
            {"user_id": r["user_id"], "key_id": r["key_id"], "kind": "charge", "amount": -r["quota"], "hold_id": None,
             "usage_event_id": r["id"], "reference": f"charge:{r['request_id']}", "note": None, "created_at": now}
            for r in rows
        ])
        for user_id in sorted(by_user):
            self._move_balance(db, user_id, -by_user[user_id])
        for key_id in sorted(by_key):
            db.execute(update(KEYS).where(KEYS.c.id == key_id, KEYS.c.limit_quota.is_not(None))
                       .values(used_quota=KEYS.c.used_quota + by_key[key_id]))
        return len(rows)

    # ------------------------------------------------------------------ asyncio

    async def aauthorize(
        self, secret: str, request_body: dict[str, Any], request_id: str, *, model: str | None = None,
        at: datetime | None = None, channel: str | None = None,
    ) -> HoldTicket:
        """``authorize`` for asyncio code: runs in a worker thread, so the event loop never waits on the database."""
        return await asyncio.to_thread(
            self.authorize, secret, request_body, request_id, model=model, at=at, channel=channel
        )

    async def asettle(
        self, hold: HoldTicket, *, response: dict[str, Any] | None = None, usage: UsageRecord | None = None,
        stream: StreamAccumulator | StreamResult | None = None, channel: str | None = None,
    ) -> Receipt:
        """``settle`` for asyncio code (in a worker thread)."""
        return await asyncio.to_thread(
            self.settle, hold, response=response, usage=usage, stream=stream, channel=channel
        )

    async def arelease(self, hold: HoldTicket) -> bool:
        """``release`` for asyncio code (in a worker thread)."""
        return await asyncio.to_thread(self.release, hold)

    # ------------------------------------------------------------------ audit

    def audit(self) -> AuditReport:
        """Check every invariant of docs/ledger.md; the report lists each violation."""
        from metering.ledger.audit import run_audit

        return self._read(lambda db: AuditReport(tuple(run_audit(db.connection))))


def _ticket(row: Any) -> HoldTicket:
    keep_until = row.get("keep_until")
    return HoldTicket(
        id=row["id"], request_id=row["request_id"], user_id=row["user_id"], key_id=row["key_id"], model=row["model"],
        price_group=row["price_group"], amount=row["amount"], prompt_tokens=row["prompt_tokens"],
        prompt_source=row["prompt_source"], created_at=_aware(row["created_at"]), expires_at=_aware(row["expires_at"]),
        channel=row["channel"], max_input_tokens=row.get("max_input_tokens"),
        max_output_tokens=row.get("max_output_tokens"), max_web_searches=row.get("max_web_searches"),
        keep_until=None if keep_until is None else _aware(keep_until),
    )


def _ticket_given(hold: Any) -> HoldTicket:
    """``hold`` if it is a ``HoldTicket`` (what ``authorize`` returned), else ``InvalidField`` naming ``hold``."""
    if not isinstance(hold, HoldTicket):
        raise InvalidField("hold", f"must be the HoldTicket authorize returned, got {type(hold).__name__}")
    return hold


def _available(key: dict[str, Any]) -> int:
    """What a key's holder can reserve now: the user's balance, capped by a limited key's room."""
    balance = int(key["balance"])
    if key["limit_quota"] is None:
        return balance
    return min(balance, int(key["limit_quota"]) - int(key["used_quota"]) - int(key["reserved_quota"]))


def _reserved(db: Db, hold: HoldTicket) -> int:
    """What the first settle found reserved: the hold's amount if it settled the hold, else 0 (a late settle)."""
    status = db.execute(select(HOLDS.c.status).where(HOLDS.c.id == hold.id)).scalar_one()
    return hold.amount if status == "settled" else 0


_PAYLOAD_FIELDS = tuple(f.name for f in fields(UsageRecord) if f.name != "extra")


def _prompt_of(hold: HoldTicket) -> PromptCount:
    resolved = resolve_model(hold.model)
    return PromptCount(
        model=hold.model, canonical_model=resolved.canonical, provider=resolved.provider, encoding=None,
        prompt_tokens=hold.prompt_tokens, source=UsageSource(hold.prompt_source),
    )


def _payload_hash(usage: UsageRecord, outcome: str) -> str:
    """sha256 of ``usage.to_dict()`` without ``extra``, plus the outcome: what tells a retried settle from another.

    Built from the fields directly: ``to_dict`` deep-copies ``extra`` (``dataclasses.asdict``), only to drop it.
    The text hashed must never change (stored hashes are compared on every retry): a test holds it to ``to_dict``.
    """
    data = {name: getattr(usage, name) for name in _PAYLOAD_FIELDS}
    data["source"] = str(usage.source)
    data["total_input_tokens"], data["total_tokens"] = usage.total_input_tokens, usage.total_tokens
    data["outcome"] = outcome
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _event_values(
    request_id: str, user_id: int, key_id: int, model: str, group: str, usage: UsageRecord, outcome: str,
    priced: Any, payload: str, at: datetime,
) -> dict[str, Any]:
    return {
        "request_id": request_id, "hold_id": None, "user_id": user_id, "key_id": key_id, "model": model,
        "price_group": group, "status": "charged", "outcome": outcome, "source": str(usage.source),
        "input_tokens": usage.input_tokens, "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_5m_tokens": usage.cache_write_5m_tokens, "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "output_tokens": usage.output_tokens, "reasoning_tokens": usage.reasoning_tokens, "images": usage.images,
        "web_search_requests": usage.web_search_requests, "channel": None, "quota": priced.quota, "usd": decimal_text(priced.usd),
        "price_version": priced.price_version.astimezone(timezone.utc).replace(tzinfo=None),
        "payload_hash": payload, "occurred_at": _naive_utc(at), "created_at": utcnow(),
    }


def _receipt(event: Any, hold_amount: int | None) -> Receipt:
    version = event["price_version"]
    return Receipt(
        request_id=event["request_id"], hold_id=event["hold_id"], model=event["model"], quota=int(event["quota"]),
        usd=event["usd"], price_version=_aware(version).isoformat(),
        overage=max(0, int(event["quota"]) - hold_amount) if hold_amount is not None else 0,
        outcome=event["outcome"], source=event["source"],
    )


def _receipt_or_conflict(existing: Any, payload: str, hold_amount: int | None) -> Receipt:
    if existing["payload_hash"] != payload:
        raise SettleConflict(f"request {existing['request_id']!r} was already settled with a different usage")
    return _receipt(existing, hold_amount)


def create_schema(engine: Engine) -> None:
    """Create every table (used by the schema module's first migration and by tests)."""
    SQLModel.metadata.create_all(engine)


__all__ = [
    "AuditReport", "ENTRY_KINDS", "HoldTicket", "Meter", "Receipt", "Violation",
]
