"""Metering: token counting, usage normalization and (later) the quota ledger.

The public entry points::

    from metering import count_request, resolve_model, StreamAccumulator, usage_from_response
"""

from metering.count_cache import DEFAULT_CACHE, TokenCountCache
from metering.counting import count_request
from metering.errors import MeteringError, RequestError, TokenCountUnavailable, UnknownModel
from metering.models import ResolvedModel, resolve_model
from metering.prompt_count import PromptCount

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
