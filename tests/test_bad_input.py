"""Bad input at every entry point: a typed error naming the field, exit 2 on the command line, nothing written.

What is tested, entry point by entry point (hypothesis generates the bad values; ``max_examples`` is kept
modest so the file stays quick):

* price tables: every field of a complete table mutated, one at a time, to each bad value of its kind
  (exhaustively), and to random values judged by an independent oracle of the documented rule: a bad
  value is refused with a problem naming that field and its line, a good one loads;
* usage payloads (OpenAI and Anthropic ``usage`` objects, ``UsageRecord``): negative, NaN, floats, values
  above 10^13 and 2^63, strings, bools, objects of the wrong shape; ``InvalidUsage`` names the field;
* request bodies given to the counters and to ``authorize``: wrong types at typed fields, random
  mutations anywhere (surrogates, huge numbers, deep nesting, values JSON cannot write), absurd
  ``max_tokens``; only ``RequestError`` / ``UnknownModel`` ever escape, naming a related path, and
  ``authorize`` writes nothing;
* SSE streams: truncated, interleaved, invalid UTF-8, absurd or malformed usage chunks, split anywhere:
  ``feed`` never raises, the result is the same however the bytes are split, never bills a rejected
  usage chunk, counts invalid bytes exactly, and settles;
* timestamps for ``at=``: naive, far past, far future, not a datetime; ``InvalidField('at')``, nothing written;
* the command line: each command's bad flags exit 2 with ``error: <field>:`` and leave the database as it
  was (or uncreated, when the price table alone refuses the flag).

``METERING_BAD_INPUT_FIGURES=1`` prints how many bad inputs each entry point was given (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from contextlib import closing
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from typer.testing import CliRunner

from metering.counting import count_request
from metering.errors import MeteringError, RequestError, format_path
from metering.ledger import InvalidField, Meter
from metering.ledger import quarantine
from metering.ledger.inputs import EARLIEST, MAX_AHEAD, event_time
from metering.ledger.tables import ApiKey, Hold, LedgerEntry, TopupOrder, UsageEvent, User
from metering.streams import StreamAccumulator
from pricing.errors import BillingError, PriceTableError
from pricing.table import parse_price_table
from pricing.usage import MAX_COUNT, InvalidUsage, UsageRecord, UsageSource

ROOT = Path(__file__).resolve().parents[1]
TRIED: Counter[str] = Counter()  # bad inputs given, per entry point
WRONGLY_ACCEPTED: Counter[str] = Counter()  # stays empty: every test below fails first
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    """Print the tallies at the end when asked (the figures of docs/reliability.md)."""
    yield
    if os.environ.get("METERING_BAD_INPUT_FIGURES"):
        print("\nbad inputs tried:", dict(sorted(TRIED.items())), "wrongly accepted:", dict(WRONGLY_ACCEPTED))


# ====================================================================== price tables


class Leaf:
    """A scalar of the table: its YAML text and its kind (which bad values apply)."""

    def __init__(self, raw: str, kind: str, required: bool = True) -> None:
        self.raw, self.kind, self.required = raw, kind, required


def table_tree() -> dict[str, Any]:
    """A table using every field the schema has (docs/price-table.md), each leaf with its kind."""
    return {
        "schema_version": Leaf("1", "schema_version"),
        "quota": {"units_per_usd": Leaf("500000", "units")},
        "groups": {"default": Leaf("1", "multiplier"), "vip": Leaf('"0.8"', "multiplier")},
        "fallback_model": Leaf("m1", "model_ref", required=False),
        "reference_rates": [{"currency": Leaf("CNY", "currency"), "per_usd": Leaf('"7.1"', "rate"),
                             "source": Leaf("test", "text")}],
        "recharge_rates": [{"id": Leaf("promo", "short_name"), "currency": Leaf("CNY", "currency"),
                            "usd_per_unit": Leaf("1", "rate"), "valid_from": Leaf("2026-01-01T00:00:00+08:00", "time"),
                            "valid_until": Leaf("2027-01-01T00:00:00+08:00", "time", required=False),
                            "label": Leaf("promo", "text")}],
        "grants": {"signup": {"usd": Leaf('"0.2"', "rate"), "once_per_user": Leaf("true", "bool")}},
        "channels": {"c1": {"cost_ratio": Leaf('"0.3"', "multiplier"), "note": Leaf("cheap", "text", required=False)}},
        "models": {"m1": {
            "provider": Leaf("openai", "provider"),
            "aliases": [Leaf("m1-2025", "name")],
            "versions": [{
                "effective_from": Leaf("2025-01-01T00:00:00Z", "time"),
                "input": Leaf('"0.1"', "price"), "output": Leaf('"0.3"', "price"),
                "cached_input": Leaf('"0.05"', "price", required=False),
                "cache_write_5m": Leaf('"0.125"', "price", required=False),
                "cache_write_1h": Leaf('"0.2"', "price", required=False),
                # Optional with a default of 0, but an explicit null is refused: "required" here means "not null".
                "per_request": Leaf("0", "price"), "per_image": Leaf('"0.001"', "price"),
                "per_web_search": Leaf('"0.01"', "price"),
                "long_context": {
                    "above_input_tokens": Leaf("200000", "count"), "input": Leaf('"0.2"', "price"),
                    "output": Leaf('"0.6"', "price"), "cached_input": Leaf('"0.1"', "price"),
                    "cache_write_5m": Leaf('"0.25"', "price"), "cache_write_1h": Leaf('"0.4"', "price"),
                },
                "max_output_tokens": Leaf("100", "count"), "source": Leaf("test", "text"),
            }],
        }},
    }


def emit(tree: dict[str, Any], replace: dict[tuple[Any, ...], str] | None = None,
         rename: dict[tuple[Any, ...], str] | None = None) -> tuple[str, dict[tuple[Any, ...], int]]:
    """Block-style YAML of ``tree`` (leaves' raw text, or ``replace``d), and the line of every path."""
    replace, rename = replace or {}, rename or {}
    out: list[str] = []
    lines: dict[tuple[Any, ...], int] = {}

    def node(value: Any, indent: int, path: tuple[Any, ...]) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                name = rename.get((*path, key), key)
                child_path = (*path, name)
                if isinstance(child, Leaf):
                    out.append(" " * indent + f"{json.dumps(name)}: {replace.get((*path, key), child.raw)}")
                    lines[child_path] = len(out)
                else:
                    out.append(" " * indent + f"{json.dumps(name)}:")
                    lines[child_path] = len(out)
                    node(child, indent + 2, child_path)
        else:
            for index, child in enumerate(value):
                if isinstance(child, Leaf):
                    out.append(" " * indent + f"- {replace.get((*path, index), child.raw)}")
                    lines[(*path, index)] = len(out)
                else:
                    out.append(" " * indent + "-")
                    lines[(*path, index)] = len(out)
                    node(child, indent + 2, (*path, index))

    node(tree, 0, ())
    return "\n".join(out) + "\n", lines


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Leaf]]:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        if isinstance(child, Leaf):
            yield (*path, key), child
        else:
            yield from leaves(child, (*path, key))


def dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


TOO_FINE = "0." + "0" * 40 + "1"  # 41 decimal places
#: Bad values of each kind, as YAML text (``~`` is null: bad only where the field is required).
BAD_VALUES = {
    "price": ["-1", "cheap", ".nan", ".inf", "-.inf", "1e+30", "1000001", TOO_FINE, '"1e-99999"', "true", "[1]", "{a: 1}"],
    "rate": ["0", "-1", ".nan", "x", "true", "1e+30", TOO_FINE, "[]"],
    "multiplier": ["0", "-0.5", "1001", ".inf", "yes", "abc", TOO_FINE],
    "count": ["0", "-5", "1.5", "ten", "true", str(MAX_COUNT + 1), "[1]"],
    "units": ["0", "-1", "true", "1000000000001", "1.5", "x"],
    "time": ["2025-01-01T00:00:00", "yesterday", "5", "true", "2025-13-01T00:00:00Z"],
    "name": ['""', '" padded"', '"nul\\u0000"', json.dumps("n" * 191), "5", "[a]"],
    "short_name": ['""', '"trailing "', json.dumps("s" * 65), "5"],
    "text": ['""', '" lead"', json.dumps("t" * 1001), "5", '"nul\\u0000"'],
    "model_ref": ["nope", "5", '""'],
    "currency": ["EUR", "cny", "5"],
    "provider": ["azure", "OpenAI", "5"],
    "bool": ['"yes"', "1", "maybe"],
    "schema_version": ["2", "true", "0"],
}
BAD_KEYS = ['""', '" vip"', "too long", '"a\\u0001b"']  # too long: one past the section's limit


def problems_of(text: str) -> list[Any]:
    with pytest.raises(PriceTableError) as refused:
        parse_price_table(text, "t.yaml")
    return refused.value.problems


def test_the_complete_table_loads() -> None:
    text, _ = emit(table_tree())
    table = parse_price_table(text, "t.yaml")
    assert table.models["m1"].versions[0].long_context_above == 200_000


MUTATIONS = [
    (path, bad) for path, leaf in leaves(table_tree()) for bad in BAD_VALUES[leaf.kind] + (["~"] if leaf.required else [])
]


@pytest.mark.parametrize(("path", "bad"), MUTATIONS, ids=[f"{dotted(p)}={b[:12]}" for p, b in MUTATIONS])
def test_each_field_mutated_to_a_bad_value_is_refused_with_its_line(path: tuple[Any, ...], bad: str) -> None:
    TRIED["price table"] += 1
    text, lines = emit(table_tree(), replace={path: bad})
    found = problems_of(text)
    named = [p for p in found if p.field == dotted(path) or p.field.startswith(dotted(path) + ".")]
    assert named, (bad, [str(p) for p in found])
    assert named[0].line == lines[path] and named[0].file == "t.yaml", [str(p) for p in found]


@pytest.mark.parametrize("section", ["groups", "grants", "channels", "models"])
@pytest.mark.parametrize("bad", BAD_KEYS)
def test_each_name_key_mutated_is_refused_with_its_line(section: str, bad: str) -> None:
    TRIED["price table"] += 1
    tree = table_tree()
    first = next(iter(tree[section]))
    if section == "models" and bad == '"a\\u0001b"':
        bad = '"a\\u0000b"'  # model names keep control characters (one-api's exotic names); NUL never
    renamed = ("g" * (191 if section == "models" else 65)) if bad == "too long" else json.loads(bad)
    text, lines = emit(tree, rename={(section, first): renamed})
    found = problems_of(text)
    named = [p for p in found if p.field.startswith(f"{section}.{renamed}")]
    assert named and named[0].line == lines[(section, renamed)], [str(p) for p in found]


NUMERIC_TEXT = re.compile(r"^[+-]?\d+(\.\d*)?([eE][+-]?\d+)?$")
INTEGER_TEXT = re.compile(r"^[+-]?\d+$")


def _decimal_ok(value: Any, low: Decimal, high: Decimal, *, strict_low: bool) -> bool:
    """The oracle of the documented decimal rule, written independently of pydantic (which reads numeric text)."""
    if isinstance(value, str) and NUMERIC_TEXT.match(value):
        value = Decimal(value)
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return False
    number = Decimal(value)
    if not number.is_finite() or number > high or (number <= low if strict_low else number < low):
        return False
    exponent = number.normalize().as_tuple().exponent
    return not (isinstance(exponent, int) and exponent < -40)


def _count_ok(value: Any, highest: int) -> bool:
    if isinstance(value, str) and INTEGER_TEXT.match(value):
        value = int(value)
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= highest


