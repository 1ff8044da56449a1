"""The streamed answer: upstream SSE bytes passed to the client as they come, metered as they are delivered.

Billing rule: a chunk is fed to the stream accumulator only after it was handed to the client's
connection. When the client hangs up, the pump stops at once (the upstream call is closed, so the
upstream stops generating) and the request is settled for what was delivered (one INFO line says so).
When the upstream breaks off, the client gets an error event in its provider's format; that text is the
relay's, never fed to the accumulator, so it is never billed. A stream that ends before one upstream byte
reached the client is charged its prompt: the upstream accepted the request (it answered 200), so it saw
the prompt. The settle runs shielded: a server shutting down mid-stream still settles what it served.
The hold is kept alive until then.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx2
from starlette.responses import Response

from gateway.client_watch import client_gone
from gateway.hold_keeper import HoldKeeper
from gateway.provider_errors import Dialect, stream_error_event
from gateway.settling import settle_after_answer
from gateway.usage_chunk import UsageChunkFilter
from metering.ledger import HoldTicket, Meter
from metering.streams import StreamAccumulator

log = logging.getLogger("gateway.stream")
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]  # no proxy buffering: tokens must reach the client as they come


class MeteredStream(Response):
    """An ASGI response relaying one upstream SSE answer and settling its hold when it ends."""

    def __init__(
        self, meter: Meter, hold: HoldTicket, keeper: HoldKeeper, upstream: httpx2.Response, channel: str,
        dialect: Dialect, hide_usage_chunk: bool, request_id_header: tuple[bytes, bytes],
    ) -> None:
        # Not Response.__init__: there is no body to render, the bytes come from the upstream as they arrive.
        self.status_code, self.background = 200, None
        self.meter, self.hold, self.keeper, self.upstream = meter, hold, keeper, upstream
        self.channel, self.dialect = channel, dialect
        self.filter = UsageChunkFilter() if hide_usage_chunk else None
        self.start_headers = [*STREAM_HEADERS, request_id_header]
        self.accumulator: StreamAccumulator = meter.accumulator(hold)
        self.delivered = 0  # upstream bytes handed to the client's connection (and fed to the accumulator)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # type: ignore[override]
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(client_gone(receive))
        hung_up = False
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():  # the client hung up: stop relaying (and the upstream call, in _finish)
                hung_up = True
                pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        finally:
            watcher.cancel()
            if not pump.done():  # the server itself is cancelling this request: stop relaying, still settle
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            outcome = await asyncio.shield(self._finish())
        if hung_up:
            log.info("request %s: the client hung up mid-stream after %d bytes; %s", self.hold.request_id,
                     self.delivered, outcome)

    async def _pump(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.start_headers})
        try:
            async for raw in self.upstream.aiter_raw():
                await self._deliver(send, self.filter.feed(raw) if self.filter else raw)
                self.accumulator.feed(raw)  # after the client got it: what is billed is what was delivered
                self.delivered += len(raw)
            if self.filter:
                await self._deliver(send, self.filter.flush())
        except httpx2.HTTPError as exc:  # the upstream broke off (reset, incomplete body, read timeout)
            log.warning("upstream %s broke off a stream (%s) for request %s", self.channel, type(exc).__name__,
                        self.hold.request_id)
            await send({"type": "http.response.body", "more_body": True,
                        "body": stream_error_event(self.dialect, "upstream_unavailable",
                                                   "the upstream connection was lost mid-stream")})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _deliver(self, send: Any, data: bytes) -> None:
        if data:
            await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _finish(self) -> str:
        """Settle for what was delivered (the prompt at least); what was done, for the log."""
        try:
            await self.upstream.aclose()
            settled = await settle_after_answer(
                lambda: self.meter.asettle(self.hold, stream=self.accumulator, channel=self.channel),
                self.hold.request_id)
            return "charged for what was delivered" if not isinstance(settled, str) else "settling failed (logged)"
        finally:
            self.keeper.stop()
