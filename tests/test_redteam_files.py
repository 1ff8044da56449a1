"""The perimeter against hostile files, dates, ids and database paths (issue 13), in process with CliRunner.

What is tested:

- Hostile YAML (price tables through ``load_price_table``, ``prices validate``, ``--prices``,
  ``METERING_PRICE_TABLE``; gateway configurations through ``load_config`` and ``gateway serve --config``):
  an alias bomb ("billion laughs"), 50,000 nested brackets, braces and block dashes, a recursive alias,
  a file larger than the limit, ``/dev/zero``, a mapping as a key. Each is refused in well under a second
  with a typed error naming the file and line (exit 2 from the command line), never a RecursionError,
  MemoryError or hang. Anchors and aliases within the limits still work; the limits are exact.
- Hostile JSON files (``count --request``, ``prices import``) and one-api's ``other`` column: nesting and
  size are bounded the same way.
- Days: ``reconcile --day``, ``report`` and ``export`` refuse year 1, year 9999, ranges over the limit and
  days before the ledger's first usage (exit 2 naming the flag, nothing written); an empty ledger's
  rules; ``reconcile --day D`` closes D and the days before it, never a day after; the worker's catch-up
  never starts before the first usage (SQLite, PostgreSQL, MariaDB).
- Ids: a USER or KEY_ID beyond 64 bits (or 5,000 digits, or beyond the 32-bit id columns) is exit 2
  naming it, and ``Meter.user``, ``find_user``, ``keys``, ``revoke_key`` raise ``InvalidField``, never a
  driver's overflow or out-of-range error (all three databases).
- ``--db`` naming a SQLite file in a missing directory: every command exits 2 naming ``--db`` (or
  ``METERING_DB``) and creates nothing, not even the directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from gateway.config import ConfigError, load_config
from metering.ledger import InvalidField, Meter, NotFound
from metering.ledger.inputs import MAX_ROW_ID
from pricing.errors import PriceTableError
from pricing.json_source import MAX_JSON_DEPTH, JsonLimitError, loads
from pricing.table import PRICE_TABLE_ENV, default_price_table_path, load_price_table, parse_price_table
from pricing.yaml_source import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, YamlLimitError, checked_events, load_yaml
from tests.traffic import CALENDAR, FIRST_DAY, book_customers, book_day
from workers.calendar import MAX_RANGE_DAYS
from workers.cli.main import app
from workers.close.nightly import close_day, close_due_days, days_to_close, first_day, reconcile
from workers.errors import InvalidArgument
from workers.oneapi.source import cache_tokens_of

RUNNER = CliRunner()
#: Well under a second: every refusal measured 0.1 to 3 ms in the library (the command line adds its start-up).
REFUSED_WITHIN_SECONDS = 1.0
#: The days tests.traffic books (FIRST_DAY = 2026-11-02), all complete long before these tests run.
DAY1, DAY2, DAY3 = FIRST_DAY, FIRST_DAY + timedelta(days=1), FIRST_DAY + timedelta(days=2)
GATEWAY_YAML = "upstreams:\n  - provider: openai\n    channel: oa\n    base_url: https://x.example\n    api_key: k\n"


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Any:
    """The ``metering`` command line in process, without the caller's METERING_* settings."""
    base: dict[str, str | None] = {"COLUMNS": "200", "NO_COLOR": "1", "METERING_DB": None, "METERING_PRICE_TABLE": None,
                                   "METERING_TZ": None}
    return RUNNER.invoke(app, list(args), env=base | (env or {}))


def refused(result: Any, field: str) -> str:
    """Exit 2 with ``error: <field>: ...`` on stderr and nothing on stdout; returns the message."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == "", result.stdout
    assert result.stderr.startswith(f"error: {field}: "), result.stderr
    return result.stderr


# ---------------------------------------------------------------------- hostile YAML


def alias_bomb() -> str:
    """The classic billion laughs: 9 levels of 9 aliases each, 9^9 = 387,420,489 strings once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"


