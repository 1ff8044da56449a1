"""Load and validate the price table, and compile it for exact, fast integer pricing.

``load_price_table(path)`` validates the whole file (pydantic for each field, then the rules that span
entries) and raises one ``PriceTableError`` listing every problem as ``file:line: field: problem``; a bad
table never half-loads. The result is an immutable ``PriceTable``.

Compiled rates: each price version's prices (USD per 1M tokens, or per item) are scaled by a power of
ten ``scale`` so that they become integers; the exact USD cost of a request is then
``sum(count_i x rate_i) / (scale x 1,000,000)`` with integers only, and the quota one ceiling division.
"""

from __future__ import annotations

import bisect
import difflib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError

from pricing.errors import PriceNotFound, PriceTableError, Problem, UnknownModel
from pricing.schema import Channel, Grant, LongContextTier, PriceTableFile, PriceVersion, RechargeRate, ReferenceRate
from pricing.yaml_source import YamlDocument, YamlLimitError, load_yaml, read_yaml_file

#: Environment variable naming the price table to use instead of the bundled one.
PRICE_TABLE_ENV = "METERING_PRICE_TABLE"
#: Order of the integer rates in a compiled version (and of the counts they multiply).
RATE_FIELDS = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "output", "image", "request", "web_search")
_PER_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class CompiledVersion:
    """A price version with integer rates: ``rates[i]`` USD x scale x 1e6 per unit of ``RATE_FIELDS[i]``."""

    version: PriceVersion
    starts_at: float  # effective_from as a POSIX timestamp
    denominator: int  # scale x 1,000,000: exact USD = sum(count x rate) / denominator
    rates: tuple[int, ...]
    long_context_above: int | None  # more total input tokens than this moves the request to long_rates
    long_rates: tuple[int, ...] | None


class QuotaPlan(NamedTuple):
    """A model's latest version for one group, folded for ``quota()``: ceil(sum(count x rate) / divisor).

    The rates already carry the group multiplier's numerator and units_per_usd, and the divisor its
    denominator (both reduced by their gcd), so a quota is a few integer multiplications and one division.
    """

    starts_at: float
    rates: tuple[int, ...]
    long_context_above: int | None
    long_rates: tuple[int, ...] | None
    divisor: int


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model's compiled versions, oldest first."""

    name: str
    provider: str
    aliases: tuple[str, ...]
    versions: tuple[CompiledVersion, ...]
    starts: tuple[float, ...]

    def version_at(self, at: float) -> CompiledVersion:
        """The version in force at POSIX time ``at``: the latest ``effective_from`` <= ``at``."""
        latest = self.versions[-1]
        if at >= latest.starts_at:  # the common case: an event priced at today's version
            return latest
        index = bisect.bisect_right(self.starts, at) - 1
        if index < 0:
            first = self.versions[0].version.effective_from.isoformat()
            raise PriceNotFound(f"{self.name} has no price before {first}")
        return self.versions[index]


@dataclass(frozen=True, slots=True)
class PriceTable:
    """A validated, compiled price table."""

    source: str
    file: PriceTableFile
    units_per_usd: int
    groups: dict[str, Fraction]
    models: dict[str, ModelEntry]
    names: dict[str, str]  # lower-cased model name or alias -> model name
    fallback_model: str | None
    #: group -> name or alias -> the latest version's quota plan (see ``QuotaPlan``): the hot path.
    quota_plans: dict[str, dict[str, QuotaPlan]]

    def resolve(self, model: str) -> tuple[ModelEntry, bool]:
        """The entry for ``model`` (name or alias, any case) and whether the operator's fallback was used."""
        name = self.names.get(model) or self.names.get(model.strip().lower())
        if name is not None:
            return self.models[name], False
        if self.fallback_model is not None:
            return self.models[self.fallback_model], True
        raise UnknownModel(model, difflib.get_close_matches(model.lower(), list(self.names), n=3, cutoff=0.6))

    def group_multiplier(self, group: str) -> Fraction:
        """The multiplier of ``group``; an unknown group is a ``PriceNotFound``, never a silent 1."""
        try:
            return self.groups[group]
        except KeyError:
            raise PriceNotFound(f"unknown group {group!r} (known: {', '.join(sorted(self.groups))})") from None

    @property
    def recharge_rates(self) -> list[RechargeRate]:
        """Recharge rates as written in the table."""
        return self.file.recharge_rates

    @property
    def reference_rates(self) -> list[ReferenceRate]:
        """Official exchange rates for reference prices."""
        return self.file.reference_rates

    @property
    def grants(self) -> dict[str, Grant]:
        """Grants by kind."""
        return self.file.grants

    @property
    def channels(self) -> dict[str, Channel]:
        """Upstream channels whose cost is configured, by name."""
        return self.file.channels


