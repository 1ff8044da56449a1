"""Hide the usage chunk the relay asked an OpenAI upstream for, from a client that did not ask for it.

The relay always sends ``stream_options.include_usage`` upstream: it is the upstream's own figure, billed
exactly. OpenAI then ends the stream with one extra chunk, ``choices: []`` plus ``usage``, that a client
which did not ask for it has never seen and may not expect; that event is dropped from what the client
receives (the accumulator still reads it). Every other byte passes unchanged, in the same chunks, so a
client sees its stream exactly as the upstream framed it.
"""

from __future__ import annotations

import json
import re

#: The end of an SSE event: a blank line, in any of the three line-ending styles the format allows.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def is_usage_only_chunk(event: bytes) -> bool:
    """True for an OpenAI stream event carrying only the usage object (``choices`` empty)."""
    if b'"usage"' not in event or b'"choices"' not in event:
        return False  # the quick path for every content chunk: no parsing
    lines = event.decode("utf-8", "replace").splitlines()
    data = "\n".join(line[5:].removeprefix(" ") for line in lines if line.startswith("data:"))
    try:
        chunk = json.loads(data)
    except ValueError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and chunk.get("usage") is not None


class UsageChunkFilter:
    """Fed the upstream's bytes, returns the bytes to send on: everything but the usage-only event."""

    def __init__(self) -> None:
        self._pending = b""  # the start of an event whose end has not arrived

    def feed(self, chunk: bytes) -> bytes:
        """The complete events of ``pending + chunk`` that the client should get, in order."""
        data = self._pending + chunk
        kept: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(data):
            event = data[start : end.end()]
            if not is_usage_only_chunk(event):
                kept.append(event)
            start = end.end()
        self._pending = data[start:]
        return b"".join(kept)

    def flush(self) -> bytes:
        """What is left when the upstream ends: an unterminated last event, passed on unless it is the usage."""
        rest, self._pending = self._pending, b""
        return b"" if is_usage_only_chunk(rest) else rest
