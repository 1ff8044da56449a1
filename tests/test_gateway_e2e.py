"""End to end: the official openai and anthropic SDKs, through the relay, to a local fake upstream.

Every charge is checked against what the fake upstream REPORTED (its ``reported`` list), priced by the
official list prices written out here, not by the code under test:

* gpt-4o: $2.50 input, $10.00 output per 1M tokens (https://openai.com/api/pricing/, the price table's
  gpt-4o version of 2024-10-02);
* claude-sonnet-4: $3.00 input, $15.00 output per 1M tokens (https://docs.anthropic.com/en/docs/about-claude/pricing).

quota = ceil(USD x 500,000) per request (docs/price-table.md, "Rounding"; group default, multiplier 1).
Balances, usage events and the usage export must all agree with those figures, to the unit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the [gateway] extra is not installed")
anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

import httpx2  # noqa: E402
from sqlalchemy import select  # noqa: E402

from gateway import GatewayConfig, Upstream, create_app  # noqa: E402
from metering.completion import count_generated  # noqa: E402
from metering.ledger import Meter  # noqa: E402
from metering.ledger.tables import Hold, UsageEvent  # noqa: E402
from metering.models import resolve_model  # noqa: E402
from tests.databases import BACKENDS, fresh_database  # noqa: E402
from tests.fake_upstream import DEFAULT_KEY, SENTENCES, FakeUpstream, fake_upstream  # noqa: E402
from tests.servers import closed_port, serve  # noqa: E402
from workers.calendar import BusinessCalendar  # noqa: E402
from workers.export.exporter import export  # noqa: E402

#: Official list prices, USD per 1M tokens (sources in the module docstring).
LIST_PRICES = {"gpt-4o": (Fraction("2.50"), Fraction("10.00")), "claude-sonnet-4": (Fraction("3.00"), Fraction("15.00"))}
UNITS_PER_USD = 500_000
#: 100 CNY at the 1 RMB = $1 promotion: $100 of list price = 50,000,000 units (data/price_table.yaml, recharge).
TOPUP_CNY, TOPUP_UNITS = "100", 50_000_000
CALENDAR = BusinessCalendar("Asia/Shanghai")
EVENTS, HOLDS = UsageEvent.__table__, Hold.__table__  # type: ignore[attr-defined]
MESSAGES = [{"role": "user", "content": "Tell me about the sea in three sentences."}]


def expected_quota(model: str, input_tokens: int, output_tokens: int) -> int:
    """The charge of one request from the official prices (not from the code under test)."""
    price_in, price_out = LIST_PRICES[model]
    usd = (input_tokens * price_in + output_tokens * price_out) / 1_000_000
    return math.ceil(usd * UNITS_PER_USD)


@dataclass
class Stack:
    """A ledger, a fake upstream and the relay in front of it, with one funded customer."""

    meter: Meter
    upstream: FakeUpstream
    url: str
    user_id: int
    key: str

    def openai(self, key: str | None = None, **options: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, **options)

    def anthropic(self, key: str | None = None, **options: Any) -> Any:
        return anthropic.Anthropic(base_url=self.url, api_key=key or self.key, max_retries=0, **options)

    def events(self) -> list[dict[str, Any]]:
        with self.meter.engine.connect() as connection:
            return [dict(r) for r in connection.execute(select(EVENTS).order_by(EVENTS.c.id)).mappings()]

    def open_holds(self) -> int:
        with self.meter.engine.connect() as connection:
            return len(connection.execute(select(HOLDS.c.id).where(HOLDS.c.status == "open")).all())

    def wait_settled(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The usage events once ``count`` exist (a stream is settled just after its last byte)."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if len(events) >= count and self.open_holds() == 0:
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(events)} events and {self.open_holds()} open holds after {timeout} s")
            time.sleep(0.01)


def _config(upstream_url: str, *, backup: str | None = None, read_timeout: float = 30.0) -> GatewayConfig:
    return GatewayConfig(
        upstreams=(
            Upstream(provider="openai", channel="openai-main", base_url=upstream_url, backup_url=backup, api_key=DEFAULT_KEY),
            Upstream(provider="anthropic", channel="anthropic-main", base_url=upstream_url, backup_url=backup,
                     api_key=DEFAULT_KEY),
        ),
        connect_timeout_seconds=2.0,
        read_timeout_seconds=read_timeout,
    )


def _funded(meter: Meter, name: str = "alice") -> tuple[int, str]:
    user_id = meter.create_user(name)
    meter.topup(user_id, TOPUP_CNY, "CNY", reference=f"order-{name}")
    return user_id, meter.create_key(user_id, "app")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    user_id, key = _funded(meter)
    with fake_upstream() as upstream, serve(create_app(meter, _config(upstream.base_url)), name="relay") as url:
        yield Stack(meter, upstream, url, user_id, key)
    meter.close()


def _check_charges(stack: Stack, reported: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
    """Each event carries the upstream's figures and the official price; returns the total charged."""
    assert len(events) == len(reported)
    total = 0
    for event, seen in zip(events, reported, strict=True):
        input_tokens = seen["prompt_tokens"] if seen["provider"] == "openai" else seen["input_tokens"]
        output_tokens = seen["completion_tokens"] if seen["provider"] == "openai" else seen["output_tokens"]
        assert (event["input_tokens"], event["output_tokens"]) == (input_tokens, output_tokens)
        assert event["source"] == "upstream" and event["outcome"] == "completed"
        assert event["quota"] == expected_quota(event["model"], input_tokens, output_tokens)
        total += event["quota"]
    return total


