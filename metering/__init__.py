"""Metering: token counting, usage normalization and (later) the quota ledger.

The public entry points::

    from metering import count_request, resolve_model, Meter, QuotaExceeded
"""

from metering.count_cache import DEFAULT_CACHE, TokenCountCache
from metering.counting import count_request
from metering.errors import MeteringError, RequestError, TokenCountUnavailable, UnknownModel
from metering.models import ResolvedModel, resolve_model
from metering.prompt_count import PromptCount


def __getattr__(name: str) -> object:
    """The ledger (``Meter``, ``QuotaExceeded``, ...) loads on first use: counting alone needs no database."""
    import metering.ledger as ledger

    if name in ledger.__all__:
        return getattr(ledger, name)
    raise AttributeError(f"module 'metering' has no attribute {name!r}")

__all__ = [
    "DEFAULT_CACHE",
    "MeteringError",
    "PromptCount",
    "RequestError",
    "ResolvedModel",
    "TokenCountCache",
    "TokenCountUnavailable",
    "UnknownModel",
    "count_request",
    "resolve_model",
]
