"""``metering import one-api``: one-api and new-api databases (SQLite, PostgreSQL, MariaDB) mapped into the ledger.

Every figure is stated with its origin: quota from the bundled price table (gpt-4o from 2024-10-02: $2.50 per 1M
input tokens, $10 per 1M output; 500,000 units = $1), balances from the source's ``users.quota`` (the rule of
docs/oneapi-import.md), one-api's own charge from the log's ``quota`` column.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from metering.ledger.errors import KeyRejected
from metering.ledger.meter import Meter
from pricing.quote import quota
from pricing.usage import UsageRecord
from tests import oneapi_schema as schema
from tests.databases import BACKENDS
from workers.oneapi.importer import ImportConflict, import_oneapi
from workers.oneapi.source import OneApiSource, SourceError, default_source_name, source_url

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_748_736_000  # 2025-06-01T00:00:00Z: gpt-4o's 2024-10-02 prices are in force
KEYS = {name: (name * 48)[:48] for name in ("A", "B", "C", "D", "E")}  # 48 characters, as one-api makes them
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
#: gpt-4o, 1,000 input + 200 output tokens: (1000 x 2.50 + 200 x 10) / 1e6 = $0.0045 = 2,250 units.
GPT4O_1000_200 = 2_250


def gpt4o_mini_quota() -> int:
    """10,000 input + 1,000 output tokens of gpt-4o-mini, from the bundled price table."""
    from pricing.table import load_price_table

    usage = UsageRecord(provider="openai", model="gpt-4o-mini", input_tokens=10_000, output_tokens=1_000)
    return quota(load_price_table(), usage, T0, "default")


def populate(url: str, flavor: str) -> None:
    """Three users, four tokens and nine logs covering every rule (see the module docstring of oneapi_import)."""
    schema.build(url, flavor)
    schema.add(url, "users", [
        {"id": 1, "username": "alice", "password": "x", "quota": 5_000_000, "group": "default",
         "access_token": "t" * 32, "aff_code": "a1"},
        {"id": 2, "username": "bob", "password": "x", "quota": 1_000_000, "group": "vip",
         "access_token": "u" * 32, "aff_code": "b2"},
        {"id": 3, "username": "12345", "password": "x", "quota": 0, "access_token": "v" * 32, "aff_code": "c3"},
    ])
    schema.add(url, "tokens", [
        {"id": 1, "user_id": 1, "key": KEYS["A"], "name": "main", "status": 1, "unlimited_quota": True},
        {"id": 2, "user_id": 1, "key": KEYS["B"], "name": "old", "status": 2, "unlimited_quota": True},
        {"id": 3, "user_id": 1, "key": KEYS["C"], "name": "capped", "status": 1, "remain_quota": 100_000,
         "used_quota": 2_250, "unlimited_quota": False},
        {"id": 4, "user_id": 2, "key": KEYS["D"], "name": "bobkey", "status": 3, "expired_time": T0,
         "unlimited_quota": True},
    ])
    new_api = flavor == "new-api"

    def log(id: int, user: int, kind: int, model: str = "", prompt: int = 0, completion: int = 0, charged: int = 0,
            token: tuple[int, str] | None = None, at: int = T0) -> dict[str, Any]:
        row = {"id": id, "user_id": user, "created_at": at, "type": kind, "model_name": model, "prompt_tokens": prompt,
               "completion_tokens": completion, "quota": charged, "channel_id": 3, "content": ""}
        if token:
            row["token_name"] = token[1]
            if new_api:
                row["token_id"] = token[0]
        return row

    schema.add(url, "logs", [
        log(1, 1, 1, charged=500_000),                                                     # top-up: counted only
        log(2, 1, 2, "gpt-4o", 1000, 200, GPT4O_1000_200, (1, "main"), T0 + 60),
        log(3, 1, 2, "gpt-4o", 1000, 200, 3_000, (3, "capped"), T0 + 120),                 # one-api charged 750 more
        log(4, 2, 2, "gpt-4o-mini", 10_000, 1_000, 1, (4, "bobkey"), T0 + 180),
        log(5, 1, 2, "no-such-model", 10, 10, 7, (1, "main"), T0 + 240),                    # quarantined: model
        log(6, 1, 2, "gpt-4o", -5, 10, 7, (1, "main"), T0 + 300),                           # quarantined: count
        log(7, 1, 2, "gpt-4o", 1000, 200, GPT4O_1000_200, (99, "deleted-one"), T0 + 360),   # token gone: fallback
        log(8, 1, 3),                                                                        # manage: counted only
        log(9, 77, 2, "gpt-4o", 1000, 200, GPT4O_1000_200, (1, "main"), T0 + 420),         # no such user
    ])


def counts(meter: Meter) -> dict[str, int]:
    """Rows of every table an import writes, and the quarantine's attempts."""
    out: dict[str, int] = {}
    with meter.engine.connect() as connection:
        for table in ("users", "api_keys", "usage_events", "ledger_entries", "quarantined_usage", "import_links"):
            out[table] = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
        out["attempts"] = connection.execute(text("SELECT coalesce(sum(attempts), 0) FROM quarantined_usage")).scalar_one()
        out["cursor"] = connection.execute(text(
            "SELECT coalesce(max(local_id), 0) FROM import_links WHERE kind = 'cursor'")).scalar_one()
    return out