# ---------------------------------------------------------------------------------------------- happy paths


def test_sdk_requests_of_both_providers_are_charged_exactly_what_the_upstream_reported(stack: Stack, tmp_path: Path) -> None:
    oa, an = stack.openai(), stack.anthropic()
    reply = oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 0
    streamed = [c for c in oa.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                     stream_options={"include_usage": True})]
    assert streamed[-1].choices == [] and streamed[-1].usage is not None  # the client asked: it gets the usage
    message = an.messages.create(model="claude-sonnet-4", max_tokens=300, messages=MESSAGES)
    assert message.content[0].text and message.usage.output_tokens > 0
    with an.messages.stream(model="claude-sonnet-4", max_tokens=300, messages=MESSAGES) as events:
        final = events.get_final_message()
    assert final.usage.output_tokens > 0

    events = stack.wait_settled(4)
    reported = stack.upstream.wait_reported(4)
    charged = _check_charges(stack, reported, events)
    assert [e["channel"] for e in events] == ["openai-main", "openai-main", "anthropic-main", "anthropic-main"]
    assert stack.meter.balance(stack.user_id) == TOPUP_UNITS - charged
    assert stack.meter.audit().ok

    # The usage export of the day carries the same rows and the same quota, to the unit.
    day = CALENDAR.day_of(datetime.now(timezone.utc))
    out = tmp_path / "usage.csv"
    export(stack.meter.engine, "usage", day, day, out, calendar=CALENDAR)
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8-sig"))))
    assert sorted(r["request_id"] for r in rows) == sorted(e["request_id"] for e in events)
    assert sum(int(r["quota"]) for r in rows) == charged


def test_the_usage_chunk_the_relay_asked_for_is_hidden_from_a_client_that_did_not(stack: Stack) -> None:
    chunks = list(stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert chunks and all(c.choices for c in chunks)  # no usage-only chunk reached the client
    assert all(c.usage is None for c in chunks)
    sent = stack.upstream.requests[-1].json
    assert sent["stream_options"] == {"include_usage": True}  # ... but the upstream was asked for it
    [event] = stack.wait_settled(1)
    [seen] = stack.upstream.wait_reported(1)
    assert event["source"] == "upstream"  # billed from the upstream's figure, not a local estimate
    assert (event["input_tokens"], event["output_tokens"]) == (seen["prompt_tokens"], seen["completion_tokens"])


def test_the_client_key_never_reaches_the_upstream(stack: Stack) -> None:
    stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stack.anthropic().messages.create(model="claude-sonnet-4", max_tokens=50, messages=MESSAGES)
    for request in stack.upstream.requests:
        assert stack.key not in json.dumps(request.headers)
    assert stack.upstream.requests[0].headers["authorization"] == f"Bearer {DEFAULT_KEY}"
    assert stack.upstream.requests[1].headers["x-api-key"] == DEFAULT_KEY


def test_a_tool_call_stream_is_charged_for_its_arguments(stack: Stack) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = list(stack.openai().chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=tools, stream=True))
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    events = stack.wait_settled(1)
    _check_charges(stack, stack.upstream.wait_reported(1), events)


