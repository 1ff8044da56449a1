"""Ledger calls for importing another gateway's books (one-api / new-api): keys with a given secret, usage for a
key id, and the ``import_links`` table that makes an import idempotent.

The gateway-specific mapping lives in ``workers/oneapi/importer.py``; what is here knows nothing of one-api. Every
write keeps the invariants of docs/ledger.md: users, keys and links are inserted (a link in the same transaction
as the row it names, so a crash never leaves one without the other), usage goes through the deferred path (a
``pending`` event that ``Meter.fold_deferred`` charges) and every usage the ledger refuses is quarantined with
its reason (source ``import_usage``), never dropped.

All or nothing: ``one_transaction`` gives a ``Meter`` whose every call (these functions' and the Meter's own:
``fold_deferred``, ``adjust``, ``revoke_key``...) runs in ONE database transaction on one connection, committed
when the block ends without an error and rolled back otherwise, so a whole import is one commit: a run that
fails anywhere leaves nothing behind, and a dry run is the same run rolled back. ``lock_cursor`` takes the
import's lock on its source first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from metering.ledger import inputs, quarantine
from metering.ledger.errors import DuplicateReference, InvalidField, LedgerBusy, NotFound
from metering.ledger.meter import (
    EVENTS, KEYS, USERS, Meter, Receipt, _is_retryable, _name, _naive_utc, _receipt, secret_hash, utcnow,
)
from metering.ledger.statements import Db
from metering.ledger.tables import ImportLink, QuarantinedUsage
from pricing.errors import UnknownModel
from pricing.oneapi import infer_provider
from pricing.quote import MAX_QUOTA
from pricing.usage import InvalidUsage, UsageRecord, UsageSource

LINKS = ImportLink.__table__  # type: ignore[attr-defined]
QUARANTINE = QuarantinedUsage.__table__  # type: ignore[attr-defined]
#: The quarantine's ``source`` of a refused imported usage row.
QUARANTINE_SOURCE = "import_usage"
#: A secret given to ``create_key_from_secret``: printable ASCII without spaces, of a length no guess reaches.
SECRET_MIN_CHARS, SECRET_MAX_CHARS = 16, 190
#: How many request ids one ``known_request_ids`` query asks about (bound parameters stay well under every limit).
_ID_CHUNK = 500
T = TypeVar("T")


# ---------------------------------------------------------------------- one transaction


class _NestedDb(Db):
    """A ``Db`` already inside the import's transaction: ``transaction()`` opens nothing more."""

    __slots__ = ()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        yield


class _Pinned(Meter):
    """A ``Meter`` whose every call runs on one connection, inside the transaction ``one_transaction`` opened.

    ``_retrying`` runs its work in a SAVEPOINT, so an ``IntegrityError`` a call answers (a link found, a
    duplicate refused) undoes only that call's statements, as its own transaction would have; ``_read``
    reads on the same connection (it sees what the transaction wrote). Nothing is retried here: any other
    database error (a dropped connection, a deadlock, a lock wait given up) fails the whole transaction, and
    every later call raises ``LedgerBusy`` at once, even when the first failure was swallowed on the way
    (``Meter._quarantine`` notes a row it could not store and goes on): the block can then only roll back.
    """

    def __init__(self, meter: Meter, connection: Connection) -> None:
        super().__init__(meter.engine, meter.prices, meter.hold_ttl)
        self._statements = meter._statements
        self.connection = connection
        self.failure: BaseException | None = None

    def close(self) -> None:
        """Nothing: the connection is ``one_transaction``'s, the engine its caller's."""

    def _usable(self) -> None:
        if self.failure is not None:
            raise LedgerBusy(f"the transaction failed ({_first_line(self.failure)}): it is rolled back, nothing of "
                             "it is written; run it again") from self.failure

    def _failed(self, exc: SQLAlchemyError) -> BaseException:
        self.failure = exc
        if isinstance(exc, DBAPIError) and (exc.connection_invalidated or _is_retryable(exc)):
            return LedgerBusy(f"the database failed mid-transaction ({_first_line(exc)}): it is rolled back, nothing "
                              "of it is written; run it again")
        return exc

    def _retrying(self, work: Callable[[Db], T], *, reads_first: bool = False) -> T:
        self._usable()
        try:
            with self.connection.begin_nested():
                return work(_NestedDb(self.connection, self._statements))
        except IntegrityError:
            raise  # rolled back to the savepoint: the transaction goes on, the caller answers it
        except SQLAlchemyError as exc:
            raise self._failed(exc) from exc

    def _read(self, work: Callable[[Db], T]) -> T:
        self._usable()
        try:
            return work(Db(self.connection, self._statements))
        except SQLAlchemyError as exc:
            raise self._failed(exc) from exc


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


