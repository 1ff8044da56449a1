"""One relayed request: authenticate, authorize, forward, meter, settle or release; errors in the client's format.

The order is the providers' own: a missing or bad key is 401 before anything about the body is said.
Then ``Meter.authorize`` takes the hold (429 ``insufficient_quota`` when the balance or the key's limit
cannot cover the worst case; 404 for a model the price table does not know). The request is forwarded
under the relay's own request id (``x-request-id`` of the answer); a client's retry is a new request, as
with the providers. Every path out of here either settles the hold, releases it, or (the relay dying)
leaves it to expire: a hold is never leaked and a request is never charged twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import httpx2
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from gateway.config import GatewayConfig
from gateway.dialects import DIALECTS, DialectSpec
from gateway.metered_stream import MeteredStream
from gateway.provider_errors import Dialect, error_response
from gateway.settling import settle_after_answer
from gateway.upstream_call import UpstreamUnavailable, open_upstream
from metering.errors import RequestError, UnknownModel
from metering.ledger import HoldTicket, Meter
from metering.ledger.errors import KeyRejected, LedgerBusy, LedgerError, QuotaExceeded
from pricing.errors import PriceNotFound

log = logging.getLogger("gateway.relay")
#: Upstream answers that speak of the relay's own credential, not the client's: a 502 to the client.
UPSTREAM_CREDENTIAL_STATUSES = frozenset({401, 403})
#: Largest request body the relay reads (images in base64 make big bodies; this is the providers' order).
MAX_BODY_BYTES = 32 * 1024 * 1024
#: The answer header naming the relay's request id (the usage event's ``request_id``).
REQUEST_ID_HEADER = "x-request-id"


class Relay:
    """The relay's request handler for both dialects, sharing one meter, configuration and HTTP client."""

    def __init__(self, meter: Meter, config: GatewayConfig, client: httpx2.AsyncClient) -> None:
        self.meter, self.config, self.client = meter, config, client

    async def handle(self, request: Request, dialect: Dialect) -> Response:
        """Relay one request in ``dialect`` (``openai`` or ``anthropic``)."""
        spec = DIALECTS[dialect]
        secret = spec.client_key(request.headers)
        if not secret:
            return error_response(dialect, "invalid_api_key", "missing API key")
        body = await _json_body(request)
        if isinstance(body, str):
            return error_response(dialect, "invalid_request", body)
        request_id = f"relay-{uuid.uuid4().hex}"
        hold = await self._authorize(secret, body, request_id, dialect)
        if isinstance(hold, Response):
            return hold
        try:
            return await self._forward(request, spec, body, hold)
        except BaseException:
            await self._release(hold)  # whatever broke before an answer went out: nothing was served
            raise

    async def _authorize(self, secret: str, body: dict[str, Any], request_id: str, dialect: Dialect) -> HoldTicket | Response:
        try:
            return await self.meter.aauthorize(secret, body, request_id)
        except KeyRejected as exc:
            kind = {401: "invalid_api_key", 403: "model_not_allowed"}.get(exc.http_status, "invalid_request")
            return error_response(dialect, kind, str(exc), param="model" if kind != "invalid_api_key" else None)
        except QuotaExceeded as exc:
            return error_response(dialect, "insufficient_quota", str(exc))
        except (UnknownModel, PriceNotFound):
            model = body.get("model")
            return error_response(dialect, "model_not_found",
                                  f"The model `{model}` does not exist or you do not have access to it.", param="model")
        except RequestError as exc:
            return error_response(dialect, "invalid_request", str(exc), param=".".join(map(str, exc.path)) or None)
        except LedgerBusy as exc:
            return error_response(dialect, "ledger_busy", f"the ledger is busy, retry: {exc}")
        except LedgerError as exc:
            log.error("authorize failed: %s", exc)
            return error_response(dialect, "invalid_request" if exc.http_status == 400 else "server_error", str(exc))

    async def _forward(self, request: Request, spec: DialectSpec, body: dict[str, Any], hold: HoldTicket) -> Response:
        entry, _ = self.meter.prices.resolve(hold.model)
        if entry.provider != spec.provider:
            await self._release(hold)
            other = next(d.path for d in DIALECTS.values() if d.provider == entry.provider)
            return error_response(spec.name, "model_not_found",
                                  f"The model `{hold.model}` is served at {other}, not {spec.path}.", param="model")
        upstream = self.config.upstream(entry.provider)
        if upstream is None:
            await self._release(hold)
            return error_response(spec.name, "no_upstream", f"no upstream is configured for {entry.provider} models")
        streamed = body.get("stream") is True
        forwarded, hide_usage = _with_stream_usage(body) if streamed and spec.asks_for_stream_usage else (body, False)
        try:
            opened = await open_upstream(self.client, upstream, spec, forwarded, request.headers)
        except UpstreamUnavailable as exc:
            await self._release(hold)
            return error_response(spec.name, "upstream_unavailable", f"the upstream did not answer ({exc})")
        response, channel = opened.response, opened.channel
        id_header = (REQUEST_ID_HEADER.encode(), hold.request_id.encode())
        if response.status_code != 200:
            return await self._upstream_error(spec, hold, response, channel)
        if streamed and response.headers.get("content-type", "").startswith("text/event-stream"):
            return MeteredStream(self.meter, hold, response, channel, spec.name, hide_usage, id_header)
        return await self._complete(spec, hold, response, channel, id_header)

    async def _complete(self, spec: DialectSpec, hold: HoldTicket, response: httpx2.Response, channel: str,
                        id_header: tuple[bytes, bytes]) -> Response:
        try:
            content = await response.aread()
        except httpx2.HTTPError as exc:
            await self._release(hold)
            return error_response(spec.name, "upstream_unavailable", f"the upstream answer broke off ({type(exc).__name__})")
        finally:
            await response.aclose()
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            await self._release(hold)  # nothing usable was served
            return error_response(spec.name, "upstream_unavailable", "the upstream answered something that is not JSON")
        headers = {id_header[0].decode(): id_header[1].decode()}
        # Settled once the answer is sent (a background task of the response): the client does not wait on the
        # ledger's write. A relay dying in between leaves the hold to expire: never a double charge.
        settle = BackgroundTask(settle_after_answer, lambda: self.meter.asettle(hold, response=answer, channel=channel),
                                hold.request_id)
        return Response(content, status_code=200, media_type="application/json", headers=headers, background=settle)

    async def _upstream_error(self, spec: DialectSpec, hold: HoldTicket, response: httpx2.Response, channel: str) -> Response:
        try:
            content = await response.aread()
        except httpx2.HTTPError:
            content = b""
        finally:
            await response.aclose()
        await self._release(hold)
        status = response.status_code
        if status in UPSTREAM_CREDENTIAL_STATUSES:
            log.error("upstream %s refused the relay's credential (HTTP %s)", channel, status)
            return error_response(spec.name, "upstream_rejected_gateway", "the upstream refused the gateway's credential")
        log.info("upstream %s answered HTTP %s for %s", channel, status, hold.request_id)
        media = response.headers.get("content-type", "application/json")
        return Response(content, status_code=status, media_type=media)  # the provider's own error, in its format

    async def _release(self, hold: HoldTicket) -> None:
        try:
            await self.meter.arelease(hold)
        except Exception as exc:  # noqa: BLE001 (the hold then expires after its TTL: released all the same)
            log.error("releasing hold of %s failed (%s); it will expire", hold.request_id, exc)


def _with_stream_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body asking the upstream for the stream's usage, and whether to hide it from the client."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    merged = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    return {**body, "stream_options": merged}, True


async def _json_body(request: Request) -> dict[str, Any] | str:
    """The request's JSON object, or the reason it is not one."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return f"the request body is larger than {MAX_BODY_BYTES} bytes"
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return f"the request body is larger than {MAX_BODY_BYTES} bytes"
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return "the request body is not valid JSON"
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    return body