def run_import(meter: Meter, url: str, **options: Any) -> dict[str, Any]:
    source = OneApiSource(source_url(url))
    try:
        return import_oneapi(meter, source, name=options.pop("name", "prod"), **options)
    finally:
        source.close()


@pytest.fixture(scope="module")
def made_sources(server_databases: dict[str, Any]) -> Any:
    """The servers' session databases (the source databases are dropped at the end)."""
    yield server_databases
    for backend in ("postgresql", "mariadb"):
        schema.drop_source_database(backend, server_databases)


@pytest.fixture
def ledger(tmp_path: Path) -> Any:
    opened = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    yield opened
    opened.close()


# ---------------------------------------------------------------------- --from


def test_from_accepts_urls_and_one_apis_sql_dsn_forms(tmp_path: Path) -> None:
    assert source_url("root:p%40ss@tcp(db.local:3307)/oneapi?charset=utf8mb4&parseTime=True&loc=Local") == (
        "mysql+pymysql://root:p%2540ss@db.local:3307/oneapi?charset=utf8mb4")
    assert source_url("root:pw@tcp(localhost)/oneapi") == "mysql+pymysql://root:pw@localhost:3306/oneapi"
    assert source_url("u@unix(/run/mysqld.sock)/oneapi").startswith("mysql+pymysql://u@/oneapi?unix_socket=")
    assert source_url("postgres://u:p@h:5432/oneapi") == "postgresql+psycopg://u:p@h:5432/oneapi"
    assert source_url("mysql://u@h/oneapi") == "mysql+pymysql://u@h/oneapi"
    db = tmp_path / "one-api.db"
    db.write_bytes(b"")
    assert source_url(str(db)) == f"sqlite:///file:{db}?mode=ro&uri=true"  # read only, and never created
    assert source_url(f"sqlite:///{db}") == source_url(str(db))
    assert default_source_name(source_url(str(db))) == "one-api"
    assert default_source_name(source_url("postgres://u:secret@h:5432/oneapi")) == "h-oneapi"  # no password
    for bad in ("", "missing.db", "oracle://x/y", "sqlite://", "u:p@tcp(h:port)/db", "u:p@tcp(h)/"):
        with pytest.raises(SourceError) as caught:
            source_url(bad)
        assert caught.value.field == "--from" and str(caught.value).startswith("--from: ")
    assert not (Path.cwd() / "missing.db").exists()


def test_a_database_that_is_not_one_api_is_refused_naming_the_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    schema.build(url, "one-api")
    schema.execute(url, "ALTER TABLE logs DROP COLUMN prompt_tokens")
    with pytest.raises(SourceError, match="logs.prompt_tokens: column missing"):
        OneApiSource(source_url(url))


# ---------------------------------------------------------------------- the mapping, on every source database


