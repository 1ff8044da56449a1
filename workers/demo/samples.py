"""The embedded demo: count the bundled sample requests and replay the bundled sample streams."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib.resources.abc import Traversable
from typing import Any, TypeVar

from metering.counting import count_request
from metering.streams import StreamAccumulator
from pricing.quote import now, price
from pricing.table import load_price_table

T = TypeVar("T")
#: Wraps an iterable to show progress (rich's ``track`` in the CLI, identity in tests).
Progress = Callable[[Iterable[T], str], Iterable[T]]

#: Streams are replayed in chunks of this many bytes, as a gateway would receive them off the socket.
REPLAY_CHUNK_BYTES = 37


def run_demo(samples: Traversable, progress: Progress) -> dict[str, Any]:
    """Count every sample request, replay every sample stream and price its usage; a JSON-ready summary."""
    table = load_price_table()
    priced_at = now()
    request_files = sorted((f for f in samples.joinpath("requests").iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    prompts = {}
    requests = []
    for file in progress(request_files, "Counting sample requests"):
        result = count_request(json.loads(file.read_text(encoding="utf-8")))
        prompts[file.name] = result
        requests.append({"sample": file.name, **result.to_dict()})
    streams = []
    index = json.loads(samples.joinpath("streams", "index.json").read_text(encoding="utf-8"))
    for entry in progress(index, "Replaying sample streams"):
        accumulator = StreamAccumulator(entry["model"], prompt=prompts.get(entry["request"]))
        data = samples.joinpath("streams", entry["file"]).read_bytes()
        for start in range(0, len(data), REPLAY_CHUNK_BYTES):
            accumulator.feed(data[start : start + REPLAY_CHUNK_BYTES])
        result = accumulator.finish()
        priced = price(table, result.usage, priced_at)
        streams.append({"sample": entry["file"], "model": entry["model"], "status": result.status,
                        "finish_reason": result.finish_reason, "usage": result.usage.to_dict(),
                        "priced": priced.to_dict()})
    return {"requests": requests, "streams": streams}


def run_ledger_demo(samples: Traversable, url: str, progress: Progress) -> dict[str, Any]:
    """The gateway's life on the embedded ledger: credit a user, hold, settle or release each sample, audit."""
    from metering.ledger import Meter

    meter = Meter.open(url)
    try:
        uid = meter.create_user(f"demo-{secrets_suffix()}")
        steps = [
            {"step": "grant signup", "units": meter.grant(uid, "signup")},
            {"step": "top-up 10 CNY (1 CNY = $1 promotion)", "units": meter.topup(uid, "10", "CNY", f"demo-{uid}-order-1")},
        ]
        secret = meter.create_key(uid, "demo key", limit_quota=None)
        index = json.loads(samples.joinpath("streams", "index.json").read_text(encoding="utf-8"))
        for number, entry in enumerate(progress(index, "Holding and settling"), start=1):
            body = json.loads(samples.joinpath("requests", entry["request"]).read_text(encoding="utf-8"))
            hold = meter.authorize(secret, body, f"demo-{uid}-{number}", model=entry["model"])
            accumulator = StreamAccumulator(entry["model"], prompt=count_request(body, entry["model"]))
            accumulator.feed(samples.joinpath("streams", entry["file"]).read_bytes())
            result = accumulator.finish()
            if result.status == "error":  # the upstream failed: the gateway releases, the user pays nothing
                meter.release(hold)
                steps.append({"step": f"{entry['file']}: hold {hold.amount}, released", "units": 0})
            else:
                receipt = meter.settle(hold, stream=result)
                steps.append({"step": f"{entry['file']}: hold {hold.amount}, settled ({result.status})", "units": -receipt.quota})
        report = meter.audit()
        return {"database": url, "user_id": uid, "steps": steps, "balance": meter.balance(uid), "audit_ok": report.ok,
                "violations": [v.detail for v in report.violations]}
    finally:
        meter.close()


def secrets_suffix() -> str:
    """A short random suffix, so the demo can run again on the same database."""
    import secrets

    return secrets.token_hex(3)
