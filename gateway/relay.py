"""One relayed request: authenticate, read, authorize, forward, meter, settle or release; errors in the client's format.

Cheap checks first, the providers' order: a missing or bad key is 401, and a key with nothing available
429, before a byte of the body is read (``Meter.check_key``, one indexed read). The body is then read as
a stream, at most ``max_body_bytes`` of it (413 as soon as it passes that, the rest never read) within
``body_timeout_seconds`` (408), and parsed as strict JSON: UTF-8, no NaN or Infinity, no lone surrogate
(400 naming the problem). Then ``Meter.authorize`` takes the hold (429 ``insufficient_quota`` when the
balance or the key's limit cannot cover the worst case; 404 for a model the price table does not know),
and a background task keeps it alive while the upstream call is open (gateway/hold_keeper.py). The
request is forwarded under the relay's own request id (``x-request-id`` of the answer); a client's retry
is a new request, as with the providers. A client that hangs up at any point is one INFO line. Every path
out of here either settles the hold, releases it, or (the relay dying) leaves it to expire: a hold is
never leaked and a request is never charged twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import uuid
from contextlib import aclosing
from typing import Any

import httpx2
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.client_watch import ClientGone, gone_response, unless_client_leaves
from gateway.config import GatewayConfig
from gateway.dialects import DIALECTS, DialectSpec
from gateway.hold_keeper import HoldKeeper
from gateway.metered_stream import MeteredStream
from gateway.provider_errors import Dialect, error_response
from gateway.settling import release_quietly, settle_after_answer
from gateway.upstream_call import Opened, UpstreamUnavailable, open_upstream
from metering.errors import RequestError, UnknownModel
from metering.ledger import HoldTicket, Meter
from metering.ledger.errors import KeyRejected, LedgerBusy, LedgerError, QuotaExceeded
from metering.worst_case import scan_body
from pricing.errors import PriceNotFound

log = logging.getLogger("gateway.relay")
#: Upstream answers that speak of the relay's own credential, not the client's: a 502 to the client.
UPSTREAM_CREDENTIAL_STATUSES = frozenset({401, 403})
#: The answer header naming the relay's request id (the usage event's ``request_id``).
REQUEST_ID_HEADER = "x-request-id"
#: On answers given before the whole body was read: the rest of it is never read, so the connection cannot
#: carry another request, and a client still sending learns at once instead of after its last byte.
CLOSE = {"connection": "close"}
#: A JSON string escape of a UTF-16 surrogate: only a body with one can hold a lone surrogate.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class Relay:
    """The relay's request handler for both dialects, sharing one meter, configuration and HTTP client."""

    def __init__(self, meter: Meter, config: GatewayConfig, client: httpx2.AsyncClient) -> None:
        self.meter, self.config, self.client = meter, config, client

    async def handle(self, request: Request, dialect: Dialect) -> Response:
        """Relay one request in ``dialect`` (``openai`` or ``anthropic``)."""
        spec = DIALECTS[dialect]
        request_id = f"relay-{uuid.uuid4().hex}"
        secret = spec.client_key(request.headers)
        if not secret:
            return error_response(dialect, "invalid_api_key", "missing API key", headers=CLOSE)
        refused = await self._check_key(secret, dialect)
        if refused is not None:
            return refused
        body = await self._read_body(request, dialect, request_id)
        if isinstance(body, Response):
            return body
        hold = await self._authorize(secret, body, request_id, dialect)
        if isinstance(hold, Response):
            return hold
        keeper = HoldKeeper(self.meter, hold)
        try:
            response = await self._forward(request, spec, body, hold, keeper)
        except BaseException:
            await release_quietly(self.meter, hold)  # whatever broke before an answer went out: nothing was served
            keeper.stop()
            raise
        if not isinstance(response, (MeteredStream, SettledAnswer)):
            keeper.stop()  # released on the way out: nothing left to keep (the others stop it once settled)
        return response

    async def _check_key(self, secret: str, dialect: Dialect) -> Response | None:
        """The refusal of a key that may not spend now (nothing of the body read yet), or None."""
        try:
            check = await asyncio.to_thread(self.meter.check_key, secret)
        except LedgerError as exc:
            return _refusal(dialect, exc, CLOSE)
        if check.available <= 0:  # a request costs at least one unit
            return error_response(dialect, "insufficient_quota",
                                  f"insufficient quota: this API key has {max(check.available, 0)} units available",
                                  headers=CLOSE)
        return None

    async def _read_body(self, request: Request, dialect: Dialect, request_id: str) -> dict[str, Any] | Response:
        """The request's JSON object, or the answer refusing it (413, 408, 400; a client gone)."""
        limit = self.config.max_body_bytes
        too_large = f"the request body is larger than {limit} bytes"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return error_response(dialect, "request_too_large", too_large, headers=CLOSE)  # not a byte read
        raw = bytearray()
        try:
            async with asyncio.timeout(self.config.body_timeout_seconds), aclosing(request.stream()) as chunks:
                async for chunk in chunks:
                    raw += chunk
                    if len(raw) > limit:  # chunked, or a Content-Length that lied: stop here, read no more
                        return error_response(dialect, "request_too_large", too_large, headers=CLOSE)
        except TimeoutError:
            return error_response(dialect, "request_timeout", f"the request body did not arrive within "
                                  f"{self.config.body_timeout_seconds:g} s", headers=CLOSE)
        except ClientDisconnect:
            log.info("request %s: the client hung up while sending the body (%d bytes read); nothing was held",
                     request_id, len(raw))
            return gone_response()
        parsed = _json_object(raw)
        if isinstance(parsed, str):
            return error_response(dialect, "invalid_request", parsed)
        if isinstance(parsed, RequestError):
            return error_response(dialect, "invalid_request", str(parsed), param=".".join(map(str, parsed.path)) or None)
        return parsed

    async def _authorize(self, secret: str, body: dict[str, Any], request_id: str, dialect: Dialect) -> HoldTicket | Response:
        try:
            return await self.meter.aauthorize(secret, body, request_id)
        except (UnknownModel, PriceNotFound):
            model = body.get("model")
            return error_response(dialect, "model_not_found",
                                  f"The model `{model}` does not exist or you do not have access to it.", param="model")
        except RequestError as exc:
            return error_response(dialect, "invalid_request", str(exc), param=".".join(map(str, exc.path)) or None)
        except LedgerError as exc:
            return _refusal(dialect, exc)

    async def _forward(self, request: Request, spec: DialectSpec, body: dict[str, Any], hold: HoldTicket,
                       keeper: HoldKeeper) -> Response:
        entry, _ = self.meter.prices.resolve(hold.model)
        if entry.provider != spec.provider:
            await release_quietly(self.meter, hold)
            other = next(d.path for d in DIALECTS.values() if d.provider == entry.provider)
            return error_response(spec.name, "model_not_found",
                                  f"The model `{hold.model}` is served at {other}, not {spec.path}.", param="model")
        upstream = self.config.upstream(entry.provider)
        if upstream is None:
            await release_quietly(self.meter, hold)
            return error_response(spec.name, "no_upstream", f"no upstream is configured for {entry.provider} models")
        streamed = body.get("stream") is True
        forwarded, hide_usage = _with_stream_usage(body) if streamed and spec.asks_for_stream_usage else (body, False)
        try:
            opened = await unless_client_leaves(open_upstream(self.client, upstream, spec, forwarded, request.headers),
                                                request.receive, _close_opened)
        except UpstreamUnavailable as exc:
            await release_quietly(self.meter, hold)
            return error_response(spec.name, "upstream_unavailable", f"the upstream did not answer ({exc})")
        except ClientGone:
            return await self._client_left(hold, "while the upstream had not answered yet")
        response, channel = opened.response, opened.channel
        id_header = (REQUEST_ID_HEADER.encode(), hold.request_id.encode())
        if response.status_code != 200:
            return await self._upstream_error(spec, hold, response, channel)
        if streamed and response.headers.get("content-type", "").startswith("text/event-stream"):
            return MeteredStream(self.meter, hold, keeper, response, channel, spec.name, hide_usage, id_header)
        return await self._complete(request, spec, hold, keeper, response, channel, id_header)

    async def _complete(self, request: Request, spec: DialectSpec, hold: HoldTicket, keeper: HoldKeeper,
                        response: httpx2.Response, channel: str, id_header: tuple[bytes, bytes]) -> Response:
        try:
            content = await unless_client_leaves(response.aread(), request.receive)
        except httpx2.HTTPError as exc:
            await release_quietly(self.meter, hold)
            return error_response(spec.name, "upstream_unavailable", f"the upstream answer broke off ({type(exc).__name__})")
        except ClientGone:
            return await self._client_left_after_answer(hold, channel, keeper)
        finally:
            await response.aclose()
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            await release_quietly(self.meter, hold)  # nothing usable was served
            return error_response(spec.name, "upstream_unavailable", "the upstream answered something that is not JSON")
        headers = {id_header[0].decode(): id_header[1].decode()}
        return SettledAnswer(content, headers, self.meter, hold, answer, channel, keeper)

    async def _upstream_error(self, spec: DialectSpec, hold: HoldTicket, response: httpx2.Response, channel: str) -> Response:
        try:
            content = await response.aread()
        except httpx2.HTTPError:
            content = b""
        finally:
            await response.aclose()
        await release_quietly(self.meter, hold)
        status = response.status_code
        if status in UPSTREAM_CREDENTIAL_STATUSES:
            log.error("upstream %s refused the relay's credential (HTTP %s)", channel, status)
            return error_response(spec.name, "upstream_rejected_gateway", "the upstream refused the gateway's credential")
        log.info("upstream %s answered HTTP %s for %s", channel, status, hold.request_id)
        media = response.headers.get("content-type", "application/json")
        return Response(content, status_code=status, media_type=media)  # the provider's own error, in its format

    async def _client_left(self, hold: HoldTicket, moment: str) -> Response:
        """A client gone before the upstream answered: the hold released, one INFO line."""
        await release_quietly(self.meter, hold)
        log.info("request %s: the client hung up %s; upstream call closed, hold released", hold.request_id, moment)
        return gone_response()

    async def _client_left_after_answer(self, hold: HoldTicket, channel: str, keeper: HoldKeeper) -> Response:
        """A client gone while an accepted answer was read: the upstream saw the prompt, so the prompt is
        charged (a cut stream's rule: never less than the prompt the provider saw), nothing of the output."""
        try:
            await settle_after_answer(
                lambda: self.meter.asettle(hold, stream=self.meter.accumulator(hold), channel=channel), hold.request_id)
        finally:
            keeper.stop()
        log.info("request %s: the client hung up while the upstream's answer was being read; upstream call closed, "
                 "charged for the prompt the upstream saw", hold.request_id)
        return gone_response()