def _name_ok(value: Any, longest: int, *, controls: bool = False) -> bool:
    """No surrounding spaces, no NUL; control characters only where ``controls`` (free text, model names)."""
    return (isinstance(value, str) and 0 < len(value) <= longest and value == value.strip() and "\0" not in value
            and (controls or not any(ord(c) < 32 or ord(c) == 127 for c in value)))


ORACLES = {
    "price": lambda v: _decimal_ok(v, Decimal(0), Decimal(10**6), strict_low=False),
    "rate": lambda v: _decimal_ok(v, Decimal(0), Decimal(10**6), strict_low=True),
    "multiplier": lambda v: _decimal_ok(v, Decimal(0), Decimal(1000), strict_low=True),
    "count": lambda v: _count_ok(v, MAX_COUNT),
    "units": lambda v: _count_ok(v, 10**12),
    "short_name": lambda v: _name_ok(v, 64),
    "text": lambda v: _name_ok(v, 1000, controls=True),
}
NUMBERS = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15), st.integers(min_value=10**9, max_value=10**13),
    st.builds(lambda digits, exponent: f"{digits}e{exponent}", st.integers(-999, 999), st.integers(-50, 20)),
    st.decimals(min_value=-10, max_value=10**7, allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from(["true", "false", "~", ".nan", ".inf", "x"]),
)
NAMES = st.text(alphabet=st.sampled_from("ab- \t\x01\x7f中"), max_size=70).map(json.dumps)


@QUICK
@given(data=st.data())
def test_random_values_are_loaded_exactly_when_the_documented_rule_allows_them(data: st.DataObject) -> None:
    from pricing.yaml_source import load_yaml

    candidates = [(p, leaf) for p, leaf in leaves(table_tree()) if leaf.kind in ORACLES]
    path, leaf = data.draw(st.sampled_from(candidates))
    raw = data.draw(NAMES if leaf.kind in ("short_name", "text") else NUMBERS.map(str))
    value = load_yaml(f"v: {raw}\n").data["v"]
    text, lines = emit(table_tree(), replace={path: str(raw)})
    valid = ORACLES[leaf.kind](value) or (value is None and not leaf.required)  # null: an optional field absent
    TRIED["price table"] += 1
    try:
        parse_price_table(text, "t.yaml")
    except PriceTableError as exc:
        assert not valid, f"a valid {leaf.kind} {raw!r} was refused: {exc}"
        named = [p for p in exc.problems if p.field == dotted(path)]
        assert named and named[0].line == lines[path], [str(p) for p in exc.problems]
    else:
        if not valid:
            WRONGLY_ACCEPTED["price table"] += 1
        assert valid, f"an invalid {leaf.kind} {raw!r} was accepted"


# ====================================================================== usage payloads

#: Values no usage count may be: each must be refused, naming its field.
BAD_COUNTS = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=MAX_COUNT + 1),
    st.sampled_from([2**63, 2**64, 10**30, -(2**63), True, False, 1.0, 0.5, float("nan"), float("inf"), "5", "",
                     [], [1], {}, {"n": 1}]),
    st.floats(), st.text(max_size=5),
)
OPENAI_FIELDS = {
    ("prompt_tokens",): 100, ("completion_tokens",): 20, ("prompt_tokens_details", "cached_tokens"): 10,
    ("completion_tokens_details", "reasoning_tokens"): 5,
}
ANTHROPIC_FIELDS = {
    ("input_tokens",): 100, ("output_tokens",): 20, ("cache_read_input_tokens",): 10,
    ("cache_creation_input_tokens",): 30, ("cache_creation", "ephemeral_5m_input_tokens"): 10,
    ("cache_creation", "ephemeral_1h_input_tokens"): 20, ("server_tool_use", "web_search_requests"): 1,
}


def usage_object(fields: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    for path, value in fields.items():
        target = usage
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return usage


@QUICK
@given(provider=st.sampled_from(["openai", "anthropic"]), data=st.data(), bad=BAD_COUNTS)
def test_a_bad_count_anywhere_in_a_usage_object_is_refused_naming_it(provider: str, data: st.DataObject, bad: Any) -> None:
    fields = dict(OPENAI_FIELDS if provider == "openai" else ANTHROPIC_FIELDS)
    path = data.draw(st.sampled_from(sorted(fields)))
    fields[path] = bad
    TRIED["usage payloads"] += 1
    mapper = UsageRecord.from_openai if provider == "openai" else UsageRecord.from_anthropic
    model = "gpt-4o" if provider == "openai" else "claude-sonnet-4-5"
    with pytest.raises(InvalidUsage) as refused:
        mapper(model, usage_object(fields))
        WRONGLY_ACCEPTED["usage payloads"] += 1
    assert refused.value.field == "usage." + ".".join(path)
    assert isinstance(refused.value, BillingError) and str(refused.value).startswith(refused.value.field + ": ")


@QUICK
@given(provider=st.sampled_from(["openai", "anthropic"]), data=st.data(),
       bad=st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2), st.floats(), st.booleans()))
def test_a_nested_usage_object_of_the_wrong_shape_is_refused_naming_it(provider: str, data: st.DataObject, bad: Any) -> None:
    assume(bad != {} and bad is not None)
    nested = ["prompt_tokens_details", "completion_tokens_details"] if provider == "openai" else [
        "cache_creation", "server_tool_use"]
    name = data.draw(st.sampled_from(nested))
    usage = usage_object(OPENAI_FIELDS if provider == "openai" else ANTHROPIC_FIELDS) | {name: bad}
    TRIED["usage payloads"] += 1
    mapper = UsageRecord.from_openai if provider == "openai" else UsageRecord.from_anthropic
    with pytest.raises(InvalidUsage) as refused:
        mapper("gpt-4o", usage)
    assert refused.value.field == f"usage.{name}"
    with pytest.raises(InvalidUsage) as whole:
        mapper("gpt-4o", bad)  # the usage object itself not an object
    assert whole.value.field == "usage"


