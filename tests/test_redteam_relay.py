"""Hostile clients against the reference relay (issue 13: no request gets past the perimeter).

Every case goes through a real uvicorn server (tests/servers.py) in front of tests/fake_upstream.py, on
SQLite; the cases that touch the ledger (hang-ups, keep-alive) run on PostgreSQL and MariaDB too.

* The key is checked before a byte of the body is read: a bad key is 401, a key with nothing available 429.
* The body is read as a stream: at most ``max_body_bytes`` (413 as soon as it passes, chunked or not, the
  rest never read) within ``body_timeout_seconds`` (408 for a body that stalls or trickles).
* JSON that Python accepts and providers refuse (NaN, Infinity, 1e400, a lone surrogate, bytes that are
  not UTF-8) is a 400 naming the problem: never a 500, never forwarded. A key given twice is forwarded as
  it was billed (its last value).
* Both upstream addresses failing (524, refused, timed out) is the documented 502, the hold released.
* A client that hangs up (sending its body, waiting for the upstream, mid-stream, during a non-streamed
  answer) is one INFO line naming the request, no ERROR and no traceback; the hold is released when the
  upstream had not answered, and once it answered 200 the request is charged the prompt it saw and what was
  delivered.
* A hold is kept alive while the upstream call outlasts the hold's TTL, and no longer.
* bench/bench_relay_body.py --quick: a 64 MB chunked body is refused quickly, the relay's RSS flat.

Figures: the 32 MiB default limit is Anthropic's documented Messages API maximum
(https://docs.claude.com/en/api/errors, "Request size limits"); the error types are each provider's
(gateway/provider_errors.py); a request costs at least one unit (docs/price-table.md, "Rounding": quota is
rounded up).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi", reason="the [gateway] extra is not installed")
anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

import httpx2
from sqlalchemy import select as sql_select

from gateway import GatewayConfig, Upstream, create_app
from gateway.config import DEFAULT_MAX_BODY_BYTES
from gateway.hold_keeper import KEEP_ALIVES_PER_TTL
from metering.ledger import HoldTicket, Meter
from metering.ledger.tables import Hold, UsageEvent
from tests.databases import BACKENDS, fresh_database
from tests.fake_upstream import DEFAULT_KEY, FakeUpstream, fake_upstream
from tests.servers import closed_port, serve

EVENTS, HOLDS = UsageEvent.__table__, Hold.__table__  # type: ignore[attr-defined]
MESSAGES = [{"role": "user", "content": "Tell me about the sea in three sentences."}]
#: 100 CNY at the 1 RMB = $1 promotion: 50,000,000 units (data/price_table.yaml, recharge).
TOPUP_UNITS = 50_000_000
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4"}
REQUEST_ID = re.compile(r"relay-[0-9a-f]{32}")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    """A ledger, a fake upstream and the relay in front of it, with one funded customer."""

    meter: Meter
    upstream: FakeUpstream
    url: str
    user_id: int
    key: str

    def headers(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.key}", "anthropic-version": "2023-06-01", **extra}

    def post(self, dialect: str, body: Any, *, key: str | None = None, timeout: float = 10.0) -> httpx2.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx2.post(self.url + PATHS[dialect], content=content, timeout=timeout,
                           headers=self.headers(key, **{"content-type": "application/json"}))

    def holds(self) -> list[dict[str, Any]]:
        with self.meter.engine.connect() as connection:
            return [dict(r) for r in connection.execute(sql_select(HOLDS).order_by(HOLDS.c.id)).mappings()]

    def events(self) -> list[dict[str, Any]]:
        with self.meter.engine.connect() as connection:
            return [dict(r) for r in connection.execute(sql_select(EVENTS).order_by(EVENTS.c.id)).mappings()]

    def wait_resolved(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The holds once ``count`` exist and none is open (a settle runs just after the last byte)."""
        deadline = time.monotonic() + timeout
        while True:
            holds = self.holds()
            if len(holds) >= count and all(h["status"] != "open" for h in holds):
                return holds
            assert time.monotonic() < deadline, f"holds after {timeout} s: {holds}"
            time.sleep(0.01)


