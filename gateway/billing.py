"""What chat front ends read besides chat: the balance endpoints (as one-api serves them) and the model list.

``GET /dashboard/billing/subscription`` answers ``hard_limit_usd`` = what the key has spent plus what it
can still spend; ``GET /dashboard/billing/usage`` answers ``total_usage`` = what it has spent, in US
cents. A front end shows ``hard_limit_usd - total_usage / 100`` as the balance left, which is then
exactly ``Meter.key_usage(...)["remaining"]``. Like one-api, the usage endpoint ignores ``start_date`` and
``end_date`` (a month's usage would break that subtraction). Both are served with and without ``/v1``.

Amounts are quota units over the price table's ``units_per_usd``, written as exact decimals (500,000
units per dollar gives at most 6 decimal places), never through a binary float.
"""

from __future__ import annotations

import asyncio
import json
from fractions import Fraction

from starlette.requests import Request
from starlette.responses import Response

from gateway.dialects import DIALECTS
from gateway.provider_errors import error_response
from metering.ledger import Meter
from metering.ledger.errors import KeyRejected, LedgerBusy
from pricing.quote import decimal_text


def usd_text(units: int, units_per_usd: int) -> str:
    """``units`` in dollars as an exact decimal (to 1e-12, half-even, if the ratio has no finite expansion)."""
    exact = Fraction(units, units_per_usd)
    try:
        return decimal_text(exact)
    except ValueError:
        # In integers (Decimal's 28-digit context would round a large amount): half to even, then the digits.
        whole, fraction = divmod(round(exact * 10**12), 10**12)
        return f"{whole}.{fraction:012d}".rstrip("0").rstrip(".")


def _json_response(fields: list[tuple[str, str]]) -> Response:
    """A flat JSON object whose values are already JSON text (numbers written exactly)."""
    body = "{" + ", ".join(f'"{name}": {value}' for name, value in fields) + "}"
    return Response(body, media_type="application/json")


async def _usage(meter: Meter, request: Request) -> dict[str, object] | Response:
    secret = DIALECTS["openai"].client_key(request.headers)
    if not secret:
        return error_response("openai", "invalid_api_key", "missing API key")
    try:
        return await asyncio.to_thread(meter.key_usage, secret)
    except KeyRejected as exc:
        return error_response("openai", "invalid_api_key", str(exc))
    except LedgerBusy as exc:
        return error_response("openai", "ledger_busy", f"the ledger is busy, retry: {exc}")


async def subscription(meter: Meter, request: Request) -> Response:
    """OpenAI's legacy ``billing_subscription`` object for the calling key."""
    usage = await _usage(meter, request)
    if isinstance(usage, Response):
        return usage
    units = meter.prices.units_per_usd
    limit = usd_text(int(usage["used"]) + int(usage["remaining"]), units)  # type: ignore[call-overload]
    expires = usage["expires_at"]
    access_until = int(expires.timestamp()) if expires is not None else 0  # type: ignore[attr-defined]
    return _json_response([
        ("object", '"billing_subscription"'), ("has_payment_method", "true"), ("soft_limit_usd", limit),
        ("hard_limit_usd", limit), ("system_hard_limit_usd", limit), ("access_until", str(access_until)),
    ])


async def usage(meter: Meter, request: Request) -> Response:
    """OpenAI's legacy usage object: ``total_usage`` in US cents."""
    found = await _usage(meter, request)
    if isinstance(found, Response):
        return found
    cents = usd_text(int(found["used"]) * 100, meter.prices.units_per_usd)  # type: ignore[call-overload]
    return _json_response([("object", '"list"'), ("total_usage", cents)])


async def models(meter: Meter, request: Request) -> Response:
    """``GET /v1/models``: the price table's models (and aliases) the calling key may use, OpenAI's list format."""
    found = await _usage(meter, request)
    if isinstance(found, Response):
        return found
    allowed = found["models"]
    listed = []
    for entry in sorted(meter.prices.models.values(), key=lambda e: e.name):
        for name in (entry.name, *entry.aliases):
            if allowed is None or name in allowed or entry.name in allowed:  # type: ignore[operator]
                listed.append({"id": name, "object": "model", "created": 0, "owned_by": entry.provider})
    body = json.dumps({"object": "list", "data": listed}, ensure_ascii=False)
    return Response(body, media_type="application/json")
