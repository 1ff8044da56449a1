"""Typed errors of the metering package; each names what was wrong and where."""

from __future__ import annotations

from collections.abc import Sequence

from pricing.errors import BillingError, UnknownModel

__all__ = [
    "BillingError",
    "EncodingIntegrityError",
    "MeteringError",
    "RequestError",
    "TokenCountUnavailable",
    "UnknownModel",
    "format_path",
]


class MeteringError(BillingError):
    """Base class of every error the metering package raises on purpose."""


def format_path(path: Sequence[str | int]) -> str:
    """Render a JSON path the way users read it: ``messages[3].content[1].image_url``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "$"


class RequestError(MeteringError, ValueError):
    """A request body that cannot be counted; ``path`` is the JSON path of the fault."""

    def __init__(self, path: Sequence[str | int], message: str) -> None:
        self.path = tuple(path)
        self.reason = message
        super().__init__(f"{format_path(self.path)}: {message}")


class EncodingIntegrityError(MeteringError):
    """A shipped or cached BPE file whose sha256 is not the one tiktoken expects."""


class TokenCountUnavailable(MeteringError):
    """An exact count was asked for, but the provider's counting endpoint failed."""