def _body(dialect: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODELS[dialect], "max_tokens": 200, "messages": MESSAGES, **extra}


def _config(upstream_url: str, *, backup: str | None = None, read_timeout: float = 30.0, **limits: Any) -> GatewayConfig:
    return GatewayConfig(
        upstreams=tuple(Upstream(provider=p, channel=f"{p}-main", base_url=upstream_url, backup_url=backup,
                                 api_key=DEFAULT_KEY) for p in ("openai", "anthropic")),
        connect_timeout_seconds=2.0, read_timeout_seconds=read_timeout, **limits,
    )


@contextmanager
def relay(ledger: str, *, meter_class: type[Meter] = Meter, hold_ttl: timedelta | None = None,
          **limits: Any) -> Iterator[Stack]:
    meter = meter_class.open(ledger) if hold_ttl is None else meter_class.open(ledger, hold_ttl=hold_ttl)
    user_id = meter.create_user("alice")
    meter.topup(user_id, "100", "CNY", reference="order-alice")
    key = meter.create_key(user_id, "app")
    try:
        with fake_upstream() as upstream, serve(create_app(meter, _config(upstream.base_url, **limits)), name="relay") as url:
            yield Stack(meter, upstream, url, user_id, key)
    finally:
        meter.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with relay(f"sqlite:///{tmp_path}/ledger.db", max_body_bytes=1024 * 1024, body_timeout_seconds=0.5) as opened:
        yield opened


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for the cases that must leave no trace in it (nothing forwarded, nothing held)."""
    with relay(f"sqlite:///{tmp_path_factory.mktemp('shared')}/ledger.db", max_body_bytes=1024 * 1024) as opened:
        yield opened


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def _openai_error(response: httpx2.Response | http.client.HTTPResponse, body: bytes | None = None) -> dict[str, Any]:
    data = json.loads(body if body is not None else response.read())  # type: ignore[union-attr]
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
    return data["error"]


def _anthropic_error(data: bytes) -> dict[str, Any]:
    parsed = json.loads(data)
    assert parsed["type"] == "error" and set(parsed["error"]) == {"type", "message"}, parsed
    return parsed["error"]


def _connection(url: str, timeout: float = 5.0) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def _headers_only(url: str, path: str, headers: dict[str, str], length: int) -> http.client.HTTPResponse:
    """Send a request's headers announcing ``length`` body bytes, and none of them; the answer."""
    connection = _connection(url)
    connection.putrequest("POST", path)
    for name, value in {**headers, "content-type": "application/json", "content-length": str(length)}.items():
        connection.putheader(name, value)
    connection.endheaders()
    return connection.getresponse()  # a relay waiting for the body would time out here (5 s)


def _no_trouble(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR, no traceback anywhere; no WARNING from the relay's server thread."""
    troubles = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info
                or (r.levelno >= logging.WARNING and (r.threadName or "").startswith("relay"))]
    assert troubles == [], [f"{r.name} {r.levelname}: {r.getMessage()}" for r in troubles]