@QUICK
@given(field=st.sampled_from(["input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                              "output_tokens", "reasoning_tokens", "images", "web_search_requests"]), bad=BAD_COUNTS)
def test_a_bad_count_in_a_usage_record_is_refused_naming_it(field: str, bad: Any) -> None:
    TRIED["usage payloads"] += 1
    with pytest.raises(InvalidUsage) as refused:
        UsageRecord(**({"provider": "openai", "model": "gpt-4o", "output_tokens": 10**9} | {field: bad}))
    assert refused.value.field == field
    with pytest.raises(InvalidUsage):
        UsageRecord(provider="openai", model="gpt-4o", **{field: Decimal(5)})  # a Decimal count is not an int


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"model": ""}, "model"), ({"model": 5}, "model"), ({"model": "m" * 191}, "model"), ({"model": "gpt\x00"}, "model"),
    ({"model": "gpt\ud800"}, "model"), ({"provider": ""}, "provider"), ({"provider": None}, "provider"),
    ({"source": "guess"}, "source"), ({"extra": []}, "extra"),
])
def test_a_usage_record_names_its_bad_non_count_field(kwargs: dict[str, Any], field: str) -> None:
    TRIED["usage payloads"] += 1
    with pytest.raises(InvalidUsage) as refused:
        UsageRecord(**({"provider": "openai", "model": "gpt-4o"} | kwargs))
    assert refused.value.field == field


def test_missing_figures_are_zero_and_an_absurd_charge_is_refused() -> None:
    from pricing.quote import MAX_QUOTA, price, quota
    from pricing.table import load_price_table

    assert UsageRecord.from_openai("gpt-4o", {}).total_tokens == 0  # absent or null: 0, documented
    assert UsageRecord.from_anthropic("claude-sonnet-4-5", {"input_tokens": None}).total_tokens == 0
    expensive = parse_price_table(emit(table_tree(), replace={
        ("models", "m1", "versions", 0, "output"): "1000000", ("groups", "default"): "1000",
        ("quota", "units_per_usd"): "1000000000000"})[0])
    usage = UsageRecord(provider="openai", model="m1", output_tokens=MAX_COUNT)
    TRIED["usage payloads"] += 2
    for compute in (lambda: price(expensive, usage, datetime.now(UTC)), lambda: quota(expensive, usage, datetime.now(UTC).timestamp())):
        with pytest.raises(InvalidUsage, match=str(MAX_QUOTA)) as refused:
            compute()
        assert refused.value.field == "usage"
    assert quota(load_price_table(), UsageRecord(provider="openai", model="gpt-4o", output_tokens=MAX_COUNT),
                 datetime.now(UTC).timestamp()) <= MAX_QUOTA  # the bundled table's worst case fits


# ====================================================================== request bodies

SAMPLES = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "metering/samples/requests").glob("*.json"))}
#: Junk of every JSON shape, plus what only a Python caller could pass.
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True),
              st.text(alphabet=st.characters(codec=None, categories=("L", "N", "P", "Zs", "Cs", "Cc")), max_size=12),
              st.sampled_from([b"bytes", {1, 2}, ("tu", "ple")])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside a body (the body itself excluded)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*path, key)
        yield from paths(child, (*path, key))


def mutated(body: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool) -> dict[str, Any]:
    copy = json.loads(json.dumps(body))
    target = copy
    for part in path[:-1]:
        target = target[part]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy


def related(error_path: tuple[Any, ...], path: tuple[Any, ...]) -> bool:
    """The error names the mutated field, one of its ancestors, or something inside it."""
    shorter = min(len(error_path), len(path))
    return error_path[:shorter] == path[:shorter]


def deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": [value]}
    return value


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), junk=st.one_of(JUNK, st.integers(1, 4).map(lambda n: deep(400 * n))), delete=st.booleans())
def test_a_body_mutated_anywhere_gives_a_count_or_a_typed_error_naming_a_related_path(
    data: st.DataObject, junk: Any, delete: bool
) -> None:
    name = data.draw(st.sampled_from(sorted(SAMPLES)))
    body = SAMPLES[name]
    path = data.draw(st.sampled_from(list(paths(body))))
    TRIED["request bodies"] += 1
    try:
        result = count_request(mutated(body, path, junk, delete), cache=None)
    except RequestError as exc:
        assert related(exc.path, path) or exc.path == (), (path, exc.path, str(exc))
        assert str(exc).startswith(format_path(exc.path) + ": ")
    except BillingError as exc:  # UnknownModel: the model was mutated
        assert path[0] == "model", (path, exc)
    else:
        assert isinstance(result.prompt_tokens, int) and result.prompt_tokens >= 0


