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

from pricing.errors import FieldError


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


class InvalidUsage(FieldError):
    """Usage that cannot be billed: a figure of the wrong type, negative, absurdly large, or contradicting
    another (reasoning above output, cached above prompt). ``field`` names the figure
    (``usage.prompt_tokens_details.cached_tokens`` for a provider's usage object, ``input_tokens`` for a record)."""


#: The largest count one request can report in any bucket. The largest context windows hold a few
#: million tokens; a figure above ten trillion is a corrupted or hostile payload (an overflowed or
#: uninitialized counter, a timestamp in the wrong field, 2^63), never usage. What a request may be
#: charged is bounded separately (``pricing.quote.MAX_QUOTA``).
MAX_COUNT = 10**13
#: Model names are stored in VARCHAR(190) columns (MariaDB's utf8mb4 index limit).
MAX_MODEL_LENGTH = 190


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
        if not isinstance(self.provider, str) or not 0 < len(self.provider) <= 32:
            raise InvalidUsage("provider", f"must be a provider name, got {_shown(self.provider)}")
        if not isinstance(self.model, str) or not self.model.strip() or len(self.model) > MAX_MODEL_LENGTH:
            raise InvalidUsage("model", f"must be a model name of 1 to {MAX_MODEL_LENGTH} characters, got {_shown(self.model)}")
        if not self.model.isprintable():  # control characters and lone surrogates: no database stores them alike
            raise InvalidUsage("model", f"must be printable text, got {_shown(self.model)}")
        for name in _COUNT_FIELDS:
            _check_count(name, getattr(self, name))
        if self.reasoning_tokens > self.output_tokens:
            raise InvalidUsage(
                "reasoning_tokens",
                f"{self.reasoning_tokens} is part of output_tokens ({self.output_tokens}) and cannot exceed it",
            )
        try:
            object.__setattr__(self, "source", UsageSource(self.source))
        except ValueError:
            raise InvalidUsage("source", f"must be one of upstream, local, estimated; got {_shown(self.source)}") from None
        if not isinstance(self.extra, dict):
            raise InvalidUsage("extra", f"must be a dict, got {type(self.extra).__name__}")

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
        _object(usage, "usage")
        prompt = _int(usage, "prompt_tokens", "input_tokens")
        completion = _int(usage, "completion_tokens", "output_tokens")
        prompt_details = _details(usage, "prompt_tokens_details", "input_tokens_details")
        completion_details = _details(usage, "completion_tokens_details", "output_tokens_details")
        cached = _int(prompt_details, "cached_tokens", prefix=_prefix(usage, "prompt_tokens_details", "input_tokens_details"))
        reasoning = _int(
            completion_details, "reasoning_tokens", prefix=_prefix(usage, "completion_tokens_details", "output_tokens_details")
        )
        if cached > prompt:
            raise InvalidUsage("usage.prompt_tokens_details.cached_tokens", f"{cached} exceeds prompt_tokens ({prompt})")
        if reasoning > completion:
            raise InvalidUsage(
                "usage.completion_tokens_details.reasoning_tokens", f"{reasoning} exceeds completion_tokens ({completion})"
            )
        return cls(
            provider="openai",
            model=model,
            input_tokens=prompt - cached,
            cached_input_tokens=cached,
            output_tokens=completion,
            reasoning_tokens=reasoning,
            **extra_fields,
        )

    @classmethod
    def from_anthropic(cls, model: str, usage: dict[str, Any], **extra_fields: Any) -> "UsageRecord":
        """Map an Anthropic ``usage`` object (Messages API) into disjoint buckets."""
        _object(usage, "usage")
        creation_total = _int(usage, "cache_creation_input_tokens")
        split = _details(usage, "cache_creation")
        write_5m = _int(split, "ephemeral_5m_input_tokens", prefix="usage.cache_creation.")
        write_1h = _int(split, "ephemeral_1h_input_tokens", prefix="usage.cache_creation.")
        if not split:
            write_5m = creation_total  # no split given: the default cache TTL is 5 minutes
        elif write_5m + write_1h != creation_total and creation_total:
            raise InvalidUsage(
                "usage.cache_creation",
                f"the split ({write_5m} + {write_1h}) does not add up to cache_creation_input_tokens ({creation_total})",
            )
        server_tools = _details(usage, "server_tool_use")
        extra_fields.setdefault("web_search_requests", _int(server_tools, "web_search_requests", prefix="usage.server_tool_use."))
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


def _shown(value: Any) -> str:
    """A value for an error message: its repr, cut short (a payload may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_count(field: str, value: Any) -> int:
    """``value`` if it is a count a request can report: an int (not a bool), 0 <= value <= MAX_COUNT."""
    # bool is an int subclass; a True token count is a bug upstream, not a 1. Floats (1.0, NaN) are refused
    # too: a count is never fractional, and a float above 2^53 has already lost digits.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidUsage(field, f"must be an integer, got {type(value).__name__} {_shown(value)}")
    if value < 0:
        raise InvalidUsage(field, f"must not be negative, got {value}")
    if value > MAX_COUNT:
        raise InvalidUsage(field, f"{_shown(value)} is beyond any request (at most {MAX_COUNT:,})")
    return value


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidUsage(field, f"must be an object, got {type(value).__name__}")
    return value


def _details(usage: dict[str, Any], *names: str) -> dict[str, Any]:
    """The first present nested object among ``names``; absent, null or empty is empty."""
    for name in names:
        value = usage.get(name)
        if value is not None and value != {}:
            return _object(value, f"usage.{name}")
    return {}


def _prefix(usage: dict[str, Any], *names: str) -> str:
    """The path prefix of the nested object ``_details`` took (for error messages)."""
    name = next((n for n in names if usage.get(n) is not None and usage.get(n) != {}), names[0])
    return f"usage.{name}."


def _int(obj: dict[str, Any], *names: str, prefix: str = "usage.") -> int:
    """The first present count of ``obj`` among ``names`` (absent or null is 0), checked by ``_check_count``."""
    for name in names:
        value = obj.get(name)
        if value is None:
            continue
        return _check_count(prefix + name, value)
    return 0