def _hang_up_line(caplog: pytest.LogCaptureFixture, timeout: float = 5.0) -> logging.LogRecord:
    """The one INFO line of a hang-up (waited for: the relay notices in its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [r for r in caplog.records if "hung up" in r.getMessage()]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    [line] = lines
    assert line.levelno == logging.INFO and line.name.startswith("gateway.") and not line.exc_info
    assert REQUEST_ID.search(line.getMessage())
    return line


# ---------------------------------------------------------------------------------------------- the key first


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_bad_or_missing_key_is_401_before_a_byte_of_the_body_is_read(stack: Stack, dialect: str) -> None:
    for headers in ({"authorization": "Bearer sk-mtr-not-a-key", "anthropic-version": "2023-06-01"},
                    {"x-api-key": "sk-mtr-not-a-key", "anthropic-version": "2023-06-01"}, {}):
        answer = _headers_only(stack.url, PATHS[dialect], headers, length=10_000_000)
        assert answer.status == 401 and answer.getheader("connection") == "close"
        if dialect == "openai":
            assert _openai_error(answer)["code"] == "invalid_api_key"
        else:
            assert _anthropic_error(answer.read())["type"] == "authentication_error"
    assert stack.upstream.requests == [] and stack.holds() == []


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_key_with_nothing_available_is_429_before_the_body_is_read(stack: Stack, dialect: str) -> None:
    broke = stack.meter.create_key(stack.meter.create_user("bob"), "k")  # never topped up: 0 units
    answer = _headers_only(stack.url, PATHS[dialect], stack.headers(broke), length=10_000_000)
    assert answer.status == 429 and answer.getheader("connection") == "close"
    data = answer.read()
    if dialect == "openai":
        error = _openai_error(answer, data)
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    else:
        assert _anthropic_error(data)["type"] == "billing_error"
    capped = stack.meter.create_key(stack.user_id, "one unit", limit_quota=1)
    # A key whose room is one unit still passes the cheap check (a request costs at least one unit)
    # and is refused by authorize, on the worst case of the body.
    refused = stack.post(dialect, _body(dialect), key=capped)
    assert refused.status_code == 429
    assert stack.upstream.requests == [] and stack.holds() == []


# ---------------------------------------------------------------------------------------------- the body's size and time


def _chunked(total: int, sent: list[int], piece: int = 64 * 1024) -> Iterator[bytes]:
    """A JSON-looking body of ``total`` bytes, made as it is sent (never held); counts what was taken."""
    head = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "'
    sent.append(len(head))
    yield head
    block = b"a" * piece
    while sent[0] < total:
        sent[0] += piece
        yield block


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_chunked_body_past_the_limit_is_413_and_the_rest_is_never_read(stack: Stack, dialect: str) -> None:
    total, sent = 64 * 1024 * 1024, [0]
    started = time.perf_counter()
    answer = httpx2.post(stack.url + PATHS[dialect], content=_chunked(total, sent), headers=stack.headers(), timeout=10)
    elapsed = time.perf_counter() - started
    assert answer.status_code == 413 and answer.headers["connection"] == "close"
    if dialect == "openai":
        assert _openai_error(answer, answer.content)["code"] == "request_too_large"
    else:
        assert _anthropic_error(answer.content)["type"] == "request_too_large"
    assert "1048576 bytes" in answer.text
    # The relay stopped at 1 MiB: the client got out what the socket buffers took, not the 64 MiB.
    assert sent[0] < 16 * 1024 * 1024 and elapsed < 2.0, (sent[0], elapsed)
    assert stack.upstream.requests == [] and stack.holds() == []


def test_a_declared_length_past_the_limit_is_413_without_reading(stack: Stack) -> None:
    answer = _headers_only(stack.url, PATHS["openai"], stack.headers(), length=1024 * 1024 * 1024 * 1024)
    assert answer.status == 413 and _openai_error(answer)["code"] == "request_too_large"
    # A body at the limit is read (and here refused for its content, not its size).
    at_limit = stack.post("openai", b" " * (1024 * 1024 - 2) + b"{}")
    assert at_limit.status_code == 400 and "model" in at_limit.text


def test_the_sdks_read_a_413_as_the_providers_own(stack: Stack) -> None:
    big = [{"role": "user", "content": "sea " * 300_000}]  # 1.2 MB of text against the stack's 1 MiB
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model="gpt-4o", messages=big)  # type: ignore[arg-type]
    assert too_large.value.status_code == 413 and too_large.value.code == "request_too_large"
    claude = anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as too_large_claude:
        claude.messages.create(model="claude-sonnet-4", max_tokens=10, messages=big)  # type: ignore[arg-type]
    assert too_large_claude.value.status_code == 413
    assert too_large_claude.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    assert stack.upstream.requests == [] and stack.holds() == []


def test_the_default_limit_is_the_providers_32_mib() -> None:
    assert GatewayConfig(upstreams=()).max_body_bytes == DEFAULT_MAX_BODY_BYTES == 32 * 1024 * 1024


def _slow_client(url: str, path: str, headers: dict[str, str], *, length: int, pause: float,
                 timeout: float = 5.0) -> tuple[int, bytes, float, int]:
    """Send a body of ``length`` one byte every ``pause`` s until an answer arrives: (status, body, seconds, bytes sent)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=timeout)
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "host": parts.netloc, "content-type": "application/json",
                                                 "content-length": str(length)}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
    started, sent = time.perf_counter(), 0
    try:
        while not select.select([sock], [], [], pause)[0]:
            assert time.perf_counter() - started < timeout, "no answer"
            if pause and sent < length - 1:  # never the last byte: the body stays incomplete
                sock.sendall(b" ")
                sent += 1
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, answer.read(), time.perf_counter() - started, sent
    finally:
        sock.close()


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["stalls", "trickles"])
def test_a_body_that_stalls_or_trickles_is_408_after_the_body_timeout(stack: Stack, pause: float) -> None:
    """0.5 s for the whole body (the stack's ``body_timeout_seconds``): a trickle of one byte every 50 ms
    never stalls, and is cut all the same."""
    status, data, seconds, sent = _slow_client(stack.url, PATHS["anthropic"], stack.headers(), length=1000, pause=pause)
    assert status == 408 and _anthropic_error(data)["type"] == "invalid_request_error"
    assert "0.5 s" in _anthropic_error(data)["message"]
    assert 0.5 <= seconds < 2.5
    assert pause == 0 or sent >= 5
    assert stack.upstream.requests == [] and stack.holds() == []