RESPONSES = {
    "openai": {"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "Hi there", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}}},
    "anthropic": {"id": "msg_1", "model": "claude-sonnet-4-5", "content": [
        {"type": "text", "text": "Hi there"}, {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}],
        "usage": {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 0,
                  "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}},
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), junk=JUNK, delete=st.booleans(), drop_usage=st.booleans())
def test_a_response_mutated_anywhere_gives_usage_or_a_typed_error(
    data: st.DataObject, junk: Any, delete: bool, drop_usage: bool
) -> None:
    from metering.completion import usage_from_response
    from metering.prompt_count import PromptCount

    provider = data.draw(st.sampled_from(sorted(RESPONSES)))
    response = json.loads(json.dumps(RESPONSES[provider]))
    if drop_usage:  # then the output is counted locally from the response's text
        del response["usage"]
    path = data.draw(st.sampled_from(list(paths(response))))
    model = response["model"]
    prompt = PromptCount(model, model, provider, None, 20, UsageSource.LOCAL)
    TRIED["responses"] += 1
    given_response = mutated(response, path, junk, delete)
    try:
        record = usage_from_response(given_response, model, prompt=prompt)
    except BillingError as exc:  # InvalidUsage naming a usage field, or ResponseError naming a JSON path
        field = getattr(exc, "field", None) or format_path(getattr(exc, "path", ()))
        assert field.split(".")[0].split("[")[0] == str(path[0]) or field == "$", (path, str(exc))
    else:
        assert isinstance(record, UsageRecord) and record.total_tokens >= 0
        usage = given_response.get("usage")
        if usage:  # accepted upstream figures are billed exactly as given: never a junk value read as 0
            names = ("prompt_tokens", "completion_tokens") if provider == "openai" else ("input_tokens", "output_tokens")
            given = [usage.get(name) for name in names]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in given):
                WRONGLY_ACCEPTED["responses"] += 1
            assert record.source is UsageSource.UPSTREAM and record.output_tokens == given[1], (path, junk)
            assert (record.total_input_tokens if provider == "openai" else record.input_tokens) == given[0], (path, junk)


@pytest.mark.parametrize(("provider", "usage", "field"), [
    ("openai", {"prompt_tokens": 5}, "usage.completion_tokens"), ("openai", {"completion_tokens": 5}, "usage.prompt_tokens"),
    ("openai", {"total_tokens": 10}, "usage.prompt_tokens"), ("openai", {"prompt_tokens": 5, "completion_tokens": None},
                                                              "usage.completion_tokens"),
    ("anthropic", {"output_tokens": 3}, "usage.input_tokens"), ("anthropic", {"input_tokens": 3}, "usage.output_tokens"),
])
def test_a_response_usage_without_its_input_or_output_count_is_refused_not_billed_as_zero(
    provider: str, usage: dict[str, Any], field: str
) -> None:
    from metering.completion import usage_from_response

    TRIED["responses"] += 1
    response = {**RESPONSES[provider], "usage": usage}
    with pytest.raises(InvalidUsage) as refused:
        usage_from_response(response, response["model"])
        WRONGLY_ACCEPTED["responses"] += 1
    assert refused.value.field == field


#: Fields whose type the counters define: (sample, path, the types it may be).
TYPED_SLOTS = [
    ("openai-cookbook-messages", ("messages",), (list,)),
    ("openai-cookbook-messages", ("messages", 0), (dict,)),
    ("openai-cookbook-messages", ("messages", 1, "content"), (str, list, type(None))),
    ("openai-vision", ("messages", 0, "content", 0), (dict,)),
    ("openai-vision", ("messages", 0, "content", 0, "text"), (str,)),
    ("openai-tools-weather", ("tools",), (list, type(None))),
    ("openai-tools-weather", ("tools", 0), (dict,)),
    ("openai-tools-weather", ("tools", 0, "function", "name"), (str,)),
    ("claude-vision-tools", ("messages",), (list,)),
    ("claude-vision-tools", ("messages", 0, "role"), (str,)),
    ("claude-vision-tools", ("messages", 0, "content"), (str, list)),
    ("claude-vision-tools", ("system",), (str, list, type(None))),
    ("claude-vision-tools", ("tools", 0, "name"), (str,)),
]


@QUICK
@given(slot=st.sampled_from(TYPED_SLOTS), junk=JUNK)
def test_a_wrong_type_at_a_typed_field_is_refused_naming_it(slot: tuple[str, tuple[Any, ...], tuple[type, ...]], junk: Any) -> None:
    name, path, allowed = slot
    assume(not isinstance(junk, allowed) or isinstance(junk, bool))
    assume(not (isinstance(junk, (list, dict)) and not junk and path in (("tools",),)))  # no tools: nothing to count
    TRIED["request bodies"] += 1
    with pytest.raises(RequestError) as refused:
        count_request(mutated(SAMPLES[name], path, junk, delete=False), cache=None)
        WRONGLY_ACCEPTED["request bodies"] += 1
    assert related(refused.value.path, path), (path, refused.value.path)


@pytest.fixture
def sqlite_meter(tmp_path: Path) -> Iterator[Meter]:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    yield meter
    meter.close()


LEDGER = [t.__table__ for t in (User, ApiKey, Hold, UsageEvent, LedgerEntry, TopupOrder)]  # type: ignore[attr-defined]


def state(meter: Meter) -> list[list[tuple[Any, ...]]]:
    with meter.engine.connect() as connection:
        return [[tuple(r) for r in connection.execute(select(t).order_by(*t.primary_key.columns))] for t in LEDGER]


def ready(meter: Meter) -> str:
    uid = meter.create_user("alice")
    meter.adjust(uid, 10**12, "fund", "test")
    return meter.create_key(uid, "k")


BAD_MAX_TOKENS = st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_COUNT + 1), st.floats(), st.text(max_size=4),
                           st.booleans(), st.lists(st.integers(), max_size=1), st.sampled_from([2**63, 10**30, "100"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(["max_tokens", "max_completion_tokens"]), bad=BAD_MAX_TOKENS, data=st.data())
def test_authorize_refuses_an_absurd_or_mistyped_output_bound_and_writes_nothing(
    sqlite_meter: Meter, field: str, bad: Any, data: st.DataObject
) -> None:
    meter = sqlite_meter
    secret = getattr(meter, "_test_secret", None) or ready(meter)
    meter._test_secret = secret  # type: ignore[attr-defined]
    body = data.draw(st.sampled_from([SAMPLES["openai-cookbook-messages"], SAMPLES["claude-vision-tools"]]))
    before = state(meter)
    TRIED["request bodies"] += 1
    with pytest.raises(RequestError) as refused:
        meter.authorize(secret, {**body, field: bad}, f"r-{data.draw(st.uuids())}")
        WRONGLY_ACCEPTED["request bodies"] += 1
    assert refused.value.path == (field,)
    assert state(meter) == before


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(JUNK.filter(lambda v: not isinstance(v, dict)), st.just({"messages": []}),
                      st.builds(lambda j: {"model": "gpt-4o", "messages": j}, JUNK.filter(lambda v: not isinstance(v, list)))),
       request_id=st.one_of(st.just("ok-id"), st.text(max_size=3).filter(lambda t: t != t.strip() or not t),
                            st.text(min_size=161, max_size=170), st.just("a\x00b"), st.just("\ud800")))
