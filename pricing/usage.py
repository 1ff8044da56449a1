"""The normalized usage record: what one request consumed, in disjoint token buckets.

Every input token of a request sits in exactly one of four buckets (``input_tokens``,
``cached_input_tokens``, ``cache_write_5m_tokens``, ``cache_write_1h_tokens``), so a price that
multiplies each bucket by its own rate can never bill a token twice. OpenAI's ``prompt_tokens``
*includes* cached tokens; Anthropic's ``input_tokens`` *excludes* cache reads and writes: the mapping
of both is tabled in docs/usage-record.md and implemented once, in ``from_openai``/``from_anthropic``.
``reasoning_tokens`` is a part of ``output_tokens``, informational, never priced on its own.

This module lives in ``pricing/`` so that pricing can consume the record without importing ``metering/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class UsageSource(StrEnum):
    """Where the figures of a usage record come from, from most to least trustworthy."""

    UPSTREAM = "upstream"  # reported by the provider in its response
    LOCAL = "local"  # counted here, exactly, from what was sent or delivered
    ESTIMATED = "estimated"  # counted here with an approximation (Claude offline, unknown image sizes)

    @staticmethod
    def weakest(*sources: "UsageSource") -> "UsageSource":
        """The least trustworthy of several sources (a record is only as good as its weakest figure)."""
        order = (UsageSource.UPSTREAM, UsageSource.LOCAL, UsageSource.ESTIMATED)
        return max(sources, key=order.index)


class InvalidUsage(ValueError):
    """A usage record whose figures contradict each other (negative, or reasoning above output)."""


_COUNT_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "images",
    "web_search_requests",
)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request's usage in disjoint buckets; see the module docstring for the provider mapping."""

    provider: str
    model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    images: int = 0
    web_search_requests: int = 0
    source: UsageSource = UsageSource.UPSTREAM
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            # bool is an int subclass; a True token count is a bug upstream, not a 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidUsage(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise InvalidUsage(f"{name} must not be negative, got {value}")
        if self.reasoning_tokens > self.output_tokens:
            raise InvalidUsage(
                f"reasoning_tokens ({self.reasoning_tokens}) is part of output_tokens ({self.output_tokens}) "
                "and cannot exceed it"
            )
        object.__setattr__(self, "source", UsageSource(self.source))

    @property
    def total_input_tokens(self) -> int:
        """All input tokens, whatever their rate: OpenAI's ``prompt_tokens``."""
        return self.input_tokens + self.cached_input_tokens + self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def total_tokens(self) -> int:
        """Input plus output (reasoning is inside output)."""
        return self.total_input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the derived totals."""
        data = asdict(self)
        data["source"] = str(self.source)
        data["total_input_tokens"] = self.total_input_tokens
        data["total_tokens"] = self.total_tokens
        return data

    @classmethod
    def from_openai(cls, model: str, usage: dict[str, Any], **extra_fields: Any) -> "UsageRecord":
        """Map an OpenAI ``usage`` object (chat completions or responses API) into disjoint buckets."""
        prompt = _int(usage, "prompt_tokens", "input_tokens")
        completion = _int(usage, "completion_tokens", "output_tokens")
        prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        cached = _int(prompt_details, "cached_tokens")
        if cached > prompt:
            raise InvalidUsage(f"cached_tokens ({cached}) exceeds prompt_tokens ({prompt})")
        return cls(
            provider="openai",
            model=model,
            input_tokens=prompt - cached,
            cached_input_tokens=cached,
            output_tokens=completion,
            reasoning_tokens=_int(completion_details, "reasoning_tokens"),
            **extra_fields,
        )

    @classmethod
    def from_anthropic(cls, model: str, usage: dict[str, Any], **extra_fields: Any) -> "UsageRecord":
        """Map an Anthropic ``usage`` object (Messages API) into disjoint buckets."""
        creation_total = _int(usage, "cache_creation_input_tokens")
        split = usage.get("cache_creation") or {}
        write_5m = _int(split, "ephemeral_5m_input_tokens")
        write_1h = _int(split, "ephemeral_1h_input_tokens")
        if not split:
            write_5m = creation_total  # no split given: the default cache TTL is 5 minutes
        elif write_5m + write_1h != creation_total and creation_total:
            raise InvalidUsage(
                f"cache_creation split ({write_5m} + {write_1h}) does not add up to "
                f"cache_creation_input_tokens ({creation_total})"
            )
        server_tools = usage.get("server_tool_use") or {}
        extra_fields.setdefault("web_search_requests", _int(server_tools, "web_search_requests"))
        return cls(
            provider="anthropic",
            model=model,
            input_tokens=_int(usage, "input_tokens"),
            cached_input_tokens=_int(usage, "cache_read_input_tokens"),
            cache_write_5m_tokens=write_5m,
            cache_write_1h_tokens=write_1h,
            output_tokens=_int(usage, "output_tokens"),
            **extra_fields,
        )


def _int(obj: dict[str, Any], *names: str) -> int:
    """The first present integer field of ``obj`` among ``names`` (absent or null is 0)."""
    for name in names:
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidUsage(f"usage field {name} must be an integer, got {value!r}")
        return value
    return 0