# ---------------------------------------------------------------------------------------------- JSON providers refuse


BAD_BODIES = {
    "nan": (b'{"model": "gpt-4o", "temperature": NaN, "messages": []}', "not a finite number", "temperature"),
    "infinity": (b'{"model": "gpt-4o", "max_tokens": Infinity, "messages": []}', "not a finite number", "max_tokens"),
    "minus-infinity": (b'{"model": "gpt-4o", "top_p": -Infinity, "messages": []}', "not a finite number", "top_p"),
    "overflow": (b'{"model": "gpt-4o", "messages": [], "tools": [{"x": 1e400}]}', "not a finite number", "tools.0.x"),
    # Refused as it is parsed, before the ledger is asked: the ledger would have answered 404 for this model.
    "nan-unknown-model": (b'{"model": "gpt-17-ultra", "temperature": NaN, "messages": []}', "not a finite number",
                          "temperature"),
    "lone-surrogate": (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate",
                       "messages.0.content"),
    "lone-surrogate-model": (b'{"model": "gpt-4o\\udfff", "messages": []}', "surrogate", "model"),
    "surrogate-key": (b'{"model": "gpt-4o", "messages": [], "\\udc00": 1}', "surrogate", None),
    "not-utf8": (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "caf\xe9"}]}', "UTF-8", None),
    "utf16": ('{"model": "gpt-4o", "messages": []}'.encode("utf-16"), "UTF-8", None),
    "not-json": (b'{"model": "gpt-4o", ', "not valid JSON", None),
    "too-deep-for-python": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests too deeply", None),
    "too-deep-for-the-ledger": (b'{"model": "gpt-4o", "messages": [], "metadata": ' + b"[" * 200 + b"]" * 200 + b"}",
                                "deeper than", "metadata"),
    "array": (b"[]", "JSON object", None),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_json_python_accepts_and_providers_refuse_is_a_400_naming_the_problem(
    shared_stack: Stack, logs: pytest.LogCaptureFixture, case: str
) -> None:
    stack, (raw, named, param) = shared_stack, BAD_BODIES[case]
    answer = stack.post("openai", raw)
    assert answer.status_code == 400, answer.text
    error = _openai_error(answer, answer.content)
    assert error["type"] == "invalid_request_error" and named in error["message"], error
    if param is not None:
        assert (error["param"] or "").startswith(param)
    claude = stack.post("anthropic", raw.replace(b"gpt-4o", b"claude-sonnet-4"))
    assert claude.status_code == 400 and named in _anthropic_error(claude.content)["message"]
    assert stack.upstream.requests == [] and stack.holds() == []  # never forwarded, nothing held
    _no_trouble(logs)


