"""Relay bench: the latency the metered relay adds per request, next to calling the fake upstream directly.

Three processes: the fake upstream (tests/fake_upstream.py, uvicorn), the relay (gateway.create_app over a
ledger, uvicorn) and this client. The client sends the same requests, alternating one direct to the fake
upstream and one through the relay (ABAB, so drift and noise hit both alike), over keep-alive connections
with httpx2, one request at a time (latency, not throughput). Per kind of request:

* ``openai`` / ``anthropic``: non-streamed chat (gpt-4o, claude-sonnet-4): the time to the whole answer;
* ``openai-stream`` / ``anthropic-stream``: streamed: the time to the first byte of the body and to the end.

Added latency = relay - direct, median over the requests (p90 too); the ratio relay / direct is printed
beside it. Through the relay each request is authenticated, held, forwarded, metered and settled in the
ledger (``--db``, default a new SQLite file); after the run the ledger must hold one charged event per
relayed request and pass ``audit()``. The LAST line of stdout is one JSON object. Exits 1 on a
correctness failure.

    .venv/bin/python bench/bench_relay.py [--requests 300] [--db URL] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

import httpx2

MESSAGES = [{"role": "user", "content": "Tell me about the sea in three sentences."}]
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "openai": ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 200}),
    "openai-stream": ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 200, "stream": True}),
    "anthropic": ("/v1/messages", {"model": "claude-sonnet-4", "messages": MESSAGES, "max_tokens": 200}),
    "anthropic-stream": ("/v1/messages", {"model": "claude-sonnet-4", "messages": MESSAGES, "max_tokens": 200,
                                          "stream": True}),
}
UPSTREAM_KEY = "sk-upstream-bench"


def _serve_upstream(port_out: Any) -> None:
    import uvicorn

    from tests.fake_upstream import FakeUpstream

    _serve(uvicorn, FakeUpstream(api_key=UPSTREAM_KEY).app, port_out)


def _serve_relay(port_out: Any, db: str, upstream_url: str) -> None:
    import uvicorn

    from gateway import GatewayConfig, Upstream, create_app
    from metering.ledger import Meter

    meter = Meter.open(db)
    config = GatewayConfig(upstreams=(
        Upstream(provider="openai", channel="openai-bench", base_url=upstream_url, api_key=UPSTREAM_KEY),
        Upstream(provider="anthropic", channel="anthropic-bench", base_url=upstream_url, api_key=UPSTREAM_KEY),
    ))
    _serve(uvicorn, create_app(meter, config), port_out)


def _serve(uvicorn: Any, app: Any, port_out: Any) -> None:
    import threading

    from tests.servers import serve

    # uvicorn binds its own socket here (given a pre-bound socket it answered 40 ms late: a delayed ACK).
    with serve(app, name="bench") as url:
        port_out.put(url)
        threading.Event().wait()


def _start(target: Callable[..., None], *args: Any) -> tuple[mp.Process, str]:
    context = mp.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=target, args=(ports, *args), daemon=True)
    process.start()
    url = ports.get(timeout=60)
    deadline = time.monotonic() + 60
    while True:  # listening once a request gets any answer
        try:
            httpx2.get(url + "/ready", timeout=1)
            return process, url
        except httpx2.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _one(client: httpx2.Client, url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to the end) of one request."""
    started = time.perf_counter()
    first = None
    with client.stream("POST", url + path, json=body, headers=headers) as response:
        for chunk in response.iter_raw():
            if first is None and chunk:
                first = time.perf_counter()
        if response.status_code != 200:
            raise SystemExit(f"{url}{path}: HTTP {response.status_code}")
    done = time.perf_counter()
    return (first or done) - started, done - started


