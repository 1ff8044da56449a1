"""The asyncio variants never block the event loop, even while the database makes them wait."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from metering import Meter
from pricing.usage import UsageRecord

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


def test_async_calls_leave_the_event_loop_free(tmp_path) -> None:
    path = tmp_path / "ledger.db"
    meter = Meter.open(f"sqlite:///{path}")
    uid = meter.create_user("alice")
    meter.topup(uid, "1", "USD", "order-1")
    secret = meter.create_key(uid, "k")

    async def main() -> tuple[int, float]:
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(heartbeat())
        # Another writer holds SQLite's write lock for 0.4 s: our calls must wait for it in their thread.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.4, lambda: (blocker.execute("COMMIT"), blocker.close()))
        started = time.perf_counter()
        holds = await asyncio.gather(*(meter.aauthorize(secret, BODY, f"req-{i}") for i in range(5)))
        waited = time.perf_counter() - started
        usage = UsageRecord(provider="openai", model="gpt-4o-mini", input_tokens=8, output_tokens=10)
        receipts = await asyncio.gather(*(meter.asettle(hold, usage=usage) for hold in holds[:4]))
        assert await meter.arelease(holds[4]) and not await meter.arelease(holds[4])
        stop.set()
        await beat
        assert all(r.quota == 4 for r in receipts)  # gpt-4o-mini: (8 x $0.15 + 10 x $0.60) / 1M = $0.0000072 = 3.6 -> 4 units
        return ticks, waited

    ticks, waited = asyncio.run(main())
    assert waited >= 0.35  # the lock really made the calls wait
    assert ticks >= 20  # ...and the loop kept running meanwhile (a blocked loop would tick ~once)
    assert meter.audit().ok
    meter.close()