def default_price_table_path() -> Path:
    """``$METERING_PRICE_TABLE`` if set, else the table bundled with the package (data/price_table.yaml)."""
    override = os.environ.get(PRICE_TABLE_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files("pricing").joinpath("price_table.yaml")))


def load_price_table(path: str | os.PathLike[str] | None = None) -> PriceTable:
    """Load, validate and compile a price table file (default: ``default_price_table_path()``)."""
    file = Path(path) if path is not None else default_price_table_path()
    try:
        text = read_yaml_file(file)
    except (OSError, UnicodeDecodeError) as exc:
        raise PriceTableError([Problem(str(file), None, "(file)", f"cannot read: {exc}")]) from None
    except YamlLimitError as exc:
        raise PriceTableError([Problem(str(file), None, "(file)", str(exc.problem))]) from None
    return parse_price_table(text, str(file))


def parse_price_table(text: str, source: str = "<price table>") -> PriceTable:
    """Validate and compile a price table given as YAML text; ``source`` names it in problems."""
    import yaml

    try:
        document = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PriceTableError([Problem(source, line, "(yaml)", str(getattr(exc, "problem", exc)))]) from None
    problems = [Problem(source, line, _dotted(path), "duplicate key") for path, line in document.duplicates]
    try:
        parsed = PriceTableFile.model_validate(document.data)
    except ValidationError as exc:
        problems += [_problem(source, document, tuple(error["loc"]), error["msg"]) for error in exc.errors()]
        raise PriceTableError(problems) from None
    problems += [_problem(source, document, path, message) for path, message in _cross_checks(parsed)]
    if problems:
        raise PriceTableError(problems)
    return _compile(parsed, source)