@contextmanager
def one_transaction(meter: Meter, *, commit: bool = True) -> Iterator[Meter]:
    """A ``Meter`` whose calls all run in ONE transaction: committed when the block ends (``commit``), else
    rolled back; rolled back too when the block raises. On SQLite the transaction holds the database's
    write lock from its start (``BEGIN IMMEDIATE``); on PostgreSQL and MariaDB the row locks it takes.

    A failed COMMIT raises ``LedgerBusy(maybe_applied=True)``: the block's writes may have been applied;
    running it again must be idempotent (an import is). A database failure before it raises ``LedgerBusy``
    (nothing written) or the database's own error; either way nothing of the block is written.
    """
    if not isinstance(meter, Meter) or isinstance(meter, _Pinned):
        raise InvalidField("meter", "must be a Meter (not one already inside a transaction)")
    inputs.flag(commit, "commit")
    try:
        connection = meter.engine.connect()
    except DBAPIError as exc:
        if exc.connection_invalidated or _is_retryable(exc):
            raise LedgerBusy(f"the database could not open the transaction ({_first_line(exc)}); retry") from exc
        raise
    try:
        try:
            transaction = connection.begin()
        except DBAPIError as exc:  # SQLite: another writer kept the write lock past the busy timeout
            if exc.connection_invalidated or _is_retryable(exc):
                raise LedgerBusy(f"the database could not open the transaction ({_first_line(exc)}); retry") from exc
            raise
        pinned = _Pinned(meter, connection)
        try:
            if connection.dialect.name == "postgresql" and (connection.dialect.server_version_info or (0,)) >= (12,):
                # Plans for the values each statement names: psycopg prepares a statement run 5 times, and
                # a generic plan made while this transaction's tables were small scans ``request_id IN (500
                # parameters)`` comparing each row with every parameter (unhashed), seconds per thousand logs.
                pinned._read(lambda db: db.connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan"))
            yield pinned
            pinned._usable()  # a failure swallowed on the way: never committed
            if commit:
                try:
                    transaction.commit()
                except SQLAlchemyError as exc:
                    raise LedgerBusy(f"the COMMIT failed ({_first_line(exc)}): it may have been applied; run it "
                                     "again (a rerun writes only what is missing)", maybe_applied=True) from exc
        finally:
            if transaction.is_active:
                with suppress(Exception):  # a dead connection: the server rolls it back
                    transaction.rollback()
    finally:
        with suppress(Exception):
            connection.close()


# ---------------------------------------------------------------------- links and cursors


def _check_meter(meter: Meter) -> Meter:
    if not isinstance(meter, Meter):
        raise InvalidField("meter", f"must be a Meter, got {type(meter).__name__}")
    return meter


def _check_source(source: str) -> str:
    return inputs.identifier(source, "source", 64)


def _check_kind(kind: str) -> str:
    return inputs.identifier(kind, "kind", 32)


def _check_external_id(external_id: str, field: str = "external_id") -> str:
    return inputs.identifier(external_id, field, 190)


def links(meter: Meter, source: str, kind: str) -> dict[str, int]:
    """Every link of ``kind`` from ``source``: external id -> local id."""
    _check_meter(meter)
    _check_source(source)
    _check_kind(kind)
    query = select(LINKS.c.external_id, LINKS.c.local_id).where(LINKS.c.source == source, LINKS.c.kind == kind)
    return {str(e): int(i) for e, i in meter._read(lambda db: db.execute(query).all())}


def _add_link(db: Db, source: str, kind: str, external_id: str, local_id: int) -> None:
    db.execute(insert(LINKS).values(source=source, kind=kind, external_id=external_id, local_id=local_id,
                                    created_at=utcnow()))


def _linked(meter: Meter, source: str, kind: str, external_id: str) -> int | None:
    query = select(LINKS.c.local_id).where(LINKS.c.source == source, LINKS.c.kind == kind,
                                           LINKS.c.external_id == external_id)
    found = meter._read(lambda db: db.execute(query).scalar())
    return None if found is None else int(found)


def set_cursor(meter: Meter, source: str, name: str, value: int) -> bool:
    """Store ``value`` as the cursor ``name`` of ``source`` (the highest foreign id read); False when unchanged."""
    _check_meter(meter)
    _check_source(source)
    _check_external_id(name, "name")
    inputs.integer(value, "value", 0, inputs.MAX_BIGINT)
    current = _linked(meter, source, "cursor", name)
    if current == value:
        return False
    if current is None:
        meter._retrying(lambda db: _add_link(db, source, "cursor", name, value))
    else:
        move = update(LINKS).where(LINKS.c.source == source, LINKS.c.kind == "cursor", LINKS.c.external_id == name)
        meter._retrying(lambda db: db.execute(move.values(local_id=value)))
    return True


def cursor(meter: Meter, source: str, name: str) -> int | None:
    """The cursor ``name`` of ``source``, None before the first import."""
    _check_meter(meter)
    _check_source(source)
    _check_external_id(name, "name")
    return _linked(meter, source, "cursor", name)


def lock_cursor(meter: Meter, source: str, name: str) -> int:
    """The cursor ``name`` of ``source`` (0 before the first import), its row locked until the transaction ends.

    Call it first in ``one_transaction``: a second import of the same source then waits for the first to
    end (SQLite's write lock does that anyway) and reads what it committed, instead of racing it. The row is
    created (at 0) when missing; a concurrent first import that created it meanwhile is waited for.
    """
    _check_meter(meter)
    _check_source(source)
    _check_external_id(name, "name")
    locked = (select(LINKS.c.local_id).where(LINKS.c.source == source, LINKS.c.kind == "cursor",
                                            LINKS.c.external_id == name).with_for_update())
    found = meter._retrying(lambda db: db.execute(locked).scalar())
    if found is None:
        try:
            meter._retrying(lambda db: _add_link(db, source, "cursor", name, 0))
            return 0
        except IntegrityError:  # another import created it first (the unique index waited for its commit)
            found = meter._retrying(lambda db: db.execute(locked).scalar())
    return int(found or 0)


def create_linked_user(meter: Meter, name: str, group: str, *, source: str, external_id: str) -> int:
    """Create a user linked to ``external_id`` of ``source`` (one transaction); the linked user when it exists.

    A name taken by a user that is not this link's is a ``DuplicateReference`` naming ``name``.
    """
    _check_meter(meter)
    _check_source(source)
    _check_external_id(external_id)
    inputs.text(group, "group", 64)
    meter.prices.group_multiplier(group)
    _name(name, "name")
    if not name or name != name.strip() or name.isdigit():
        raise InvalidField("name", "a user name must be non-empty, without spaces around it and not only digits")

    def work(db: Db) -> int:
        result = db.execute(insert(USERS).values(name=name, price_group=group, balance=0, created_at=utcnow()))
        user_id = int(result.inserted_primary_key[0])
        _add_link(db, source, "user", external_id, user_id)
        return user_id

    try:
        return meter._retrying(work)
    except IntegrityError:
        linked = _linked(meter, source, "user", external_id)
        if linked is not None:
            return linked
        raise DuplicateReference(f"name: a user named {name!r} already exists and was not imported from {source}") from None


def _check_secret(secret: object) -> str:
    """The secret as given, else ``InvalidField`` naming ``secret`` (the value itself is never echoed)."""
    if not isinstance(secret, str):
        raise InvalidField("secret", f"must be text, got {type(secret).__name__}")
    if not SECRET_MIN_CHARS <= len(secret) <= SECRET_MAX_CHARS:
        raise InvalidField("secret", f"must be {SECRET_MIN_CHARS} to {SECRET_MAX_CHARS} characters long, "
                                     f"got {len(secret)}")
    if not all("!" <= ch <= "~" for ch in secret):
        raise InvalidField("secret", "must be printable ASCII without spaces")
    return secret


def create_key_from_secret(
    meter: Meter, user_id: int, name: str, secret: str, *, source: str, external_id: str, kind: str = "token",
    revoked: bool = False, limit_quota: int | None = None, models: Sequence[str] | None = None,
    expires_at: datetime | None = None,
) -> int:
    """Create a key whose secret is ``secret`` (one the clients already use), linked to ``external_id``; its id.

    Only the sha256 is stored, as for every key; the secret is never logged or echoed. The linked key is
    returned when it exists; a secret some other key already has is a ``DuplicateReference`` naming ``secret``.
    """
    _check_meter(meter)
    _check_source(source)
    _check_external_id(external_id)
    _check_kind(kind)
    inputs.row_id(user_id, "user_id")
    _check_secret(secret)
    _name(name, "name")
    inputs.flag(revoked, "revoked")
    if limit_quota is not None:
        inputs.integer(limit_quota, "limit_quota", 0, MAX_QUOTA)
    allowed = None if models is None else inputs.model_names(models, "models")  # foreign names kept: not priced here
    values = {
        "user_id": user_id, "name": name, "secret_hash": secret_hash(secret),
        # The display prefix shows what the client sees first, as for our own keys: 4 characters past "sk-".
        "display_prefix": secret[: min(len(secret) - 8, 7)] + "...", "status": "revoked" if revoked else "enabled",
        "expires_at": None if expires_at is None else _naive_utc(expires_at, "expires_at"),
        "allowed_models": None if allowed is None else json.dumps(allowed),
        "limit_quota": limit_quota, "used_quota": 0, "reserved_quota": 0, "created_at": utcnow(),
    }

    def work(db: Db) -> int:
        key_id = int(db.execute(insert(KEYS).values(**values)).inserted_primary_key[0])
        _add_link(db, source, kind, external_id, key_id)
        return key_id

    try:
        return meter._retrying(work)
    except IntegrityError:
        linked = _linked(meter, source, kind, external_id)
        if linked is not None:
            return linked
        if not meter._read(lambda db: db.execute(select(USERS.c.id).where(USERS.c.id == user_id)).first()):
            raise NotFound(f"no user {user_id}") from None
        raise DuplicateReference("secret: another key already has this secret") from None


def set_key_room(meter: Meter, key_id: int, room: int) -> bool:
    """Make a limited key's room (``limit - used - reserved``) equal ``room`` (at least 0); False when it was."""
    _check_meter(meter)
    inputs.row_id(key_id, "key_id")
    inputs.integer(room, "room", -inputs.MAX_BIGINT, inputs.MAX_BIGINT)
    row = meter._read(lambda db: db.execute(
        select(KEYS.c.limit_quota, KEYS.c.used_quota, KEYS.c.reserved_quota).where(KEYS.c.id == key_id)).first())
    if row is None:
        raise NotFound(f"no key {key_id}")
    if row[0] is None:
        return False
    target = min(MAX_QUOTA, max(0, int(row[1]) + int(row[2]) + room))
    if int(row[0]) == target:
        return False
    # Conditional on the counters read: a hold taken meanwhile leaves the limit for the next run.
    change = update(KEYS).where(KEYS.c.id == key_id, KEYS.c.used_quota == row[1], KEYS.c.reserved_quota == row[2])
    return bool(meter._retrying(lambda db: db.execute(change.values(limit_quota=target)).rowcount))


def known_request_ids(meter: Meter, request_ids: Iterable[str]) -> set[str]:
    """The request ids among ``request_ids`` that already have a usage event or an import quarantine row."""
    _check_meter(meter)
    if isinstance(request_ids, (str, bytes)) or not isinstance(request_ids, Iterable):
        raise InvalidField("request_ids", f"must be a list of request ids, got {type(request_ids).__name__}")
    wanted = [inputs.identifier(r, "request_ids") for r in request_ids]
    found: set[str] = set()
    for start in range(0, len(wanted), _ID_CHUNK):
        chunk = wanted[start:start + _ID_CHUNK]
        events = select(EVENTS.c.request_id).where(EVENTS.c.request_id.in_(chunk))
        kept = select(QUARANTINE.c.request_id).where(QUARANTINE.c.source == QUARANTINE_SOURCE,
                                                     QUARANTINE.c.request_id.in_(chunk))
        found.update(meter._read(lambda db: [*db.execute(events).scalars(), *db.execute(kept).scalars()]))
    return found


def usage_record(meter: Meter, model: object, input_tokens: object, output_tokens: object,
                 cached_tokens: object = 0) -> UsageRecord:
    """The usage of one imported log (counts as the upstream reported them); ``InvalidUsage`` naming the field.

    ``cached_tokens``: the prompt-cache reads *inside* ``input_tokens``, as OpenAI counts them (its
    ``prompt_tokens`` includes ``cached_tokens``); they are priced at the cached rate (docs/usage-record.md).
    """
    _check_meter(meter)
    if not isinstance(model, str):
        raise InvalidUsage("model", f"must be a model name, got {type(model).__name__}")
    try:
        provider = meter.prices.resolve(model)[0].provider
    except UnknownModel:
        provider = infer_provider(model) if model.strip() else "unknown"  # the price look-up refuses it next
    if cached_tokens is None:
        cached_tokens = 0
    if not isinstance(cached_tokens, int) or isinstance(cached_tokens, bool) or cached_tokens < 0:
        raise InvalidUsage("cached_tokens", f"must be a non-negative integer, got {type(cached_tokens).__name__}")
    if cached_tokens:
        if not isinstance(input_tokens, int) or isinstance(input_tokens, bool) or cached_tokens > input_tokens:
            raise InvalidUsage("cached_tokens", f"{cached_tokens} cached tokens are more than the {input_tokens!r} input")
        return UsageRecord(provider=provider, model=model, input_tokens=input_tokens - cached_tokens,
                           cached_input_tokens=cached_tokens, output_tokens=output_tokens,  # type: ignore[arg-type]
                           source=UsageSource.UPSTREAM)
    return UsageRecord(provider=provider, model=model, input_tokens=input_tokens,  # type: ignore[arg-type]
                       output_tokens=output_tokens, source=UsageSource.UPSTREAM)  # type: ignore[arg-type]


def record_usage_for_key(
    meter: Meter, key_id: int, request_id: str, *, model: object, input_tokens: object, output_tokens: object,
    at: datetime, channel: str | None = None, payload: dict[str, Any] | None = None, cached_tokens: object = 0,
) -> Receipt:
    """Record an already-served request's usage on key ``key_id`` as a pending event (``fold_deferred`` charges it).

    The key's status and expiry are not checked: the request was served (and billed) by the other gateway
    when the key was valid. A retry with the same request id returns the first receipt. A usage the ledger
    refuses is quarantined (source ``import_usage``, ``payload`` kept with it) before the typed error is raised.
    """
    _check_meter(meter)
    try:
        return _record(meter, key_id, request_id, model, input_tokens, output_tokens, at, channel, cached_tokens)
    except quarantine.REJECTIONS as exc:
        if not getattr(exc, "retryable", False):
            user = None if not _is_id(key_id) else meter._read(
                lambda db: db.execute(select(KEYS.c.user_id).where(KEYS.c.id == key_id)).scalar())
            stored = {"model": model, "input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cached_tokens": cached_tokens, "at": at,
                      "channel": channel, **(payload or {})}
            meter._quarantine(exc, QUARANTINE_SOURCE, stored, request_id=request_id, user_id=user,
                              key_id=key_id if _is_id(key_id) else None, model=model)
        raise


def _is_id(value: object) -> bool:
    try:
        inputs.row_id(value, "key_id")
    except InvalidField:
        return False
    return True


def _record(meter: Meter, key_id: int, request_id: str, model: object, input_tokens: object, output_tokens: object,
            at: datetime, channel: str | None, cached_tokens: object = 0) -> Receipt:
    inputs.row_id(key_id, "key_id")
    usage, moment = _checked(meter, request_id, model, input_tokens, output_tokens, at, channel, cached_tokens)
    key = _key_rows(meter, [key_id]).get(key_id)
    if key is None:
        raise NotFound(f"no key {key_id}")
    return meter._insert_pending(key, request_id, usage, moment, "completed", channel)


def _checked(meter: Meter, request_id: str, model: object, input_tokens: object, output_tokens: object,
             at: datetime, channel: str | None, cached_tokens: object = 0) -> tuple[UsageRecord, datetime]:
    """The usage and time of one imported request, every field checked (typed errors naming the field)."""
    inputs.identifier(request_id, "request_id")
    if channel is not None:
        inputs.identifier(channel, "channel", inputs.CHANNEL_MAX_CHARS)
    moment = inputs.event_time(at, "at")
    return usage_record(meter, model, input_tokens, output_tokens, cached_tokens), moment


def _key_rows(meter: Meter, key_ids: Iterable[int]) -> dict[int, Any]:
    """Id, user and price group of each key among ``key_ids`` (what pricing a pending event needs)."""
    query = (select(KEYS.c.id, KEYS.c.user_id, USERS.c.price_group).join(USERS, USERS.c.id == KEYS.c.user_id)
             .where(KEYS.c.id.in_(sorted(set(key_ids)))))
    return {row["id"]: row for row in meter._read(lambda db: db.execute(query).mappings().all())}


@dataclass(frozen=True, slots=True)
class ImportedUsage:
    """One already-served request to record on key ``key_id`` (what ``record_usage_for_key`` takes)."""

    key_id: int
    request_id: str
    model: object
    input_tokens: object
    output_tokens: object
    at: datetime
    channel: str | None = None
    payload: dict[str, Any] | None = None
    cached_tokens: object = 0  # prompt-cache reads inside input_tokens (OpenAI's sense)


def record_usage_many(meter: Meter, items: Sequence[ImportedUsage]) -> list[Receipt | Exception]:
    """``record_usage_for_key`` for a batch: the valid rows inserted in ONE transaction, each refusal quarantined.

    Per item, in order: its receipt, or the typed error it was refused with (already quarantined, as the
    one-row call does). A request id recorded meanwhile (another import) sends the batch one row at a time,
    where a retry gets its first receipt.
    """
    _check_meter(meter)
    if not isinstance(items, (list, tuple)):
        raise InvalidField("items", f"must be a list of ImportedUsage, got {type(items).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, ImportedUsage):
            raise InvalidField(f"items[{index}]", f"must be an ImportedUsage, got {type(item).__name__}")
    keys = _key_rows(meter, (item.key_id for item in items if _is_id(item.key_id)))
    results: list[Receipt | Exception | None] = [None] * len(items)
    ready: list[tuple[int, dict[str, Any]]] = []
    for index, item in enumerate(items):
        try:
            inputs.row_id(item.key_id, "key_id")
            usage, moment = _checked(meter, item.request_id, item.model, item.input_tokens, item.output_tokens,
                                     item.at, item.channel, item.cached_tokens)
            key = keys.get(item.key_id)
            if key is None:
                raise NotFound(f"no key {item.key_id}")
            ready.append((index, meter._pending_event(key, item.request_id, usage, moment, "completed", item.channel)))
        except quarantine.REJECTIONS as exc:
            if getattr(exc, "retryable", False):
                raise
            results[index] = _one(meter, item)  # refused again there, and quarantined by the one rule
    if ready:
        try:
            meter._retrying(lambda db: db.execute(insert(EVENTS), [event for _, event in ready]))
            for index, event in ready:
                results[index] = _receipt(event, None)
        except IntegrityError:
            for index, _ in ready:
                results[index] = _one(meter, items[index])
    return results  # type: ignore[return-value]


def _one(meter: Meter, item: ImportedUsage) -> Receipt | Exception:
    try:
        return record_usage_for_key(meter, item.key_id, item.request_id, model=item.model,
                                    input_tokens=item.input_tokens, output_tokens=item.output_tokens, at=item.at,
                                    channel=item.channel, payload=item.payload, cached_tokens=item.cached_tokens)
    except quarantine.REJECTIONS as exc:
        if getattr(exc, "retryable", False):
            raise
        return exc


__all__ = [
    "QUARANTINE_SOURCE", "create_key_from_secret", "create_linked_user", "cursor", "known_request_ids",
    "ImportedUsage", "links", "lock_cursor", "one_transaction", "record_usage_for_key", "record_usage_many",
    "set_cursor", "set_key_room", "usage_record",
]
