"""Rejected usage, kept: the ``quarantined_usage`` table and what writes and reads it.

The rule (docs/ledger.md, "Rejected usage"): when ``settle`` or ``record_usage`` refuses a usage payload
(invalid figures, an unknown model, a conflicting retry, a bad argument...), the ledger stores the raw
payload and the reason here **in a transaction of its own**, then raises the typed error to the caller
as before. Nothing else is written: the hold stays open (it is released by the caller or expires after
its TTL), no usage event, entry or balance moves. The row is finance's record of a request that was
served but not billed, so it never passes silently.

A stream is the one exception to "refused": its accumulator bills what was delivered, counted locally,
when the upstream's usage chunk is invalid (metering must never break a stream it relays); the rejected
chunk is stored with ``action = replaced`` after the charge, so the replacement can be reviewed.

What is stored, bounded (``MAX_PAYLOAD_CHARS``, ``MAX_REASON_CHARS``) and never a secret: the usage object
(a response's ``choices`` / ``content``, the generated text, are left out: they are not billing data), the
rejected stream chunk, or the ``UsageRecord`` given. Values under secret-looking keys (``api_key``,
``authorization``...) and anything shaped like a key or code (``sk-...``, ``rc-...``, ``Bearer ...``) are
replaced by ``[redacted]``; the API key a ``record_usage`` call presented is never part of the payload.
Text is stored as ASCII-escaped JSON, so NULs and lone surrogates (which PostgreSQL or UTF-8 refuse) are
kept as escapes rather than failing the insert.

Retries: one row per distinct rejection, identified by its ``fingerprint`` (sha256 of the source, request
id, error class, field and stored payload). The same rejection again (a gateway retrying the same bad
settle) adds no row: it bumps ``attempts`` and ``last_seen_at`` of the first. A different payload or
reason for the same request is a new row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

from sqlalchemy import exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from metering.errors import RequestError, format_path
from metering.ledger.errors import KeyRejected, NotFound, SettleConflict
from metering.ledger.tables import QuarantinedUsage, UsageEvent
from metering.streams import RejectedUsage, StreamAccumulator, StreamResult
from pricing.errors import BillingError, UnknownModel

QUARANTINE = QuarantinedUsage.__table__  # type: ignore[attr-defined]
#: A rejection that could not be stored is logged here (the caller still gets its typed error).
log = logging.getLogger("metering.ledger.quarantine")
EVENTS = UsageEvent.__table__  # type: ignore[attr-defined]

#: The entry points whose rejected usage is kept (``import_usage``: a foreign gateway's log, metering/ledger/imports.py).
SOURCES = ("settle_response", "settle_usage", "settle_stream", "record_usage", "import_usage")
#: ``refused``: nothing was charged (the caller got the error); ``replaced``: a stream's invalid usage
#: chunk, billed from the local count instead; ``capped``: usage beyond its hold's worst case, charged at the
#: worst case (``uncharged_quota`` is the rest, for an operator to approve).
ACTIONS = ("refused", "replaced", "capped")
#: What ``settle`` and ``record_usage`` quarantine: every error they raise on purpose (the typed errors, and
#: ValueError) except a retryable one (``LedgerBusy``: the database, not the usage). A database error that
#: is not ours (a lost server) is not a rejection of the usage either: the caller retries the same call.
REJECTIONS = (BillingError, ValueError)
MAX_PAYLOAD_CHARS = 8_000
MAX_REASON_CHARS = 2_000
#: Keys whose values are never stored, whatever they hold (compared lower-cased, ``-`` as ``_``).
SECRET_KEYS = frozenset({"api_key", "apikey", "authorization", "x_api_key", "secret", "password", "access_token",
                         "refresh_token", "token", "key"})
_SECRET_TEXT = re.compile(r"\b(sk|rc)-[A-Za-z0-9_\-]{6,}|\b[Bb]earer\s+[^\s\"\\]+")
#: How deep a payload is walked for secret keys; deeper parts are summarized, not stored.
_MAX_DEPTH = 32
_RESPONSE_TEXT_KEYS = ("choices", "content")


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[{len(text) - limit} more characters not stored]"
    return text[: limit - len(marker)] + marker


def safe_text(text: str, limit: int) -> str:
    """``text`` as every database stores it: NULs and lone surrogates escaped, secrets redacted, bounded."""
    text = text.replace("\0", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return _bounded(_SECRET_TEXT.sub("[redacted]", text), limit)


def _redacted(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value``: secret-keyed values replaced, exotic values as text, depth bounded."""
    if depth > _MAX_DEPTH:
        return f"[{type(value).__name__} nested deeper than {_MAX_DEPTH} levels]"
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else repr(key)
            secret = name.lower().replace("-", "_") in SECRET_KEYS
            out[name] = "[redacted]" if secret else _redacted(item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_redacted(item, depth + 1) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Decimal, Fraction, datetime)):
        return str(value)
    to_dict = getattr(value, "to_dict", None)  # a UsageRecord
    if callable(to_dict):
        try:
            return _redacted(to_dict(), depth + 1)
        except Exception:  # noqa: BLE001 (a broken object is stored by its type, never fails the quarantine)
            pass
    return f"[{type(value).__name__}]"