# ---------------------------------------------------------------------------------------------- errors


def test_errors_come_in_each_providers_format_and_leave_nothing_held(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as bad_key:
        stack.openai(key="sk-mtr-not-a-key").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert bad_key.value.status_code == 401 and bad_key.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as bad_key_claude:
        stack.anthropic(key="sk-mtr-not-a-key").messages.create(model="claude-sonnet-4", max_tokens=10, messages=MESSAGES)
    assert bad_key_claude.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as unknown:
        stack.openai().chat.completions.create(model="gpt-17-ultra", messages=MESSAGES)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError):
        stack.anthropic().messages.create(model="claude-sonnet-17", max_tokens=10, messages=MESSAGES)
    with pytest.raises(openai.NotFoundError, match="/v1/messages"):  # a Claude model at the OpenAI endpoint
        stack.openai().chat.completions.create(model="claude-sonnet-4", messages=MESSAGES)

    poor_id = stack.meter.create_user("bob")
    stack.meter.adjust(poor_id, 10, "grant-bob", "ten units")
    poor_key = stack.meter.create_key(poor_id, "k")
    with pytest.raises(openai.RateLimitError) as broke:
        stack.openai(key=poor_key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert broke.value.status_code == 429 and broke.value.code == "insufficient_quota"
    assert broke.value.body["type"] == "insufficient_quota"  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError):
        stack.anthropic(key=poor_key).messages.create(model="claude-sonnet-4", max_tokens=10, messages=MESSAGES)

    assert stack.upstream.requests == []  # none of these reached the upstream
    assert stack.events() == [] and stack.open_holds() == 0
    assert stack.meter.balance(stack.user_id) == TOPUP_UNITS and stack.meter.balance(poor_id) == 10
    assert stack.meter.audit().ok


def test_an_upstream_error_is_passed_on_and_the_hold_released(stack: Stack) -> None:
    stack.upstream.behave("status:400", "status:401", "status:529")
    with pytest.raises(openai.BadRequestError):
        stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.InternalServerError) as relay_credential:  # the relay's key, not the client's
        stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert relay_credential.value.status_code == 502
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        stack.anthropic().messages.create(model="claude-sonnet-4", max_tokens=10, messages=MESSAGES)
    assert overloaded.value.status_code == 529
    assert stack.events() == [] and stack.open_holds() == 0
    assert stack.meter.balance(stack.user_id) == TOPUP_UNITS


# ---------------------------------------------------------------------------------------------- streams cut short