def test_authorize_refuses_bad_bodies_and_request_ids_with_typed_errors_and_writes_nothing(
    sqlite_meter: Meter, body: Any, request_id: str
) -> None:
    meter = sqlite_meter
    secret = getattr(meter, "_test_secret", None) or ready(meter)
    meter._test_secret = secret  # type: ignore[attr-defined]
    before = state(meter)
    TRIED["request bodies"] += 1
    with pytest.raises((RequestError, InvalidField, MeteringError)) as refused:
        meter.authorize(secret, body, request_id)
        WRONGLY_ACCEPTED["request bodies"] += 1
    if request_id != "ok-id":
        assert isinstance(refused.value, InvalidField) and refused.value.field == "request_id"
    assert state(meter) == before


# ====================================================================== SSE streams


def sse(events: list[Any]) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


def openai_events(text: str, usage: Any) -> list[Any]:
    events: list[Any] = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in text.split(" ")]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": usage})
    return [*events, "[DONE]"]


def anthropic_events(text: str, usage: Any) -> list[Any]:
    return [
        {"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece + " "}}
          for piece in text.split(" ")),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage},
        {"type": "message_stop"},
    ]


INVALID_UTF8 = [b"\xff", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82"]
#: Junk a JSON usage chunk can carry.
JSON_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6,
)
WORDS = st.text(alphabet="abcdefgh", min_size=1, max_size=6)


def feed_split(model: str, data: bytes, cuts: list[int]) -> Any:
    accumulator = StreamAccumulator(model)
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        accumulator.feed(data[start:cut])
        start = cut
    return accumulator.finish()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    provider=st.sampled_from(["openai", "anthropic"]),
    words=st.lists(WORDS, min_size=1, max_size=6),
    bad_usage=st.one_of(st.none(), BAD_COUNTS, JSON_JUNK),
    truncate=st.one_of(st.none(), st.floats(0, 1)),
    interleave=st.booleans(),
    invalid=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(INVALID_UTF8)), max_size=3),
    cuts=st.lists(st.floats(0, 1), max_size=6),
)
def test_a_bad_stream_never_breaks_the_relay_and_never_bills_a_rejected_usage(
    provider: str, words: list[str], bad_usage: Any, truncate: float | None, interleave: bool,
    invalid: list[tuple[float, bytes]], cuts: list[float],
) -> None:
    model = "gpt-4o-mini" if provider == "openai" else "claude-sonnet-4-5"
    build = openai_events if provider == "openai" else anthropic_events
    good = {"prompt_tokens": 12, "completion_tokens": 7} if provider == "openai" else {"output_tokens": 7}
    usage_field = "completion_tokens" if provider == "openai" else "output_tokens"
    usage = good if bad_usage is None else {**good, usage_field: bad_usage}
    events = build(" ".join(words), usage)
    if interleave:  # another response's events woven in (a proxy mixing two streams)
        other = build("zz yy", good)
        events = [e for pair in zip(events, other) for e in pair] + events[len(other):]
    data = sse(events)
    if truncate is not None:
        data = data[: int(len(data) * truncate)]
    positions = sorted(((int(len(data) * where), junk) for where, junk in invalid), reverse=True)
    assume(len({at for at, _ in positions}) == len(positions))  # an ASCII byte between any two: never a valid pair
    inserted = 0
    for at, junk in positions:  # from the end, so each position is still the original one
        data = data[:at] + junk + data[at:]
        inserted += len(junk)
    TRIED["SSE streams"] += 1
    whole = feed_split(model, data, [])
    split = feed_split(model, data, [int(len(data) * c) for c in cuts])
    assert split == whole  # however the bytes were split
    assert whole.invalid_bytes == inserted  # the stream's own bytes are ASCII: only the inserted ones are invalid
    record = whole.usage
    assert all(0 <= getattr(record, f) <= MAX_COUNT for f in ("input_tokens", "output_tokens", "cached_input_tokens"))
    if bad_usage is not None and not (isinstance(bad_usage, int) and not isinstance(bad_usage, bool) and 0 <= bad_usage <= MAX_COUNT):
        # The rejected figure is never billed; when its chunk arrived intact it is kept for the quarantine.
        if not interleave and provider == "openai":
            assert record.source is not UsageSource.UPSTREAM
        if whole.rejected_usage:
            assert all(r.field.startswith("usage") for r in whole.rejected_usage)
        elif truncate is None and not invalid and not interleave:
            WRONGLY_ACCEPTED["SSE streams"] += 1
            raise AssertionError(f"the invalid usage {bad_usage!r} was neither rejected nor kept")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bad=BAD_COUNTS, words=st.lists(WORDS, min_size=1, max_size=4))
def test_a_stream_with_a_rejected_usage_settles_locally_and_keeps_one_row_per_chunk(
    sqlite_meter: Meter, bad: Any, words: list[str]
) -> None:
    meter = sqlite_meter
    secret = getattr(meter, "_test_secret", None) or ready(meter)
    meter._test_secret = secret  # type: ignore[attr-defined]
    hold = meter.authorize(secret, SAMPLES["openai-cookbook-messages"] | {"model": "gpt-4o"}, f"s-{os.urandom(6).hex()}")
    accumulator = meter.accumulator(hold)
    accumulator.feed(sse(openai_events(" ".join(words), {"prompt_tokens": 3, "completion_tokens": bad})))
    rows_before = len(quarantine.listing(meter._read))
    TRIED["SSE streams"] += 1
    receipt = meter.settle(hold, stream=accumulator)
    assert receipt.source == "local"  # the prompt count and the delivered text, not the upstream's figure
    assert len(quarantine.listing(meter._read)) == rows_before + 1