@pytest.mark.parametrize("flavor", ["one-api", "new-api"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_import_maps_users_keys_usage_and_balances_then_a_rerun_writes_nothing(
    backend: str, flavor: str, made_sources: Any, tmp_path: Path, ledger: Meter,
) -> None:
    url = schema.source_database(backend, made_sources, tmp_path)
    populate(url, flavor)
    summary = run_import(ledger, url)
    assert summary["flavor"] == flavor
    assert summary["users"] == {"read": 3, "created": 3, "existing": 0, "renamed": 1, "group_defaulted": 1}
    assert summary["by_type"] == {"topup": 1, "consume": 7, "manage": 1}
    logs = summary["logs"]
    assert (logs["consume"], logs["imported"], logs["quarantined"], logs["already_imported"]) == (7, 4, 3, 0)
    assert summary["quarantine_reasons"] == {"UnknownModel model": 1, "InvalidUsage input_tokens": 1,
                                             "NotFound user_id": 1}
    mini = gpt4o_mini_quota()
    assert summary["quota"] == {"ours": 3 * GPT4O_1000_200 + mini, "one_api": 2 * GPT4O_1000_200 + 3_000 + 1,
                                "differing_logs": 2, "difference": (GPT4O_1000_200 - 3_000) + (mini - 1)}
    assert summary["folded"] == 4
    # Users: named by username (digits only is renamed), bob's unknown group "vip" imported as default.
    users = {u["name"]: u for u in ledger.users()}
    assert set(users) == {"alice", "bob", "prod-user-3"} and users["bob"]["group"] == "default"
    # Balances: one-api's users.quota, after the imported usage was charged.
    assert (users["alice"]["balance"], users["bob"]["balance"], users["prod-user-3"]["balance"]) == (5_000_000, 1_000_000, 0)
    assert summary["balances"]["adjusted"] == 2
    # Events: priced by our table at the log's time, charged once.
    with ledger.engine.connect() as connection:
        events = connection.execute(text(
            "SELECT request_id, model, quota, status, occurred_at, channel FROM usage_events ORDER BY request_id")).all()
    assert [e.request_id for e in events] == ["oneapi:prod:2", "oneapi:prod:3", "oneapi:prod:4", "oneapi:prod:7"]
    assert [e.quota for e in events] == [GPT4O_1000_200, GPT4O_1000_200, mini, GPT4O_1000_200]
    assert {e.status for e in events} == {"charged"} and {e.channel for e in events} == {"oneapi-3"}
    assert str(events[0].occurred_at).startswith("2025-06-01 00:01:00")  # logs.created_at T0 + 60, in UTC
    # Keys: the secrets clients already use work; the disabled one and the expired one do not.
    hold = ledger.authorize("sk-" + KEYS["A"], BODY, "after-import")
    ledger.release(hold)
    with pytest.raises(KeyRejected, match="invalid API key"):
        ledger.authorize("sk-" + KEYS["B"], BODY, "disabled")
    with pytest.raises(KeyRejected, match="has expired"):
        ledger.authorize("sk-" + KEYS["D"], BODY, "expired")
    keys = {k["name"]: k for k in ledger.keys()}
    assert keys["capped"]["limit_quota"] - keys["capped"]["used_quota"] == 100_000  # one-api's remain_quota
    assert keys["main"]["prefix"] == "sk-AAAA..." and keys["main"]["limit_quota"] is None
    assert keys["old"]["status"] == "revoked" and keys["bobkey"]["expires_at"] == "2025-06-01T00:00:00+00:00"
    fallback = [k for k in ledger.keys() if k["name"].startswith("one-api import")]
    assert len(fallback) == 1 and fallback[0]["status"] == "revoked"
    # Rejected rows: quarantined with their reason, never dropped.
    with ledger.engine.connect() as connection:
        rejected = {r.request_id: r for r in connection.execute(text(
            "SELECT request_id, source, error, field, reason, payload FROM quarantined_usage"))}
    assert set(rejected) == {"oneapi:prod:5", "oneapi:prod:6", "oneapi:prod:9"}
    assert rejected["oneapi:prod:5"].error == "UnknownModel" and rejected["oneapi:prod:6"].field == "input_tokens"
    assert {r.source for r in rejected.values()} == {"import_usage"} and '"log_id": 6' in rejected["oneapi:prod:6"].payload
    assert ledger.audit().ok
    # The same import again: nothing new, no quarantine attempt bumped.
    before = counts(ledger)
    again = run_import(ledger, url)
    assert counts(ledger) == before
    assert (again["logs"]["imported"], again["logs"]["quarantined"], again["logs"]["already_imported"]) == (0, 0, 7)
    assert again["users"]["created"] == again["keys"]["created"] == again["balances"]["adjusted"] == 0


@pytest.mark.parametrize("flavor", ["one-api", "new-api"])
def test_a_later_run_imports_only_the_new_logs_and_follows_the_balance(flavor: str, tmp_path: Path, ledger: Meter) -> None:
    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, flavor)
    run_import(ledger, url)
    before = counts(ledger)
    extra = {"token_id": 1} if flavor == "new-api" else {}
    schema.add(url, "logs", [{"id": 10, "user_id": 1, "created_at": T0 + 900, "type": 2, "model_name": "gpt-4o",
                              "prompt_tokens": 1000, "completion_tokens": 200, "quota": GPT4O_1000_200,
                              "token_name": "main", **extra}])
    schema.execute(url, "UPDATE users SET quota = :q WHERE id = 1", q=5_000_000 - GPT4O_1000_200)
    summary = run_import(ledger, url)
    assert (summary["logs"]["imported"], summary["logs"]["already_imported"], summary["folded"]) == (1, 7, 1)
    after = counts(ledger)
    assert after["usage_events"] == before["usage_events"] + 1
    # One charge and no adjustment: our price equals one-api's here, so the balance lands on users.quota by itself.
    assert after["ledger_entries"] == before["ledger_entries"] + 1 and summary["balances"]["adjusted"] == 0
    assert ledger.balance(ledger.find_user("alice")) == 5_000_000 - GPT4O_1000_200
    assert after["cursor"] == 10 and after["attempts"] == before["attempts"]
    assert ledger.audit().ok


def test_new_apis_cache_reads_are_priced_at_the_cached_rate_for_openai_models(tmp_path: Path, ledger: Meter) -> None:
    """new-api keeps a log's prompt-cache reads in ``other.cache_tokens``; for OpenAI they are inside prompt_tokens."""
    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, "new-api")

    def cached_log(id: int, model: str, prompt: int, cache: int, other: str | None = None) -> dict[str, Any]:
        return {"id": id, "user_id": 1, "created_at": T0 + id, "type": 2, "model_name": model, "prompt_tokens": prompt,
                "completion_tokens": 200, "quota": 0, "token_id": 1, "token_name": "main",
                "other": other if other is not None else json.dumps({"cache_tokens": cache, "cache_ratio": 0.5})}

    schema.add(url, "logs", [
        cached_log(20, "gpt-4o", 1000, 600),
        cached_log(21, "claude-sonnet-4", 1000, 600),  # Claude's cache figures are not mapped: priced as input
        cached_log(22, "gpt-4o", 100, 600),            # more cache reads than input: quarantined
        cached_log(23, "gpt-4o", 1000, 0, other="not json"),
    ])
    summary = run_import(ledger, url)
    assert (summary["logs"]["cache_mapped"], summary["logs"]["cache_not_mapped"]) == (2, 1)
    assert summary["quarantine_reasons"]["InvalidUsage cached_tokens"] == 1
    with ledger.engine.connect() as connection:
        events = {r.request_id: r for r in connection.execute(text(
            "SELECT request_id, input_tokens, cached_input_tokens, quota FROM usage_events"))}
    gpt = events["oneapi:prod:20"]
    # 400 input at $2.50 + 600 cached at $1.25 + 200 output at $10 per 1M (gpt-4o, 2024-10-02) = $0.00375.
    assert (gpt.input_tokens, gpt.cached_input_tokens, gpt.quota) == (400, 600, 1_875)
    claude = events["oneapi:prod:21"]
    # 1,000 input at $3 + 200 output at $15 per 1M (claude-sonnet-4) = $0.006 = 3,000 units.
    assert (claude.input_tokens, claude.cached_input_tokens, claude.quota) == (1000, 0, 3_000)
    assert events["oneapi:prod:23"].quota == GPT4O_1000_200  # an "other" that is not JSON claims no cache
    assert "oneapi:prod:22" not in events and ledger.audit().ok


