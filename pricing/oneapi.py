"""Interop with the gateways our users run: one-api (songquanpeng/one-api) and new-api (QuantumNous/new-api).

Those gateways price models with "options", JSON maps keyed by the exact model name:

``ModelRatio``
    The input price as a multiple of $0.002 per 1K tokens, i.e. ``input USD per 1M tokens / 2``
    (gpt-4o at $2.50 / 1M is 1.25).
``CompletionRatio``
    ``output price / input price`` (gpt-4o: 4). When a model has none, the gateways do *not* use 1 but a
    hardcoded guess by name prefix (and new-api even "locks" some of them, ignoring the option for e.g.
    ``gpt-5*``, ``o1*``/``o3*``, ``claude-3*``); so the export writes one for every key.
``CacheRatio`` (new-api)
    ``cached input price / input price``; absent means 1 (cached tokens at the input price).
``ModelPrice`` (new-api)
    A fixed USD price per request. When a model has one, new-api bills that per call and never reads its
    ModelRatio / CompletionRatio (tokens are free). one-api has no ModelPrice.

``export_oneapi(table, at)`` gives the four maps for the versions in force at ``at``; ``dumps_oneapi``
writes them as JSON with exact numbers (``lossy_keys`` lists the ratios that had to be rounded);
``export_caveats`` lists what the gateways cannot express. ``import_oneapi(data, effective_from=...,
template=...)`` builds a complete price-table YAML document from such maps.

Decisions (see the functions for the details):

* ModelPrice: written only where ``per_request > 0``; the key keeps its ModelRatio / CompletionRatio
  (the version's token prices, so one-api, which has no ModelPrice, still bills tokens). On import,
  ModelPrice wins as in new-api: the model gets ``per_request`` and zero token prices. A version with
  both a per-request and a token price is therefore reported by ``export_caveats``.
* Undefined ratios (input price 0): CompletionRatio / CacheRatio are written as 1 when the output /
  cached price is 0 too (any ratio gives 0), and left out with a caveat when it is not.
* Lossy: a ratio with no finite decimal expansion (1.50 -> 2.00 is 4/3) stays an exact ``Fraction`` in
  the exported dict; ``dumps_oneapi`` writes it with 12 significant digits and ``lossy_keys`` names it.

Pure: no I/O; callers read and write the files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction
from typing import Any

import yaml

from pricing import json_source
from pricing.errors import PriceNotFound, PriceTableError, Problem
from pricing.schema import PriceVersion
from pricing.table import CompiledVersion, ModelEntry, PriceTable, as_timestamp, parse_price_table

#: The option maps, in the order they are written.
SECTIONS = ("ModelRatio", "CompletionRatio", "CacheRatio", "ModelPrice")
#: ModelRatio 1 = $0.002 per 1K tokens = $2 per 1M tokens.
USD_PER_MILLION_PER_RATIO = Fraction(2)
#: Significant digits of a ratio that has no finite decimal expansion (then it is lossy).
LOSSY_DIGITS = 12
#: The ``source`` of every imported price version.
IMPORT_SOURCE = "imported from one-api options JSON"
#: Defaults for what the JSON cannot say, when there is no template (or the template lacks the model).
DEFAULT_MAX_OUTPUT_TOKENS = 4096
DEFAULT_UNITS_PER_USD = 500_000  # the gateways' QuotaPerUnit: 500,000 quota = $1
DEFAULT_PROVIDER = "openai"
#: Provider by lower-cased name prefix (after any "vendor/" part), first match wins.
PROVIDER_PREFIXES: tuple[tuple[str, str], ...] = (("claude", "anthropic"),)

#: A ratio or price: a Decimal when it has a finite decimal expansion, else an exact Fraction.
Number = Decimal | Fraction
OneApiOptions = dict[str, dict[str, Number]]


@dataclass(frozen=True, slots=True)
class ExportCaveat:
    """Something in ``model``'s price version that the gateways' options cannot express."""

    model: str
    message: str

    def __str__(self) -> str:
        return f"{self.model}: {self.message}"


# ----------------------------------------------------------------------------------------------- export


def export_oneapi(table: PriceTable, at: datetime) -> OneApiOptions:
    """The option maps for the version of each model in force at ``at`` (an aware datetime).

    Models with no version at ``at`` are left out; every alias is a key of its own, with the model's
    values. Values are exact (``Decimal``, or ``Fraction`` for a ratio with no finite decimal expansion);
    keys are sorted; all four maps are present (CacheRatio and ModelPrice may be empty).
    """
    out: OneApiOptions = {section: {} for section in SECTIONS}
    for entry, version in _versions_at(table, at):
        values = _ratios(version)
        for key in (entry.name, *entry.aliases):
            for section, value in values.items():
                out[section][key] = value
    return {section: dict(sorted(values.items())) for section, values in out.items()}


def export_caveats(table: PriceTable, at: datetime) -> list[ExportCaveat]:
    """What the export at ``at`` cannot carry to the gateways, per model (aliases share their model's)."""
    caveats: list[ExportCaveat] = []
    for entry, version in _versions_at(table, at):
        cv = version.version

        def add(message: str, name: str = entry.name) -> None:
            caveats.append(ExportCaveat(name, message))

        if cv.input == 0 and cv.output > 0:
            add(f"output ${cv.output}/1M with a zero input price: no CompletionRatio can express it (left out)")
        if cv.input == 0 and cv.cached_input is not None and cv.cached_input > 0:
            add(f"cached input ${cv.cached_input}/1M with a zero input price: no CacheRatio can express it (left out)")
        if cv.per_request > 0:
            if cv.input > 0 or cv.output > 0:
                add(
                    f"both ${cv.per_request} per request and token prices: new-api bills only the ModelPrice,"
                    " one-api only the tokens"
                )
            else:
                add(f"${cv.per_request} per request: one-api has no ModelPrice and bills it as free tokens")
        for field in ("cache_write_5m", "cache_write_1h"):
            if getattr(cv, field) is not None:
                add(
                    f"{field} ${getattr(cv, field)}/1M is not exported"
                    " (new-api bills cache writes at its CreateCacheRatio, 1.25 by default)"
                )
        for field in ("per_image", "per_web_search"):
            if getattr(cv, field) > 0:
                add(f"{field} ${getattr(cv, field)} is not exported")
        if cv.long_context is not None:
            add(f"long-context prices above {cv.long_context.above_input_tokens} input tokens are not exported")
    return caveats


def _versions_at(table: PriceTable, at: datetime) -> list[tuple[ModelEntry, CompiledVersion]]:
    when = as_timestamp(at)
    found = []
    for entry in table.models.values():
        try:
            found.append((entry, entry.version_at(when)))
        except PriceNotFound:
            continue
    return found


def _ratios(compiled: CompiledVersion) -> dict[str, Number]:
    """One version's option values (only the sections that apply)."""
    version = compiled.version
    price_in, price_out = Fraction(version.input), Fraction(version.output)
    values: dict[str, Number] = {"ModelRatio": _number(price_in / USD_PER_MILLION_PER_RATIO)}
    completion = _ratio(price_out, price_in)
    if completion is not None:
        values["CompletionRatio"] = completion
    if version.cached_input is not None:
        cache = _ratio(Fraction(version.cached_input), price_in)
        if cache is not None:
            values["CacheRatio"] = cache
    if version.per_request > 0:
        values["ModelPrice"] = _number(Fraction(version.per_request))
    return values


def _ratio(part: Fraction, whole: Fraction) -> Number | None:
    """``part / whole``; 1 for 0 / 0 (any ratio gives 0 then); None when it is undefined (x / 0)."""
    if whole == 0:
        return Decimal(1) if part == 0 else None
    return _number(part / whole)


# ------------------------------------------------------------------------------------------------ dumps


def dumps_oneapi(data: Mapping[str, Any], *, indent: int = 2) -> str:
    """JSON text for ``data`` (the export's maps, or any one of them) with every number written exactly.

    Decimals and terminating fractions are written in full, in plain notation (never 0.30000000000000004,
    never 1E+1); a fraction with no finite decimal expansion is written with ``LOSSY_DIGITS`` significant
    digits (4/3 -> 1.33333333333): ``lossy_keys(data)`` lists those. Keys are sorted; ends with a newline.
    """
    return _dump(data, indent, 0) + "\n"


def lossy_keys(data: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The paths (e.g. ``("CompletionRatio", "gpt-3.5-turbo-0613")``) that ``dumps_oneapi`` rounds."""
    found: list[tuple[str, ...]] = []

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, Mapping):
            for key in sorted(value, key=str):
                walk(value[key], (*path, str(key)))
        elif _json_number(value)[1]:
            found.append(path)

    walk(data, ())
    return found


def _dump(value: Any, indent: int, depth: int) -> str:
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        pad, inner = " " * (indent * depth), " " * (indent * (depth + 1))
        items = [
            f"{inner}{json.dumps(str(key), ensure_ascii=False)}: {_dump(value[key], indent, depth + 1)}"
            for key in sorted(value, key=str)
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return _json_number(value)[0]


def _json_number(value: Any) -> tuple[str, bool]:
    """(JSON text, lossy) for a number; anything else is a TypeError, NaN or infinity a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | Fraction):
        raise TypeError(f"not a number: {value!r}")
    exact = _exact_input(value)
    if exact is None:
        raise ValueError(f"not a finite number: {value!r}")
    text = _fixed_or_none(exact)
    if text is not None:
        return text, False
    with localcontext() as context:
        context.prec = LOSSY_DIGITS
        rounded = Decimal(exact.numerator) / Decimal(exact.denominator)
    return _fixed(Fraction(rounded)), True


# ----------------------------------------------------------------------------------------------- import


@dataclass
class _Model:
    key: str
    input: Fraction
    output: Fraction
    cached: Fraction | None
    per_request: Fraction
    notes: list[str]

    @property
    def prices(self) -> tuple[Fraction, Fraction, Fraction | None, Fraction]:
        return (self.input, self.output, self.cached, self.per_request)


def import_oneapi(
    data: Mapping[str, Any] | str,
    *,
    effective_from: datetime,
    template: PriceTable | None = None,
    source: str = "<one-api options JSON>",
) -> str:
    """A complete price-table YAML document (text) from one-api / new-api option maps.

    ``data`` is the JSON text or the parsed object ``{"ModelRatio": {...}, "CompletionRatio": {...},
    "CacheRatio": {...}, "ModelPrice": {...}}`` (a map may also be given as the JSON string the gateways
    store it as). Numbers are read exactly (JSON numbers as Decimal). For each key of ModelRatio or
    ModelPrice: input = ModelRatio x 2, output = input x CompletionRatio (1 when absent), cached_input =
    input x CacheRatio (only when present); a key with a ModelPrice is billed as new-api bills it: that
    price per request and no token prices. Each model gets one version from ``effective_from`` with
    ``source: IMPORT_SOURCE``; models are written in the template's order, then the rest sorted.

    From ``template`` (when given): the non-model sections (quota, groups, fallback_model when that model
    is imported under its name, reference_rates, recharge_rates, grants), and, for keys it knows by name
    or alias (any case), provider and max_output_tokens (of its version in force at ``effective_from``,
    else its first). The keys that a template model is known by fold back into one model named by the
    first of them in template order (name, then aliases) with the others as ``aliases``, as long as their
    prices are identical; a key priced differently becomes a model of its own. Without a template, or
    for keys it does not know: provider by ``PROVIDER_PREFIXES`` (else openai), max_output_tokens
    ``DEFAULT_MAX_OUTPUT_TOKENS``, quota ``DEFAULT_UNITS_PER_USD`` per USD, one group ``default: 1``.
    What the JSON cannot carry (cache-write, per-image, web-search, long-context prices of the template)
    is not imported; a comment at the top of the document lists it per model.

    Bad input raises ``PriceTableError`` listing every problem, each naming the JSON key in ``source``.
    """
    as_timestamp(effective_from)  # refuses a naive datetime
    maps = _read_maps(data, source)
    models = _models_from_maps(maps, source)
    body, notes = _document(models, template, effective_from)
    header = [
        f"Price table imported from one-api / new-api options JSON ({source}),",
        f"every model priced from {effective_from.isoformat()}. Generated by pricing.oneapi.import_oneapi.",
    ]
    if notes:
        header.append("Not imported (the options JSON cannot say it):")
        header += [f"  {note}" for note in notes]
    header = ["# " + " ".join(line.splitlines()) for line in header]  # a name with a line break stays a comment
    text = "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=10**6)
    parse_price_table(text, source)  # the document must load; raises (with its problems) if not
    return text


class _ObjectWithDuplicates(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the keys it had more than once."""

    duplicates: list[str]


def _object_pairs(pairs: list[tuple[str, Any]]) -> _ObjectWithDuplicates:
    result = _ObjectWithDuplicates()
    result.duplicates = []
    for key, value in pairs:
        if key in result:
            result.duplicates.append(key)
        result[key] = value
    return result


@dataclass(frozen=True)
class _NotANumber:
    """NaN / Infinity / -Infinity in the JSON text: kept as a marker so the key can be named."""

    text: str


def _refuse_constant(name: str) -> _NotANumber:
    return _NotANumber(name)


def _parse_json(text: str, source: str, field: str) -> Any:
    try:
        return json_source.loads(text, parse_float=Decimal, parse_constant=_refuse_constant, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as exc:
        raise PriceTableError(
            [Problem(source, exc.lineno, field, f"invalid JSON: {exc.msg} (column {exc.colno})")]
        ) from None


def _read_maps(data: Mapping[str, Any] | str, source: str) -> dict[str, dict[str, Fraction]]:
    """The four maps with exact values; every problem at once."""
    if isinstance(data, str):
        data = _parse_json(data, source, "(json)")
    if not isinstance(data, Mapping):
        raise PriceTableError(
            [Problem(source, None, "(root)", f"expected a JSON object of option maps, got {_kind(data)}")]
        )
    problems = [Problem(source, None, key, "duplicate key") for key in getattr(data, "duplicates", [])]
    maps: dict[str, dict[str, Fraction]] = {section: {} for section in SECTIONS}
    named: dict[str, list[str]] = {section: [] for section in SECTIONS}  # valid names, valid values or not
    for section, value in data.items():
        if section not in SECTIONS:
            problems.append(
                Problem(source, None, str(section), f"unsupported option (supported: {', '.join(SECTIONS)})")
            )
            continue
        if isinstance(value, str):  # the gateways store each map as a JSON string
            try:
                value = _parse_json(value, source, section)
            except PriceTableError as exc:
                problems += exc.problems
                continue
        if not isinstance(value, Mapping):
            problems.append(
                Problem(source, None, section, f"expected an object of model -> number, got {_kind(value)}")
            )
            continue
        problems += [
            Problem(source, None, _field(section, key), "duplicate key") for key in getattr(value, "duplicates", [])
        ]
        for key, number in value.items():
            field = _field(section, key)
            if not isinstance(key, str) or not key.strip():
                problems.append(Problem(source, None, field, "a model name must be a non-empty string"))
                continue
            named[section].append(key)
            exact = _exact_input(number)
            if exact is None:
                problems.append(Problem(source, None, field, f"expected a number, got {_kind(number)}"))
            elif exact < 0:
                problems.append(
                    Problem(source, None, field, f"must not be negative, got {_fixed_or_none(exact) or exact}")
                )
            else:
                maps[section][key] = exact
    priced = set(named["ModelRatio"]) | set(named["ModelPrice"])
    for section in ("CompletionRatio", "CacheRatio"):
        for key in named[section]:
            if key not in priced:
                problems.append(
                    Problem(source, None, _field(section, key), "no ModelRatio or ModelPrice for this model")
                )
    if not problems and not priced:
        problems.append(Problem(source, None, "(root)", "no models: ModelRatio and ModelPrice are empty or absent"))
    by_lower: dict[str, str] = {}
    for key in sorted(priced):
        other = by_lower.setdefault(key.lower(), key)
        if other != key:
            section = "ModelRatio" if key in named["ModelRatio"] else "ModelPrice"
            problems.append(
                Problem(
                    source,
                    None,
                    _field(section, key),
                    f"same name as {other!r} but for case (price table names ignore case)",
                )
            )
    if problems:
        raise PriceTableError(problems)
    return maps


def _models_from_maps(maps: dict[str, dict[str, Fraction]], source: str) -> dict[str, _Model]:
    problems: list[Problem] = []
    models: dict[str, _Model] = {}
    for key in sorted(maps["ModelRatio"].keys() | maps["ModelPrice"].keys()):
        notes: list[str] = []
        if key in maps["ModelPrice"]:
            price_in = price_out = Fraction(0)
            cached = None
            per_request = maps["ModelPrice"][key]
            if maps["ModelRatio"].get(key):
                notes.append(
                    f"{key}: token prices (its ModelRatio), since it has a ModelPrice (new-api bills only that)"
                )
        else:
            price_in = maps["ModelRatio"][key] * USD_PER_MILLION_PER_RATIO
            price_out = price_in * maps["CompletionRatio"].get(key, Fraction(1))
            cached = price_in * maps["CacheRatio"][key] if key in maps["CacheRatio"] else None
            per_request = Fraction(0)
        for field, value, section in (
            ("input", price_in, "ModelRatio"),
            ("output", price_out, "CompletionRatio"),
            ("cached_input", cached, "CacheRatio"),
            ("per_request", per_request, "ModelPrice"),
        ):
            if value is not None and _fixed_or_none(value) is None:
                problems.append(
                    Problem(
                        source,
                        None,
                        _field(section, key),
                        f"gives a {field} price of {value}, which has no finite decimal expansion",
                    )
                )
        models[key] = _Model(key, price_in, price_out, cached, per_request, notes)
    if problems:
        raise PriceTableError(problems)
    return models


def _document(
    models: dict[str, _Model], template: PriceTable | None, effective_from: datetime
) -> tuple[dict[str, Any], list[str]]:
    """The YAML document as plain data, and the notes for its header."""
    notes: list[str] = [note for model in models.values() for note in model.notes]
    known: dict[str, list[tuple[int, str]]] = {}  # template model -> [(position in its names, key)]
    for key in models:
        if template is None:
            break
        name = template.names.get(key) or template.names.get(key.lower())
        if name is not None:
            entry = template.models[name]
            lowered = [n.lower() for n in (entry.name, *entry.aliases)]
            known.setdefault(name, []).append((lowered.index(key.lower()), key))
    out_models: dict[str, Any] = {}
    if template is not None:
        for name, entry in template.models.items():
            if name not in known:
                continue
            version = _template_version(entry, effective_from)
            dropped = _dropped_fields(version)
            if dropped:
                notes.append(f"{name}: the template's {', '.join(dropped)}")
            groups: list[list[str]] = []
            for _, key in sorted(known[name]):
                for group in groups:
                    if models[group[0]].prices == models[key].prices:
                        group.append(key)
                        break
                else:
                    groups.append([key])
            for group in groups:
                out_models[group[0]] = _model_yaml(
                    models[group[0]], entry.provider, group[1:], version.max_output_tokens, effective_from
                )
    placed = {key for keys in known.values() for _, key in keys}
    for key in sorted(set(models) - placed):
        out_models[key] = _model_yaml(models[key], infer_provider(key), [], DEFAULT_MAX_OUTPUT_TOKENS, effective_from)

    body: dict[str, Any] = {"schema_version": 1}
    if template is None:
        body["quota"] = {"units_per_usd": DEFAULT_UNITS_PER_USD}
        body["groups"] = {"default": "1"}
    else:
        file = template.file
        body["quota"] = {"units_per_usd": file.quota.units_per_usd}
        body["groups"] = {group: _fixed(Fraction(m)) for group, m in file.groups.items()}
        if file.fallback_model is not None and file.fallback_model in out_models:
            body["fallback_model"] = file.fallback_model
        if file.reference_rates:
            body["reference_rates"] = [_plain(rate.model_dump()) for rate in file.reference_rates]
        if file.recharge_rates:
            body["recharge_rates"] = [_plain(rate.model_dump(exclude_none=True)) for rate in file.recharge_rates]
        if file.grants:
            body["grants"] = {kind: _plain(grant.model_dump()) for kind, grant in file.grants.items()}
        missing = [name for name in template.models if name not in known]
        if missing:
            notes.append("template models not in the JSON (left out): " + ", ".join(missing))
    body["models"] = out_models
    return body, notes


def _template_version(entry: ModelEntry, effective_from: datetime) -> PriceVersion:
    try:
        return entry.version_at(as_timestamp(effective_from)).version
    except PriceNotFound:
        return entry.versions[0].version


def _dropped_fields(version: PriceVersion) -> list[str]:
    dropped = [f for f in ("cache_write_5m", "cache_write_1h") if getattr(version, f) is not None]
    dropped += [f for f in ("per_image", "per_web_search") if getattr(version, f) > 0]
    if version.long_context is not None:
        dropped.append("long_context")
    return dropped


def _model_yaml(
    model: _Model, provider: str, aliases: list[str], max_output_tokens: int, effective_from: datetime
) -> dict[str, Any]:
    version: dict[str, Any] = {"effective_from": effective_from.isoformat(), "input": _price(model.input)}
    if model.cached is not None:
        version["cached_input"] = _price(model.cached)
    version["output"] = _price(model.output)
    if model.per_request > 0:
        version["per_request"] = _price(model.per_request)
    version["max_output_tokens"] = max_output_tokens
    version["source"] = IMPORT_SOURCE
    entry: dict[str, Any] = {"provider": provider}
    if aliases:
        entry["aliases"] = aliases
    entry["versions"] = [version]
    return entry


def infer_provider(model: str) -> str:
    """The provider of a model the template does not know, by ``PROVIDER_PREFIXES`` (else openai)."""
    name = model.rsplit("/", 1)[-1].strip().lower()
    for prefix, provider in PROVIDER_PREFIXES:
        if name.startswith(prefix):
            return provider
    return DEFAULT_PROVIDER


# ---------------------------------------------------------------------------------------------- numbers


def _scaled(value: Fraction) -> tuple[int, int] | None:
    """``(n, k)`` with ``value == n / 10**k`` and ``k`` minimal; None when no such pair exists."""
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:
        return None
    places = max(twos, fives)
    return value.numerator * 10**places // value.denominator, places


def _fixed_or_none(value: Fraction, min_places: int = 0) -> str | None:
    """Plain decimal text (no exponent, no trailing zeros beyond ``min_places``), or None if non-terminating."""
    scaled = _scaled(value)
    if scaled is None:
        return None
    n, places = scaled
    if places < min_places:
        n, places = n * 10 ** (min_places - places), min_places
    digits = str(abs(n)).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}" if places else digits
    return f"-{text}" if n < 0 else text


def _fixed(value: Fraction) -> str:
    text = _fixed_or_none(value)
    if text is None:
        raise ValueError(f"{value} has no finite decimal expansion")
    return text


def _price(value: Fraction) -> str:
    """A price for the YAML: plain decimal text with at least two places ("2.50", "0.075")."""
    return _fixed_or_none(value, 2) or _fixed(value)


def _number(value: Fraction) -> Number:
    """``value`` as a Decimal (exactly, plain exponent) when it terminates, else the Fraction itself."""
    scaled = _scaled(value)
    if scaled is None:
        return value
    n, places = scaled
    return Decimal(n) if places == 0 else Decimal(f"{n}E-{places}")


def _exact_input(value: Any) -> Fraction | None:
    """An exact value for a JSON / Python number; None for anything else (bool, str, NaN, infinity)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Fraction):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = Decimal(repr(value))  # the shortest text that reads back as this float: what was written
    if isinstance(value, Decimal):
        try:
            return Fraction(value) if value.is_finite() else None
        except (InvalidOperation, ValueError):
            return None
    return None


def _plain(value: Any) -> Any:
    """pydantic ``model_dump`` output as YAML-ready data: decimals as plain strings, datetimes as ISO text."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Decimal):
        return _fixed(Fraction(value))
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _field(section: str, key: Any) -> str:
    return f"{section}[{json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)}]"


def _kind(value: Any) -> str:
    if isinstance(value, _NotANumber):
        return value.text
    if isinstance(value, bool):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({json.dumps(value, ensure_ascii=False)[:40]})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "DEFAULT_PROVIDER",
    "DEFAULT_UNITS_PER_USD",
    "IMPORT_SOURCE",
    "LOSSY_DIGITS",
    "PROVIDER_PREFIXES",
    "SECTIONS",
    "USD_PER_MILLION_PER_RATIO",
    "ExportCaveat",
    "OneApiOptions",
    "dumps_oneapi",
    "export_caveats",
    "export_oneapi",
    "import_oneapi",
    "infer_provider",
    "lossy_keys",
]