# ====================================================================== timestamps

TIMES = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),  # naive
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])),
    st.sampled_from([datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
                     EARLIEST - timedelta(microseconds=1), datetime(1970, 1, 1, tzinfo=UTC)]),
    st.one_of(st.text(max_size=5), st.integers(), st.floats(), st.dates()),
)


@settings(max_examples=150, deadline=None)
@given(at=TIMES)
def test_an_event_time_is_accepted_exactly_when_aware_and_plausible(at: Any) -> None:
    now = datetime.now(UTC)
    TRIED["timestamps"] += 1
    expected = plausible(at, now)
    try:
        moment = event_time(at, "at", now=now)
    except InvalidField as exc:
        assert not expected and exc.field == "at" and str(exc).startswith("at: ")
    else:
        if not expected:
            WRONGLY_ACCEPTED["timestamps"] += 1
        assert expected and moment == at


def plausible(at: Any, now: datetime) -> bool:
    """The documented rule for ``at``, written out: aware, from 2000 to a year from now."""
    if not (isinstance(at, datetime) and at.tzinfo is not None and at.utcoffset() is not None):
        return False
    try:
        return EARLIEST <= at.astimezone(UTC) <= now + MAX_AHEAD
    except OverflowError:
        return False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(at=TIMES, call=st.sampled_from(["authorize", "record_usage", "topup"]))
def test_a_bad_at_is_refused_by_every_call_and_nothing_is_written(sqlite_meter: Meter, at: Any, call: str) -> None:
    assume(not plausible(at, datetime.now(UTC)))
    meter = sqlite_meter
    secret = getattr(meter, "_test_secret", None) or ready(meter)
    meter._test_secret = secret  # type: ignore[attr-defined]
    before = state(meter)
    usage = UsageRecord(provider="openai", model="gpt-4o", input_tokens=1)
    calls = {
        "authorize": lambda: meter.authorize(secret, SAMPLES["openai-cookbook-messages"], "t-1", at=at),
        "record_usage": lambda: meter.record_usage(secret, "t-2", usage, at=at),
        "topup": lambda: meter.topup(1, "1", "USD", "t-3", at=at),
    }
    TRIED["timestamps"] += 1
    with pytest.raises(InvalidField) as refused:
        calls[call]()
        WRONGLY_ACCEPTED["timestamps"] += 1
    assert refused.value.field == "at"
    assert state(meter) == before


# ====================================================================== the command line

RUNNER = CliRunner()


def invoke(*args: str) -> Any:
    from workers.cli.main import app

    return RUNNER.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1", "METERING_DB": None,
                                               "METERING_PRICE_TABLE": None})


def refused_naming(result: Any, field: str) -> None:
    """Exit 2, nothing on stdout, and the error names ``field``: ours, or the command line parser's."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    ours = result.stderr.startswith(f"error: {field}:")
    said = result.stderr.lower()  # the parser names an argument in lower case ('key_id')
    parsers = f"invalid value for '{field.lower()}'" in said or f"missing option '{field.lower()}'" in said
    assert ours or parsers, result.stderr


@pytest.fixture(scope="module")
def cli_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite ledger with alice (funded) and her key 1, made once and copied for each test."""
    path = tmp_path_factory.mktemp("cli") / "template.db"
    meter = Meter.open(f"sqlite:///{path}")
    uid = meter.create_user("alice")
    meter.adjust(uid, 10_000_000, "fund", "test")
    meter.create_key(uid, "k")
    meter.close()
    return path


@pytest.fixture
def cli_db(cli_template: Path, tmp_path: Path) -> str:
    """A fresh copy of the template ledger."""
    copy = tmp_path / "ledger.db"
    shutil.copyfile(cli_template, copy)
    return f"sqlite:///{copy}"


