"""Relay body bench: the relay's peak memory for a huge chunked request body, next to small requests.

Three processes, as in bench/bench_relay.py: the fake upstream, the relay (gateway.create_app over a
SQLite ledger, uvicorn, spawned) and this client. The relay's peak resident memory is read from
/proc/<pid>/status (VmHWM, the high-water mark of its RSS; Linux only):

1. baseline: small requests through the relay (authenticated, held, forwarded, settled: every import,
   token encoding and statement is warm), then VmHWM;
2. chunked bodies (no Content-Length) made on the fly, 256 KiB at a time, never held by the client: a
   JSON-looking request whose one string never ends. The relay must answer 413 as soon as the body passes
   its ``max_body_bytes`` and read no more; VmHWM after each, the time to the 413 and the bytes the client
   got out before it. A full run sends 64 MB and then 1.5 GB: the peak must not depend on the size;
3. a body declaring a 1.5 GB Content-Length: 413 before a byte of it is read.

``--quick`` (run by tests/test_redteam_relay.py): 64 MB against a relay limited to 1 MiB; exits 1 unless
the 413 comes within 5 s and the relay's peak grew by less than ``QUICK_RSS_BOUND``. The LAST line of
stdout is one JSON object.

    .venv/bin/python bench/bench_relay_body.py [--quick] [--json-only]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

import httpx2
from bench_relay import KINDS, UPSTREAM_KEY, _serve, _serve_upstream, _start

MB, MIB = 1000 * 1000, 1024 * 1024
#: Full run: the issue's 1.5 GB body, after a 64 MB one, against the relay's default limit.
FULL_BODIES = (64 * MB, 1500 * MB)
QUICK_BODY, QUICK_LIMIT = 64 * MB, 1 * MIB
#: --quick fails past this growth of the relay's peak RSS (a relay buffering the body would pass 64 MB).
QUICK_RSS_BOUND = 16 * MIB
QUICK_SECONDS = 5.0
PIECE = 256 * 1024
#: Small requests before the baseline is read (the relay warm, as in production).
WARM_REQUESTS = 30
HEAD = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "'


def _serve_relay(port_out: Any, db: str, upstream_url: str, limit: int | None) -> None:
    import uvicorn

    from gateway import GatewayConfig, Upstream, create_app
    from metering.ledger import Meter

    limits = {} if limit is None else {"max_body_bytes": limit}
    config = GatewayConfig(upstreams=(
        Upstream(provider="openai", channel="openai-bench", base_url=upstream_url, api_key=UPSTREAM_KEY),
        Upstream(provider="anthropic", channel="anthropic-bench", base_url=upstream_url, api_key=UPSTREAM_KEY),
    ), **limits)
    _serve(uvicorn, create_app(Meter.open(db), config), port_out)


def _status(pid: int | str) -> dict[str, int]:
    """VmHWM and VmRSS of a process, in bytes."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            figures[name] = int(value.split()[0]) * 1024  # kB
    return figures


def _body(total: int, sent: list[int]) -> Iterator[bytes]:
    """``total`` bytes of a request body, made as they are sent (one 256 KiB block, yielded again and again)."""
    sent[0] = len(HEAD)
    yield HEAD
    block = b"a" * PIECE
    while sent[0] < total:
        sent[0] += PIECE
        yield block


def _send(client: httpx2.Client, url: str, headers: dict[str, str], total: int, pid: int, kind: str) -> dict[str, Any]:
    sent = [0]
    started = time.perf_counter()
    if kind == "chunked":
        answer = client.post(url, content=_body(total, sent), headers=headers)
        status, text = answer.status_code, answer.text
    else:  # the size announced, no byte of the body sent: the relay must not wait for it
        status, text = _declared(url, headers, total)
    seconds = time.perf_counter() - started
    return {"kind": kind, "body_bytes": total, "status": status, "seconds": round(seconds, 3),
            "client_sent_bytes": sent[0], "answer": text[:200], "relay": _status(pid)}


def _declared(url: str, headers: dict[str, str], total: int) -> tuple[int, str]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        connection.putrequest("POST", parts.path)
        for name, value in {**headers, "content-length": str(total)}.items():
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_BODY // MB} MB against a {QUICK_LIMIT // MIB} MiB limit.")
    parser.add_argument("--json-only", action="store_true", help="Print only the JSON line.")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json_only else print
    if not Path("/proc/self/status").exists():
        raise SystemExit("needs Linux /proc (VmHWM)")

    from metering.ledger import Meter

    limit = QUICK_LIMIT if args.quick else None
    sizes = (QUICK_BODY,) if args.quick else FULL_BODIES
    workdir = tempfile.mkdtemp(prefix="bench-relay-body-")
    db = f"sqlite:///{workdir}/ledger.db"
    meter = Meter.open(db)
    user_id = meter.create_user(f"bench-{os.getpid()}")
    meter.adjust(user_id, 10**15, f"bench-{user_id}", "relay body bench credit")
    key = meter.create_key(user_id, "bench")
    meter.close()

    upstream, upstream_url = _start(_serve_upstream)
    relay, relay_url = _start(_serve_relay, db, upstream_url, limit)
    assert relay.pid is not None
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    path, small = KINDS["openai"]
    rows: list[dict[str, Any]] = []
    try:
        with httpx2.Client(timeout=120) as client:
            for _ in range(WARM_REQUESTS):
                answer = client.post(relay_url + path, json=small, headers=headers)
                if answer.status_code != 200:
                    raise SystemExit(f"small request: HTTP {answer.status_code} {answer.text[:200]}")
            baseline = _status(relay.pid)
            for total in sizes:
                rows.append(_send(client, relay_url + path, headers, total, relay.pid, "chunked"))
            rows.append(_send(client, relay_url + path, headers, sizes[-1], relay.pid, "declared"))
            after = client.post(relay_url + path, json=small, headers=headers).status_code  # still serving
    finally:
        relay.terminate()
        upstream.terminate()
        relay.join(10)
        upstream.join(10)
        shutil.rmtree(workdir, ignore_errors=True)
    client_peak = _status("self")["VmHWM"]

    say(f"relay limit {limit or 'default'} bytes; baseline after {WARM_REQUESTS} small requests: "
        f"peak RSS {baseline['VmHWM'] / MIB:.1f} MiB")
    ok = after == 200
    for row in rows:
        row["peak_rss_bytes"] = row["relay"]["VmHWM"]
        row["peak_rss_growth_bytes"] = row["relay"]["VmHWM"] - baseline["VmHWM"]
        ok = ok and row["status"] == 413
        say(f"{row['kind']:8s} {row['body_bytes'] / MB:8.0f} MB: HTTP {row['status']} in {row['seconds']:6.3f} s, "
            f"client got out {row['client_sent_bytes'] / MIB:7.1f} MiB, relay peak RSS {row['peak_rss_bytes'] / MIB:7.1f} MiB "
            f"(+{row['peak_rss_growth_bytes'] / MIB:.1f} MiB)")
    if args.quick:
        [big] = [r for r in rows if r["kind"] == "chunked"]
        ok = ok and big["seconds"] < QUICK_SECONDS and big["peak_rss_growth_bytes"] < QUICK_RSS_BOUND
    say(f"client peak RSS {client_peak / MIB:.1f} MiB (the body is never held); {'ok' if ok else 'FAILED'}")
    print(json.dumps({
        "bench": "relay_body", "at": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
        "max_body_bytes": limit, "baseline": baseline, "bodies": rows, "client_peak_rss_bytes": client_peak,
        "rss_bound_bytes": QUICK_RSS_BOUND if args.quick else None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()[0]},
        "ok": ok,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
