"""``metering import one-api``: a one-api / new-api deployment's users, keys and usage, mapped into our ledger.

The rules (docs/oneapi-import.md has them with examples):

* **users** -> our users, named by ``username`` (a name our ledger refuses, e.g. only digits, becomes
  ``<source>-user-<id>``). A ``group`` missing from our price table is mapped to ``default`` with a warning
  (counted), or refused up front with ``unknown_group="refuse"``. A username an existing, non-imported user of
  ours already has is an ``ImportConflict`` (field ``users.username``) before anything is written.
* **tokens** -> our API keys with the same secret (``"sk-" + key``: what one-api's clients send), so they keep
  working behind our relay. Disabled, deleted or of a disabled user -> revoked; ``expired_time`` -1 -> no
  expiry, else ``expires_at``; unlimited -> no limit, else a limit whose room equals ``remain_quota``.
* **consume logs** (type 2) -> pending usage events (request id ``oneapi:<source>:<log id>``, time
  ``created_at``), priced by OUR price table, then folded; every refused row is quarantined with its reason.
  Other log types are counted only. one-api's own ``quota`` per log is compared with ours (counted and summed).
* **balances**: one-api's ``users.quota`` (the remaining balance) is the truth: after the fold, ONE adjustment
  brings our balance to it when they differ (reference from source, user, our balance and the target, so a
  rerun with nothing new writes nothing).

All or nothing: the whole run is ONE ledger transaction (``imports.one_transaction``), committed at its end, so
a run that fails anywhere (a conflict, a refused value, a database failure, an exception, a killed process)
writes nothing: no user, key, link, event, quarantine row, charge, adjustment or cursor move. A dry run is
the same run rolled back instead of committed: it validates exactly what the run validates, and its summary
is the run's.

Idempotent: links (``import_links``) name what each foreign row became, the logs' request ids are unique, and
the log cursor (minus an overlap for rows committed out of id order) skips what earlier runs read.
"""

from __future__ import annotations

import secrets as random_secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import inspect, select

from metering.ledger import imports, inputs, quarantine
from metering.ledger.errors import InvalidField, NotFound
from metering.ledger.meter import KEYS, USERS, Meter, secret_hash
from pricing.errors import UnknownModel
from pricing.quote import MAX_QUOTA
from workers.oneapi.source import (
    CONSUME, LOG_TYPES, TOKEN_DISABLED, TOKEN_EXPIRED, OneApiSource, SourceLog, SourceToken, SourceUser,
)

#: Logs are re-read from this many ids below the cursor: MySQL and PostgreSQL may commit ids out of order.
CURSOR_OVERLAP = 10_000
UNKNOWN_GROUP_POLICIES = ("default", "refuse")
#: Imported events charged per transaction (``Meter.fold_deferred``): a backlog of millions in big commits.
FOLD_PER_TRANSACTION = 500
#: The most warnings the summary lists (each kind is counted in full).
MAX_WARNINGS = 20
#: ``batch``: logs read per query (the command line's --batch bounds).
MAX_BATCH = 100_000
#: The tables an import reads and writes; a ledger without them (new, or older than migration 0004) is read as empty.
LEDGER_TABLES = frozenset({"users", "api_keys", "import_links", "usage_events", "ledger_entries", "quarantined_usage"})
#: Progress callback: (stage, done, total or None), as workers.progress draws it.
Progress = Callable[[str, int, "int | None"], None]