def test_a_key_given_twice_is_forwarded_as_billed_its_last_value(stack: Stack) -> None:
    """No provider documents refusing a repeated key, and the relay forwards the object it parsed (not the
    client's bytes): the upstream sees the one value the hold was computed from."""
    raw = (b'{"model": "gpt-4o-mini", "max_tokens": 100000, "model": "gpt-4o", "max_tokens": 50, '
           b'"messages": ' + json.dumps(MESSAGES).encode() + b"}")
    answer = stack.post("openai", raw)
    assert answer.status_code == 200
    [sent] = stack.upstream.requests
    assert sent.json["model"] == "gpt-4o" and sent.json["max_tokens"] == 50 and sent.body.count(b'"max_tokens"') == 1
    [hold] = stack.wait_resolved(1)
    assert (hold["model"], hold["max_output_tokens"], hold["status"]) == ("gpt-4o", 50, "settled")


# ---------------------------------------------------------------------------------------------- both addresses failing


@pytest.mark.parametrize("main,backup", [("status:524", "status:524"), ("refused", "status:524"),
                                         ("status:524", "refused"), ("hang:2", "hang:2"), ("status:524", None)])
def test_both_addresses_failing_is_the_documented_502_and_the_hold_is_released(
    tmp_path: Path, logs: pytest.LogCaptureFixture, main: str, backup: str | None
) -> None:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    user_id = meter.create_user("alice")
    meter.topup(user_id, "100", "CNY", reference="order-alice")
    key = meter.create_key(user_id, "app")
    with fake_upstream() as first, fake_upstream() as second:
        urls: list[str | None] = []
        for address, fake in ((main, first), (backup, second)):
            if address is not None and address != "refused":
                fake.behave(address, address)  # one per dialect
            urls.append(None if address is None else closed_port() if address == "refused" else fake.base_url)
        assert urls[0] is not None
        with serve(create_app(meter, _config(urls[0], backup=urls[1], read_timeout=0.3)), name="relay") as url:
            stack = Stack(meter, first, url, user_id, key)
            for dialect in ("openai", "anthropic"):
                answer = stack.post(dialect, _body(dialect))
                assert answer.status_code == 502, answer.text
                if dialect == "openai":
                    error = _openai_error(answer, answer.content)
                    assert (error["type"], error["code"]) == ("server_error", "upstream_unavailable")
                else:
                    assert _anthropic_error(answer.content)["type"] == "api_error"
                assert "did not answer" in answer.text and "<html" not in answer.text.lower()
            holds = stack.holds()
            assert [h["status"] for h in holds] == ["released", "released"] and stack.events() == []
            assert meter.balance(user_id) == TOPUP_UNITS and meter.audit().ok
    assert not [r for r in logs.records if r.levelno >= logging.ERROR or r.exc_info]
    meter.close()


# ---------------------------------------------------------------------------------------------- hang-ups, on every database


