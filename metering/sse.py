"""A small incremental Server-Sent Events decoder, fed raw upstream bytes in chunks of any size.

Why our own: the gateway meters the bytes it relays, with no HTTP client object around them, and the
SDKs' decoders (``openai._streaming``, ``anthropic._streaming``) are private API that may change under us.

It follows the WHATWG "event stream interpretation" rules:

* the bytes are UTF-8 (a leading BOM is dropped; invalid bytes become U+FFFD, exactly as Python's
  ``errors="replace"`` does, and are counted in ``invalid_bytes``), and a chunk may end in the middle of a
  character or of a line;
* a line ends at ``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r`` at the end of a chunk may be the first half of
  a ``\\r\\n``, so a ``\\n`` at the start of the next chunk is swallowed);
* ``field: value`` (one space after the colon is dropped; a line without a colon is a field with an empty
  value); ``data`` lines are joined with ``\\n``; a line starting with ``:`` is a comment;
* a blank line dispatches the event, unless it has no ``data`` field at all.

One deliberate difference: WHATWG discards an event left unterminated at end of stream, while ``close()``
dispatches it. A cut upstream often stops right after its last ``data:`` line, and those tokens were
generated and delivered, so billing must see them; a half line will usually fail JSON parsing downstream.
"""

from __future__ import annotations

import codecs
import re
import threading
from typing import NamedTuple

_LINE_END = re.compile(r"\r\n|\r|\n")
#: Fields the SSE spec defines that carry nothing we meter (reconnection hints).
_KNOWN_UNUSED_FIELDS = frozenset({"id", "retry"})
#: The decoder whose bytes are being decoded on this thread (the error handler counts into it).
_decoding = threading.local()
_ERRORS = "metering.sse-replace"


def _replace_and_count(error: UnicodeError) -> tuple[str, int]:
    """Python's ``replace`` (one U+FFFD per invalid sequence), counting the invalid bytes on the decoder."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    decoder = getattr(_decoding, "decoder", None)
    if decoder is not None:
        decoder.invalid_bytes += error.end - error.start
    return "\ufffd", error.end


codecs.register_error(_ERRORS, _replace_and_count)


class SSEEvent(NamedTuple):
    """One dispatched event: its ``event:`` name (None when absent) and its joined ``data``."""

    event: str | None
    data: str


class SSEDecoder:
    """Turns byte chunks into ``SSEEvent``s; ``unknown_lines`` counts lines with an unknown field name,
    ``invalid_bytes`` the bytes that were not UTF-8."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_ERRORS)
        self._pending: list[str] = []  # text received after the last complete line, in pieces
        self._skip_lf = False  # the last chunk ended in "\r": a leading "\n" belongs to that line end
        self._at_start = True  # a BOM is only dropped at the very start of the stream
        self._event: str | None = None
        self._data: list[str] = []
        self._has_data = False
        self.unknown_lines = 0
        self.invalid_bytes = 0  # bytes that were not UTF-8

    def _decode(self, chunk: bytes, final: bool = False) -> str:
        _decoding.decoder = self
        try:
            return self._decoder.decode(chunk, final)
        finally:
            _decoding.decoder = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode ``chunk`` and return the events it completes (possibly none)."""
        return self._take(self._decode(chunk))

    def close(self) -> list[SSEEvent]:
        """End of stream: return the events still pending, including an unterminated last one."""
        events = self._take(self._decode(b"", final=True))
        if self._pending:
            line = "".join(self._pending)
            self._pending = []
            self._line(line, events)
        self._dispatch(events)
        return events

    def _take(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        self._pending.append(text)
        if "\r" not in text and "\n" not in text:
            # No line end yet: do not rejoin and rescan the partial line (a long data line fed in small
            # chunks would otherwise cost quadratic time).
            return []
        buffer = "".join(self._pending)
        events: list[SSEEvent] = []
        start = 0
        while (match := _LINE_END.search(buffer, start)) is not None:
            if match.group() == "\r" and match.end() == len(buffer):
                self._skip_lf = True  # the "\n" of a "\r\n" may come in the next chunk
            self._line(buffer[start : match.start()], events)
            start = match.end()
        self._pending = [buffer[start:]] if start < len(buffer) else []
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return  # a comment (servers send them as keep-alives)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name not in _KNOWN_UNUSED_FIELDS:
            self.unknown_lines += 1  # the spec ignores these; we count them as malformed upstream output

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._has_data:
            events.append(SSEEvent(self._event or None, "\n".join(self._data)))
        self._event = None
        self._data = []
        self._has_data = False