class SettledAnswer(Response):
    """A complete (non-streamed) answer, settled once it was handed to the client's connection.

    The client does not wait on the ledger's write (the settle runs after the last byte went out), and the
    hold is kept alive until it is done. A relay dying in between leaves the hold to expire: never a double
    charge.
    """

    def __init__(self, content: bytes, headers: dict[str, str], meter: Meter, hold: HoldTicket,
                 answer: dict[str, Any], channel: str, keeper: HoldKeeper) -> None:
        super().__init__(content, status_code=200, media_type="application/json", headers=headers)
        self.meter, self.hold, self.answer, self.channel, self.keeper = meter, hold, answer, channel, keeper

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
            await settle_after_answer(lambda: self.meter.asettle(self.hold, response=self.answer, channel=self.channel),
                                      self.hold.request_id)
        finally:
            self.keeper.stop()


def _refusal(dialect: Dialect, exc: LedgerError, headers: dict[str, str] | None = None) -> Response:
    """The answer to a ledger that refused the key, the quota, or could not answer now."""
    if isinstance(exc, KeyRejected):
        kind = {401: "invalid_api_key", 403: "model_not_allowed"}.get(exc.http_status, "invalid_request")
        return error_response(dialect, kind, str(exc), param="model" if kind != "invalid_api_key" else None,
                              headers=headers)
    if isinstance(exc, QuotaExceeded):
        return error_response(dialect, "insufficient_quota", str(exc), headers=headers)
    if isinstance(exc, LedgerBusy):
        return error_response(dialect, "ledger_busy", f"the ledger is busy, retry: {exc}", headers=headers)
    log.error("the ledger refused a request: %s", exc)
    return error_response(dialect, "invalid_request" if exc.http_status == 400 else "server_error", str(exc),
                          headers=headers)


