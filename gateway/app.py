"""The relay as an ASGI app: routes, one shared HTTP client, the meter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
from fastapi import FastAPI, Request
from starlette.responses import Response

from gateway import billing
from gateway.config import GatewayConfig
from gateway.relay import Relay
from metering.ledger import Meter

#: Connections kept open to each upstream (a relay's calls are long; the providers allow many).
MAX_CONNECTIONS = 512


def create_app(meter: Meter, config: GatewayConfig) -> FastAPI:
    """The relay over ``meter`` forwarding to ``config``'s upstreams (the caller owns and closes the meter)."""
    timeout = httpx2.Timeout(config.read_timeout_seconds, connect=config.connect_timeout_seconds)
    limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS // 4)
    state: dict[str, Relay] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # trust_env=False: an HTTP(S)_PROXY of the host must not silently reroute paid upstream traffic.
        async with httpx2.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            state["relay"] = Relay(meter, config, client)
            yield

    app = FastAPI(title="llm-metering relay", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await state["relay"].handle(request, "openai")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await state["relay"].handle(request, "anthropic")

    async def subscription(request: Request) -> Response:
        return await billing.subscription(meter, request)

    async def usage(request: Request) -> Response:
        return await billing.usage(meter, request)

    async def models(request: Request) -> Response:
        return await billing.models(meter, request)

    app.add_api_route("/v1/models", models, methods=["GET"])
    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/dashboard/billing/subscription", subscription, methods=["GET"])
        app.add_api_route(f"{prefix}/dashboard/billing/usage", usage, methods=["GET"])
    return app