def _hang_up_once_upstream_has_it(stack: Stack, dialect: str, seconds_after: float) -> float:
    """Send a request, and close the connection ``seconds_after`` the upstream got it; when it got it."""
    seen = len(stack.upstream.requests)
    connection = _connection(stack.url)
    connection.request("POST", PATHS[dialect], json.dumps(_body(dialect)), stack.headers())
    deadline = time.monotonic() + 5
    while len(stack.upstream.requests) == seen:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.005)
    forwarded = time.monotonic()
    time.sleep(seconds_after)
    connection.close()
    return forwarded


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_that_hangs_up_is_one_info_line_and_the_ledger_is_right(
    backend: str, server_databases: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with relay(fresh_database(backend, server_databases, tmp_path)) as stack:
        # 1. While sending its body: nothing was held.
        connection = _connection(stack.url)
        connection.putrequest("POST", PATHS["openai"])
        for name, value in {**stack.headers(), "content-length": "5000"}.items():
            connection.putheader(name, value)
        connection.endheaders(b'{"model": "gpt-4o", ')
        time.sleep(0.1)
        connection.close()
        assert "while sending the body" in _hang_up_line(caplog).getMessage()
        _no_trouble(caplog)
        assert stack.holds() == [] and stack.upstream.requests == []
        caplog.clear()

        # 2. While the upstream has not answered yet (its headers): the hold released, the upstream call
        # closed (the fake would answer, and report, after 1 s: it reports nothing).
        stack.upstream.behave("hang:1.0")
        started = _hang_up_once_upstream_has_it(stack, "openai", seconds_after=0.05)
        line = _hang_up_line(caplog).getMessage()
        [hold] = stack.wait_resolved(1)
        assert "upstream had not answered" in line and hold["request_id"] in line and hold["status"] == "released"
        time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))
        assert stack.upstream.reported == [] and stack.events() == []
        _no_trouble(caplog)
        caplog.clear()

        # 3. During a non-streamed answer (the upstream answered 200, sent half of it, then stalls): the upstream
        # saw the prompt, so the prompt is charged (as a cut stream's), none of the output.
        stack.upstream.behave("stall:1.0")
        _hang_up_once_upstream_has_it(stack, "anthropic", seconds_after=0.2)  # its headers came at once
        line = _hang_up_line(caplog).getMessage()
        holds = stack.wait_resolved(2)
        assert "answer was being read" in line and holds[1]["request_id"] in line and holds[1]["status"] == "settled"
        assert [r["outcome"] for r in stack.upstream.wait_reported(1)] == ["disconnected"]
        [event] = stack.events()
        assert (event["request_id"], event["outcome"], event["output_tokens"]) == (holds[1]["request_id"], "aborted", 0)
        assert event["input_tokens"] == holds[1]["prompt_tokens"] > 0
        _no_trouble(caplog)
        caplog.clear()

        # 4. Mid-stream: charged for what was delivered, not for the whole reply.
        stack.upstream.behave("slow:0.05")
        got = b""
        with httpx2.Client(timeout=10) as client, client.stream(
            "POST", stack.url + PATHS["openai"], json=_body("openai", stream=True), headers=stack.headers()
        ) as answer:
            assert answer.status_code == 200
            for raw in answer.iter_raw():
                got += raw
                if got.count(b"\n\n") >= 3:
                    break
        line = _hang_up_line(caplog).getMessage()
        holds = stack.wait_resolved(3)
        assert "mid-stream" in line and "charged for what was delivered" in line and holds[2]["request_id"] in line
        event = stack.events()[1]
        assert event["request_id"] == holds[2]["request_id"] and event["outcome"] == "aborted"
        assert holds[2]["status"] == "settled" and 0 < event["quota"] < holds[2]["amount"]
        assert stack.upstream.wait_reported(2)[1]["outcome"] == "disconnected"  # the upstream stopped generating
        _no_trouble(caplog)
        assert stack.meter.balance(stack.user_id) == TOPUP_UNITS - sum(e["quota"] for e in stack.events())
        assert stack.meter.audit().ok


# ---------------------------------------------------------------------------------------------- keep-alive


