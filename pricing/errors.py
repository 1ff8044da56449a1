"""Typed errors shared by every package (pricing is the bottom layer, so they live here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class BillingError(Exception):
    """Root of every error llm-metering raises on purpose."""


class UnknownModel(BillingError, KeyError):
    """A model name that is not in the table; never silently priced or counted with a default."""

    def __init__(self, model: str, suggestions: Sequence[str] = ()) -> None:
        self.model = model
        self.suggestions = list(suggestions)
        hint = f" (did you mean {', '.join(self.suggestions)}?)" if self.suggestions else ""
        super().__init__(f"unknown model {model!r}{hint}")

    def __str__(self) -> str:  # KeyError would quote the whole message again
        return self.args[0]


class FieldError(BillingError, ValueError):
    """A value handed to the billing core that is wrong; ``field`` names it (``usage.prompt_tokens``, ``at``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple[object, ...]:  # picklable across processes, like the ledger's errors
        return (type(self), (self.field, self.reason))


class PriceNotFound(BillingError, LookupError):
    """A known model with no price version in force at the event time (or no such group/rate)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a price table: where (file, line, field) and what."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}"


class PriceTableError(BillingError, ValueError):
    """A price table that failed validation; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))
