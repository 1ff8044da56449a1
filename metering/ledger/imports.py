"""Ledger calls for importing another gateway's books (one-api / new-api): keys with a given secret, usage for a
key id, and the ``import_links`` table that makes an import idempotent.

The gateway-specific mapping lives in ``workers/oneapi_import.py``; what is here knows nothing of one-api. Every
write keeps the invariants of docs/ledger.md: users, keys and links are inserted (a link in the same transaction
as the row it names, so a crash never leaves one without the other), usage goes through the deferred path (a
``pending`` event that ``Meter.fold_deferred`` charges) and every usage the ledger refuses is quarantined with
its reason (source ``import_usage``), never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from metering.ledger import inputs, quarantine
from metering.ledger.errors import DuplicateReference, InvalidField, NotFound
from metering.ledger.meter import EVENTS, KEYS, USERS, Meter, Receipt, _name, _naive_utc, _receipt, secret_hash, utcnow
from metering.ledger.statements import Db
from metering.ledger.tables import ImportLink, QuarantinedUsage
from pricing.errors import UnknownModel
from pricing.oneapi import infer_provider
from pricing.quote import MAX_QUOTA, price
from pricing.usage import InvalidUsage, UsageRecord, UsageSource

LINKS = ImportLink.__table__  # type: ignore[attr-defined]
QUARANTINE = QuarantinedUsage.__table__  # type: ignore[attr-defined]
#: The quarantine's ``source`` of a refused imported usage row.
QUARANTINE_SOURCE = "import_usage"
#: A secret given to ``create_key_from_secret``: printable ASCII without spaces, of a length no guess reaches.
SECRET_MIN_CHARS, SECRET_MAX_CHARS = 16, 190
#: How many request ids one ``known_request_ids`` query asks about (bound parameters stay well under every limit).
_ID_CHUNK = 500


def _check_source(source: str) -> str:
    return inputs.identifier(source, "source", 64)


def links(meter: Meter, source: str, kind: str) -> dict[str, int]:
    """Every link of ``kind`` from ``source``: external id -> local id."""
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
    _check_source(source)
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
    return _linked(meter, source, "cursor", name)


def create_linked_user(meter: Meter, name: str, group: str, *, source: str, external_id: str) -> int:
    """Create a user linked to ``external_id`` of ``source`` (one transaction); the linked user when it exists.

    A name taken by a user that is not this link's is a ``DuplicateReference`` naming ``name``.
    """
    _check_source(source)
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
    _check_source(source)
    _check_secret(secret)
    _name(name, "name")
    if limit_quota is not None and (
        not isinstance(limit_quota, int) or isinstance(limit_quota, bool) or not 0 <= limit_quota <= MAX_QUOTA
    ):
        raise InvalidField("limit_quota", f"must be an integer from 0 to {MAX_QUOTA} (None means unlimited)")
    values = {
        "user_id": user_id, "name": name, "secret_hash": secret_hash(secret),
        # The display prefix shows what the client sees first, as for our own keys: 4 characters past "sk-".
        "display_prefix": secret[: min(len(secret) - 8, 7)] + "...", "status": "revoked" if revoked else "enabled",
        "expires_at": None if expires_at is None else _naive_utc(expires_at, "expires_at"),
        "allowed_models": None if not models else json.dumps(sorted(set(models))),
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
        raise DuplicateReference("secret: another key already has this secret") from None


def set_key_room(meter: Meter, key_id: int, room: int) -> bool:
    """Make a limited key's room (``limit - used - reserved``) equal ``room`` (at least 0); False when it was."""
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
    wanted = list(request_ids)
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
    if not isinstance(model, str):
        raise InvalidUsage("model", f"must be a model name, got {type(model).__name__}")
    try:
        provider = meter.prices.resolve(model)[0].provider
    except UnknownModel:
        provider = infer_provider(model) if model.strip() else "unknown"  # the price look-up refuses it next
    if cached_tokens:
        if not isinstance(cached_tokens, int) or isinstance(cached_tokens, bool) or cached_tokens < 0:
            raise InvalidUsage("cached_tokens", f"must be a non-negative integer, got {cached_tokens!r}")
        if not isinstance(input_tokens, int) or isinstance(input_tokens, bool) or cached_tokens > input_tokens:
            raise InvalidUsage("cached_tokens", f"{cached_tokens} cached tokens are more than the {input_tokens!r} input")
        return UsageRecord(provider=provider, model=model, input_tokens=input_tokens - cached_tokens,
                           cached_input_tokens=cached_tokens, output_tokens=output_tokens,  # type: ignore[arg-type]
                           source=UsageSource.UPSTREAM)
    return UsageRecord(provider=provider, model=model, input_tokens=input_tokens,  # type: ignore[arg-type]
                       output_tokens=output_tokens, source=UsageSource.UPSTREAM)  # type: ignore[arg-type]


def check_usage(meter: Meter, model: object, input_tokens: object, output_tokens: object, at: datetime,
                group: str, cached_tokens: object = 0) -> int:
    """What ``record_usage_for_key`` would charge, writing nothing (a dry run); its typed error otherwise."""
    usage = usage_record(meter, model, input_tokens, output_tokens, cached_tokens)
    return price(meter.prices, usage, inputs.event_time(at, "at"), group).quota


def record_usage_for_key(
    meter: Meter, key_id: int, request_id: str, *, model: object, input_tokens: object, output_tokens: object,
    at: datetime, channel: str | None = None, payload: dict[str, Any] | None = None, cached_tokens: object = 0,
) -> Receipt:
    """Record an already-served request's usage on key ``key_id`` as a pending event (``fold_deferred`` charges it).

    The key's status and expiry are not checked: the request was served (and billed) by the other gateway
    when the key was valid. A retry with the same request id returns the first receipt. A usage the ledger
    refuses is quarantined (source ``import_usage``, ``payload`` kept with it) before the typed error is raised.
    """
    try:
        return _record(meter, key_id, request_id, model, input_tokens, output_tokens, at, channel, cached_tokens)
    except quarantine.REJECTIONS as exc:
        if not getattr(exc, "retryable", False):
            user = meter._read(lambda db: db.execute(select(KEYS.c.user_id).where(KEYS.c.id == key_id)).scalar())
            stored = {"model": model, "input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cached_tokens": cached_tokens, "at": at,
                      "channel": channel, **(payload or {})}
            meter._quarantine(exc, QUARANTINE_SOURCE, stored, request_id=request_id, user_id=user, key_id=key_id,
                              model=model)
        raise


def _record(meter: Meter, key_id: int, request_id: str, model: object, input_tokens: object, output_tokens: object,
            at: datetime, channel: str | None, cached_tokens: object = 0) -> Receipt:
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
    keys = _key_rows(meter, (item.key_id for item in items))
    results: list[Receipt | Exception | None] = [None] * len(items)
    ready: list[tuple[int, dict[str, Any]]] = []
    for index, item in enumerate(items):
        try:
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
    "QUARANTINE_SOURCE", "check_usage", "create_key_from_secret", "create_linked_user", "cursor", "known_request_ids",
    "ImportedUsage", "links", "record_usage_for_key", "record_usage_many", "set_cursor",
    "set_key_room", "usage_record",
]