def _summary(direct: list[float], relay: list[float]) -> dict[str, float]:
    added = [r - d for d, r in zip(direct, relay)]
    ms = 1000.0
    return {
        "direct_median_ms": round(statistics.median(direct) * ms, 3),
        "relay_median_ms": round(statistics.median(relay) * ms, 3),
        "added_median_ms": round(statistics.median(added) * ms, 3),
        "added_p90_ms": round(statistics.quantiles(added, n=10)[-1] * ms, 3),
        "ratio": round(statistics.median(relay) / statistics.median(direct), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="Requests per kind and path (default 300).")
    parser.add_argument("--db", help="Ledger URL for the relay (default: a new SQLite file).")
    parser.add_argument("--json-only", action="store_true", help="Print only the JSON line.")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json_only else print

    from metering.ledger import Meter

    workdir = tempfile.mkdtemp(prefix="bench-relay-")
    db = args.db or f"sqlite:///{workdir}/ledger.db"
    meter = Meter.open(db)
    user_id = meter.create_user(f"bench-{os.getpid()}-{time.time_ns()}")
    meter.adjust(user_id, 10**15, f"bench-{user_id}", "relay bench credit")
    key = meter.create_key(user_id, "bench")

    upstream, upstream_url = _start(_serve_upstream)
    relay, relay_url = _start(_serve_relay, db, upstream_url)
    direct_headers = {"authorization": f"Bearer {UPSTREAM_KEY}", "x-api-key": UPSTREAM_KEY, "anthropic-version": "2023-06-01"}
    relay_headers = {"authorization": f"Bearer {key}", "x-api-key": key, "anthropic-version": "2023-06-01"}
    results: dict[str, Any] = {}
    relayed = 0
    try:
        with httpx2.Client(timeout=30) as to_upstream, httpx2.Client(timeout=30) as to_relay:
            for kind, (path, body) in KINDS.items():
                for _ in range(20):  # warm-up: connections, caches, the ledger's statements
                    _one(to_upstream, upstream_url, path, body, direct_headers)
                    _one(to_relay, relay_url, path, body, relay_headers)
                    relayed += 1
                direct_first, direct_end, relay_first, relay_end = [], [], [], []
                for _ in range(args.requests):
                    first, end = _one(to_upstream, upstream_url, path, body, direct_headers)
                    direct_first.append(first)
                    direct_end.append(end)
                    first, end = _one(to_relay, relay_url, path, body, relay_headers)
                    relay_first.append(first)
                    relay_end.append(end)
                    relayed += 1
                results[kind] = {"total": _summary(direct_end, relay_end)}
                if body.get("stream"):
                    results[kind]["first_byte"] = _summary(direct_first, relay_first)
                figures = results[kind]["total"]
                say(f"{kind:17s} direct {figures['direct_median_ms']:7.2f} ms  relay {figures['relay_median_ms']:7.2f} ms"
                    f"  added {figures['added_median_ms']:6.2f} ms (p90 {figures['added_p90_ms']:6.2f})"
                    f"  ratio {figures['ratio']:.2f}")
                if "first_byte" in results[kind]:
                    fb = results[kind]["first_byte"]
                    say(f"{'  first byte':17s} direct {fb['direct_median_ms']:7.2f} ms  relay {fb['relay_median_ms']:7.2f} ms"
                        f"  added {fb['added_median_ms']:6.2f} ms (p90 {fb['added_p90_ms']:6.2f})")
        # Correctness: one charged event per relayed request. Each is settled just after its last byte went
        # out, so wait for the last ones before stopping the relay.
        deadline = time.monotonic() + 10
        while _charged(meter) < relayed and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        relay.terminate()
        upstream.terminate()
        relay.join(10)
        upstream.join(10)
    charged, audit_ok = _charged(meter), meter.audit().ok
    meter.close()
    ok = charged == relayed and audit_ok
    say(f"ledger: {charged} charged events for {relayed} relayed requests, audit {'ok' if audit_ok else 'FAILED'}")
    print(json.dumps({
        "bench": "relay", "at": datetime.now(UTC).isoformat(timespec="seconds"), "requests_per_kind": args.requests,
        "database": db.split(":", 1)[0], "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                     "load_average": os.getloadavg()[0]},
        "kinds": results, "relayed": relayed, "charged": charged, "audit_ok": audit_ok, "ok": ok,
    }))
    return 0 if ok else 1


def _charged(meter: Any) -> int:
    from sqlalchemy import func, select

    from metering.ledger.tables import UsageEvent

    events = UsageEvent.__table__  # type: ignore[attr-defined]
    with meter.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(events).where(events.c.status == "charged")).scalar_one())


if __name__ == "__main__":
    sys.exit(main())