class ImportConflict(ValueError):
    """The source cannot be mapped without overwriting or guessing; ``field`` names the foreign column."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class _Plan:
    """What the users and tokens become: our ids (None for a user until it is created)."""

    users: dict[int, int | None] = field(default_factory=dict)  # source user id -> our user id
    groups: dict[int, str] = field(default_factory=dict)  # source user id -> our price group
    keys: dict[int, int] = field(default_factory=dict)  # source token id -> our key id
    by_name: dict[tuple[int, str], int] = field(default_factory=dict)  # (source user, token name) -> token id
    fallback: dict[int, int] = field(default_factory=dict)  # source user id -> our fallback key id


def _summary(source: OneApiSource, name: str, dry_run: bool) -> dict[str, Any]:
    return {
        "source": name, "flavor": source.flavor, "dry_run": dry_run,
        "users": Counter(), "keys": Counter(), "logs": Counter(), "by_type": Counter(), "quarantine_reasons": Counter(),
        "quota": Counter(), "balances": Counter(), "folded": 0, "warnings": [],
    }


def _warn(summary: dict[str, Any], message: str) -> None:
    if len(summary["warnings"]) < MAX_WARNINGS:
        summary["warnings"].append(message)


def import_oneapi(
    meter: Meter, source: OneApiSource, *, name: str, dry_run: bool = False, unknown_group: str = "default",
    sync_balances: bool = True, batch: int = 2_000, progress: Progress | None = None,
) -> dict[str, Any]:
    """Import ``source`` into ``meter`` as deployment ``name``, all or nothing; returns the summary.

    ``dry_run``: the same run rolled back instead of committed (it writes nothing; its summary is the
    real run's). A ledger without the import's tables (new, or older than the schema head) is read as
    empty by a dry run (an empty in-memory ledger is imported into); the real run refuses it.
    """
    if unknown_group not in UNKNOWN_GROUP_POLICIES:
        raise ImportConflict("--unknown-group", f"must be one of {', '.join(UNKNOWN_GROUP_POLICIES)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH:
        raise ImportConflict("--batch", f"must be an integer from 1 to {MAX_BATCH}")
    imports._check_source(name)
    tables = meter._read(lambda db: set(inspect(db.connection).get_table_names()))
    if LEDGER_TABLES <= tables:
        return _run(meter, source, name, dry_run, unknown_group, sync_balances, batch, progress)
    if not dry_run:
        raise ImportConflict("--db", "the ledger's schema is not at head (open it with Meter.open first)")
    empty = Meter.open("sqlite://", prices=meter.prices)  # the ledger read as empty: the same run, on nothing
    try:
        summary = _run(empty, source, name, dry_run, unknown_group, sync_balances, batch, progress)
    finally:
        empty.close()
    if tables:
        older = ("--db: the ledger's schema is older than the import's (the real run migrates it): it was read as "
                 "empty, so conflicts with its users and keys are not seen")
        summary["warnings"] = [older, *summary["warnings"]][:MAX_WARNINGS]
    return summary


def _run(meter: Meter, source: OneApiSource, name: str, dry_run: bool, unknown_group: str, sync_balances: bool,
         batch: int, progress: Progress | None) -> dict[str, Any]:
    """The import in one transaction: committed at the end, or (``dry_run``) rolled back."""
    summary = _summary(source, name, dry_run)
    users = source.users()
    tokens = source.tokens()
    with imports.one_transaction(meter, commit=not dry_run) as ledger:
        start = imports.lock_cursor(ledger, name, "logs")  # first: a concurrent import of this source waits here
        plan = _plan_users(ledger, users, name, unknown_group, summary)
        _check_tokens(ledger, tokens, name)
        _create_users(ledger, users, plan, name, summary)
        _map_tokens(ledger, tokens, users, plan, name, summary)
        _import_logs(ledger, source, plan, name, start, batch, progress, summary)
        while (folded := ledger.fold_deferred(per_transaction=FOLD_PER_TRANSACTION)):
            summary["folded"] += folded
        _sync_key_rooms(ledger, tokens, plan, summary)
        _sync_balances(ledger, users, plan, name, sync_balances, summary)
    return _plain(summary)


# ---------------------------------------------------------------------- users


def _our_name(user: SourceUser, name: str) -> tuple[str, bool]:
    """The user's name in our ledger, and whether it had to be replaced (our rules refuse it)."""
    text = user.username
    try:
        inputs.text(text, "name", 190)
        if text and text == text.strip() and not text.isdigit():
            return text, False
    except InvalidField:
        pass
    return f"{name}-user-{user.id}", True


def _plan_users(meter: Meter, users: list[SourceUser], name: str, policy: str, summary: dict[str, Any]) -> _Plan:
    """Groups, names and links of the users; every conflict is raised before anything is written."""
    plan = _Plan()
    linked = imports.links(meter, name, "user")
    taken = set(meter._read(lambda db: db.execute(select(USERS.c.name)).scalars().all()))
    refused: list[str] = []
    for user in users:
        summary["users"]["read"] += 1
        if abs(user.quota) > MAX_QUOTA:
            raise ImportConflict("users.quota", f"user {user.id}: a balance of {user.quota} is beyond the ledger's "
                                 f"{MAX_QUOTA:,} units")
        group = user.group
        if group not in meter.prices.groups:
            if policy == "refuse":
                refused.append(f"user {user.id} ({user.username!r}) has group {group!r}")
                continue
            summary["users"]["group_defaulted"] += 1
            _warn(summary, f"users.group: user {user.id} group {group!r} is not in the price table: imported as default")
            group = "default"
        plan.groups[user.id] = group
        plan.users[user.id] = linked.get(str(user.id))
        if plan.users[user.id] is None:
            our_name, renamed = _our_name(user, name)
            if our_name in taken:
                raise ImportConflict("users.username", f"user {user.id}: a user named {our_name!r} already exists in "
                                     "the ledger and was not imported from this source (rename one of them first)")
            summary["users"]["renamed"] += renamed
    if refused:
        raise ImportConflict("users.group", f"{len(refused)} user(s) in groups the price table does not know: "
                             f"{'; '.join(refused[:5])} (add the groups, or pass --unknown-group default)")
    return plan


def _create_users(meter: Meter, users: list[SourceUser], plan: _Plan, name: str, summary: dict[str, Any]) -> None:
    for user in users:
        if plan.users.get(user.id) is not None:
            summary["users"]["existing"] += 1
            continue
        our_name, _ = _our_name(user, name)
        plan.users[user.id] = imports.create_linked_user(meter, our_name, plan.groups[user.id], source=name,
                                                         external_id=str(user.id))
        summary["users"]["created"] += 1


# ---------------------------------------------------------------------- tokens


def _secret(token: SourceToken) -> str:
    """What one-api's clients send: ``sk-`` and the stored key (one-api strips the prefix before looking it up)."""
    return token.key if token.key.startswith("sk-") else "sk-" + token.key


def _check_tokens(meter: Meter, tokens: list[SourceToken], name: str) -> None:
    """A token whose secret another key of ours already has (not through this source's links) is a conflict."""
    linked = set(imports.links(meter, name, "token"))
    hashes = {secret_hash(_secret(t)): t.id for t in tokens if str(t.id) not in linked and t.key}
    found: list[int] = []
    chunk = list(hashes)
    for start in range(0, len(chunk), 500):
        query = select(KEYS.c.secret_hash).where(KEYS.c.secret_hash.in_(chunk[start:start + 500]))
        found += [hashes[h] for h in meter._read(lambda db: db.execute(query).scalars().all())]
    if found:
        raise ImportConflict("tokens.key", f"token(s) {', '.join(map(str, sorted(found)[:5]))}: a key of the ledger "
                             "already has this secret (imported under another --source?)")


def _key_terms(token: SourceToken, user: SourceUser) -> dict[str, Any]:
    """Status, expiry and limit of our key for ``token`` (docs/oneapi-import.md, "Tokens")."""
    revoked = token.status == TOKEN_DISABLED or token.deleted or not user.enabled or user.deleted
    expires_at = None
    if token.expired_time != -1:
        try:
            expires_at = datetime.fromtimestamp(token.expired_time, timezone.utc)
        except (OverflowError, OSError, ValueError):
            revoked = True  # an expiry no calendar holds: the key is kept for its history, never usable
    elif token.status == TOKEN_EXPIRED:
        revoked = True  # expired with no expiry time: nothing to carry but the status
    # Exhausted (4) stays enabled with a limit: its room is remain_quota (<= 0: none), as in one-api. A room
    # beyond the ledger's largest amount is that amount (set_key_room bounds it the same way).
    limit = None if token.unlimited_quota else min(MAX_QUOTA, max(0, token.remain_quota))
    return {"revoked": revoked, "expires_at": expires_at, "limit_quota": limit, "models": token.models}


def _key_name(token: SourceToken) -> str:
    """The token's name as our key's (NULs dropped, at most 190 characters), else ``token <id>``."""
    try:
        return inputs.text(token.name.replace("\0", "")[:190], "name", 190)
    except (InvalidField, AttributeError):
        return f"token {token.id}"


def _map_tokens(meter: Meter, tokens: list[SourceToken], users: list[SourceUser], plan: _Plan, name: str,
                summary: dict[str, Any]) -> None:
    by_id = {u.id: u for u in users}
    linked = imports.links(meter, name, "token")
    plan.fallback.update({int(k): v for k, v in imports.links(meter, name, "fallback_key").items()})
    for token in tokens:
        summary["keys"]["read"] += 1
        user = by_id.get(token.user_id)
        if user is None or token.user_id not in plan.groups:
            summary["keys"]["skipped_orphan"] += 1
            _warn(summary, f"tokens.user_id: token {token.id} belongs to no imported user: not imported")
            continue
        existing = linked.get(str(token.id))
        terms = _key_terms(token, user)
        try:
            imports._check_secret(_secret(token))
            if existing is None and terms["models"] is not None:  # what create_key_from_secret would refuse
                terms["models"] = inputs.model_names(list(terms["models"]), "tokens.models")
        except InvalidField as exc:
            summary["keys"]["skipped_invalid"] += 1
            _warn(summary, f"{'tokens.key' if exc.field == 'secret' else exc.field}: token {token.id}: "
                           f"{exc.args[0] if exc.args else exc}")
            continue
        plan.by_name.setdefault((token.user_id, token.name), token.id)  # ids ascending: the oldest of a name wins
        if existing is not None:
            plan.keys[token.id] = existing
            summary["keys"]["existing"] += 1
            if terms["revoked"] and meter.revoke_key(existing):
                summary["keys"]["revoked_since"] += 1
            continue
        summary["keys"]["created"] += 1
        summary["keys"]["revoked"] += terms["revoked"]
        plan.keys[token.id] = imports.create_key_from_secret(
            meter, plan.users[token.user_id], _key_name(token), _secret(token), source=name,  # type: ignore[arg-type]
            external_id=str(token.id), **terms)


def _fallback_key(meter: Meter, plan: _Plan, user_id: int, name: str, summary: dict[str, Any]) -> int:
    """The user's import key, for logs whose token is gone: revoked, with a random secret nobody holds."""
    if user_id not in plan.fallback:
        plan.fallback[user_id] = imports.create_key_from_secret(
            meter, plan.users[user_id], f"one-api import ({name}): deleted or unnamed tokens",  # type: ignore[arg-type]
            "sk-import-" + random_secrets.token_urlsafe(32), source=name, external_id=str(user_id),
            kind="fallback_key", revoked=True)
        summary["keys"]["fallback_created"] += 1
    return plan.fallback[user_id]


def _sync_key_rooms(meter: Meter, tokens: list[SourceToken], plan: _Plan, summary: dict[str, Any]) -> None:
    """A limited key's room after the import is one-api's ``remain_quota``, whatever our prices charged."""
    for token in tokens:
        key_id = plan.keys.get(token.id)
        if key_id is not None and not token.unlimited_quota and imports.set_key_room(meter, key_id, token.remain_quota):
            summary["keys"]["room_synced"] += 1


# ---------------------------------------------------------------------- logs


def _moment(value: Any) -> Any:
    """``created_at`` (unix seconds) as an aware datetime; what is not one is passed on for the ledger to refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            pass
    return value


def _import_logs(meter: Meter, source: OneApiSource, plan: _Plan, name: str, start: int, batch: int,
                 progress: Progress | None, summary: dict[str, Any]) -> None:
    """Every log past the cursor: consume logs recorded, others counted; the cursor moves to the last id read."""
    after = max(0, start - CURSOR_OVERLAP)
    total, done, last = source.count_logs(after), 0, start
    if progress:
        progress("logs", 0, total)
    for rows in source.logs(after, batch):
        consume = [row for row in rows if row.type == CONSUME]
        for row in rows:
            summary["by_type"][LOG_TYPES.get(row.type, f"type {row.type}")] += 1
        known = imports.known_request_ids(meter, (_request_id(name, r) for r in consume))
        fresh = []
        for row in consume:
            summary["logs"]["consume"] += 1
            if _request_id(name, row) in known:
                summary["logs"]["already_imported"] += 1
            else:
                fresh.append(row)
        _record_logs(meter, fresh, plan, name, summary)
        done += len(rows)
        last = max(last, rows[-1].id)
        if progress:
            progress("logs", done, total)
    summary["logs"]["read"] = done
    imports.set_cursor(meter, name, "logs", last)


def _request_id(name: str, row: SourceLog) -> str:
    return f"oneapi:{name}:{row.id}"


def _key_for(meter: Meter, row: SourceLog, plan: _Plan, name: str, summary: dict[str, Any]) -> int:
    """Our key for a log: by token id (new-api), else by the user's token name (one-api), else the fallback."""
    token_id = row.token_id if row.token_id in plan.keys else plan.by_name.get((row.user_id, row.token_name or ""))
    if token_id is not None and token_id in plan.keys:
        return plan.keys[token_id]
    summary["logs"]["on_fallback_key"] += 1
    return _fallback_key(meter, plan, row.user_id, name, summary)


def _payload(row: SourceLog, name: str) -> dict[str, Any]:
    """What a quarantine row keeps of a refused log, beside the usage itself."""
    return {"log_id": row.id, "source": name, "user_id": row.user_id, "token_id": row.token_id,
            "token_name": row.token_name, "oneapi_quota": row.quota}


def _record_logs(meter: Meter, rows: list[SourceLog], plan: _Plan, name: str, summary: dict[str, Any]) -> None:
    """Record a batch of consume logs: one statement for the valid ones (``imports.record_usage_many``)."""
    batch: list[tuple[SourceLog, imports.ImportedUsage]] = []
    for row in rows:
        if row.user_id not in plan.groups:
            _orphan_log(meter, row, name, summary)  # quarantined: the source lacks the user
            continue
        key_id = _key_for(meter, row, plan, name, summary)
        channel = None if row.channel_id is None else f"oneapi-{row.channel_id}"
        batch.append((row, imports.ImportedUsage(
            key_id, _request_id(name, row), row.model_name, row.prompt_tokens, row.completion_tokens,
            _moment(row.created_at), channel, _payload(row, name), _cached(meter, row, summary))))
    results = imports.record_usage_many(meter, [item for _, item in batch])
    for (row, _), result in zip(batch, results, strict=True):
        if isinstance(result, Exception):
            _count_refused(summary, result)
        else:
            _count_imported(summary, row, result.quota)


def _cached(meter: Meter, row: SourceLog, summary: dict[str, Any]) -> Any:
    """new-api's cache reads of a log, for an OpenAI model (inside its prompt_tokens, priced at the cached rate).

    For Claude, new-api's prompt_tokens leave the cache reads and writes out, and its ``other`` fields for
    them changed between versions: they are not mapped (counted), so such a log is priced as its input.
    """
    if row.cache_tokens is None:
        return 0
    try:
        provider = meter.prices.resolve(row.model_name)[0].provider if isinstance(row.model_name, str) else None
    except UnknownModel:
        return 0  # the log is quarantined for its model anyway
    if provider == "openai":
        summary["logs"]["cache_mapped"] += 1
        return row.cache_tokens
    summary["logs"]["cache_not_mapped"] += 1
    return 0


def _count_refused(summary: dict[str, Any], exc: Exception) -> None:
    summary["logs"]["quarantined"] += 1
    summary["quarantine_reasons"][f"{type(exc).__name__} {quarantine.field_of(exc) or ''}".strip()] += 1


def _count_imported(summary: dict[str, Any], row: SourceLog, quota: int) -> None:
    theirs = row.quota if isinstance(row.quota, int) else 0
    summary["logs"]["imported"] += 1
    summary["quota"]["ours"] += quota
    summary["quota"]["one_api"] += theirs
    if quota != theirs:
        summary["quota"]["differing_logs"] += 1
        summary["quota"]["difference"] += quota - theirs


def _orphan_log(meter: Meter, row: SourceLog, name: str, summary: dict[str, Any]) -> None:
    """A consume log of a user the source's users table lacks: quarantined (no user, so no key to record it on)."""
    missing = NotFound(f"user_id: log {row.id} names user {row.user_id!r}, which the source's users table lacks")
    missing.field = "user_id"  # type: ignore[attr-defined]  (what the quarantine row names)
    meter._quarantine(missing, imports.QUARANTINE_SOURCE, _payload(row, name), request_id=_request_id(name, row),
                      model=row.model_name)
    _count_refused(summary, missing)


# ---------------------------------------------------------------------- balances


def _sync_balances(meter: Meter, users: list[SourceUser], plan: _Plan, name: str, sync: bool,
                   summary: dict[str, Any]) -> None:
    """Bring each imported user's balance to one-api's ``users.quota`` with one adjustment (docs: "Balances")."""
    for user in users:
        our_id = plan.users.get(user.id)
        if user.id not in plan.groups or our_id is None:
            continue
        ours = meter.balance(our_id)
        if ours == user.quota:
            continue
        summary["balances"]["adjusted" if sync else "to_adjust"] += 1
        summary["balances"]["adjustment_total"] += user.quota - ours
        if not sync:
            continue
        reference = f"oneapi:{name}:balance:{user.id}:{ours}:{user.quota}"
        meter.adjust(our_id, user.quota - ours, reference,
                     f"one-api import {name}: balance brought to users.quota ({user.quota}) of user {user.id}")


def _plain(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as JSON-ready dicts (Counters as plain dicts, the invariant's terms always present)."""
    out = {k: dict(v) if isinstance(v, Counter) else v for k, v in summary.items()}
    for section, keys in (("logs", ("read", "consume", "imported", "already_imported", "quarantined", "on_fallback_key")),
                          ("quota", ("ours", "one_api", "differing_logs", "difference")),
                          ("users", ("read", "created", "existing", "renamed", "group_defaulted")),
                          ("keys", ("read", "created", "existing", "revoked", "skipped_invalid", "skipped_orphan",
                                    "fallback_created", "room_synced")),
                          ("balances", ("adjusted", "to_adjust", "adjustment_total"))):
        out[section] = {key: int(out[section].get(key, 0)) for key in keys} | {
            k: v for k, v in out[section].items() if k not in keys}
    return out


__all__ = ["CURSOR_OVERLAP", "ImportConflict", "UNKNOWN_GROUP_POLICIES", "import_oneapi"]