def render_payload(value: Any) -> str:
    """The payload as stored: ASCII JSON of its redacted copy (a str is stored as the text it is), bounded."""
    if isinstance(value, str):
        return safe_text(value, MAX_PAYLOAD_CHARS)
    try:
        text = json.dumps(_redacted(value), ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = f"[{type(value).__name__}: not representable]"
    return safe_text(text, MAX_PAYLOAD_CHARS)


def response_payload(response: Any) -> Any:
    """What a response keeps in quarantine: everything but the generated text (``choices``, ``content``)."""
    if not isinstance(response, dict):
        return response
    kept: dict[str, Any] = {}
    for key, value in response.items():
        if key in _RESPONSE_TEXT_KEYS:
            size = len(value) if isinstance(value, (list, str)) else 1
            kept[key] = f"[{type(value).__name__} of {size}: generated text, not stored]"
        else:
            kept[key] = value
    return kept


def settle_payload(*, response: Any = None, usage: Any = None, stream: Any = None) -> tuple[str, Any]:
    """(source, payload) of a refused ``settle``: the stream's result, the response's usage part, or the usage."""
    if stream is not None:
        try:
            result = stream.finish() if isinstance(stream, StreamAccumulator) else stream
        except Exception:  # noqa: BLE001 (an accumulator in a broken state: its type is what we can keep)
            return "settle_stream", stream
        if not isinstance(result, StreamResult):
            return "settle_stream", result
        return "settle_stream", {
            "status": result.status, "usage": result.usage, "malformed_lines": result.malformed_lines,
            "events": result.events, "invalid_bytes": result.invalid_bytes,
            "rejected_usage": [chunk.data for chunk in result.rejected_usage],
        }
    if response is not None:
        return "settle_response", response_payload(response)
    return "settle_usage", usage


def rejected_chunks(stream: Any) -> tuple[RejectedUsage, ...]:
    """The upstream usage chunks a settled stream refused (billed from the local count instead)."""
    result = stream.finish() if isinstance(stream, StreamAccumulator) else stream
    return result.rejected_usage if isinstance(result, StreamResult) else ()


def field_of(error: BaseException) -> str | None:
    """The field an error names: ``field`` of typed field errors, the JSON path of a body or response error."""
    field = getattr(error, "field", None)
    if isinstance(field, str):
        return field
    if isinstance(error, RequestError):
        return format_path(error.path)
    if isinstance(error, UnknownModel):
        return "model"
    if isinstance(error, KeyRejected):
        return "key"
    if isinstance(error, SettleConflict):  # another usage than the one the request was billed with
        return "usage"
    if isinstance(error, NotFound):
        return "hold"
    return None


def fingerprint(source: str, request_id: str | None, error: str, field: str | None, payload: str) -> str:
    """What tells one rejection from another: the same five values are the same rejection retried."""
    parts = json.dumps([source, request_id, error, field, payload], ensure_ascii=True)
    return hashlib.sha256(parts.encode("ascii")).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def store(
    run: Callable[[Callable[[Any], Any]], Any],
    *,
    source: str,
    error: BaseException,
    payload: Any,
    action: str = "refused",
    request_id: Any = None,
    user_id: int | None = None,
    key_id: int | None = None,
    hold_id: int | None = None,
    model: Any = None,
) -> int:
    """Store one rejection (or count a retry of it) in its own transaction; returns the row's id.

    ``run(work)`` runs ``work(db)`` in a write transaction (``Meter._retrying``). Every text is made
    storable here, so the row is written whatever the rejected values were.
    """
    row = quarantine_row(source=source, error=error, payload=payload, action=action, request_id=request_id,
                         user_id=user_id, key_id=key_id, hold_id=hold_id, model=model)
    digest, now = row["fingerprint"], row["created_at"]
    try:
        return int(run(lambda db: db.execute(insert(QUARANTINE).values(**row)).inserted_primary_key[0]))
    except IntegrityError:
        pass  # the same rejection was stored before: a retry, counted on the first row
    bump = (
        update(QUARANTINE).where(QUARANTINE.c.fingerprint == digest)
        .values(attempts=QUARANTINE.c.attempts + 1, last_seen_at=now)
    )
    run(lambda db: db.execute(bump))
    first = select(QUARANTINE.c.id).where(QUARANTINE.c.fingerprint == digest)
    return int(run(lambda db: db.execute(first).scalar_one()))


def quarantine_row(
    *, source: str, error: BaseException, payload: Any, action: str = "refused", request_id: Any = None,
    user_id: int | None = None, key_id: int | None = None, hold_id: int | None = None, model: Any = None,
    uncharged_quota: int | None = None,
) -> dict[str, Any]:
    """The ``quarantined_usage`` row of one rejection, every text made storable (``store`` inserts it; a capped
    settle inserts it in its own charge's transaction)."""
    if source not in SOURCES or action not in ACTIONS:
        raise ValueError(f"unknown quarantine source {source!r} or action {action!r}")
    stored = render_payload(payload)
    request = None if request_id is None else safe_text(str(request_id), 190)
    error_name = type(error).__name__[:64]
    field = field_of(error)
    field = None if field is None else safe_text(field, 190)
    now = _now()
    return {
        "fingerprint": fingerprint(source, request, error_name, field, stored), "source": source, "action": action,
        "request_id": request, "user_id": _int_or_none(user_id), "key_id": _int_or_none(key_id),
        "hold_id": _int_or_none(hold_id), "model": None if model is None else safe_text(str(model), 190),
        "error": error_name, "field": field, "reason": safe_text(str(error) or error_name, MAX_REASON_CHARS),
        "payload": stored, "attempts": 1, "created_at": now, "last_seen_at": now, "uncharged_quota": uncharged_quota,
    }


def _int_or_none(value: Any) -> int | None:
    """An id worth storing: an int in the column's range (a forged ticket's id may be anything)."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31:
        return value
    return None


def listing(
    read: Callable[[Callable[[Any], Any]], Any], *, request_id: str | None = None, user_id: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Quarantined rejections, newest first, each with ``settled``: whether the request has been billed since."""
    settled = exists().where(EVENTS.c.request_id == QUARANTINE.c.request_id)
    query = select(QUARANTINE, settled.label("settled")).order_by(QUARANTINE.c.id.desc())
    if request_id is not None:
        query = query.where(QUARANTINE.c.request_id == request_id)
    if user_id is not None:
        query = query.where(QUARANTINE.c.user_id == user_id)
    if limit is not None:
        query = query.limit(limit)
    rows = read(lambda db: db.execute(query).mappings().all())
    return [
        {
            "id": r["id"], "created_at": _iso(r["created_at"]), "last_seen_at": _iso(r["last_seen_at"]),
            "attempts": int(r["attempts"]), "source": r["source"], "action": r["action"], "request_id": r["request_id"],
            "user_id": r["user_id"], "key_id": r["key_id"], "hold_id": r["hold_id"], "model": r["model"],
            "error": r["error"], "field": r["field"], "reason": r["reason"], "payload": r["payload"],
            "settled": bool(r["settled"]), "uncharged_quota": r["uncharged_quota"],
        }
        for r in rows
    ]


def count(read: Callable[[Callable[[Any], Any]], Any]) -> int:
    """How many rejections are quarantined (distinct ones: retries are counted in ``attempts``)."""
    return int(read(lambda db: db.execute(select(func.count()).select_from(QUARANTINE)).scalar_one()))


def _iso(moment: datetime) -> str:
    return moment.replace(tzinfo=timezone.utc).isoformat()


__all__ = [
    "ACTIONS", "MAX_PAYLOAD_CHARS", "MAX_REASON_CHARS", "QUARANTINE", "REJECTIONS", "SOURCES", "count", "field_of",
    "fingerprint", "listing", "quarantine_row", "rejected_chunks", "render_payload", "response_payload", "safe_text",
    "settle_payload", "store",
]
