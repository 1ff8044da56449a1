"""A local HTTP server that speaks Anthropic's /v1/messages/count_tokens (a paid API: never called for real)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Given the parsed request body, return (HTTP status, response JSON).
Responder = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]


@contextmanager
def fake_anthropic(responder: Responder) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Serve ``responder`` on 127.0.0.1; yields (base_url, list of recorded requests)."""
    recorded: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            recorded.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            if self.path != "/v1/messages/count_tokens":
                status, payload = 404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}}
            else:
                status, payload = responder(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorded
    finally:
        server.shutdown()
        server.server_close()
