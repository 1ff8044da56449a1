"""One entry point for prompt counting: picks the counter by the model's provider."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metering.claude_prompt import count_claude_exact, estimate_claude
from metering.count_cache import DEFAULT_CACHE, TokenCountCache
from metering.errors import RequestError, TokenCountUnavailable
from metering.models import resolve_model
from metering.openai_prompt import count_openai_chat
from metering.prompt_count import PromptCount


def count_request(
    body: Any,
    model: str | None = None,
    *,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    cache: TokenCountCache | None = DEFAULT_CACHE,
    anthropic_client: Any = None,
    fallback_to_estimate: bool = True,
) -> PromptCount:
    """Count a request body's prompt tokens; ``model`` defaults to the body's ``model``.

    OpenAI models are counted exactly offline. Claude models are counted exactly through
    ``anthropic_client`` (an ``anthropic.Anthropic``) when given, else estimated offline; if the
    endpoint fails and ``fallback_to_estimate`` is true, the estimate is returned with a note.
    """
    if not isinstance(body, dict):
        raise RequestError((), "the request body must be a JSON object")
    if model is None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(("model",), "is required (in the body, or given explicitly)")
    if not isinstance(model, str):
        raise RequestError(("model",), f"must be a string, got {type(model).__name__}")
    resolved = resolve_model(model)
    try:
        return _count(body, resolved, image_sizes, cache, anthropic_client, fallback_to_estimate)
    except RecursionError:  # a body nested deeper than any walk of it can go: the client's error, typed
        raise RequestError((), "the request body is nested too deeply to count") from None


def _count(
    body: dict[str, Any], resolved: Any, image_sizes: Mapping[str, tuple[int, int]] | None,
    cache: TokenCountCache | None, anthropic_client: Any, fallback_to_estimate: bool,
) -> PromptCount:
    if resolved.provider == "openai":
        return count_openai_chat(body, resolved, image_sizes=image_sizes, cache=cache)
    if anthropic_client is not None:
        try:
            return count_claude_exact(body, resolved, anthropic_client)
        except TokenCountUnavailable as exc:
            if not fallback_to_estimate:
                raise
            estimate = estimate_claude(body, resolved, image_sizes=image_sizes, cache=cache)
            return estimate._replace(notes=(*estimate.notes, f"exact count unavailable: {exc}"))
    return estimate_claude(body, resolved, image_sizes=image_sizes, cache=cache)
