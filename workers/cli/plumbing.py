"""What the command line prints: stored text escaped for a terminal, JSON documents, and errors.

Names and other stored text (user and key names, references, quarantine reasons, model and channel names
from imports and price tables) are kept exactly as given, and may hold ESC sequences, CR, BEL, other C0
and C1 controls or bidi overrides that would clear, rewrite or reorder an operator's terminal. Every
table, line and error the command line prints passes such text through ``printable`` (``\\x1b``,
``\\r``, ``\\u202e``: visible, never acted on). ``--json`` output stays exact JSON: ``json_text`` lets
``json.dumps`` escape C0 controls as it always does and writes the few characters it leaves raw (DEL, C1,
bidi controls, line and paragraph separators) as ``\\u`` escapes, which decode to the same text.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

#: Exit code of bad input (a flag, an argument, a file): the command wrote nothing.
EXIT_BAD_INPUT = 2

# What a terminal acts on instead of showing, or what reorders the text after it: C0 controls, DEL, C1
# controls (0x9b is an 8-bit CSI), the bidi marks, embeddings, overrides and isolates, the line and
# paragraph separators, and lone surrogates (which cannot even be encoded for output).
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_RAW_IN_JSON = f"\x7f-\x9f{_BIDI}\u2028\u2029\ud800-\udfff"
_UNSAFE_TEXT = re.compile(f"[\x00-\x1f{_RAW_IN_JSON}]")
_UNSAFE_JSON = re.compile(f"[{_RAW_IN_JSON}]")  # C0 inside strings is json.dumps's own to escape
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

stderr = Console(stderr=True)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(value: object) -> str:
    """``str(value)`` with every terminal control escaped (``\\x1b``, ``\\r``, ``\\u202e``); other text as is."""
    return _UNSAFE_TEXT.sub(_escaped, str(value))


def cell(value: object) -> Text:
    """A table cell: escaped, and a ``Text`` so that rich never reads ``[/]`` in a name as markup."""
    return Text(printable(value))


def json_safe(text: str) -> str:
    """JSON text with the terminal controls ``json.dumps`` leaves raw written as ``\\u`` escapes (the same JSON:
    those characters can only stand inside its strings)."""
    return _UNSAFE_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def json_text(payload: Any) -> str:
    """``payload`` as one line of JSON, non-ASCII kept, terminal controls escaped (``json_safe``)."""
    return json_safe(json.dumps(payload, ensure_ascii=False, default=str))


def emit(payload: Any) -> None:
    """Print ``payload`` as the command's one JSON document."""
    print(json_text(payload))


def print_error(message: str) -> None:
    """``error: message`` on stderr, escaped (the message may quote a name or a file's content)."""
    stderr.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """``error: message`` on stderr and exit 2 (``message`` starts with the field: ``--db: ...``)."""
    print_error(message)
    raise typer.Exit(EXIT_BAD_INPUT)


__all__ = ["EXIT_BAD_INPUT", "cell", "emit", "fail", "json_safe", "json_text", "print_error", "printable"]
