"""Typed errors of the ledger, each with what a gateway needs to answer its client."""

from __future__ import annotations

from typing import Any

from metering.errors import MeteringError
from pricing.usage import InvalidUsage


class LedgerError(MeteringError):
    """Base of the ledger's errors."""

    http_status = 500
    error_type = "server_error"
    error_code: str | None = None

    def openai_error(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, OpenAI-style error body) for the gateway to return to its client."""
        return self.http_status, {
            "error": {"message": str(self), "type": self.error_type, "param": None, "code": self.error_code}
        }


class QuotaExceeded(LedgerError):
    """Not enough quota for the worst case of this request: on the user's balance or the key's limit."""

    http_status = 429
    error_type = "insufficient_quota"
    error_code = "insufficient_quota"

    def __init__(self, needed: int, available: int, scope: str) -> None:
        self.needed = needed
        self.available = available
        self.scope = scope  # "user" or "key"
        owner = "your balance" if scope == "user" else "this API key's limit"
        super().__init__(f"insufficient quota: this request may need {needed} units, {owner} has {available} available")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (a gateway's worker pool)
        return (type(self), (self.needed, self.available, self.scope))


class KeyRejected(LedgerError):
    """The API key is unknown, revoked, expired, or not allowed this model."""

    http_status = 401
    error_type = "invalid_request_error"
    error_code = "invalid_api_key"

    def __init__(self, reason: str, *, http_status: int = 401, code: str = "invalid_api_key") -> None:
        self.reason = reason
        self.http_status = http_status
        self.error_code = code
        super().__init__(reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,), {"http_status": self.http_status, "error_code": self.error_code})


class SettleConflict(LedgerError):
    """A request id settled (or recorded) before with a different usage payload."""

    http_status = 409
    error_type = "invalid_request_error"
    error_code = "request_id_conflict"


class DuplicateReference(LedgerError):
    """An external reference (top-up order, adjustment) reused with different content."""

    http_status = 409
    error_type = "invalid_request_error"
    error_code = "duplicate_reference"


class NotFound(LedgerError):
    """A user, key, hold or code that does not exist."""

    http_status = 404
    error_type = "invalid_request_error"
    error_code = "not_found"


class UnsafeDatabase(LedgerError):
    """A database we refuse: SQLite on a network filesystem (its locks are not reliable there)."""


class InvalidField(LedgerError, ValueError):
    """A value the ledger refuses to store (e.g. a name no database could keep byte for byte); ``field`` names it.

    ``str(error)`` starts with the field (``name: ...``); the value itself is never echoed.
    """

    http_status = 400
    error_type = "invalid_request_error"
    error_code = "invalid_field"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.message))


class LedgerBusy(LedgerError):
    """The database could not finish the call now: retry the same call (same request id, reference or code).

    Raised when a lock wait timed out or a deadlock persisted after the ledger's own retries, when the
    connection dropped twice, or when the connection failed at the COMMIT. In the first cases nothing was
    written; in the last (``maybe_applied``) the COMMIT may have been applied, and the retry, keyed by the
    same idempotency key, finds it and returns the first result (or ``False`` / ``DuplicateReference`` for
    a release or a redemption already done): the effect happens exactly once either way.
    """

    http_status = 503
    error_type = "server_error"
    error_code = "ledger_busy"
    retryable = True

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        self.maybe_applied = maybe_applied
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes, like the other typed errors
        return (type(self), (str(self),), {"maybe_applied": self.maybe_applied})



class UsageBeyondHold(InvalidUsage):
    """An upstream's usage beyond its request's worst case: charged at the worst case, the rest kept.

    Never raised to the caller: ``settle`` charges the capped usage and records this, with the reported
    figures and the quota not charged, in ``quarantined_usage`` (action ``capped``) for an operator to
    approve (``Meter.approve_capped``) or leave. ``field`` names the first figure beyond the worst case.
    """
