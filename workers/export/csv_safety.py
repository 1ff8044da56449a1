"""Formula-injection neutralization for CSV cells (OWASP's "CSV Injection" rule).

A spreadsheet evaluates a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula (and tab and
CR are treated the same way by some). Such a cell of a TEXT column is prefixed with a single quote, so
it is shown as text. The fullwidth forms ``＝ ＋ － ＠`` are included: Excel with an East Asian input
method may take them for their ASCII twins, and user names here are often Chinese. Numeric columns are
never passed through this (a negative quota stays a number); the values this project computes (days,
timestamps, counts, decimal amounts) never start with a dangerous character by construction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: The first characters that make a spreadsheet read a cell as a formula.
DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_CLASS = "[" + re.escape("".join(DANGEROUS_FIRST)) + "]"
_DANGEROUS = re.compile(_CLASS).match
#: In a column joined as NUL + cell + NUL + cell ...: a cell that starts dangerously (one C-level search,
#: fast because the pattern starts with a literal), and the place to put its quote.
_FLAGGED = re.compile("\x00" + _CLASS).search
_QUOTE_AT = re.compile("\x00(?=" + _CLASS + ")")


def neutralize(value: str | None) -> str:
    """``value`` safe to open in a spreadsheet: a leading quote when it starts like a formula ("" for None)."""
    if value is None:
        return ""
    return "'" + value if _DANGEROUS(value) else value


def neutralize_column(values: Sequence[str | None]) -> Sequence[str | None]:
    """A whole column at once, returned as is unless a cell needs it (None stays None: an empty cell).

    The column is joined with NULs into one string: one regex search finds whether any cell starts
    dangerously, one substitution quotes them all, one split gives the cells back, with no Python code
    per cell. A column holding None, or a cell holding a NUL itself, takes the cell-by-cell way.
    """
    try:
        joined = "\x00" + "\x00".join(values)  # type: ignore[arg-type]
    except TypeError:  # a None among the cells
        return [None if value is None else neutralize(value) for value in values]
    if not _FLAGGED(joined):
        return values
    if joined.count("\x00") != len(values):
        return [neutralize(value) for value in values]  # type: ignore[arg-type]
    return _QUOTE_AT.sub("\x00'", joined)[1:].split("\x00")
