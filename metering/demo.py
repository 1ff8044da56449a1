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