def test_an_unknown_group_can_be_refused_and_then_nothing_is_written(tmp_path: Path, ledger: Meter) -> None:
    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, "one-api")
    empty = counts(ledger)
    with pytest.raises(ImportConflict) as caught:
        run_import(ledger, url, unknown_group="refuse")
    assert caught.value.field == "users.group" and "'vip'" in str(caught.value)
    assert counts(ledger) == empty


def test_a_username_one_of_our_users_has_is_a_conflict_before_anything_is_written(tmp_path: Path, ledger: Meter) -> None:
    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, "new-api")
    ledger.create_user("alice")
    before = counts(ledger)
    with pytest.raises(ImportConflict, match="users.username: user 1: a user named 'alice' already exists"):
        run_import(ledger, url)
    assert counts(ledger) == before


def test_the_same_deployment_under_another_source_name_is_a_key_conflict(tmp_path: Path, ledger: Meter) -> None:
    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, "one-api")
    run_import(ledger, url, name="prod")
    schema.execute(url, "UPDATE users SET username = username || '2'")  # no name clash: the keys still clash
    before = counts(ledger)
    with pytest.raises(ImportConflict, match="tokens.key"):
        run_import(ledger, url, name="again")
    assert counts(ledger) == before


def test_a_dry_run_validates_and_counts_but_writes_nothing(tmp_path: Path, ledger: Meter) -> None:
    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, "one-api")
    before = counts(ledger)
    summary = run_import(ledger, url, dry_run=True)
    assert counts(ledger) == before
    assert (summary["logs"]["imported"], summary["logs"]["quarantined"], summary["users"]["read"]) == (4, 3, 3)
    # The dry run is the real run rolled back: it reports what the run does (2 adjustments, 1 log on a fallback key).
    assert summary["balances"]["adjusted"] == 2 and summary["logs"]["on_fallback_key"] == 1
    assert run_import(ledger, url) == {**summary, "dry_run": False}