class CountingMeter(Meter):
    """A Meter that notes each ``keep_alive`` call (the relay's keep-alive task, seen from the ledger)."""

    calls: list[tuple[float, str]]

    def keep_alive(self, hold: HoldTicket, now: datetime | None = None) -> datetime | None:
        self.calls.append((time.monotonic(), hold.request_id))
        return super().keep_alive(hold, now)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hold_outlives_its_ttl_while_the_upstream_call_is_open_and_no_longer(
    backend: str, server_databases: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hold_ttl 0.75 s; a non-streamed answer that takes 1.6 s to start and a stream that takes 1.6 s (ten
    deltas, 0.16 s apart), while the worker's ``expire_holds`` runs every 50 ms: neither hold expires, and
    both are settled against their hold (no overage). Once done, the keep-alives stop."""
    CountingMeter.calls = []
    ttl = timedelta(seconds=0.75)
    with relay(fresh_database(backend, server_databases, tmp_path), meter_class=CountingMeter, hold_ttl=ttl) as stack:
        stack.upstream.behave("hang:1.6", "slow:0.16")
        expired: list[int] = []
        done = threading.Event()

        def worker() -> None:
            while not done.is_set():
                expired.append(stack.meter.expire_holds())
                time.sleep(0.05)

        sweeper = threading.Thread(target=worker)
        sweeper.start()
        answers: list[Any] = []
        plain = threading.Thread(target=lambda: answers.append(stack.post("openai", _body("openai"))))
        plain.start()
        try:
            deadline = time.monotonic() + 5
            while not stack.upstream.requests:  # the plain request takes the first behaviour
                assert time.monotonic() < deadline
                time.sleep(0.005)
            streamed = stack.post("anthropic", _body("anthropic", stream=True))
            plain.join()
        finally:
            done.set()
            sweeper.join()
        assert streamed.status_code == 200 and answers[0].status_code == 200
        holds = stack.wait_resolved(2)
        assert sum(expired) == 0 and len(expired) > 10
        assert [h["status"] for h in holds] == ["settled", "settled"]
        events = stack.events()
        assert len(events) == 2 and all(0 < e["quota"] <= h["amount"] for e, h in zip(events, holds, strict=True))
        assert stack.meter.balance(stack.user_id) == TOPUP_UNITS - sum(e["quota"] for e in events)
        # Kept alive every third of the TTL, from the hold until the settle (2 TTLs or more): six times or so.
        per_request = {h["request_id"]: [t for t, r in CountingMeter.calls if r == h["request_id"]] for h in holds}
        assert all(len(times) >= 2 * KEEP_ALIVES_PER_TTL - 2 for times in per_request.values()), per_request
        # ... and not after: no call once both were settled, nothing left open to expire.
        seen = len(CountingMeter.calls)
        time.sleep(ttl.total_seconds())
        assert len(CountingMeter.calls) == seen
        assert stack.meter.expire_holds(datetime.now(UTC) + timedelta(days=1)) == 0  # nothing lingers
        assert stack.meter.audit().ok
    _no_trouble(caplog)


def test_keep_alives_stop_when_the_hold_is_released(tmp_path: Path) -> None:
    """An upstream error after a wait longer than the TTL: the hold is released, and the task ends with it."""
    CountingMeter.calls = []
    with relay(f"sqlite:///{tmp_path}/ledger.db", meter_class=CountingMeter, hold_ttl=timedelta(seconds=0.6)) as stack:
        stack.upstream.behave("hang:0.8+status:500")
        assert stack.post("openai", _body("openai")).status_code == 500
        [hold] = stack.wait_resolved(1)
        assert hold["status"] == "released" and len(CountingMeter.calls) >= 2
        seen = len(CountingMeter.calls)
        time.sleep(0.6)
        assert len(CountingMeter.calls) == seen


# ---------------------------------------------------------------------------------------------- the memory bench


def test_the_body_bench_quick_mode_answers_413_quickly_with_a_flat_rss() -> None:
    """bench/bench_relay_body.py --quick: a 64 MB chunked body against a relay limited to 1 MiB, in its
    own process. The bench exits 1 when its own checks fail; the figures are read back here too."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_relay_body.py"), "--quick", "--json-only"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    [big] = [r for r in result["bodies"] if r["kind"] == "chunked"]
    assert big["status"] == 413 and big["body_bytes"] == 64 * 1000 * 1000
    assert big["seconds"] < 5.0 and big["client_sent_bytes"] < 32 * 1024 * 1024
    assert big["peak_rss_growth_bytes"] < result["rss_bound_bytes"]
    assert result["ok"] is True
