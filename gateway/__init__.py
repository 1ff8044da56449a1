"""A reference relay in front of OpenAI and Anthropic upstreams, metered by the ledger (the ``[gateway]`` extra).

``create_app(meter, config)`` is an ASGI app (FastAPI) serving ``POST /v1/chat/completions`` (OpenAI
format), ``POST /v1/messages`` (Anthropic format) and the balance endpoints chat front ends read
(``/dashboard/billing/subscription``, ``/v1/dashboard/billing/usage``). Each request is authenticated with
one of our API keys, authorized (a hold on the worst case), forwarded, metered as it passes and settled
(or released when the upstream failed). docs/gateway.md has the rules; ``metering gateway serve`` runs it.

Nothing in ``pricing``, ``metering`` or ``workers`` imports this package: the core installs without
FastAPI, uvicorn or an HTTP client.
"""

from gateway.app import create_app
from gateway.config import GatewayConfig, Upstream, load_config

__all__ = ["GatewayConfig", "Upstream", "create_app", "load_config"]
