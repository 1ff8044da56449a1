"""Open the upstream call: the main address, then the backup on a connection failure, timeout or HTTP 524.

524 is Cloudflare's "a timeout occurred": the CDN in front of the main address gave up on the origin.
Providers and resellers document a backup address without the CDN for exactly that case. Nothing has
reached the client when the backup is tried, so trying it is safe for billing: one hold, one settle.
A 524 from the last address is no answer either (an HTML page of the CDN, in neither provider's format):
``UpstreamUnavailable``, like a connection that failed. Other answers (4xx, 5xx but 524) come from the
upstream itself and are passed on, never retried here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2

from gateway.config import Upstream
from gateway.dialects import DialectSpec

log = logging.getLogger("gateway.upstream")
#: The upstream statuses that send the request on to the backup address.
FAILOVER_STATUSES = frozenset({524})


class UpstreamUnavailable(Exception):
    """Every address of the upstream failed to answer (connection error, timeout or 524)."""


@dataclass(frozen=True, slots=True)
class Opened:
    """An upstream answer whose headers have arrived (the body is still to be read) and who served it."""

    response: httpx2.Response
    channel: str


async def open_upstream(
    client: httpx2.AsyncClient, upstream: Upstream, dialect: DialectSpec, body: dict[str, Any],
    client_headers: Mapping[str, str],
) -> Opened:
    """Send ``body`` to the upstream (main address, then backup); returns once the answer's headers are in."""
    headers = dialect.upstream_headers(upstream.credential(), client_headers)
    failures: list[str] = []
    addresses = upstream.addresses()
    for attempt, (base_url, channel) in enumerate(addresses, start=1):
        request = client.build_request("POST", base_url + dialect.path, json=body, headers=headers)
        try:
            response = await client.send(request, stream=True)
        except httpx2.TransportError as exc:  # refused, reset, timed out, broken framing: no answer came
            failures.append(f"{channel}: {type(exc).__name__}")
            log.warning("upstream %s failed (%s); %s", channel, type(exc).__name__,
                        "trying the backup" if attempt < len(addresses) else "no backup left")
            continue
        if response.status_code in FAILOVER_STATUSES:
            await response.aclose()
            failures.append(f"{channel}: HTTP {response.status_code}")
            log.warning("upstream %s answered %s; %s", channel, response.status_code,
                        "trying the backup" if attempt < len(addresses) else "no backup left")
            continue
        return Opened(response, channel)
    raise UpstreamUnavailable("; ".join(failures))
