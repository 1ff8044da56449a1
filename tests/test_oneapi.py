"""one-api / new-api options interop: exact ratios out, a complete price table back in.

Worked examples use the gateways' own defaults as the reference:
  one-api  = songquanpeng/one-api relay/billing/ratio/model.go (ModelRatio map, GetCompletionRatio)
  new-api  = QuantumNous/new-api setting/ratio_setting/model_ratio.go (defaultModelRatio,
             getHardcodedCompletionModelRatio, defaultModelPrice) and cache_ratio.go (defaultCacheRatio)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricing.errors import PriceTableError
from pricing.oneapi import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_UNITS_PER_USD,
    IMPORT_SOURCE,
    SECTIONS,
    dumps_oneapi,
    export_caveats,
    export_oneapi,
    import_oneapi,
    infer_provider,
    lossy_keys,
)
from pricing.table import PriceTable, load_price_table, parse_price_table

AT = datetime(2026, 1, 1, tzinfo=UTC)
START = "2024-01-01T00:00:00Z"


def table_of(models: dict[str, dict[str, Any]], extra: str = "") -> PriceTable:
    """A price table from ``{name: {provider?, aliases?, max_output_tokens?, input, output, ...}}``."""
    lines = ["schema_version: 1", "quota: {units_per_usd: 500000}", "groups: {default: 1}", extra, "models:"]
    for name, spec in models.items():
        spec = dict(spec)
        provider = spec.pop("provider", "anthropic" if name.startswith("claude") else "openai")
        aliases = spec.pop("aliases", [])
        version = {
            "effective_from": spec.pop("effective_from", START),
            "max_output_tokens": spec.pop("max_output_tokens", 4096),
        }
        version.update({key: str(value) for key, value in spec.items()})
        version["source"] = "test"
        lines.append(f"  {json.dumps(name)}:")
        lines.append(f"    provider: {provider}")
        lines.append(f"    aliases: {json.dumps(aliases)}")
        lines.append(f"    versions: [{json.dumps(version)}]")
    return parse_price_table("\n".join(lines) + "\n", "<test table>")


def prices(table: PriceTable, name: str, at: datetime = AT) -> tuple[Any, ...]:
    v = table.resolve(name)[0].version_at(at.timestamp()).version
    return (v.input, v.output, v.cached_input, v.per_request)


def all_strings_no_floats(node: Any) -> None:
    if isinstance(node, dict):
        for value in node.values():
            all_strings_no_floats(value)
    elif isinstance(node, list):
        for value in node:
            all_strings_no_floats(value)
    else:
        assert not isinstance(node, float), node


# ------------------------------------------------------------------------------------------ worked examples

# (model, input, cached_input, output, ModelRatio, CompletionRatio, CacheRatio, where the gateways say so)
KNOWN = [
    (
        "gpt-4o",
        "2.50",
        "1.25",
        "10.00",
        "1.25",
        "4",
        "0.5",
        "new-api defaultModelRatio gpt-4o 1.25 ($2.5 / 1M); gpt-4o* completion 4; defaultCacheRatio 0.5",
    ),
    (
        "gpt-3.5-turbo",
        "0.50",
        None,
        "1.50",
        "0.25",
        "3",
        None,
        "one-api ModelRatio gpt-3.5-turbo 0.25 ($0.0005 / 1K); GetCompletionRatio gpt-3.5-turbo 3",
    ),
    (
        "claude-3-opus-20240229",
        "15.00",
        "1.50",
        "75.00",
        "7.5",
        "5",
        "0.1",
        "one-api 15.0 / 1000 * USD = 7.5; claude-3* completion 5; new-api defaultCacheRatio 0.1",
    ),
    ("gpt-4", "30.00", None, "60.00", "15", "2", None, "one-api / new-api gpt-4 15; plain gpt-4 completion 2"),
    ("gpt-4-turbo", "10.00", None, "30.00", "5", "3", None, "gpt-4-turbo 5 ($0.01 / 1K); gpt-4-turbo* completion 3"),
    ("gpt-4o-mini", "0.15", "0.075", "0.60", "0.075", "4", "0.5", "gpt-4o-mini 0.075 ($0.00015 / 1K); cache 0.5"),
    ("gpt-4.1", "2.00", "0.50", "8.00", "1", "4", "0.25", "new-api gpt-4.1 1.0 ($2 / 1M); defaultCacheRatio 0.25"),
    (
        "gpt-5",
        "1.25",
        "0.125",
        "10.00",
        "0.625",
        "8",
        "0.1",
        "new-api gpt-5 0.625; gpt-5 completion 8 (locked); cache 0.1",
    ),
    ("o1", "15.00", "7.50", "60.00", "7.5", "4", "0.5", "new-api o1 7.5 ($15 / 1M); o1* completion 4; cache 0.5"),
    (
        "claude-3-haiku-20240307",
        "0.25",
        None,
        "1.25",
        "0.125",
        "5",
        None,
        "new-api 0.125 ($0.25 / 1M); claude-3* completion 5",
    ),
    ("deepseek-chat", "0.27", None, "0.27", "0.135", "1", None, "new-api deepseek-chat 0.27 / 2"),
]


@pytest.mark.parametrize(("model", "price_in", "cached", "price_out", "ratio", "completion", "cache", "where"), KNOWN)
def test_export_matches_the_gateways_defaults(
    model, price_in, cached, price_out, ratio, completion, cache, where
) -> None:
    spec = {"input": price_in, "output": price_out} | ({"cached_input": cached} if cached else {})
    data = export_oneapi(table_of({model: spec}), AT)
    assert data["ModelRatio"] == {model: Decimal(ratio)}, where
    assert data["CompletionRatio"] == {model: Decimal(completion)}, where
    assert data["CacheRatio"] == ({model: Decimal(cache)} if cache else {}), where
    assert data["ModelPrice"] == {}
    assert json.loads(dumps_oneapi(data), parse_float=Decimal)["ModelRatio"][model] == Decimal(ratio)


@pytest.mark.parametrize(("model", "price_in", "cached", "price_out", "ratio", "completion", "cache", "where"), KNOWN)
def test_import_of_the_gateways_defaults(model, price_in, cached, price_out, ratio, completion, cache, where) -> None:
    sections = [("ModelRatio", ratio), ("CompletionRatio", completion)] + ([("CacheRatio", cache)] if cache else [])
    text = "{" + ", ".join(f'"{section}": {{"{model}": {value}}}' for section, value in sections) + "}"
    table = parse_price_table(import_oneapi(text, effective_from=AT))
    expected = (Decimal(price_in), Decimal(price_out), Decimal(cached) if cached else None, Decimal(0))
    assert prices(table, model) == expected, where


def test_new_api_model_price_is_a_price_per_request() -> None:
    # new-api defaultModelPrice: "dall-e-3": 0.04, "mj_imagine": 0.1 (USD per call, tokens not billed)
    text = '{"ModelPrice": {"dall-e-3": 0.04, "mj_imagine": 0.1}}'
    table = parse_price_table(import_oneapi(text, effective_from=AT))
    assert prices(table, "dall-e-3") == (0, 0, None, Decimal("0.04"))
    assert prices(table, "mj_imagine") == (0, 0, None, Decimal("0.1"))


def test_model_price_wins_over_model_ratio_as_in_new_api() -> None:
    # new-api ships both "gpt-4-gizmo-*": 15 (ModelRatio) and 0.1 (ModelPrice); it bills $0.1 per call only.
    name = "gpt-4-gizmo-*"
    text = f'{{"ModelRatio": {{"{name}": 15}}, "CompletionRatio": {{"{name}": 2}}, "ModelPrice": {{"{name}": 0.1}}}}'
    out = import_oneapi(text, effective_from=AT)
    assert prices(parse_price_table(out), "gpt-4-gizmo-*") == (0, 0, None, Decimal("0.1"))
    assert "gpt-4-gizmo-*: token prices (its ModelRatio)" in out  # said in the header, not silently


# ----------------------------------------------------------------------------------------------- export


def test_export_lists_every_alias_and_skips_models_not_yet_priced() -> None:
    table = table_of(
        {
            "gpt-4o": {"aliases": ["gpt-4o-2024-08-06"], "input": "2.50", "output": "10.00"},
            "future": {"effective_from": "2030-01-01T00:00:00Z", "input": "1", "output": "1"},
        }
    )
    data = export_oneapi(table, AT)
    assert list(data) == list(SECTIONS)
    assert data["ModelRatio"] == {"gpt-4o": Decimal("1.25"), "gpt-4o-2024-08-06": Decimal("1.25")}
    assert "future" not in data["CompletionRatio"]
    assert export_oneapi(table, datetime(2030, 6, 1, tzinfo=UTC))["ModelRatio"]["future"] == Decimal("0.5")
    assert export_oneapi(table, datetime(2023, 1, 1, tzinfo=UTC)) == {section: {} for section in SECTIONS}


def test_export_always_writes_a_completion_ratio_even_1() -> None:
    # an absent CompletionRatio is NOT 1 in the gateways (one-api gives gpt-4* 2, claude-3* 5 ...)
    data = export_oneapi(table_of({"gpt-4-equal": {"input": "3", "output": "3"}}), AT)
    assert data["CompletionRatio"] == {"gpt-4-equal": Decimal(1)}


def test_export_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="time zone"):
        export_oneapi(table_of({"m": {"input": "1", "output": "1"}}), datetime(2026, 1, 1))


def test_per_request_model_gets_a_model_price_and_its_token_ratio() -> None:
    table = table_of(
        {
            "per-call": {"input": "0", "output": "0", "per_request": "0.04"},
            "both": {"input": "1", "output": "2", "per_request": "0.01"},
        }
    )
    data = export_oneapi(table, AT)
    assert data["ModelPrice"] == {"both": Decimal("0.01"), "per-call": Decimal("0.04")}
    assert data["ModelRatio"] == {"both": Decimal("0.5"), "per-call": Decimal(0)}
    assert data["CompletionRatio"] == {"both": Decimal(2), "per-call": Decimal(1)}  # 0/0 -> neutral 1
    caveats = [str(c) for c in export_caveats(table, AT)]
    assert any(c.startswith("both: both $0.01 per request and token prices") for c in caveats)
    assert any(c.startswith("per-call: $0.04 per request: one-api has no ModelPrice") for c in caveats)


def test_undefined_ratios_are_left_out_with_a_caveat() -> None:
    table = table_of({"odd": {"input": "0", "cached_input": "0.5", "output": "3"}})
    data = export_oneapi(table, AT)
    assert data["ModelRatio"] == {"odd": Decimal(0)}
    assert data["CompletionRatio"] == {} and data["CacheRatio"] == {}
    assert [c.model for c in export_caveats(table, AT)] == ["odd", "odd"]


def test_caveats_name_what_the_gateways_cannot_carry() -> None:
    caveats = export_caveats(load_price_table(), AT)
    sonnet = [c.message for c in caveats if c.model == "claude-sonnet-4"]
    assert any("cache_write_5m" in m for m in sonnet)
    assert any("per_web_search" in m for m in sonnet)
    assert any("long-context" in m for m in sonnet)
    assert not [c for c in caveats if c.model == "gpt-4o"]


# ------------------------------------------------------------------------------------------------ dumps


def test_dumps_writes_exact_numbers_without_float_noise() -> None:
    table = table_of({"m": {"input": "0.30", "cached_input": "0.03", "output": "0.90"}})
    data = export_oneapi(table, AT)
    text = dumps_oneapi(data)
    assert '"m": 0.15' in text and '"m": 0.1' in text and '"m": 3' in text  # ModelRatio, CacheRatio, CompletionRatio
    assert json.loads(text, parse_float=Decimal) == data and lossy_keys(data) == []
    assert 0.1 + 0.2 != 0.3  # the float noise avoided: 0.30000000000000004
    assert dumps_oneapi({"x": Decimal("0.1") + Decimal("0.2")}) == '{\n  "x": 0.3\n}\n'


def test_dumps_plain_notation_for_big_and_small_numbers() -> None:
    text = dumps_oneapi({"a": Decimal("1E+1"), "b": Fraction(1, 10**8), "c": 7, "d": 0.1, "e": Decimal("2.500")})
    assert json.loads(text) == {"a": 10, "b": 1e-8, "c": 7, "d": 0.1, "e": 2.5}
    assert '"a": 10,' in text and '"b": 0.00000001,' in text and '"e": 2.5\n' in text


def test_non_terminating_ratio_is_12_significant_digits_and_lossy() -> None:
    # gpt-3.5-turbo-0613: $1.50 in, $2.00 out -> CompletionRatio 4/3 (one-api hardcodes 4.0 / 3.0)
    table = table_of({"gpt-3.5-turbo-0613": {"aliases": ["gpt-3.5-turbo-0301"], "input": "1.50", "output": "2.00"}})
    data = export_oneapi(table, AT)
    assert data["CompletionRatio"]["gpt-3.5-turbo-0613"] == Fraction(4, 3)  # exact in the dict
    assert '"gpt-3.5-turbo-0613": 1.33333333333' in dumps_oneapi(data)
    assert lossy_keys(data) == [("CompletionRatio", "gpt-3.5-turbo-0301"), ("CompletionRatio", "gpt-3.5-turbo-0613")]
    assert dumps_oneapi({"x": Fraction(1, 3000)}) == '{\n  "x": 0.000333333333333\n}\n'
    assert lossy_keys({"x": Fraction(2, 3), "y": Fraction(1, 4)}) == [("x",)]


def test_dumps_refuses_what_is_not_a_number() -> None:
    with pytest.raises(TypeError):
        dumps_oneapi({"x": "1.5"})
    with pytest.raises(ValueError):
        dumps_oneapi({"x": Decimal("NaN")})


# ----------------------------------------------------------------------------------------------- import


def test_import_defaults_without_a_template() -> None:
    text = import_oneapi(
        {"ModelRatio": {"claude-3-5-sonnet-20241022": Decimal("1.5"), "anthropic/claude-x": 1, "gpt-x": 2}},
        effective_from=AT,
    )
    table = parse_price_table(text)
    assert table.units_per_usd == DEFAULT_UNITS_PER_USD and set(table.groups) == {"default"}
    assert table.models["claude-3-5-sonnet-20241022"].provider == "anthropic"
    assert table.models["anthropic/claude-x"].provider == "anthropic"
    assert table.models["gpt-x"].provider == "openai"
    version = table.models["gpt-x"].versions[0].version
    assert version.max_output_tokens == DEFAULT_MAX_OUTPUT_TOKENS
    assert version.source == IMPORT_SOURCE and version.effective_from == AT
    assert prices(table, "gpt-x") == (Decimal(4), Decimal(4), None, 0)  # CompletionRatio absent -> 1
    assert infer_provider("Claude-3") == "anthropic" and infer_provider("deepseek-chat") == "openai"


def test_import_writes_decimals_as_quoted_strings() -> None:
    text = import_oneapi(
        '{"ModelRatio": {"m": 0.075}, "CompletionRatio": {"m": 4}, "CacheRatio": {"m": 0.5}}', effective_from=AT
    )
    raw = yaml.safe_load(text)
    version = raw["models"]["m"]["versions"][0]
    assert (version["input"], version["cached_input"], version["output"]) == ("0.15", "0.075", "0.60")
    assert "'0.15'" in text
    all_strings_no_floats(raw)


def test_import_accepts_maps_stored_as_json_strings() -> None:
    # the gateways keep each option as a JSON string (options table: key "ModelRatio", value "{...}")
    data = {"ModelRatio": '{"m": 1.25}', "CompletionRatio": '{"m": 4}'}
    assert prices(parse_price_table(import_oneapi(data, effective_from=AT)), "m") == (
        Decimal("2.5"),
        Decimal(10),
        None,
        0,
    )


def test_names_with_line_breaks_cannot_escape_the_header_comments() -> None:
    evil = "x\nfallback_model: x\r\u2028models: {}"
    text = import_oneapi({"ModelRatio": {evil: 1}, "ModelPrice": {evil: 1}}, effective_from=AT, source="a\nb")
    assert all(line.startswith("#") for line in text.split("\nschema_version:")[0].splitlines())
    table = parse_price_table(text)
    assert list(table.models) == [evil] and table.fallback_model is None


def test_import_is_deterministic_whatever_the_key_order() -> None:
    a = {"ModelRatio": {"b": 1, "a": 2}, "CompletionRatio": {"a": 3}}
    b = {"CompletionRatio": {"a": 3}, "ModelRatio": {"a": 2, "b": 1}}
    assert import_oneapi(a, effective_from=AT) == import_oneapi(b, effective_from=AT)


def test_import_refuses_a_naive_effective_from() -> None:
    with pytest.raises(ValueError, match="time zone"):
        import_oneapi({"ModelRatio": {"m": 1}}, effective_from=datetime(2026, 1, 1))


def test_template_gives_sections_provider_and_max_output_tokens() -> None:
    template = table_of(
        {
            "gpt-4o": {
                "aliases": ["gpt-4o-2024-08-06", "gpt-4o-2024-11-20"],
                "max_output_tokens": 16384,
                "input": "2.50",
                "output": "10",
            },
            "claude-3-opus": {
                "aliases": ["claude-3-opus-20240229"],
                "max_output_tokens": 4096,
                "input": "15",
                "output": "75",
            },
            "gone": {"input": "1", "output": "1"},
        },
        extra='grants: {signup: {usd: "0.2"}}\nfallback_model: gpt-4o',
    )
    options = {
        "ModelRatio": {
            "gpt-4o": 1.25,
            "gpt-4o-2024-08-06": 1.25,
            "gpt-4o-2024-11-20": 1,
            "claude-3-opus-20240229": 7.5,
        },
        "CompletionRatio": {"gpt-4o": 4, "gpt-4o-2024-08-06": 4, "gpt-4o-2024-11-20": 4, "claude-3-opus-20240229": 5},
    }
    text = import_oneapi(options, effective_from=AT, template=template)
    table = parse_price_table(text)
    assert list(table.models) == ["gpt-4o", "gpt-4o-2024-11-20", "claude-3-opus-20240229"]  # template order
    assert table.models["gpt-4o"].aliases == ("gpt-4o-2024-08-06",)  # identical prices fold back
    assert table.models["gpt-4o-2024-11-20"].aliases == ()  # priced differently: a model of its own
    assert table.models["gpt-4o-2024-11-20"].versions[0].version.max_output_tokens == 16384  # known by alias
    assert table.models["claude-3-opus-20240229"].provider == "anthropic"  # named by the only key given
    assert table.fallback_model == "gpt-4o" and table.grants["signup"].usd == Decimal("0.2")
    assert "template models not in the JSON (left out): gone" in text


def test_template_alias_matching_ignores_case_and_fallback_is_dropped_when_not_imported() -> None:
    template = table_of(
        {"gpt-4o": {"aliases": ["gpt-4o-2024-08-06"], "input": "2.5", "output": "10"}}, extra="fallback_model: gpt-4o"
    )
    table = parse_price_table(
        import_oneapi({"ModelRatio": {"GPT-4o-2024-08-06": 1}}, effective_from=AT, template=template)
    )
    assert list(table.models) == ["GPT-4o-2024-08-06"] and table.fallback_model is None


# --------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("at", [datetime(2023, 7, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC), AT])
def test_bundled_table_round_trips(at: datetime) -> None:
    original = load_price_table()
    data = export_oneapi(original, at)
    text = import_oneapi(data, effective_from=at, template=original)
    imported = parse_price_table(text, "<imported>")
    assert export_oneapi(imported, at) == data
    in_force = {}
    for name, entry in original.models.items():
        try:
            in_force[name] = entry.version_at(at.timestamp()).version
        except LookupError:
            continue
    assert set(imported.models) == set(in_force)  # the same names and aliases fold back
    for name, version in in_force.items():
        assert imported.models[name].aliases == original.models[name].aliases
        assert imported.models[name].provider == original.models[name].provider
        got = imported.models[name].versions[0].version
        assert (got.input, got.output, got.cached_input, got.per_request) == (
            version.input,
            version.output,
            version.cached_input,
            version.per_request,
        ), name
        assert got.max_output_tokens == version.max_output_tokens
    assert import_oneapi(data, effective_from=at, template=original) == text  # deterministic


def test_bundled_table_round_trips_through_json_text_except_lossy_keys() -> None:
    original = load_price_table()
    data = export_oneapi(original, AT)
    lossy = set(lossy_keys(data))
    imported = parse_price_table(import_oneapi(dumps_oneapi(data), effective_from=AT, template=original))
    again = export_oneapi(imported, AT)
    for section in SECTIONS:
        for key, value in data[section].items():
            if (section, key) not in lossy:
                assert again[section][key] == value, (section, key)


# ---------------------------------------------------------------------------------------------- hypothesis

PRICE = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
POSITIVE = st.decimals(min_value=Decimal("0.000001"), max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@st.composite
def model_specs(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    specs = {}
    for i in range(draw(st.integers(1, 4))):
        aliases = [f"m{i}-alias{j}" for j in range(draw(st.integers(0, 2)))]
        if draw(st.booleans()):  # priced by tokens
            spec = {"input": draw(POSITIVE), "output": draw(PRICE)}
            if draw(st.booleans()):
                spec["cached_input"] = draw(PRICE)
        else:  # priced per call, as the gateways can express it (no token prices)
            spec = {"input": Decimal(0), "output": Decimal(0), "per_request": draw(POSITIVE)}
        specs[f"claude-m{i}" if draw(st.booleans()) else f"m{i}"] = spec | {"aliases": aliases}
    return specs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_specs())
def test_random_exact_prices_round_trip_losslessly(specs: dict[str, dict[str, Any]]) -> None:
    original = table_of(specs)
    data = export_oneapi(original, AT)
    imported = parse_price_table(import_oneapi(data, effective_from=AT, template=original))
    assert export_oneapi(imported, AT) == data
    for name, entry in original.models.items():
        assert imported.models[name].aliases == entry.aliases
        assert prices(imported, name) == prices(original, name)

    # through the JSON text: exact except where dumps had to round (and says so)
    lossy = set(lossy_keys(data))
    via_text = parse_price_table(import_oneapi(dumps_oneapi(data), effective_from=AT, template=original))
    for name in original.models:
        want, got = prices(original, name), prices(via_text, name)
        assert got[0] == want[0] and got[3] == want[3]
        if ("CompletionRatio", name) not in lossy:
            assert got[1] == want[1]
        if ("CacheRatio", name) not in lossy:
            assert got[2] == want[2]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), PRICE, max_size=5))
def test_dumps_is_exact_for_decimals(values: dict[str, Decimal]) -> None:
    assert json.loads(dumps_oneapi(values), parse_float=Decimal) == values
    assert lossy_keys(values) == []


# ------------------------------------------------------------------------------------------------- errors


def problems(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(PriceTableError) as info:
        import_oneapi(data, effective_from=AT, source="options.json")
    assert all(p.file == "options.json" for p in info.value.problems)
    return [(p.field, p.message) for p in info.value.problems]


@pytest.mark.parametrize("data", ["[1, 2]", "3", '"text"', [1], "null"])
def test_not_an_object(data: Any) -> None:
    assert problems(data)[0][0] == "(root)"


def test_invalid_json_names_the_line() -> None:
    with pytest.raises(PriceTableError) as info:
        import_oneapi('{\n  "ModelRatio": {"a": 1,}\n}', effective_from=AT, source="options.json")
    assert info.value.problems[0].line == 2 and "invalid JSON" in info.value.problems[0].message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "must not be negative"),
        ('"1.5"', "got a string"),
        ("true", "got true"),
        ("null", "got null"),
        ("NaN", "got NaN"),
        ("Infinity", "got Infinity"),
        ("[1]", "got an array"),
        ("{}", "got an object"),
    ],
)
def test_bad_ratio_names_the_key(value: str, message: str) -> None:
    found = problems(f'{{"ModelRatio": {{"gpt-4o": 1}}, "CompletionRatio": {{"gpt-4o": {value}}}}}')
    assert len(found) == 1
    assert found[0][0] == 'CompletionRatio["gpt-4o"]' and message in found[0][1]


def test_ratio_without_a_model_ratio_names_the_key() -> None:
    found = problems({"ModelRatio": {"a": 1}, "CompletionRatio": {"b": 2}, "CacheRatio": {"c": Decimal("0.1")}})
    assert found == [
        ('CompletionRatio["b"]', "no ModelRatio or ModelPrice for this model"),
        ('CacheRatio["c"]', "no ModelRatio or ModelPrice for this model"),
    ]
    # a ModelPrice is enough (new-api then ignores the CompletionRatio, and so does the import)
    table = parse_price_table(import_oneapi({"ModelPrice": {"a": 1}, "CompletionRatio": {"a": 2}}, effective_from=AT))
    assert prices(table, "a") == (0, 0, None, 1)


def test_every_problem_at_once() -> None:
    found = problems(
        '{"ModelRatio": {"a": -0.5, "b": "x", "c": 1, "c": 2}, "GroupRatio": {"default": 1},'
        ' "CacheRatio": [], "ModelPrice": {"": 1}}'
    )
    assert ('ModelRatio["c"]', "duplicate key") in found
    assert ('ModelRatio["a"]', "must not be negative, got -0.5") in found
    assert ('ModelRatio["b"]', 'expected a number, got a string ("x")') in found
    assert (
        "GroupRatio",
        "unsupported option (supported: ModelRatio, CompletionRatio, CacheRatio, ModelPrice)",
    ) in found
    assert ("CacheRatio", "expected an object of model -> number, got an array") in found
    assert ('ModelPrice[""]', "a model name must be a non-empty string") in found
    assert len(found) == 6


def test_names_differing_only_by_case_are_refused() -> None:
    found = problems({"ModelRatio": {"GPT-4o": 1, "gpt-4o": 1}})
    assert len(found) == 1 and "but for case" in found[0][1]


def test_no_models() -> None:
    assert problems("{}") == [("(root)", "no models: ModelRatio and ModelPrice are empty or absent")]


def test_price_with_no_finite_decimal_is_refused() -> None:
    found = problems({"ModelRatio": {"m": 1}, "CompletionRatio": {"m": Fraction(1, 3)}})
    assert found[0][0] == 'CompletionRatio["m"]' and "no finite decimal" in found[0][1]


def test_export_dates_are_inclusive() -> None:
    table = table_of({"m": {"effective_from": "2026-01-01T00:00:00Z", "input": "1", "output": "1"}})
    assert "m" in export_oneapi(table, AT)["ModelRatio"]
    assert "m" not in export_oneapi(table, AT - timedelta(microseconds=1))["ModelRatio"]
