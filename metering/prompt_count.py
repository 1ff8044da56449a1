"""The result of counting a request's prompt, shared by the OpenAI and Claude counters."""

from __future__ import annotations

import json
from functools import partial
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from metering.count_cache import TokenCountCache
from metering.encodings import get_encoding
from metering.errors import RequestError
from metering.images import ImageCount, image_tokens, size_from_data_url
from metering.model_table import ImageRule
from pricing.usage import UsageSource

#: A text -> token count function bound to one encoding (and maybe a cache).
TextCounter = Callable[[str], int]


def compact_json(value: Any, path: Sequence[str | int] = ()) -> str:
    """The JSON text we count for structured tool input/schemas (Anthropic sends objects, not strings).

    A value JSON cannot write (a set, bytes, a cycle, nesting deeper than the interpreter's stack) is a
    ``RequestError`` naming ``path``: a body decoded from JSON never holds one, a caller's object might.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RequestError(path, f"must be JSON data ({reason})") from None


def text_counter(encoding_name: str, cache: TokenCountCache | None) -> TextCounter:
    """A function counting ordinary text in ``encoding_name``, through ``cache`` when one is given."""
    encoding = get_encoding(encoding_name)
    if cache is None:
        encode = encoding.encode_ordinary
        return lambda text: len(encode(text))
    return partial(cache.count, encoding)


class PromptCount(NamedTuple):
    """Prompt tokens of one request, with the breakdown that adds up to them.

    A NamedTuple rather than a frozen dataclass: it is as immutable, and it is built on every request,
    where a frozen dataclass's per-field ``object.__setattr__`` costs more than the counting overhead.
    """

    model: str
    canonical_model: str
    provider: str
    encoding: str | None  # None for an estimate that is not in any tiktoken encoding (Claude)
    prompt_tokens: int
    source: UsageSource
    message_tokens: tuple[int, ...] = ()
    system_tokens: int = 0  # Anthropic's top-level system prompt (OpenAI's is a message)
    tools_tokens: int = 0
    priming_tokens: int = 0
    images: int = 0
    image_tokens: int = 0
    estimated_images: int = 0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``metering count --json`` payload)."""
        return {
            "model": self.model,
            "canonical_model": self.canonical_model,
            "provider": self.provider,
            "encoding": self.encoding,
            "prompt_tokens": self.prompt_tokens,
            "source": str(self.source),
            "message_tokens": list(self.message_tokens),
            "system_tokens": self.system_tokens,
            "tools_tokens": self.tools_tokens,
            "priming_tokens": self.priming_tokens,
            "images": self.images,
            "image_tokens": self.image_tokens,
            "estimated_images": self.estimated_images,
            "notes": list(self.notes),
        }


class ImageTally:
    """Counts images as a request is walked: how many, their tokens, how many had an unknown size."""

    __slots__ = ("rule", "sizes", "images", "tokens", "estimated")

    def __init__(self, rule: ImageRule, sizes: Mapping[str, tuple[int, int]] | None) -> None:
        self.rule = rule
        self.sizes = sizes or {}
        self.images = 0
        self.tokens = 0
        self.estimated = 0

    def add_url(self, url: Any, detail: str, path: Sequence[str | int]) -> int:
        """Count an image given by URL (``data:`` is read; others need a caller-given size)."""
        if not isinstance(url, str) or not url:
            raise RequestError(path, "image url must be a non-empty string")
        if url.startswith("data:"):
            size: tuple[int, int] | None = size_from_data_url(url, path)
        else:
            size = self.sizes.get(url)
        return self._add(image_tokens(self.rule, size, detail))

    def add_size(self, size: tuple[int, int] | None, detail: str = "auto") -> int:
        """Count an image whose size is already known (or None: unknown)."""
        return self._add(image_tokens(self.rule, size, detail))

    def _add(self, counted: ImageCount) -> int:
        self.images += 1
        self.tokens += counted.tokens
        self.estimated += counted.estimated
        return counted.tokens


def require(
    value: Any,
    kind: type | tuple[type, ...],
    path: Sequence[str | int],
    what: str,
    error: type[RequestError] = RequestError,
) -> Any:
    """Return ``value`` if it is of ``kind``, else raise ``error`` (a ``RequestError``) naming ``path``."""
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "null" if value is None else type(value).__name__
        raise error(path, f"must be {what}, got {got}")
    return value
