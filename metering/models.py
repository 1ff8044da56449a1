"""Resolve a model name as a gateway receives it to its canonical entry in the model table."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

from metering.errors import UnknownModel
from metering.model_table import ALIASES, MODELS, PROVIDER_PREFIXES, SNAPSHOT_SUFFIXES, ModelSpec


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A requested model name, the canonical model it resolves to, and how to count it."""

    requested: str
    canonical: str
    spec: ModelSpec

    @property
    def provider(self) -> str:
        """``openai`` or ``anthropic``."""
        return self.spec.provider


def _lookup(name: str) -> str | None:
    if name in MODELS:
        return name
    return ALIASES.get(name)


@lru_cache(maxsize=1024)
def resolve_model(model: str) -> ResolvedModel:
    """Resolve ``model`` (aliases, provider prefixes, dated snapshots) or raise ``UnknownModel``."""
    if not isinstance(model, str) or not model.strip():
        raise UnknownModel(str(model))
    name = model.strip().lower()
    for prefix in PROVIDER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    canonical = _lookup(name)
    while canonical is None:
        for suffix in SNAPSHOT_SUFFIXES:
            stripped = suffix.sub("", name)
            if stripped != name:
                name = stripped
                break
        else:
            known = list(MODELS) + list(ALIASES)
            raise UnknownModel(model, difflib.get_close_matches(name, known, n=3, cutoff=0.6))
        canonical = _lookup(name)
    return ResolvedModel(requested=model, canonical=canonical, spec=MODELS[canonical])


def known_models() -> list[str]:
    """Every canonical model name in the table, sorted."""
    return sorted(MODELS)
