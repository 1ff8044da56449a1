"""The ledger's command line contract, run as real subprocesses: names, JSON shapes, exit codes, secrets.

Plus the public API example of docs/ledger.md, run exactly as written there.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from metering import Meter
from metering.ledger import KeyRejected
from metering.ledger.database import normalize_url

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
RESPONSE = {"model": "gpt-4o", "choices": [{"message": {"role": "assistant", "content": "Hi!"}}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 3}}
SECRET = re.compile(r"sk-mtr-[A-Za-z0-9_-]{43}")


def run(*args: str, db: str | None = None, stdin: str | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m metering ARGS [--db DB]`` with no METERING_DB inherited."""
    environment = {k: v for k, v in os.environ.items() if k != "METERING_DB"} | {"NO_COLOR": "1", "COLUMNS": "200"}
    argv = [sys.executable, "-m", "metering", *args, *(["--db", db] if db else [])]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=cwd or ROOT, env=environment | (env or {}))


def ok_json(*args: str, db: str | None = None, **kwargs: Any) -> Any:
    out = run(*args, "--json", db=db, **kwargs)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def refused(out: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, ``error: ...message...`` on stderr, nothing on stdout."""
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("error: "), out.stderr
    assert message in out.stderr, out.stderr
    assert out.stdout == ""


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


@pytest.fixture
def alice(db: str) -> str:
    """A database with user alice (id 1) holding the signup grant and a 10 CNY top-up: 5,100,000 units."""
    assert ok_json("user", "create", "alice", db=db)["id"] == 1
    ok_json("grant", "alice", "signup", db=db)
    ok_json("topup", "alice", "--amount", "10", "--currency", "CNY", "--reference", "order-1", db=db)
    return db


def test_db_upgrade_creates_the_schema_and_is_idempotent(db: str, tmp_path: Path) -> None:
    first = run("db", "upgrade", db=db)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"ok: {db} is at revision 0005 (head)"
    assert ok_json("db", "upgrade", db=db) == {"database": db, "revision": "0005", "head": "0005"}
    tables = {r[0] for r in sqlite3.connect(tmp_path / "ledger.db").execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "api_keys", "ledger_entries", "alembic_version"} <= tables


def test_db_upgrade_hides_the_password_and_reports_an_unreachable_server() -> None:
    out = run("db", "upgrade", db="postgresql://bob:hunter2@127.0.0.1:1/nowhere")
    refused(out, "database: ")
    assert "hunter2" not in out.stderr
    refused(run("db", "upgrade", db="not a url"), "database: ")


def test_the_database_comes_from_metering_db_else_metering_db_in_the_current_directory(tmp_path: Path) -> None:
    elsewhere = tmp_path / "env.db"
    out = run("user", "create", "viaenv", "--json", env={"METERING_DB": f"sqlite:///{elsewhere}"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert elsewhere.exists() and not (tmp_path / "metering.db").exists()
    assert [u["name"] for u in ok_json("user", "list", db=f"sqlite:///{elsewhere}")] == ["viaenv"]
    assert run("user", "create", "bydefault", cwd=tmp_path).returncode == 0
    assert (tmp_path / "metering.db").exists()
    # --db wins over the environment.
    out = run("user", "list", "--json", db=f"sqlite:///{tmp_path}/metering.db", env={"METERING_DB": f"sqlite:///{elsewhere}"})
    assert [u["name"] for u in json.loads(out.stdout)] == ["bydefault"]


def test_users_create_show_list(db: str) -> None:
    out = run("user", "create", "alice", db=db)
    assert out.returncode == 0 and out.stdout.strip() == "created user 1 alice (group default)"
    assert ok_json("user", "create", "bob", "--group", "default", db=db) == {"id": 2, "name": "bob", "group": "default", "balance": 0}
    shown = ok_json("user", "show", "alice", db=db)
    assert shown == {"id": 1, "name": "alice", "group": "default", "balance": 0, "usd": "0", "keys": []}
    assert ok_json("user", "show", "2", db=db)["name"] == "bob"  # USER is a name or an id
    assert [u["name"] for u in ok_json("user", "list", db=db)] == ["alice", "bob"]
    listed = run("user", "list", db=db)
    assert listed.returncode == 0 and "alice" in listed.stdout and "bob" in listed.stdout
    refused(run("user", "create", "alice", db=db), "user 'alice' already exists")
    refused(run("user", "create", "42", db=db), "cannot be only digits")
    refused(run("user", "create", "carol", "--group", "platinum", db=db), "unknown group 'platinum'")
    refused(run("user", "show", "nobody", db=db), "no user 'nobody'")
    refused(run("user", "show", "99", db=db), "no user '99'")


def test_key_create_prints_the_secret_once_and_it_is_not_stored(alice: str, tmp_path: Path) -> None:
    out = run("key", "create", "alice", "--name", "k1", db=alice)
    assert out.returncode == 0, out.stderr
    secrets_seen = SECRET.findall(out.stdout + out.stderr)
    assert len(secrets_seen) == 1 and out.stdout.splitlines()[1] == secrets_seen[0]
    assert out.stdout.splitlines()[0] == "created key 1 k1 for user 1 (unlimited, 0 charged)"
    assert "warning:" in out.stderr and "stores only its sha256" in out.stderr
    secret = secrets_seen[0]
    for file in tmp_path.glob("ledger.db*"):  # the database, its WAL and shared memory
        assert secret.encode() not in file.read_bytes()
    payload = ok_json("key", "create", "1", "--name", "k2", "--limit-quota", "1000", "--models", "gpt-4o,claude-sonnet-4-5",
                      "--expires", "2099-01-01T00:00:00+08:00", db=alice)
    assert set(payload) == {"id", "user_id", "name", "prefix", "status", "limit_quota", "used_quota", "reserved_quota",
                            "models", "expires_at", "charged_quota", "secret", "warning"}
    assert (payload["id"], payload["user_id"], payload["name"], payload["limit_quota"]) == (2, 1, "k2", 1000)
    assert payload["models"] == ["claude-sonnet-4-5", "gpt-4o"] and payload["expires_at"] == "2098-12-31T16:00:00+00:00"
    assert SECRET.fullmatch(payload["secret"]) and payload["prefix"] == payload["secret"][:11] + "..."
    assert "not store" in payload["warning"] or "stores only" in payload["warning"]
    # The printed secrets are real keys.
    meter = Meter.open(alice)
    try:
        assert meter.authorize(secret, BODY, "req-1").amount == 510
        assert meter.authorize(payload["secret"], BODY, "req-2").key_id == 2
        with pytest.raises(KeyRejected, match="may not use model"):
            meter.authorize(payload["secret"], BODY | {"model": "gpt-4o-mini"}, "req-3")
    finally:
        meter.close()
    # No other command prints a secret.
    for args in (("key", "list"), ("key", "list", "--json"), ("user", "show", "alice", "--json"), ("user", "show", "alice")):
        shown = run(*args, db=alice)
        assert shown.returncode == 0 and not SECRET.search(shown.stdout + shown.stderr)


def test_key_create_refusals(alice: str) -> None:
    refused(run("key", "create", "alice", "--limit-quota", "5", "--unlimited", db=alice), "either --limit-quota N or --unlimited")
    refused(run("key", "create", "alice", "--expires", "2099-01-01T00:00:00", db=alice), "has no time zone")
    refused(run("key", "create", "alice", "--expires", "2001-01-01T00:00:00Z", db=alice), "is in the past")
    refused(run("key", "create", "alice", "--expires", "tomorrow", db=alice), "not an ISO 8601 time")
    refused(run("key", "create", "alice", "--models", "gpt-9", db=alice), "unknown model 'gpt-9'")
    refused(run("key", "create", "nobody", db=alice), "no user 'nobody'")
    assert run("key", "create", "alice", "--limit-quota", "-1", db=alice).returncode == 2  # typer's range check
    assert ok_json("key", "list", db=alice) == []


def test_key_list_and_revoke(alice: str) -> None:
    first = ok_json("key", "create", "alice", "--unlimited", db=alice)
    ok_json("user", "create", "bob", db=alice)
    ok_json("key", "create", "bob", "--limit-quota", "7", db=alice)
    assert [k["id"] for k in ok_json("key", "list", db=alice)] == [1, 2]
    (bobs,) = ok_json("key", "list", "bob", db=alice)
    assert bobs["limit_quota"] == 7 and bobs["status"] == "enabled" and "secret" not in bobs
    meter = Meter.open(alice)
    try:
        meter.settle(meter.authorize(first["secret"], BODY, "req-1"), response=RESPONSE)
    finally:
        meter.close()
    (alices,) = ok_json("key", "list", "alice", db=alice)
    assert (alices["used_quota"], alices["charged_quota"]) == (0, 25)  # unlimited: usage from the usage events
    assert ok_json("key", "revoke", "1", db=alice) == {"id": 1, "status": "revoked", "changed": True}
    assert ok_json("key", "revoke", "1", db=alice) == {"id": 1, "status": "revoked", "changed": False}
    again = run("key", "revoke", "1", db=alice)
    assert again.returncode == 0 and again.stdout.strip() == "key 1 was already revoked"
    refused(run("key", "revoke", "99", db=alice), "no API key 99")
    assert ok_json("key", "list", "alice", db=alice)[0]["status"] == "revoked"
    meter = Meter.open(alice)
    try:
        with pytest.raises(KeyRejected, match="^invalid API key$"):  # revoked: the same answer as an unknown key
            meter.authorize(first["secret"], BODY, "req-2")
    finally:
        meter.close()
    table = run("key", "list", db=alice)
    assert table.returncode == 0 and "revoked" in table.stdout and "unlimited" in table.stdout


def test_topup_grant_and_balance(db: str) -> None:
    ok_json("user", "create", "alice", db=db)
    granted = ok_json("grant", "alice", "signup", db=db)
    assert granted == {"user_id": 1, "kind": "signup", "quota": 100_000, "granted": True, "balance": 100_000}
    assert ok_json("grant", "1", "signup", db=db) == {"user_id": 1, "kind": "signup", "quota": 0, "granted": False,
                                                      "balance": 100_000}
    refused(run("grant", "alice", "birthday", db=db), "unknown grant 'birthday'")
    topped = ok_json("topup", "alice", "--amount", "10", "--currency", "CNY", "--reference", "order-1", db=db)
    assert topped == {"user_id": 1, "reference": "order-1", "amount": "10", "currency": "CNY", "quota": 5_000_000,
                      "balance": 5_100_000}
    retried = run("topup", "alice", "--amount", "10", "--currency", "CNY", "--reference", "order-1", db=db)
    assert retried.returncode == 0 and "balance 5100000" in retried.stdout  # a retried webhook credits once
    refused(run("topup", "alice", "--amount", "20", "--currency", "CNY", "--reference", "order-1", db=db),
            "top-up reference 'order-1' was used for a different order")
    refused(run("topup", "alice", "--amount", "10", "--currency", "XYZ", "--reference", "order-2", db=db), "XYZ")
    refused(run("topup", "alice", "--amount", "ten", "--currency", "CNY", "--reference", "order-3", db=db), "--amount")
    refused(run("topup", "nobody", "--amount", "10", "--currency", "CNY", "--reference", "order-4", db=db), "no user 'nobody'")
    assert ok_json("balance", "alice", db=db) == {"user_id": 1, "name": "alice", "balance": 5_100_000, "usd": "10.2"}
    human = run("balance", "1", db=db)
    assert human.returncode == 0 and human.stdout.strip() == "alice (1): 5100000 units ($10.2)"
    refused(run("balance", "bob", db=db), "no user 'bob'")


def test_redemption_codes(alice: str) -> None:
    created = ok_json("redeem", "create", "--count", "3", "--quota", "500", "--batch", "promo", db=alice)
    assert set(created) == {"batch", "count", "quota", "codes", "warning"}
    assert (created["batch"], created["count"], created["quota"], len(set(created["codes"]))) == ("promo", 3, 500, 3)
    first, second, third = created["codes"]
    assert ok_json("redeem", "use", "alice", first, db=alice) == {"user_id": 1, "quota": 500, "balance": 5_100_500}
    refused(run("redeem", "use", "alice", first, db=alice), "already used")
    refused(run("redeem", "use", "alice", "rc-not-a-code", db=alice), "invalid redemption code")
    from_stdin = run("redeem", "use", "alice", "-", db=alice, stdin=second + "\n")
    assert from_stdin.returncode == 0 and from_stdin.stdout.strip() == "redeemed 500 units for user 1; balance 5101000"
    human = run("redeem", "create", "--count", "2", "--quota", "1", db=alice)
    assert human.returncode == 0 and len(re.findall(r"^rc-\S+$", human.stdout, re.M)) == 2
    assert "warning:" in human.stderr
    assert run("redeem", "create", "--count", "0", "--quota", "1", db=alice).returncode == 2
    for args in (("user", "show", "alice", "--json"), ("key", "list", "--json"), ("audit", "--json")):
        assert third not in run(*args, db=alice).stdout  # codes are printed once, at creation


def test_audit_is_ok_then_exits_1_after_a_balance_is_corrupted(alice: str, tmp_path: Path) -> None:
    out = run("audit", db=alice)
    assert out.returncode == 0 and out.stdout.strip() == "ok"
    assert ok_json("audit", db=alice) == {"ok": True, "violations": [], "quarantined": 0}
    with sqlite3.connect(tmp_path / "ledger.db") as connection:
        connection.execute("UPDATE users SET balance = balance + 1 WHERE name = 'alice'")
    broken = run("audit", db=alice)
    assert broken.returncode == 1
    assert broken.stdout.splitlines() == [
        "1 violation:", "  balance equals the sum of entries: user 1: balance 5100001, entries 5100000"
    ]
    payload = json.loads(run("audit", "--json", db=alice).stdout)
    assert payload == {"ok": False, "violations": [{"invariant": "balance equals the sum of entries", "subject": "user 1",
                                                    "detail": "balance 5100001, entries 5100000"}], "quarantined": 0}
    assert run("audit", "--json", db=alice).returncode == 1


def test_the_commands_on_every_database(ledger_url: str) -> None:
    """--db works the same on SQLite, PostgreSQL and MariaDB (the server's own URL, no environment)."""
    assert ok_json("db", "upgrade", db=ledger_url)["revision"] == "0005"
    assert ok_json("user", "create", "alice", db=ledger_url)["id"] == 1
    assert ok_json("grant", "alice", "signup", db=ledger_url)["quota"] == 100_000
    assert ok_json("topup", "alice", "--amount", "10", "--currency", "CNY", "--reference", "o-1", db=ledger_url)["quota"] == 5_000_000
    key = ok_json("key", "create", "alice", "--limit-quota", "1000", db=ledger_url)
    (code,) = ok_json("redeem", "create", "--count", "1", "--quota", "5", db=ledger_url)["codes"]
    assert ok_json("redeem", "use", "alice", code, db=ledger_url)["balance"] == 5_100_005
    assert [k["id"] for k in ok_json("key", "list", "alice", db=ledger_url)] == [key["id"]]
    assert ok_json("balance", "alice", db=ledger_url)["balance"] == 5_100_005
    assert ok_json("audit", db=ledger_url) == {"ok": True, "violations": [], "quarantined": 0}
    engine = create_engine(normalize_url(ledger_url))
    with engine.begin() as connection:
        connection.execute(text("UPDATE users SET balance = balance - 5 WHERE name = 'alice'"))
    engine.dispose()
    broken = run("audit", "--json", db=ledger_url)
    assert broken.returncode == 1 and json.loads(broken.stdout)["violations"][0]["subject"] == "user 1"


def _api_example() -> str:
    document = (ROOT / "docs" / "ledger.md").read_text(encoding="utf-8")
    section = document.split("## Public API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_public_api_example_of_the_docs_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _api_example()
    assert 'Meter.open("sqlite:///metering.db")' in code and "meter.audit()" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"request_body": BODY, "response_body": RESPONSE}
    exec(compile(code, "docs/ledger.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    meter = namespace["meter"]
    try:
        assert (tmp_path / "metering.db").exists()
        assert namespace["hold"].amount == 510 and namespace["receipt"].quota == 25
        assert meter.release(namespace["hold"]) is False  # settled already: released at most once
        assert meter.balance(namespace["uid"]) == 100_000 + 5_000_000 - 25
        assert meter.audit().ok and meter.audit().violations == ()
        assert SECRET.fullmatch(namespace["secret"])
    finally:
        meter.close()
    # The CLI reads the same database.
    assert ok_json("balance", "alice", cwd=tmp_path)["balance"] == 5_099_975
    assert ok_json("audit", cwd=tmp_path)["ok"] is True
