"""Keep a request's hold from expiring while its upstream call is open (``Meter.keep_alive``).

A hold expires ``hold_ttl`` after it was taken (the worker's ``expire_holds`` returns it to the balance),
so a call longer than the TTL would be settled late: all of it charged as overage. The relay moves the
expiry forward every ``hold_ttl / KEEP_ALIVES_PER_TTL`` from the moment the hold is taken until the
request is settled or released, then stops at once. The ledger never moves it past the request's longest
documented run (``HoldTicket.keep_until``). A relay that dies stops calling, and the hold expires within
one TTL, as before.
"""

from __future__ import annotations

import asyncio
import logging

from metering.ledger import HoldTicket, Meter

log = logging.getLogger("gateway.keep_alive")
#: Keep-alives per TTL: a third leaves two chances for one that meets a busy ledger before the hold is due.
KEEP_ALIVES_PER_TTL = 3


class HoldKeeper:
    """One background task per request calling ``meter.keep_alive(hold)``; ``stop()`` ends it."""

    def __init__(self, meter: Meter, hold: HoldTicket) -> None:
        self.meter, self.hold = meter, hold
        self.interval = meter.hold_ttl.total_seconds() / KEEP_ALIVES_PER_TTL
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"keep-alive {hold.request_id}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                expires = await asyncio.to_thread(self.meter.keep_alive, self.hold)
            except Exception as exc:  # noqa: BLE001 (the next tick tries again; the hold is due only after the TTL)
                log.warning("keeping the hold of %s alive failed (%s: %s)", self.hold.request_id, type(exc).__name__, exc)
                continue
            if expires is None:  # settled or released meanwhile: nothing left to keep
                return

    @property
    def running(self) -> bool:
        """True until stopped (or the hold was found resolved)."""
        return not self._task.done()

    def stop(self) -> None:
        """Stop keeping the hold alive (idempotent). A keep-alive already in its worker thread finishes there
        and finds the hold resolved: it changes nothing."""
        self._task.cancel()