def _read_sse(url: str, path: str, key: str, body: dict[str, Any], keep: int) -> bytes:
    """Read ``keep`` SSE events of a streamed request, then hang up (a client that disconnects)."""
    headers = {"authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
    got = b""
    with httpx2.Client(timeout=10) as client, client.stream("POST", url + path, json=body, headers=headers) as response:
        assert response.status_code == 200
        for raw in response.iter_raw():
            got += raw
            if got.count(b"\n\n") >= keep:
                break
    return got


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_client_that_hangs_up_is_charged_for_what_was_delivered(stack: Stack, provider: str) -> None:
    stack.upstream.behave("slow:0.05")  # a delta every 50 ms: the client leaves in the middle
    body: dict[str, Any] = {"model": "gpt-4o" if provider == "openai" else "claude-sonnet-4", "max_tokens": 400,
                            "messages": MESSAGES, "stream": True}
    path = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
    got = _read_sse(stack.url, path, stack.key, body, keep=5)
    [event] = stack.wait_settled(1)
    assert event["outcome"] == "aborted"
    delivered = stack.meter.accumulator(stack.meter.hold(event["request_id"]))
    delivered.feed(got)
    result = delivered.finish()
    # Billed: at least what the client read, at most what the upstream sent before the relay closed the
    # call (chunks in flight in the socket buffers lie in between), and never the whole reply.
    [seen] = stack.upstream.wait_reported(1)
    assert seen["outcome"] == "disconnected"  # the relay hung up on the upstream too: it stopped generating
    sent, _ = count_generated([seen["delivered_text"]], resolve_model(event["model"]))
    full, _ = count_generated([" ".join(SENTENCES)], resolve_model(event["model"]))
    assert result.text and result.usage.output_tokens <= event["output_tokens"] <= sent < full
    assert event["quota"] < stack.meter.hold(event["request_id"]).amount
    assert stack.meter.audit().ok


@pytest.mark.parametrize("mode", ["cut:3", "error_event:3"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_an_upstream_that_breaks_off_is_charged_for_the_delivered_text_never_the_error(
    stack: Stack, provider: str, mode: str
) -> None:
    stack.upstream.behave(mode)
    if provider == "openai":
        received = ""
        with pytest.raises(openai.APIError):
            for chunk in stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
                received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    else:
        received = ""
        with pytest.raises(anthropic.APIError):
            for item in stack.anthropic().messages.create(model="claude-sonnet-4", max_tokens=300, messages=MESSAGES,
                                                          stream=True):
                if item.type == "content_block_delta":
                    received += item.delta.text
    [event] = stack.wait_settled(1)
    [seen] = stack.upstream.wait_reported(1)
    assert received == seen["delivered_text"] and received
    assert event["outcome"] in ("aborted", "error")
    delivered_tokens, _ = count_generated([received], resolve_model(event["model"]))
    assert event["output_tokens"] == delivered_tokens  # the delivered text, and not one token of error text


# ---------------------------------------------------------------------------------------------- backup upstream


@pytest.mark.parametrize("trouble", ["refused", "status:524", "hang:3"])
def test_the_backup_upstream_serves_when_the_main_one_fails(tmp_path: Path, trouble: str) -> None:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    user_id, key = _funded(meter)
    with fake_upstream() as main, fake_upstream() as backup:
        main_url = closed_port() if trouble == "refused" else main.base_url
        if trouble != "refused":
            main.behave(trouble)
        config = _config(main_url, backup=backup.base_url, read_timeout=1.0)
        with serve(create_app(meter, config), name="relay") as url:
            stack = Stack(meter, backup, url, user_id, key)
            reply = stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert reply.choices[0].message.content
            [event] = stack.wait_settled(1)
            assert event["channel"] == "openai-main-backup"
            _check_charges(stack, backup.wait_reported(1), [event])
            assert len(backup.requests) == 1
    meter.close()


def test_both_upstreams_failing_is_a_502_and_the_hold_is_released(tmp_path: Path) -> None:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    user_id, key = _funded(meter)
    with serve(create_app(meter, _config(closed_port(), backup=closed_port())), name="relay") as url:
        stack = Stack(meter, None, url, user_id, key)  # type: ignore[arg-type]
        with pytest.raises(openai.InternalServerError) as failed:
            stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert failed.value.status_code == 502 and failed.value.code == "upstream_unavailable"
        assert stack.events() == [] and stack.open_holds() == 0
        assert meter.balance(user_id) == TOPUP_UNITS
    meter.close()


# ---------------------------------------------------------------------------------------------- balance endpoints


def test_the_balance_endpoints_show_what_is_left_as_chatgpt_next_web_computes_it(stack: Stack) -> None:
    limited = stack.meter.create_key(stack.user_id, "capped", limit_quota=1_000_000)
    for key in (stack.key, limited):
        stack.openai(key=key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stack.wait_settled(2)
    headers = {"authorization": f"Bearer {limited}"}
    for prefix in ("", "/v1"):
        subscription = httpx2.get(f"{stack.url}{prefix}/dashboard/billing/subscription", headers=headers).json()
        usage = httpx2.get(f"{stack.url}{prefix}/dashboard/billing/usage?start_date=2026-11-01&end_date=2026-12-01",
                           headers=headers).json()
        assert subscription["object"] == "billing_subscription" and usage["object"] == "list"
        status = stack.meter.key_usage(limited)
        # The front end's arithmetic: remaining = hard_limit_usd - total_usage / 100.
        remaining_usd = Fraction(str(subscription["hard_limit_usd"])) - Fraction(str(usage["total_usage"])) / 100
        assert remaining_usd == Fraction(status["remaining"], UNITS_PER_USD)
        assert Fraction(str(usage["total_usage"])) == Fraction(status["used"] * 100, UNITS_PER_USD)
        # The capped key: what it spent plus its room is its limit.
        assert Fraction(str(subscription["hard_limit_usd"])) == Fraction(1_000_000, UNITS_PER_USD)
    refused = httpx2.get(f"{stack.url}/dashboard/billing/subscription", headers={"authorization": "Bearer sk-mtr-nope"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------------------------- concurrency, databases


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_sdk_clients_on_each_database_charge_each_request_once(
    backend: str, server_databases: dict[str, Any], tmp_path: Path
) -> None:
    meter = Meter.open(fresh_database(backend, server_databases, tmp_path))
    user_id, key = _funded(meter)
    with fake_upstream() as upstream, serve(create_app(meter, _config(upstream.base_url)), name="relay") as url:
        stack = Stack(meter, upstream, url, user_id, key)
        failures: list[BaseException] = []

        def client(index: int) -> None:
            try:
                for n in range(3):
                    content = [{"role": "user", "content": f"Question {index}-{n}: what is {index} + {n}?"}]
                    if (index + n) % 2:
                        list(stack.openai().chat.completions.create(model="gpt-4o", messages=content, stream=True))
                    else:
                        stack.anthropic().messages.create(model="claude-sonnet-4", max_tokens=200, messages=content)
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        events = stack.wait_settled(18)
        reported = {r["request_id"]: r for r in upstream.wait_reported(18)}
        assert len(events) == 18 == len(reported)
        total = 0
        for event in events:
            assert event["outcome"] == "completed" and event["source"] == "upstream"
            total += event["quota"]
        by_tokens = sorted((r["prompt_tokens"] if r["provider"] == "openai" else r["input_tokens"],
                            r["completion_tokens"] if r["provider"] == "openai" else r["output_tokens"],
                            r["requested_model"]) for r in reported.values())
        assert sorted((e["input_tokens"], e["output_tokens"], e["model"]) for e in events) == by_tokens
        assert total == sum(expected_quota(model, i, o) for i, o, model in by_tokens)
        assert meter.balance(user_id) == TOPUP_UNITS - total
        assert meter.audit().ok
    meter.close()


# ---------------------------------------------------------------------------------------------- the command line


def test_metering_gateway_serve_relays_and_meters(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    db = f"sqlite:///{tmp_path}/ledger.db"
    meter = Meter.open(db)
    user_id, key = _funded(meter)
    with socket.socket() as probe:  # a free port for the command (released just before it binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with fake_upstream() as upstream:
        config = tmp_path / "gateway.yaml"
        config.write_text(f"upstreams:\n  - {{provider: openai, channel: oa, base_url: '{upstream.base_url}', "
                          f"api_key_env: TEST_UPSTREAM_KEY}}\n", encoding="utf-8")
        env = {**os.environ, "TEST_UPSTREAM_KEY": DEFAULT_KEY}
        command = [sys.executable, "-m", "workers", "gateway", "serve", "--config", str(config), "--db", db,
                   "--port", str(port)]
        server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx2.get(url + "/dashboard/billing/usage", timeout=1)
                    break
                except httpx2.HTTPError:
                    assert server.poll() is None, server.stdout.read().decode()  # type: ignore[union-attr]
                    assert time.monotonic() < deadline, "metering gateway serve did not start"
                    time.sleep(0.1)
            stack = Stack(meter, upstream, url, user_id, key)
            stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES)
            events = stack.wait_settled(1)
            assert _check_charges(stack, upstream.wait_reported(1), events) == TOPUP_UNITS - meter.balance(user_id)
        finally:
            server.terminate()
            server.wait(10)
    meter.close()
    bad = subprocess.run([sys.executable, "-m", "workers", "gateway", "serve", "--config", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--config" in bad.stderr


def test_the_model_list_is_the_price_tables_as_the_key_may_use_it(stack: Stack) -> None:
    listed = {m.id: m.owned_by for m in stack.openai().models.list()}
    assert listed["gpt-4o"] == "openai" and listed["claude-sonnet-4"] == "anthropic"
    assert set(listed) >= set(stack.meter.prices.models)  # every model of the table, aliases too
    narrow = stack.meter.create_key(stack.user_id, "mini only", models=["gpt-4o-mini"])
    mini = stack.meter.prices.models["gpt-4o-mini"]
    assert {m.id for m in stack.openai(key=narrow).models.list()} == {mini.name, *mini.aliases}
    with pytest.raises(openai.AuthenticationError):
        stack.openai(key="sk-mtr-nope").models.list()


# ---------------------------------------------------------------------------------------------- invariants


OUTCOMES = ("ok", "ok-stream", "ok-stream-usage", "cut:2", "error_event:1", "status:500", "status:429",
            "prompt_offset:5", "hangup")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.sampled_from(OUTCOMES), st.sampled_from(["openai", "anthropic"])),
                     min_size=1, max_size=6))
def test_any_mix_of_outcomes_charges_each_served_request_once_and_frees_every_hold(
    stack: Stack, plan: list[tuple[str, str]]
) -> None:
    """Whatever happens upstream or at the client: one event per request that got content, none for the
    others, every hold resolved, the balance equal to the top-up minus the events, the audit clean."""
    before = {e["request_id"] for e in stack.events()}
    served = 0
    for outcome, provider in plan:
        model = "gpt-4o" if provider == "openai" else "claude-sonnet-4"
        path = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
        body: dict[str, Any] = {"model": model, "max_tokens": 200, "messages": MESSAGES}
        mode = outcome if ":" in outcome else "ok"
        if outcome.startswith(("ok-stream", "cut", "error_event", "hangup")):
            body["stream"] = True
        if outcome == "ok-stream-usage" and provider == "openai":
            body["stream_options"] = {"include_usage": True}
        if outcome == "hangup":
            mode = "slow:0.02"
        stack.upstream.behave(mode)
        headers = {"authorization": f"Bearer {stack.key}", "anthropic-version": "2023-06-01"}
        if outcome == "hangup":
            _read_sse(stack.url, path, stack.key, body, keep=3)
            served += 1
            continue
        response = httpx2.post(stack.url + path, json=body, headers=headers, timeout=10)
        if outcome.startswith("status:"):
            assert response.status_code == int(outcome[7:])
        else:
            assert response.status_code == 200
            served += 1
    events = [e for e in stack.wait_settled(len(before) + served) if e["request_id"] not in before]
    assert len(events) == served
    for event in events:
        hold = stack.meter.hold(event["request_id"])
        assert event["hold_id"] == hold.id and event["quota"] >= 0
    all_events = stack.events()
    assert stack.meter.balance(stack.user_id) == TOPUP_UNITS - sum(e["quota"] for e in all_events)
    assert len({e["request_id"] for e in all_events}) == len(all_events)
    assert stack.open_holds() == 0
    assert stack.meter.audit().ok


# ---------------------------------------------------------------------------------------------- one-api, then the relay


def test_one_api_keys_keep_working_through_the_relay_after_an_import(tmp_path: Path) -> None:
    """A one-api deployment imported (tests/test_oneapi_import.py's fixture), then the relay put in front: its
    clients keep their keys, with or without ``sk-``, and are charged from one-api's balance onwards."""
    from tests.test_oneapi_import import KEYS, populate, run_import

    source = f"sqlite:///{tmp_path}/one-api.db"
    populate(source, "one-api")
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    run_import(meter, source)
    alice = meter.find_user("alice")
    assert meter.balance(alice) == 5_000_000  # one-api's users.quota for alice, the balance rule
    with fake_upstream() as upstream, serve(create_app(meter, _config(upstream.base_url)), name="relay") as url:
        stack = Stack(meter, upstream, url, alice, f"sk-{KEYS['A']}")
        stack.openai().chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stack.openai(key=KEYS["A"]).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # the bare key
        with pytest.raises(openai.AuthenticationError):  # token 2 was disabled in one-api: revoked here
            stack.openai(key=f"sk-{KEYS['B']}").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        imported = {e["request_id"] for e in stack.events() if e["request_id"].startswith("oneapi:")}
        relayed = [e for e in stack.wait_settled(len(imported) + 2) if e["request_id"] not in imported]
        charged = _check_charges(stack, upstream.wait_reported(2), relayed)
        assert meter.balance(alice) == 5_000_000 - charged
        capped = httpx2.get(f"{url}/dashboard/billing/subscription", headers={"authorization": f"Bearer {KEYS['C']}"})
        usage = httpx2.get(f"{url}/dashboard/billing/usage", headers={"authorization": f"Bearer {KEYS['C']}"})
        left = Fraction(str(capped.json()["hard_limit_usd"])) - Fraction(str(usage.json()["total_usage"])) / 100
        assert left == Fraction(100_000, UNITS_PER_USD)  # the capped token's remain_quota in one-api
        assert meter.audit().ok
    meter.close()
