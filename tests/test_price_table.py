"""Loading the price table: exact decimals, every problem with file, line and field, never half-loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from decimal import Decimal
from pathlib import Path

import pytest

from tests.wheel import build_wheel
from pricing.errors import PriceTableError
from pricing.table import load_price_table, parse_price_table

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """\
schema_version: 1
quota: {units_per_usd: 500000}
groups: {default: 1, vip: "0.8"}
models:
  m1:
    provider: openai
    aliases: [m1-2025-01-01]
    versions:
      - {effective_from: 2025-01-01T00:00:00Z, input: 0.1, output: "0.3", max_output_tokens: 100, source: test}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(PriceTableError) as info:
        parse_price_table(text, "t.yaml")
    return [str(problem) for problem in info.value.problems]


def test_the_bundled_table_loads() -> None:
    table = load_price_table()
    assert table.units_per_usd == 500_000
    assert {"gpt-4o", "claude-3-opus", "gpt-3.5-turbo"} <= set(table.models)


def test_prices_are_exact_decimals_never_floats() -> None:
    table = parse_price_table(MINIMAL)
    version = table.models["m1"].versions[0].version
    assert version.input == Decimal("0.1") and isinstance(version.input, Decimal)  # 0.1 as float is not 0.1
    assert table.models["m1"].versions[0].rates[0] == 1  # 0.1 per 1M at scale 10: an exact integer rate


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (("input: 0.1", "input: -1"), "t.yaml:9: models.m1.versions[0].input: Input should be greater than or equal to 0"),
        (("input: 0.1", "input: cheap"), "t.yaml:9: models.m1.versions[0].input: Input should be a valid decimal"),
        (("input: 0.1", "input: .nan"), "t.yaml:9: models.m1.versions[0].input:"),
        (("source: test}", "source: test, colour: red}"), "t.yaml:9: models.m1.versions[0].colour: Extra inputs are not permitted"),
        (("vip: \"0.8\"", "vip: 0"), "t.yaml:3: groups.vip: Input should be greater than 0"),
        (("2025-01-01T00:00:00Z", "2025-01-01T00:00:00"), "t.yaml:9: models.m1.versions[0].effective_from: Input should have timezone info"),
        (("units_per_usd: 500000", "units_per_usd: 500000, extra: 1"), "t.yaml:2: quota.extra: Extra inputs are not permitted"),
    ],
)
def test_field_problems_name_file_line_and_field(replace: tuple[str, str], expected: str) -> None:
    found = problems_of(MINIMAL.replace(*replace))
    assert any(problem.startswith(expected) for problem in found), found


def test_every_problem_is_reported_at_once() -> None:
    text = MINIMAL.replace("input: 0.1", "input: -1").replace('vip: "0.8"', "vip: -2")
    assert len(problems_of(text)) == 2


def test_unordered_or_equal_versions_are_refused() -> None:
    text = MINIMAL + (
        "      - {effective_from: 2024-06-01T00:00:00Z, input: 1, output: 1, max_output_tokens: 1, source: s}\n"
    )
    (problem,) = problems_of(text)
    assert problem.startswith("t.yaml:10: models.m1.versions[1].effective_from: versions must be in strictly increasing")
    same = MINIMAL + "      - {effective_from: 2025-01-01T00:00:00Z, input: 1, output: 1, max_output_tokens: 1, source: s}\n"
    assert "strictly increasing" in problems_of(same)[0]


def test_alias_collisions_are_refused() -> None:
    text = MINIMAL + """\
  m2:
    provider: anthropic
    aliases: [M1-2025-01-01]
    versions:
      - {effective_from: 2025-01-01T00:00:00Z, input: 1, output: 1, max_output_tokens: 1, source: s}
"""
    (problem,) = problems_of(text)
    assert problem.startswith("t.yaml:12: models.m2.aliases[0]: name 'M1-2025-01-01' is already used by model 'm1'")


def test_duplicate_keys_are_refused_not_merged() -> None:
    text = MINIMAL.replace("groups: {default: 1, vip: \"0.8\"}", "groups: {default: 1, default: 2}")
    assert problems_of(text) == ["t.yaml:3: groups.default: duplicate key"]


def test_a_recharge_window_must_end_after_it_starts() -> None:
    text = MINIMAL + """\
recharge_rates:
  - {id: promo, currency: CNY, usd_per_unit: 1, valid_from: 2026-02-01T00:00:00+08:00,
     valid_until: 2026-01-01T00:00:00+08:00, label: promo}
"""
    assert problems_of(text) == ["t.yaml:12: recharge_rates[0].valid_until: the window ends before it starts"]


def test_a_default_group_and_a_real_fallback_are_required() -> None:
    text = MINIMAL.replace('groups: {default: 1, vip: "0.8"}', 'groups: {vip: "0.8"}') + "fallback_model: nope\n"
    found = problems_of(text)
    assert "t.yaml:3: groups: a 'default' group is required" in found
    assert "t.yaml:10: fallback_model: 'nope' is not a model of this table" in found


def test_broken_yaml_names_the_line() -> None:
    found = problems_of(MINIMAL.replace("groups: {default: 1", "groups: {default: [1"))
    assert found[0].startswith("t.yaml:")


def test_cli_validate_prints_path_line_field_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("input: 0.1", "input: -1"), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "metering", "prices", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith(f"{bad}:9: models.m1.versions[0].input:")
    ok = subprocess.run([sys.executable, "-m", "metering", "prices", "validate"], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok:" in ok.stdout


def test_the_environment_variable_overrides_the_bundled_table(tmp_path: Path) -> None:
    custom = tmp_path / "custom.yaml"
    custom.write_text(MINIMAL, encoding="utf-8")
    env = {**os.environ, "METERING_PRICE_TABLE": str(custom)}
    out = subprocess.run([sys.executable, "-m", "metering", "prices", "show", "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert '"model": "m1"' in out.stdout and "gpt-4o" not in out.stdout


def test_an_installed_wheel_finds_its_table_from_another_directory(tmp_path: Path) -> None:
    """The wheel ships the table (the symlink's content), and the installed package loads it from anywhere."""
    wheel = build_wheel(tmp_path)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "pricing" / "price_table.yaml").read_bytes() == (ROOT / "data" / "price_table.yaml").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import pricing, pricing.table as t; print(pricing.__file__); print(len(t.load_price_table().models))"
    env = {k: v for k, v in os.environ.items() if k != "METERING_PRICE_TABLE"} | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    location, models = out.stdout.split()
    assert location.startswith(str(site)) and int(models) == len(load_price_table().models)


def test_cli_export_then_import_gives_a_valid_table_with_the_same_ratios(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "metering", *args], capture_output=True, text=True)

    exported = run("prices", "export", "--format", "one-api", "--at", "2026-11-28T00:00:00Z")
    assert exported.returncode == 0, exported.stderr
    options = tmp_path / "options.json"
    options.write_text(exported.stdout, encoding="utf-8")
    imported = tmp_path / "imported.yaml"
    made = run("prices", "import", str(options), "--effective-from", "2026-01-01T00:00:00Z", "--out", str(imported))
    assert made.returncode == 0, made.stderr
    assert run("prices", "validate", str(imported)).returncode == 0
    again = run("prices", "export", "--format", "one-api", "--at", "2026-11-28T00:00:00Z", "--prices", str(imported))
    import json

    first, second = json.loads(exported.stdout), json.loads(again.stdout)
    assert first["ModelRatio"] == second["ModelRatio"] and first["CacheRatio"] == second["CacheRatio"]
    assert run("prices", "export", "--format", "litellm").returncode == 2