# ---------------------------------------------------------------------- our ledger on every database


def test_import_into_each_ledger_database(meter: Meter, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, "new-api")
    summary = run_import(meter, url)
    assert summary["logs"]["imported"] == 4 and summary["logs"]["quarantined"] == 3
    assert {u["name"]: u["balance"] for u in meter.users()} == {"alice": 5_000_000, "bob": 1_000_000, "prod-user-3": 0}
    meter.release(meter.authorize("sk-" + KEYS["A"], BODY, "works"))
    assert meter.audit().ok
    before = counts(meter)
    run_import(meter, url)
    assert counts(meter) == before


# ---------------------------------------------------------------------- the worker on imported books


def test_close_and_export_run_on_the_imported_usage(tmp_path: Path, ledger: Meter) -> None:
    from tests.traffic import CALENDAR, FIRST_DAY, after, moment
    from workers.close.nightly import close_due_days
    from workers.export.exporter import export

    url = f"sqlite:///{tmp_path}/src.db"
    populate(url, "new-api")
    day = int(moment(FIRST_DAY, 3600).timestamp())
    schema.execute(url, "UPDATE logs SET created_at = :at + id", at=day)
    run_import(ledger, url)
    closed = close_due_days(ledger, calendar=CALENDAR, now=after(FIRST_DAY))
    assert [(r.day, r.status) for r in closed] == [(FIRST_DAY, "closed")]
    assert closed[0].discrepancies == {}  # priced by our own table: the close's re-pricing agrees
    assert closed[0].totals["requests"] == 4 and closed[0].totals["quota"] == 3 * GPT4O_1000_200 + gpt4o_mini_quota()
    manifest = export(ledger.engine, "usage", FIRST_DAY, FIRST_DAY, tmp_path / "usage.csv", calendar=CALENDAR)
    assert manifest["rows"] == 4
    assert ledger.audit().ok


