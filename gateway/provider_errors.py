"""Errors answered in the client's own provider format (OpenAI or Anthropic), as data.

Each kind maps to one HTTP status and, per format, the error ``type`` (and OpenAI's ``code``) a client
of that provider switches on. Anthropic has no ``insufficient_quota``: its own word for an account out of
credit is ``billing_error``; the status stays 429, as one-api answers, so both SDKs raise their
rate-limit error class and clients that back off on 429 do. A body too large is Anthropic's own
``request_too_large`` (413); a body sent too slowly is 408 with ``invalid_request_error``, the type Anthropic
documents for "other 4XX status codes" (https://docs.claude.com/en/api/errors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from starlette.responses import Response

Dialect = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """One kind of error: HTTP status, OpenAI type and code, Anthropic type."""

    status: int
    openai_type: str
    openai_code: str | None
    anthropic_type: str


ERRORS: dict[str, ErrorKind] = {
    "invalid_api_key": ErrorKind(401, "invalid_request_error", "invalid_api_key", "authentication_error"),
    "model_not_allowed": ErrorKind(403, "invalid_request_error", "model_not_allowed", "permission_error"),
    "insufficient_quota": ErrorKind(429, "insufficient_quota", "insufficient_quota", "billing_error"),
    "model_not_found": ErrorKind(404, "invalid_request_error", "model_not_found", "not_found_error"),
    "invalid_request": ErrorKind(400, "invalid_request_error", None, "invalid_request_error"),
    "request_too_large": ErrorKind(413, "invalid_request_error", "request_too_large", "request_too_large"),
    "request_timeout": ErrorKind(408, "invalid_request_error", "request_timeout", "invalid_request_error"),
    "ledger_busy": ErrorKind(503, "server_error", "ledger_busy", "api_error"),
    "upstream_unavailable": ErrorKind(502, "server_error", "upstream_unavailable", "api_error"),
    "upstream_rejected_gateway": ErrorKind(502, "server_error", "upstream_auth_failed", "api_error"),
    "no_upstream": ErrorKind(503, "server_error", "no_upstream", "api_error"),
    "server_error": ErrorKind(500, "server_error", None, "api_error"),
}


def error_body(dialect: Dialect, kind: str, message: str, *, param: str | None = None) -> dict[str, object]:
    """The error object of ``kind`` in ``dialect``'s format."""
    spec = ERRORS[kind]
    if dialect == "anthropic":
        return {"type": "error", "error": {"type": spec.anthropic_type, "message": message}}
    return {"error": {"message": message, "type": spec.openai_type, "param": param, "code": spec.openai_code}}


def error_response(dialect: Dialect, kind: str, message: str, *, param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response carrying ``error_body`` with ``kind``'s status (and ``headers``)."""
    body = json.dumps(error_body(dialect, kind, message, param=param), ensure_ascii=False).encode()
    return Response(body, status_code=ERRORS[kind].status, media_type="application/json", headers=headers)


def stream_error_event(dialect: Dialect, kind: str, message: str) -> bytes:
    """An SSE error event for a stream already under way (the status line has gone)."""
    body = json.dumps(error_body(dialect, kind, message), ensure_ascii=False)
    if dialect == "anthropic":
        return f"event: error\ndata: {body}\n\n".encode()
    return f"data: {body}\n\n".encode()
