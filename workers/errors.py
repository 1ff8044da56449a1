"""Typed errors of the worker's library functions (exports, reports)."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A bad argument to an export or a report; ``field`` names it (``str(error)`` starts with it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
