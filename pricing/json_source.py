"""Read JSON a user gives us (request files, one-api options, one-api's log columns) within limits.

``json.loads`` recurses once per nesting level: 50,000 nested brackets raise ``RecursionError`` (a
traceback, not an answer), and a file read whole can be as large as a pipe or /dev/zero. ``loads`` first
measures the nesting with one regular-expression pass (strings skipped, so a bracket inside a string does
not count) and refuses more than ``MAX_JSON_DEPTH`` levels with ``JsonLimitError``, a
``json.JSONDecodeError`` carrying the line and column, so every caller's handler of bad JSON handles it.
``read_json_file`` never reads more than ``MAX_JSON_BYTES``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

#: Deepest nesting of arrays and objects. A request's tool schemas may nest 64 levels
#: (metering.openai_prompt.MAX_SCHEMA_DEPTH), two JSON levels each, under the body's own few; json.loads
#: would exhaust Python's stack near 1,000.
MAX_JSON_DEPTH = 256
#: Largest JSON file read: the relay's limit for a request body (gateway.relay.MAX_BODY_BYTES, images in
#: base64 make big bodies); one-api options are a few hundred KB.
MAX_JSON_BYTES = 32 * 1024 * 1024

# A string (skipped whole, escapes included) or one bracket; everything else is passed over by the search.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class JsonLimitError(json.JSONDecodeError):
    """JSON beyond one of this module's limits (``msg`` says which; ``lineno``/``colno`` where)."""


def check_depth(text: str) -> None:
    """Refuse ``text`` with ``JsonLimitError`` if its arrays and objects nest deeper than ``MAX_JSON_DEPTH``."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise JsonLimitError(f"nested deeper than {MAX_JSON_DEPTH} levels", text, match.start())
        elif bracket in "]}":
            depth -= 1  # unbalanced text is json.loads's to report


def loads(text: str | bytes, **options: Any) -> Any:
    """``json.loads(text, **options)`` once ``text`` is known to nest no deeper than ``MAX_JSON_DEPTH``."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")  # a UnicodeDecodeError is a ValueError, like bad JSON
    check_depth(text)
    return json.loads(text, **options)


def read_json_file(path: str | os.PathLike[str]) -> str:
    """The text of a JSON file (``-``: standard input), never reading more than ``MAX_JSON_BYTES``.

    ``OSError`` or ``UnicodeDecodeError`` when it cannot be read; ``JsonLimitError`` when it is too large.
    """
    if str(path) == "-":
        data = sys.stdin.buffer.read(MAX_JSON_BYTES + 1)
    else:
        with open(path, "rb") as file:
            data = file.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise JsonLimitError(f"larger than {MAX_JSON_BYTES:,} bytes", "", 0)
    return data.decode("utf-8")


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "JsonLimitError", "check_depth", "loads", "read_json_file"]