#: name -> (text, the line the refusal names, a phrase of the problem)
HOSTILE_YAML: dict[str, tuple[str, int | None, str]] = {
    "alias bomb": (alias_bomb(), 6, f"more than {MAX_YAML_NODES:,} nodes"),
    "50,000 nested [": ("[" * 50_000 + "]" * 50_000, 1, "nest"),
    "50,000 nested {": ("{a: " * 50_000 + "1" + "}" * 50_000, 1, f"nested deeper than {MAX_YAML_DEPTH} levels"),
    "50,000 nested -": ("- " * 50_000 + "x\n", 1, f"nested deeper than {MAX_YAML_DEPTH} levels"),
    "1,000 lines, each deeper": ("".join(" " * n + "a:\n" for n in range(1_000)), 33, f"nested deeper than {MAX_YAML_DEPTH}"),
    "recursive alias": ("models: &m\n  x: *m\n", 2, "alias *m is inside its own anchor"),
    "undefined alias": ("models: *nowhere\n", 1, "alias *nowhere has no anchor"),
    "mapping as a key": ("? {a: 1}\n: 2\n", 1, "a key must be a scalar"),
}


def timed(call: Callable[[], Any]) -> tuple[float, BaseException | None]:
    started = time.perf_counter()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (the caller asserts its type)
        return time.perf_counter() - started, exc
    return time.perf_counter() - started, None


@pytest.mark.parametrize("name", list(HOSTILE_YAML))
def test_a_hostile_price_table_is_refused_fast_naming_file_and_line(tmp_path: Path, name: str) -> None:
    content, line, phrase = HOSTILE_YAML[name]
    path = tmp_path / "hostile.yaml"
    path.write_text(content, encoding="utf-8")
    seconds, error = timed(lambda: load_price_table(path))
    assert isinstance(error, PriceTableError), error
    assert seconds < REFUSED_WITHIN_SECONDS, seconds
    (problem,) = error.problems
    assert (problem.file, problem.line, problem.field) == (str(path), line, "(yaml)"), problem
    assert phrase in problem.message, problem.message
    assert str(error).startswith(f"{path}:{line}: (yaml): ")


@pytest.mark.parametrize("name", list(HOSTILE_YAML))
def test_a_hostile_gateway_configuration_is_refused_fast_naming_file_and_line(tmp_path: Path, name: str) -> None:
    content, line, phrase = HOSTILE_YAML[name]
    path = tmp_path / "gateway.yaml"
    path.write_text(content, encoding="utf-8")
    seconds, error = timed(lambda: load_config(path))
    assert isinstance(error, ConfigError), error
    assert seconds < REFUSED_WITHIN_SECONDS, seconds
    assert str(error).startswith(f"{path}:{line}: ") and phrase in str(error), str(error)


@pytest.mark.parametrize("name", ["alias bomb", "50,000 nested [", "recursive alias"])
def test_every_way_in_refuses_a_hostile_yaml_file_with_exit_2(tmp_path: Path, name: str) -> None:
    content, line, _ = HOSTILE_YAML[name]
    path = tmp_path / "hostile.yaml"
    path.write_text(content, encoding="utf-8")
    db = tmp_path / "ledger.db"
    where = f"{path}:{line}: (yaml): "
    validate = invoke("prices", "validate", str(path))
    assert validate.exit_code == 2 and validate.stderr.startswith(where), validate.stderr
    quoted = invoke("quote", "--model", "gpt-4o", "--input", "1", "--output", "1", "--prices", str(path))
    assert quoted.exit_code == 2 and quoted.stderr.startswith(where), quoted.stderr
    assert where in refused(invoke("user", "create", "alice", "--prices", str(path), "--db", f"sqlite:///{db}"), "--prices")
    assert where in refused(invoke("report", "--from", "2026-11-02", "--to", "2026-11-02", "--prices", str(path),
                                   "--db", f"sqlite:///{db}"), "--prices")
    from_env = invoke("balance", "alice", "--db", f"sqlite:///{db}", env={PRICE_TABLE_ENV: str(path)})
    assert where in refused(from_env, PRICE_TABLE_ENV)
    served = invoke("gateway", "serve", "--config", str(path), "--db", f"sqlite:///{db}")
    assert f"{path}:{line}: " in refused(served, "--config")
    assert not db.exists()  # refused before the ledger was opened