async def _close_opened(opened: Opened) -> None:
    await opened.response.aclose()


def _with_stream_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body asking the upstream for the stream's usage, and whether to hide it from the client."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    merged = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    return {**body, "stream_options": merged}, True


class _StrictNumbers:
    """``json.loads`` hooks noting a number JSON does not have: NaN and Infinity (which Python's parser takes),
    or a literal that overflows a double (``1e400`` parses as infinity). The body is then walked by
    ``scan_body``, which names where it is."""

    def __init__(self) -> None:
        self.seen = False

    def constant(self, name: str) -> float:
        self.seen = True
        return math.nan

    def number(self, text: str) -> float:
        value = float(text)
        self.seen = self.seen or not math.isfinite(value)
        return value


def _json_object(raw: bytearray) -> dict[str, Any] | RequestError | str:
    """The body as a JSON object, or the reason it is not one (a ``RequestError`` names the path).

    Strict where Python's ``json`` is lenient and the providers are not: UTF-8 only (``json.loads`` of bytes
    would also take UTF-16 and UTF-32), no NaN / Infinity, no number that overflows a double, no lone
    surrogate (``"\\ud800"``: text no provider reads). A key given twice keeps its last value, as in
    JavaScript's and Python's parsers: the relay forwards the object it parsed, so the upstream sees the
    very value the hold was computed from.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not UTF-8 text (byte {exc.start} is not valid UTF-8)"
    numbers = _StrictNumbers()
    try:
        body = json.loads(text, parse_constant=numbers.constant, parse_float=numbers.number)
    except json.JSONDecodeError as exc:
        return f"the request body is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
    except RecursionError:
        return "the request body is not valid JSON (it nests too deeply)"
    except ValueError as exc:  # an integer of more digits than Python converts
        return f"the request body is not valid JSON ({exc})"
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    # Rare (escaped emoji pairs are fine): only then is the body walked, to name the value refused.
    if numbers.seen or SURROGATE_ESCAPE.search(text):
        try:
            scan_body(body)
        except RequestError as exc:
            return exc
        if numbers.seen:  # scan_body names each one; never forwarded in any case
            return "the request body contains a number that is not JSON (NaN, Infinity, or beyond a double)"
    return body