def _problem(source: str, document: YamlDocument, path: tuple[str | int, ...], message: str) -> Problem:
    return Problem(source, document.line_of(path), _dotted(path), message)


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _cross_checks(table: PriceTableFile) -> list[tuple[tuple[str | int, ...], str]]:
    """Rules that span entries; each problem as (path, message)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if "default" not in table.groups:
        problems.append((("groups",), "a 'default' group is required"))
    seen: dict[str, str] = {}
    for name, model in table.models.items():
        for key, path in [(name, ("models", name))] + [
            (alias, ("models", name, "aliases", i)) for i, alias in enumerate(model.aliases)
        ]:
            owner = seen.setdefault(key.lower(), name)
            if owner != name or (key != name and key.lower() == name.lower()):
                problems.append((path, f"name {key!r} is already used by model {owner!r}"))
            elif path[-2:-1] == ("aliases",) and [a.lower() for a in model.aliases].count(key.lower()) > 1:
                problems.append((path, f"alias {key!r} is listed twice"))
        for i, (before, after) in enumerate(zip(model.versions, model.versions[1:], strict=False)):
            if after.effective_from <= before.effective_from:
                problems.append(
                    (
                        ("models", name, "versions", i + 1, "effective_from"),
                        f"versions must be in strictly increasing effective_from order: {after.effective_from.isoformat()}"
                        f" is not after {before.effective_from.isoformat()}",
                    )
                )
        for i, version in enumerate(model.versions):
            tier = version.long_context
            if tier is None:
                continue
            for field in ("cached_input", "cache_write_5m", "cache_write_1h"):
                if getattr(version, field) is not None and getattr(tier, field) is None:
                    path = ("models", name, "versions", i, "long_context", field)
                    problems.append((path, f"required: the base version has a {field} price"))
    if table.fallback_model is not None and table.fallback_model not in table.models:
        problems.append((("fallback_model",), f"{table.fallback_model!r} is not a model of this table"))
    for i, rate in enumerate(table.recharge_rates):
        if rate.valid_until is not None and rate.valid_until <= rate.valid_from:
            problems.append((("recharge_rates", i, "valid_until"), "the window ends before it starts"))
        for j, other in enumerate(table.recharge_rates[:i]):
            if other.currency == rate.currency and _overlap(other, rate):
                problems.append(
                    (("recharge_rates", i, "valid_from"), f"overlaps recharge_rates[{j}] ({other.id}) for {rate.currency}")
                )
        if rate.id in [other.id for other in table.recharge_rates[:i]]:
            problems.append((("recharge_rates", i, "id"), f"duplicate id {rate.id!r}"))
    return problems


def _overlap(a: RechargeRate, b: RechargeRate) -> bool:
    a_end = a.valid_until.timestamp() if a.valid_until else float("inf")
    b_end = b.valid_until.timestamp() if b.valid_until else float("inf")
    return a.valid_from.timestamp() < b_end and b.valid_from.timestamp() < a_end


def _scale(prices: Iterable[Decimal]) -> int:
    """The smallest power of ten that makes every price (per 1M, or per item x 1M) an integer."""
    digits = 0
    for price in prices:
        exponent = price.normalize().as_tuple().exponent
        if isinstance(exponent, int) and exponent < 0:
            digits = max(digits, -exponent)
    return 10**digits


def _rates(prices: tuple[Decimal, ...], scale: int) -> tuple[int, ...]:
    rates = tuple(price * scale for price in prices)
    assert all(rate == rate.to_integral_value() for rate in rates)  # guaranteed by _scale
    return tuple(int(rate) for rate in rates)


def _price_row(v: PriceVersion | LongContextTier, base: PriceVersion) -> tuple[Decimal, ...]:
    """Prices in RATE_FIELDS order, per 1M tokens; absent cache prices fall back to the input price."""
    per_item = _PER_MILLION  # per-item prices are per 1 item: x 1M to share the per-1M denominator
    return (
        v.input,
        v.cached_input if v.cached_input is not None else v.input,
        v.cache_write_5m if v.cache_write_5m is not None else v.input,
        v.cache_write_1h if v.cache_write_1h is not None else v.input,
        v.output,
        base.per_image * per_item,
        base.per_request * per_item,
        base.per_web_search * per_item,
    )


def _compile_version(version: PriceVersion) -> CompiledVersion:
    row = _price_row(version, version)
    tier = version.long_context
    long_row = _price_row(tier, version) if tier is not None else None
    scale = _scale(row + (long_row or ()))
    return CompiledVersion(
        version=version,
        starts_at=version.effective_from.timestamp(),
        denominator=scale * _PER_MILLION,
        rates=_rates(row, scale),
        long_context_above=tier.above_input_tokens if tier is not None else None,
        long_rates=_rates(long_row, scale) if long_row is not None else None,
    )


def _compile(table: PriceTableFile, source: str) -> PriceTable:
    models: dict[str, ModelEntry] = {}
    names: dict[str, str] = {}
    for name, model in table.models.items():
        versions = tuple(_compile_version(v) for v in model.versions)
        models[name] = ModelEntry(
            name=name,
            provider=model.provider,
            aliases=tuple(model.aliases),
            versions=versions,
            starts=tuple(v.starts_at for v in versions),
        )
        for key in (name, *model.aliases):
            names[key] = name
            names[key.lower()] = name
    groups = {group: Fraction(multiplier) for group, multiplier in table.groups.items()}
    units = table.quota.units_per_usd
    quota_plans = {
        group: {key: _quota_plan(models[name].versions[-1], multiplier, units) for key, name in names.items()}
        for group, multiplier in groups.items()
    }
    return PriceTable(
        source=source,
        file=table,
        units_per_usd=units,
        groups=groups,
        models=models,
        names=names,
        fallback_model=table.fallback_model,
        quota_plans=quota_plans,
    )


def _quota_plan(compiled: CompiledVersion, multiplier: Fraction, units_per_usd: int) -> QuotaPlan:
    factor = multiplier.numerator * units_per_usd
    divisor = compiled.denominator * multiplier.denominator
    common = math.gcd(factor, divisor)
    factor, divisor = factor // common, divisor // common
    long_rates = compiled.long_rates
    return QuotaPlan(
        starts_at=compiled.starts_at,
        rates=tuple(rate * factor for rate in compiled.rates),
        long_context_above=compiled.long_context_above,
        long_rates=None if long_rates is None else tuple(rate * factor for rate in long_rates),
        divisor=divisor,
    )


def as_timestamp(at: datetime | float | int) -> float:
    """A POSIX timestamp from an aware datetime (a naive one is refused) or a number."""
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"event time {at.isoformat()} has no time zone")
        return at.timestamp()
    return float(at)