def test_a_file_over_the_size_limit_and_dev_zero_are_refused_without_reading_them_whole(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * MAX_YAML_BYTES + b"\n")
    for path in (big, Path("/dev/zero")):
        seconds, error = timed(lambda path=path: load_price_table(path))  # type: ignore[misc]
        assert isinstance(error, PriceTableError) and seconds < REFUSED_WITHIN_SECONDS, (error, seconds)
        assert [(p.field, p.message) for p in error.problems] == [
            ("(file)", f"the file is larger than {MAX_YAML_BYTES:,} bytes")]
    assert "larger than" in refused(invoke("gateway", "serve", "--config", str(big)), "--config")
    with pytest.raises(YamlLimitError):
        load_yaml("#" * (MAX_YAML_BYTES + 1))
    exactly = tmp_path / "exact.yaml"
    exactly.write_bytes(b"#" * (MAX_YAML_BYTES - 1) + b"\n")  # at the limit: read, then validated as a table
    with pytest.raises(PriceTableError) as at_limit:
        load_price_table(exactly)
    assert "larger than" not in str(at_limit.value)


def test_the_depth_and_expansion_limits_are_exact() -> None:
    assert load_yaml("[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH).data is not None
    with pytest.raises(YamlLimitError, match=f"nested deeper than {MAX_YAML_DEPTH} levels"):
        load_yaml("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1))
    # A sequence holding an anchored scalar and n aliases of it is 1 + 1 + n nodes once expanded.
    at_limit = "[&a x" + ", *a" * (MAX_YAML_NODES - 2) + "]"
    checked_events(at_limit)
    with pytest.raises(YamlLimitError, match="nodes once its aliases are expanded"):
        checked_events(at_limit[:-1] + ", *a]")


def test_anchors_and_aliases_within_the_limits_still_work() -> None:
    bundled = default_price_table_path().read_text(encoding="utf-8")
    # gpt-4o's versions anchored and reused by a twin model: a legitimate use of anchors and aliases.
    shared = bundled.replace("  gpt-4o:\n    provider: openai\n    versions:\n",
                             "  gpt-4o:\n    provider: openai\n    versions: &gpt4o_versions\n", 1)
    shared += "  gpt-4o-twin:\n    provider: openai\n    versions: *gpt4o_versions\n"
    assert shared.count("&gpt4o_versions") == 1
    table = parse_price_table(shared, "shared.yaml")
    assert table.models["gpt-4o-twin"].versions == table.models["gpt-4o"].versions
    document = load_yaml("base: &v {input: '2.5', output: '10'}\nfirst: *v\nsecond: [*v, *v]\n")
    assert document.data["first"] == document.data["second"][1] == {"input": "2.5", "output": "10"}


def test_a_valid_gateway_configuration_still_loads_and_a_bad_field_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(GATEWAY_YAML + "connect_timeout_seconds: 2.5\n", encoding="utf-8")
    config = load_config(path)
    assert config.connect_timeout_seconds == 2.5 and config.upstream("openai") is not None
    path.write_text(GATEWAY_YAML.replace("https://x.example", "ftp://x"), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}:4: upstreams\.0\.base_url: "):
        load_config(path)
    path.write_text(GATEWAY_YAML + "    base_url: https://y.example\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}:6: upstreams\.0\.base_url: duplicate key"):
        load_config(path)


# ---------------------------------------------------------------------- hostile JSON


def test_deeply_nested_json_files_are_refused_with_exit_2(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    objects = tmp_path / "objects.json"
    objects.write_text('{"a":' * 50_000 + "1" + "}" * 50_000)
    for path in (deep, objects):
        counted = invoke("count", "--request", str(path))
        assert f"nested deeper than {MAX_JSON_DEPTH} levels" in refused(counted, str(path))
        imported = invoke("prices", "import", str(path))
        assert imported.exit_code == 2 and imported.stderr.startswith(f"{path}:1: (json): "), imported.stderr
        assert "nested deeper than" in imported.stderr
    assert cache_tokens_of("[" * 50_000 + "]" * 50_000) is None  # one-api's column: no cache figure, no crash


def test_the_json_depth_limit_is_exact_and_strings_do_not_count() -> None:
    assert loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(JsonLimitError) as deep:
        loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert (deep.value.lineno, deep.value.colno) == (1, MAX_JSON_DEPTH + 1)
    assert isinstance(deep.value, json.JSONDecodeError)  # every handler of bad JSON handles it
    brackets = "[" * 1_000 + '\\"['
    assert loads(json.dumps({"text": brackets})) == {"text": brackets}


# ---------------------------------------------------------------------- days


def book(url: str, *days: date) -> None:
    meter = Meter.open(url)
    try:
        secrets = book_customers(meter)
        for day in days:
            book_day(meter, secrets, day, 4, seed=1)
    finally:
        meter.close()


def day_rows(url: str) -> list[tuple[str, str]]:
    meter = Meter.open(url)
    try:
        with meter.engine.connect() as connection:
            return [tuple(r) for r in connection.execute(text("SELECT day, status FROM day_closes ORDER BY day"))]
    finally:
        meter.close()


@pytest.mark.parametrize(("args", "field", "phrase"), [
    (["reconcile", "--day", "0001-01-01"], "--day", "is before 2000-01-01"),
    (["reconcile", "--day", "9999-12-31"], "--day", "days ahead"),
    (["report", "--from", "0001-01-01", "--to", "2026-11-02"], "--from", "is before 2000-01-01"),
    (["report", "--from", "2026-11-02", "--to", "9999-12-31"], "--to", "days ahead"),
    (["report", "--from", "2000-01-01", "--to", "2026-11-02"], "--from", f"longer than {MAX_RANGE_DAYS:,} days"),
    (["export", "usage", "--from", "0001-01-01", "--to", "0001-01-01", "--out", "x.csv"], "--from", "before 2000"),
    (["export", "usage", "--from", "2026-11-02", "--to", "9999-12-31", "--out", "x.csv"], "--to", "days ahead"),
    (["export", "invoice", "--from", "2000-01-01", "--to", "2026-11-02", "--out", "x.csv"], "--from", "longer than"),
])
def test_absurd_days_are_refused_before_the_database_is_opened(tmp_path: Path, args: list[str], field: str,
                                                               phrase: str) -> None:
    db = tmp_path / "ledger.db"
    args = [str(tmp_path / a) if a == "x.csv" else a for a in args]
    assert phrase in refused(invoke(*args, "--db", f"sqlite:///{db}"), field)
    assert list(tmp_path.iterdir()) == []  # no database, no CSV


def test_days_before_the_first_usage_are_refused_naming_the_flag(ledger_url: str, tmp_path: Path) -> None:
    book(ledger_url, DAY2, DAY3)
    before = f"{DAY1} is before the ledger's first usage, on {DAY2}"
    assert before in refused(invoke("reconcile", "--day", DAY1.isoformat(), "--db", ledger_url), "--day")
    assert day_rows(ledger_url) == []  # nothing written
    assert before in refused(invoke("report", "--from", DAY1.isoformat(), "--to", DAY3.isoformat(), "--db", ledger_url),
                             "--from")
    out = tmp_path / "u.csv"
    exported = invoke("export", "usage", "--from", DAY1.isoformat(), "--to", DAY3.isoformat(), "--out", str(out),
                      "--db", ledger_url)
    assert before in refused(exported, "--from") and not out.exists()
    assert invoke("report", "--from", DAY2.isoformat(), "--to", DAY3.isoformat(), "--db", ledger_url).exit_code == 0


def test_reconcile_closes_the_day_and_the_days_before_it_never_a_day_after(ledger_url: str) -> None:
    book(ledger_url, DAY1, DAY2, DAY3)
    result = invoke("reconcile", "--day", DAY2.isoformat(), "--json", "--db", ledger_url)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "closed"
    assert day_rows(ledger_url) == [(DAY1.isoformat(), "closed"), (DAY2.isoformat(), "closed")]
    again = invoke("reconcile", "--day", DAY1.isoformat(), "--json", "--db", ledger_url)
    assert json.loads(again.stdout)["status"] == "already_closed"
    assert day_rows(ledger_url) == [(DAY1.isoformat(), "closed"), (DAY2.isoformat(), "closed")]


def test_an_empty_ledger_refuses_reconcile_and_reports_and_exports_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/ledger.db"
    assert invoke("user", "create", "alice", "--db", db).exit_code == 0  # a user and no usage: still "empty"
    assert "the ledger has no usage yet" in refused(invoke("reconcile", "--day", DAY1.isoformat(), "--db", db), "--day")
    assert day_rows(db) == []
    report = invoke("report", "--from", DAY1.isoformat(), "--to", DAY3.isoformat(), "--format", "json", "--db", db)
    assert report.exit_code == 0 and json.loads(report.stdout)["totals"]["requests"] == 0
    exported = invoke("export", "usage", "--from", DAY1.isoformat(), "--to", DAY3.isoformat(), "--out",
                      str(tmp_path / "u.csv"), "--json", "--db", db)
    assert exported.exit_code == 0 and json.loads(exported.stdout)["rows"] == 0


def test_the_catch_up_never_starts_before_the_first_usage(meter: Meter) -> None:
    secrets = book_customers(meter)
    later = DAY3 + timedelta(days=2)
    book_day(meter, secrets, later, 4, seed=2)
    now = datetime.combine(later + timedelta(days=1), datetime.min.time(), timezone.utc) + timedelta(hours=2)
    assert first_day(meter.engine, CALENDAR) == later
    with pytest.raises(InvalidArgument) as early:  # the library refuses it too (the CLI maps day to --day)
        reconcile(meter, DAY1, calendar=CALENDAR, now=now)
    assert early.value.field == "day"
    # An empty day closed by hand far before the first usage (an older version let reconcile do it) ...
    assert close_day(meter, DAY1, calendar=CALENDAR, now=now).status == "closed"
    # ... does not make the catch-up close every day since: it starts at the first usage.
    assert days_to_close(meter, calendar=CALENDAR, now=now) == [later]
    assert [(r.day, r.status) for r in close_due_days(meter, calendar=CALENDAR, now=now)] == [(later, "closed")]


# ---------------------------------------------------------------------- ids


HUGE = "99999999999999999999999"  # > 2^64


@pytest.mark.parametrize(("args", "field"), [
    (["user", "show", HUGE], "USER"), (["balance", HUGE], "USER"), (["key", "list", HUGE], "USER"),
    (["key", "create", HUGE], "USER"), (["grant", HUGE, "signup"], "USER"), (["redeem", "use", HUGE, "rc-x"], "USER"),
    (["topup", HUGE, "--amount", "1", "--currency", "CNY", "--reference", "o-1"], "USER"),
    (["quarantine", "list", "--user", HUGE], "--user"), (["key", "revoke", HUGE], "KEY_ID"),
    (["user", "show", "9" * 5_000], "USER"), (["key", "revoke", "0"], "KEY_ID"),
    (["user", "show", str(MAX_ROW_ID + 1)], "USER"), (["user", "show", "nul\x00name"], "USER"),
])
def test_an_id_beyond_64_bits_is_exit_2_naming_it_on_every_database(ledger_url: str, args: list[str], field: str) -> None:
    meter = Meter.open(ledger_url)
    meter.create_user("alice")
    meter.close()
    result = invoke(*args, "--db", ledger_url)
    message = refused(result, field)
    assert "database" not in message and "overflow" not in message.lower(), message


def test_the_ledger_api_raises_typed_errors_for_ids_no_database_can_hold(meter: Meter) -> None:
    uid = meter.create_user("alice")
    for call in (lambda: meter.user(2**64), lambda: meter.user(MAX_ROW_ID + 1), lambda: meter.find_user(str(2**31)),
                 lambda: meter.user(0), lambda: meter.user(True),
                 lambda: meter.find_user(HUGE), lambda: meter.find_user(2**70), lambda: meter.find_user("a\x00b"),
                 lambda: meter.find_user("n" * 191), lambda: meter.keys(2**63), lambda: meter.revoke_key(2**64),
                 lambda: meter.balance(-(2**70)), lambda: meter.grant(2**64, "signup")):
        with pytest.raises(InvalidField):
            call()
    with pytest.raises(NotFound):
        meter.find_user(str(MAX_ROW_ID))  # the largest id an INTEGER column holds is an id: no such user
    with pytest.raises(NotFound):
        meter.user(MAX_ROW_ID)
    assert meter.find_user(str(uid)) == meter.find_user("alice") == uid
    with pytest.raises(NotFound):
        meter.revoke_key(MAX_ROW_ID)  # no such key


# ---------------------------------------------------------------------- --db in a missing directory


MISSING_DB_COMMANDS = [
    ["db", "upgrade"], ["user", "create", "alice"], ["user", "show", "alice"], ["user", "list"],
    ["key", "create", "alice"], ["key", "list"], ["key", "revoke", "1"], ["balance", "alice"], ["audit"],
    ["topup", "alice", "--amount", "1", "--currency", "CNY", "--reference", "o-1"], ["grant", "alice", "signup"],
    ["redeem", "create", "--count", "1", "--quota", "5"], ["redeem", "use", "alice", "rc-x"], ["quarantine", "list"],
    ["worker", "--once"], ["reconcile", "--day", "2026-11-02"], ["report", "--from", "2026-11-02", "--to", "2026-11-02"],
    ["export", "usage", "--from", "2026-11-02", "--to", "2026-11-02", "--out", "{tmp}/u.csv"],
    ["import", "one-api", "--from", "{tmp}/one-api.db"], ["import", "one-api", "--from", "{tmp}/one-api.db", "--dry-run"],
    ["demo", "--days", "1", "--out", "{tmp}/demo"], ["gateway", "serve", "--config", "{tmp}/gateway.yaml"],
]


@pytest.mark.parametrize("args", MISSING_DB_COMMANDS, ids=[" ".join(a[:2]) + (" dry" if "--dry-run" in a else "")
                                                          for a in MISSING_DB_COMMANDS])
def test_a_db_in_a_missing_directory_creates_nothing_and_names_db(tmp_path: Path, args: list[str]) -> None:
    from tests.oneapi_schema import build

    build(f"sqlite:///{tmp_path}/one-api.db", "one-api")
    (tmp_path / "gateway.yaml").write_text(GATEWAY_YAML, encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))
    missing = tmp_path / "no" / "such" / "dir"
    filled = [a.format(tmp=tmp_path) for a in args]
    assert str(missing) in refused(invoke(*filled, "--db", f"sqlite:///{missing}/x.db"), "--db")
    if args[0] != "demo":  # the demo makes its own database unless --db is given; METERING_DB is not read
        assert str(missing) in refused(invoke(*filled, env={"METERING_DB": f"sqlite:///{missing}/x.db"}), "METERING_DB")
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "no").exists()