def db_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read with sqlite3 itself (what "nothing written" compares)."""
    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: connection.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}


#: (arguments, the field the error must name). Each runs against a populated ledger that must not change.
CLI_CASES = [
    (["user", "create", " padded"], "NAME"), (["user", "create", "123"], "NAME"), (["user", "create", "x\x00y"], "NAME"),
    (["user", "create", "n" * 191], "NAME"), (["user", "create", "bob", "--group", "platinum"], "--group"),
    (["user", "show", "nobody"], "USER"), (["balance", "nobody"], "USER"),
    (["key", "create", "alice", "--limit-quota", "-1"], "--limit-quota"),
    (["key", "create", "alice", "--limit-quota", str(2**63)], "--limit-quota"),
    (["key", "create", "alice", "--limit-quota", "many"], "--limit-quota"),
    (["key", "create", "alice", "--expires", "2030-01-01T00:00:00"], "--expires"),
    (["key", "create", "alice", "--expires", "9999-12-31T23:59:59-14:00"], "--expires"),
    (["key", "create", "alice", "--expires", "2001-01-01T00:00:00Z"], "--expires"),
    (["key", "create", "alice", "--models", "gpt-99"], "--models"), (["key", "create", "alice", "--name", "k" * 191], "--name"),
    (["key", "create", "alice", "--unlimited", "--limit-quota", "5"], "--unlimited"),
    (["key", "create", "nobody"], "USER"), (["key", "revoke", "99"], "KEY_ID"), (["key", "revoke", "one"], "KEY_ID"),
    (["topup", "alice", "--amount", "ten", "--currency", "CNY", "--reference", "o-1"], "--amount"),
    (["topup", "alice", "--amount", "-5", "--currency", "CNY", "--reference", "o-1"], "--amount"),
    (["topup", "alice", "--amount", "nan", "--currency", "CNY", "--reference", "o-1"], "--amount"),
    (["topup", "alice", "--amount", "1e999999", "--currency", "CNY", "--reference", "o-1"], "--amount"),
    (["topup", "alice", "--amount", "0.000000001", "--currency", "CNY", "--reference", "o-1"], "--amount"),
    (["topup", "alice", "--amount", "1" * 40, "--currency", "CNY", "--reference", "o-1"], "--amount"),
    (["topup", "alice", "--amount", "10", "--currency", "EUR", "--reference", "o-1"], "--currency"),
    (["topup", "alice", "--amount", "10", "--currency", "CNY", "--reference", " o-1"], "--reference"),
    (["topup", "alice", "--amount", "10", "--currency", "CNY", "--reference", "r" * 161], "--reference"),
    (["topup", "nobody", "--amount", "10", "--currency", "CNY", "--reference", "o-1"], "USER"),
    (["grant", "alice", "birthday"], "KIND"),
    (["redeem", "create", "--count", "0", "--quota", "5"], "--count"),
    (["redeem", "create", "--count", "1", "--quota", str(2**60)], "--quota"),
    (["redeem", "create", "--count", "1", "--quota", "5", "--batch", "b" * 65], "--batch"),
    (["redeem", "use", "alice", "rc-not-a-code"], "CODE"),
    (["quarantine", "list", "--limit", "0"], "--limit"), (["quarantine", "list", "--request-id", " x"], "--request-id"),
    (["quote", "--model", "gpt-4o", "--input", "-1", "--output", "1"], "--input"),
    (["quote", "--model", "gpt-4o", "--input", str(MAX_COUNT + 1), "--output", "1"], "--input"),
    (["quote", "--model", "gpt-4o", "--input", "1", "--output", "1", "--cached-input", "2"], "--cached-input"),
    (["quote", "--model", "gpt-99", "--input", "1", "--output", "1"], "--model"),
    (["quote", "--model", "gpt-4o", "--input", "1", "--output", "1", "--group", "platinum"], "--group"),
    (["quote", "--model", "gpt-4o", "--input", "1", "--output", "1", "--at", "2020-01-01T00:00:00Z"], "--at"),
    (["quote", "--model", "gpt-4o", "--input", "1", "--output", "1", "--at", "soon"], "--at"),
    (["quote", "--model", "claude-sonnet-4-5", "--input", "1", "--output", "1", "--cache-write", "1",
      "--cache-write-1h", "2"], "--cache-write-1h"),
    (["quote-topup", "--amount", "-1", "--currency", "CNY"], "--amount"),
    (["quote-topup", "--amount", "10", "--currency", "EUR"], "--currency"),
    (["prices", "show", "--model", "gpt-99"], "--model"),
    (["prices", "export", "--format", "litellm"], "--format"),
    (["count", "--request", "-", "--model", "gpt-99"], "--model"),
    (["count", "--request", "-", "--image-size", "nonsense"], "--image-size"),
    (["reconcile", "--day", "2026-13-01"], "--day"),
    (["report", "--from", "2026-11-02", "--to", "2026-11-01"], "--from"),
]


@pytest.mark.parametrize(("args", "field"), CLI_CASES, ids=[" ".join(a)[:40] for a, _ in CLI_CASES])
def test_each_bad_flag_exits_2_naming_it_and_writes_nothing(cli_db: str, args: list[str], field: str) -> None:
    before = db_rows(cli_db)
    TRIED["command line"] += 1
    if args[0] == "count":
        from workers.cli.main import app

        result = RUNNER.invoke(app, args, input=json.dumps(SAMPLES["openai-vision"]))
    else:
        result = invoke(*args, *([] if args[0] in ("quote", "quote-topup", "prices", "count") else ["--db", cli_db]))
    refused_naming(result, field)
    assert db_rows(cli_db) == before


@pytest.mark.parametrize("args", [
    ["user", "create", "bob", "--group", "platinum"], ["grant", "alice", "birthday"],
    ["topup", "alice", "--amount", "x", "--currency", "CNY", "--reference", "o"],
    ["topup", "alice", "--amount", "1", "--currency", "EUR", "--reference", "o"],
    ["key", "create", "alice", "--expires", "yesterday"], ["redeem", "create", "--count", "1", "--quota", "1", "--batch", " b"],
])
def test_a_flag_the_price_table_refuses_never_creates_the_database(tmp_path: Path, args: list[str]) -> None:
    target = tmp_path / "never.db"
    TRIED["command line"] += 1
    result = invoke(*args, "--db", f"sqlite:///{target}")
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.stderr
    assert not target.exists()


AMOUNT_TEXT = re.compile(r"^\s*\d{1,9}(\.\d{1,8})?\s*$")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(amount=st.one_of(st.text(max_size=12), st.decimals(allow_nan=True).map(str), st.integers(min_value=10**9 + 1).map(str),
                        st.integers(max_value=0).map(str)))
def test_random_topup_amounts_credit_or_exit_2_naming_the_flag(cli_db: str, amount: str) -> None:
    assume("\x00" not in amount)
    before = db_rows(cli_db)
    TRIED["command line"] += 1
    result = invoke("topup", "alice", f"--amount={amount}", "--currency", "USD", "--reference", f"o-{abs(hash(amount))}",
                    "--json", "--db", cli_db)
    try:
        value = Decimal(amount)
        plausible = bool(AMOUNT_TEXT.match(amount)) and value > 0 and value * 500_000 >= 1
    except (InvalidOperation, ValueError):
        plausible = False
    if result.exit_code == 0:
        assert plausible or Decimal(amount) > 0, amount  # "1_000" and "1E+2" are decimals too
        assert json.loads(result.stdout)["quota"] >= 1
    else:
        refused_naming(result, "--amount")
        assert db_rows(cli_db) == before
        assert not plausible, f"a valid amount {amount!r} was refused: {result.stderr}"
