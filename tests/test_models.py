"""The model table: names resolve to their family; unknown names are a typed error."""

from __future__ import annotations

import pytest

from metering.encodings import SHIPPED_ENCODINGS
from metering.errors import UnknownModel
from metering.model_table import ALIASES, MODELS
from metering.models import resolve_model

# The table: cl100k_base for the gpt-3.5/gpt-4 generation, o200k_base from gpt-4o on.
CL100K = ["gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-4", "gpt-4-32k", "gpt-4-turbo", "gpt-4-1106-preview",
          "gpt-4-0125-preview", "gpt-4-vision-preview"]
O200K = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.5-preview", "o1", "o3", "o4-mini", "gpt-5",
         "gpt-5-mini", "gpt-5-nano"]


@pytest.mark.parametrize("model", CL100K)
def test_cl100k_family(model: str) -> None:
    assert resolve_model(model).spec.encoding == "cl100k_base"


@pytest.mark.parametrize("model", O200K)
def test_o200k_family(model: str) -> None:
    assert resolve_model(model).spec.encoding == "o200k_base"


@pytest.mark.parametrize(
    ("requested", "canonical"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-32k-0613", "gpt-4-32k"),
        ("gpt-3.5-turbo-1106", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-16k-0613", "gpt-3.5-turbo-16k"),
        ("gpt-3.5-turbo-0301", "gpt-3.5-turbo-0301"),  # its own framing: not folded into the family
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o1-2024-12-17", "o1"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3.5-sonnet", "claude-3-5-sonnet"),
        ("openai/gpt-4o", "gpt-4o"),
        ("anthropic/claude-3-haiku-20240307", "claude-3-haiku"),
        ("GPT-4o", "gpt-4o"),
    ],
)
def test_snapshots_and_aliases_resolve(requested: str, canonical: str) -> None:
    resolved = resolve_model(requested)
    assert resolved.canonical == canonical
    assert resolved.requested == requested


@pytest.mark.parametrize("model", ["gpt-4x", "gpt-6", "llama-3-70b", "", "claude-2", "gpt-4o-2024-08-06-extra"])
def test_unknown_models_are_a_typed_error(model: str) -> None:
    with pytest.raises(UnknownModel) as info:
        resolve_model(model)
    assert info.value.model == model


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModel) as info:
        resolve_model("gpt-4o-minii")
    assert "gpt-4o-mini" in info.value.suggestions


def test_every_table_entry_uses_a_shipped_encoding() -> None:
    for name, spec in MODELS.items():
        assert spec.encoding in SHIPPED_ENCODINGS, name
        assert spec.provider in ("openai", "anthropic"), name
        assert (spec.provider == "anthropic") == (spec.claude_safety_factor is not None), name
    for alias, target in ALIASES.items():
        assert target in MODELS, alias


def test_claude_safety_factors_are_within_the_published_range_or_above() -> None:
    # Published comparisons put Claude 15-45% above o200k/cl100k; a factor below 1.15 would under-reserve.
    for name, spec in MODELS.items():
        if spec.claude_safety_factor is not None:
            assert spec.claude_safety_factor >= 1.15, name
