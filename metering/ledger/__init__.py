"""The quota ledger: users, keys, holds, settlement, credits and the audit (see docs/ledger.md)."""

from metering.ledger.errors import (
    DuplicateReference,
    InvalidField,
    KeyRejected,
    LedgerBusy,
    LedgerError,
    NotFound,
    QuotaExceeded,
    SettleConflict,
    UnsafeDatabase,
)
from metering.ledger.meter import AuditReport, HoldTicket, Meter, Receipt, Violation

__all__ = [
    "AuditReport", "DuplicateReference", "HoldTicket", "InvalidField", "KeyRejected", "LedgerBusy", "LedgerError", "Meter", "NotFound",
    "QuotaExceeded", "Receipt", "SettleConflict", "UnsafeDatabase", "Violation",
]
