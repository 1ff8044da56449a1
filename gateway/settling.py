"""Settling after the answer went out (retried while the ledger is busy, never raised to the client); releasing.

By then the client has its answer, so a failure can only be logged. ``LedgerBusy`` (a lock wait, a
dropped connection) is retried with the same hold: ``settle`` is idempotent per request id, so a retry
after a COMMIT that was applied returns the first receipt. Any other refusal was quarantined by the
ledger with its reason; the hold then expires after its TTL (docs/ledger.md, "Rejected usage").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from metering.ledger import HoldTicket, Meter, Receipt
from metering.ledger.errors import LedgerBusy

log = logging.getLogger("gateway.settle")
#: Attempts while the ledger answers LedgerBusy, and the pause before each retry (seconds, growing).
ATTEMPTS = 4
PAUSE_SECONDS = 0.05


async def settle_after_answer(settle: Callable[[], Awaitable[Receipt]], request_id: str) -> Receipt | str:
    """The receipt, or the reason there is none (logged)."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await settle()
        except LedgerBusy as exc:
            if attempt == ATTEMPTS:
                reason = f"LedgerBusy after {ATTEMPTS} attempts: {exc}"
                break
            await asyncio.sleep(PAUSE_SECONDS * attempt)
        except Exception as exc:  # noqa: BLE001 (quarantined by the ledger, or a bug: logged, the stream is over)
            reason = f"{type(exc).__name__}: {exc}"
            break
    log.error("settling request %s failed (%s); its hold expires after the TTL", request_id, reason)
    return reason


async def release_quietly(meter: Meter, hold: HoldTicket) -> None:
    """Release ``hold`` (nothing was served); a failure is logged: the hold then expires after its TTL."""
    try:
        await meter.arelease(hold)
    except Exception as exc:  # noqa: BLE001 (released all the same, by the expiry)
        log.error("releasing hold of %s failed (%s); it will expire", hold.request_id, exc)
