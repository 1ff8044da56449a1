"""The two API formats the relay speaks, as data: where the key is, where to forward, how to authenticate.

A dialect is bound to the provider whose format it is: ``/v1/chat/completions`` serves OpenAI models and
``/v1/messages`` Claude models (the relay forwards bodies unchanged; it does not translate formats).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.provider_errors import Dialect


def client_secret(token: str | None) -> str | None:
    """The key as the ledger knows it: every key's secret starts with ``sk-``, and one-api clients may send
    an imported key without it (one-api accepts both), so a bare key gets the prefix back."""
    if not token:
        return None
    return token if token.startswith("sk-") else f"sk-{token}"


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return client_secret(token.strip()) if scheme.lower() == "bearer" else None


def _anthropic_key(headers: Mapping[str, str]) -> str | None:
    # The SDK sends x-api-key (newer releases a bearer token); both are accepted.
    return client_secret(headers.get("x-api-key")) or _bearer(headers)


def _openai_auth(credential: str, client_headers: Mapping[str, str]) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


#: Anthropic request headers a client may set and the upstream must see (the API version, beta features).
ANTHROPIC_PASSED_HEADERS = ("anthropic-version", "anthropic-beta")
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


def _anthropic_auth(credential: str, client_headers: Mapping[str, str]) -> dict[str, str]:
    headers = {"x-api-key": credential, "anthropic-version": DEFAULT_ANTHROPIC_VERSION}
    headers.update({name: client_headers[name] for name in ANTHROPIC_PASSED_HEADERS if name in client_headers})
    return headers


@dataclass(frozen=True, slots=True)
class DialectSpec:
    """One API format: its provider, upstream path, how the client's key is read and the upstream's is sent."""

    name: Dialect
    provider: str
    path: str
    client_key: Callable[[Mapping[str, str]], str | None]
    upstream_headers: Callable[[str, Mapping[str, str]], dict[str, str]]
    #: OpenAI reports a stream's usage only when asked (``stream_options.include_usage``); Anthropic always.
    asks_for_stream_usage: bool


DIALECTS: dict[Dialect, DialectSpec] = {
    "openai": DialectSpec("openai", "openai", "/v1/chat/completions", _bearer, _openai_auth, True),
    "anthropic": DialectSpec("anthropic", "anthropic", "/v1/messages", _anthropic_key, _anthropic_auth, False),
}