# ---------------------------------------------------------------------- the command line


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_imports_with_json_and_bad_input_exits_2_writing_nothing(tmp_path: Path) -> None:
    src = tmp_path / "one-api.db"
    populate(f"sqlite:///{src}", "one-api")
    ledger_url = f"sqlite:///{tmp_path}/ledger.db"
    bad = cli("import", "one-api", "--from", str(tmp_path / "nope.db"), "--db", ledger_url)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --from: no such SQLite file")
    dry = cli("import", "one-api", "--from", str(src), "--db", ledger_url, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["logs"]["imported"] == 4
    assert not (tmp_path / "ledger.db").exists()  # neither --dry-run nor a bad --from creates the ledger
    refused = cli("import", "one-api", "--from", str(src), "--db", ledger_url, "--unknown-group", "refuse")
    assert refused.returncode == 2 and "error: users.group:" in refused.stderr
    done = cli("import", "one-api", "--from", str(src), "--db", ledger_url, "--json", "--source", "prod")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["source"] == "prod" and summary["logs"]["imported"] == 4 and summary["balances"]["adjusted"] == 2
    plain = cli("import", "one-api", "--from", f"sqlite:///{src}", "--db", ledger_url, "--source", "prod")
    assert plain.returncode == 0 and "0 imported, 0 quarantined, 7 already imported" in plain.stdout
    assert KEYS["A"] not in done.stdout + done.stderr + plain.stdout + plain.stderr  # a secret is never printed
    audit = cli("audit", "--db", ledger_url)
    assert audit.returncode == 0
    helped = cli("import", "--help")
    assert helped.returncode == 0 and "one-api" in helped.stdout


# ---------------------------------------------------------------------- an invariant, for random logs


LOG = st.fixed_dictionaries({
    "type": st.sampled_from([1, 2, 2, 2, 3, 4, 5, 6]),
    "user_id": st.sampled_from([1, 2, 3, 9]),
    "model_name": st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "nope", ""]),
    "prompt_tokens": st.integers(-3, 50_000),
    "completion_tokens": st.integers(-3, 5_000),
    "quota": st.integers(0, 100_000),
    "token_name": st.sampled_from(["main", "capped", "gone", ""]),
    "created_at": st.sampled_from([T0, T0 + 86_400, 0, 4_102_444_800]),  # 1970 and 2100 are refused
})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logs=st.lists(LOG, max_size=25), balances=st.lists(st.integers(-1_000, 10**9), min_size=3, max_size=3))
def test_every_consume_log_is_imported_or_quarantined_and_balances_equal_users_quota(
    logs: list[dict[str, Any]], balances: list[int], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("prop")
    url = f"sqlite:///{folder}/src.db"
    populate(url, "one-api")
    schema.execute(url, "DELETE FROM logs")
    for user_id, balance in zip((1, 2, 3), balances):
        schema.execute(url, "UPDATE users SET quota = :q WHERE id = :id", q=balance, id=user_id)
    schema.add(url, "logs", [{"id": n + 1, **row} for n, row in enumerate(logs)])
    meter = Meter.open(f"sqlite:///{folder}/ledger.db")
    try:
        summary = run_import(meter, url)
        consume = sum(1 for row in logs if row["type"] == 2)
        assert summary["logs"]["imported"] + summary["logs"]["quarantined"] == consume
        assert counts(meter)["usage_events"] == summary["logs"]["imported"]
        assert counts(meter)["quarantined_usage"] == summary["logs"]["quarantined"]
        assert sorted(u["balance"] for u in meter.users()) == sorted(balances)
        assert meter.audit().ok
        before = counts(meter)
        run_import(meter, url)
        assert counts(meter) == before
    finally:
        meter.close()
