"""Abuse and security (issue 6, item 3), on SQLite, PostgreSQL and MariaDB wherever a database is involved.

What is tested:

- Key secrets and redemption codes are stored only as their sha256 and compared in constant time: an
  unknown, a wrong and a revoked key (and a non-text one) get one and the same answer that never echoes
  the key, every look-up compares hashes with ``hmac.compare_digest`` whether a row was found or not,
  and no text column of any table holds a secret or a code.
- A full flow (keys and codes created, requests authorized and settled with valid and invalid keys,
  errors, the ``metering`` command line with ``--json``, a day close, the worker, a report in every
  format, every export kind) with logging captured at DEBUG: no secret, no code and no hash of either
  appears in a log line, an error, an output, a report or an export; keys appear as their display prefix.
- Hostile user and key names (SQL, formulas, markup, emoji, bidi controls, line breaks) are stored byte
  for byte, read back equal, exported with formula cells neutralized, the tables intact afterwards; the
  names no database can keep (NUL, lone surrogates, over 190 characters) are refused with ``InvalidField``
  naming the field, and nothing is stored.
- A new SQLite database file (and its -wal and -shm files) is 0600 even under umask 000; an existing
  file keeps the mode its operator gave it.
- An export path outside the chosen directory (``..``, absolute, a planted symlink to a file or a
  directory, dangling or not) is refused by ``metering export --dir`` with exit 2 naming the field and
  nothing written, and by the worker for a symlink planted in its ``--out``.
- One request id replayed 1,000 times (authorize and settle), across a restart and from a fresh
  process, charges once: one hold, one usage event, one charge entry, the balance moved once.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import html
import io
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Iterable, Iterator
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, Text, inspect, text
from typer.testing import CliRunner

from metering.ledger import InvalidField, KeyRejected, Meter, NotFound, QuotaExceeded
from metering.ledger.database import READ_ONLY, make_engine
from metering.ledger.errors import DuplicateReference
from metering.ledger.meter import SECRET_PREFIX, secret_hash
from pricing.usage import UsageRecord
from workers.calendar import BusinessCalendar
from workers.cli.main import app
from workers.close.nightly import close_day
from workers.export.csv_safety import neutralize
from workers.errors import InvalidArgument
from workers.export.exporter import KINDS, export
from workers.jobs import Worker, export_path
from workers.report.build import build_report, render
from workers.report.options import FORMATS

ROOT = Path(__file__).resolve().parents[1]
CALENDAR = BusinessCalendar("Asia/Shanghai")
BODY = {"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "hello there"}]}
RUNNER = CliRunner()
#: Names that break naive SQL, CSV, HTML, terminal and log writers; each is stored and read back exactly.
HOSTILE_NAMES = (
    "'; DROP TABLE users; --",
    '=HYPERLINK("http://x","y")',
    "Robert'); DROP TABLE students;--",
    "+SUM(1)", "-2+3", "@cmd", "＝1+1", "=1\t+1\r\nx", "line\nbreak",
    "<script>alert(1)</script>", "[bold red]markup[/]", "[/]",
    'a "quoted", name', "%s %d {0} %(name)s", "\\x00 is not a NUL",
    "😀 emoji 👨‍👩‍👧", "\u202eexe.txt\u202c RTL override", "Ωμέγα 张伟 עברית",
    "x" * 190,
)
#: Key names only: a user name may not start or end with white space (a user is looked up by name).
KEY_NAMES = ("\t=1+1", "\r=1", "  padded key  ")
#: Names no database could keep byte for byte: refused, naming the field.
REFUSED_NAMES = ("nul\x00byte", "\x00", "lone \ud800 surrogate", "y" * 191)


# ---------------------------------------------------------------------- helpers


def funded(meter: Meter, name: str = "alice", units: int = 50_000_000) -> int:
    """A user credited ``units`` (one adjustment)."""
    uid = meter.create_user(name)
    meter.adjust(uid, units, f"fund-{uid}", "test funding")
    return uid


def usage(prompt: int, output: int = 7) -> UsageRecord:
    """A gpt-4o usage record."""
    return UsageRecord(provider="openai", model="gpt-4o", input_tokens=prompt, output_tokens=output)


def key_id(meter: Meter, name: str) -> int:
    """The id of the key called ``name``."""
    (found,) = [row["id"] for row in meter.keys() if row["name"] == name]
    return int(found)


def forbidden(values: Iterable[str]) -> dict[str, str]:
    """What must never appear, by what it is: each secret, its random part, 12-character pieces, its sha256."""
    out: dict[str, str] = {}
    for value in values:
        body = value.split("-", 2)[-1] if value.startswith(SECRET_PREFIX) else value.removeprefix("rc-")
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()  # secret_hash, any text
        out |= {value: "secret", body: "random part", body[:12]: "first 12", body[-12:]: "last 12",
                digest: "sha256", digest[:16]: "sha256 prefix"}
    return out


def assert_absent(values: Iterable[str], haystack: str, where: str) -> None:
    """None of ``forbidden(values)`` occurs in ``haystack``."""
    for needle, what in forbidden(values).items():
        assert needle not in haystack, f"{what} of a secret found in {where}"


def error_texts(exc: BaseException) -> str:
    """Everything an error can show: str, repr, attributes, the OpenAI body, the formatted traceback."""
    parts = [str(exc), repr(exc), repr(vars(exc)), "".join(traceback.format_exception(exc))]
    if hasattr(exc, "openai_error"):
        parts.append(json.dumps(exc.openai_error()))
    return "\n".join(parts)


def at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Every logger at DEBUG: SQLAlchemy's echo of statements and result rows included."""
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy.engine", "sqlalchemy.pool", "metering", "workers", "alembic", "apscheduler"):
        caplog.set_level(logging.DEBUG, logger=name)


def text_columns(meter: Meter) -> Iterator[tuple[str, str, Any]]:
    """(table, column, value) for every cell of every text column of every table of the database."""
    with meter.engine.connect() as plain:
        connection = plain.execution_options(**{READ_ONLY: True})  # one reader: SQLite's write lock is not taken
        inspector = inspect(connection)
        for table in inspector.get_table_names():
            columns = [c["name"] for c in inspector.get_columns(table) if isinstance(c["type"], (String, Text))]
            if not columns:
                continue
            quoted = ", ".join(meter.engine.dialect.identifier_preparer.quote(c) for c in columns)
            for row in connection.execute(text(f"SELECT {quoted} FROM {meter.engine.dialect.identifier_preparer.quote(table)}")):
                for column, value in zip(columns, row):
                    yield table, column, value


def count(meter: Meter, sql: str, **params: Any) -> int:
    """One integer from SQL."""
    with meter.engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())


def cli(caplog: pytest.LogCaptureFixture, db: str, *args: str, stdin: str | None = None) -> Any:
    """``metering ARGS --db DB`` in this process (logging reaches caplog); DEBUG restored afterwards."""
    result = RUNNER.invoke(app, [*args, "--db", db], input=stdin, env={"NO_COLOR": "1", "COLUMNS": "200"})
    at_debug(caplog)  # the worker's logging set-up lowers the metering logger to INFO
    return result


def files_under(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (symlinks not followed) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# ---------------------------------------------------------------------- secrets: hashes, constant time


def test_keys_and_codes_are_stored_as_hashes_compared_in_constant_time_and_rejected_alike(
    meter: Meter, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = funded(meter)
    good = meter.create_key(uid, "good")
    revoked = meter.create_key(uid, "revoked")
    assert meter.revoke_key(key_id(meter, "revoked"))
    codes = meter.create_redemption_codes(3, 500, batch="b1")
    unknown = SECRET_PREFIX + secrets.token_urlsafe(32)
    wrong = good[:-1] + ("A" if good[-1] != "A" else "B")  # one character off a real key
    presented: list[Any] = [unknown, wrong, revoked, good.upper(), secret_hash(good), "", good.encode(), None,
                            "sk-mtr-\udc80broken"]
    compared: list[tuple[Any, Any]] = []
    real_compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real_compare(a, b))

    answers = set()
    for number, secret in enumerate(presented):
        for call in (lambda: meter.authorize(secret, BODY, f"bad-{number}"),
                     lambda: meter.record_usage(secret, f"deferred-{number}", usage(3))):
            with pytest.raises(KeyRejected) as info:
                call()
            answers.add((str(info.value), json.dumps(info.value.openai_error()), info.value.http_status))
            shown = error_texts(info.value)
            if isinstance(secret, str) and secret:
                assert_absent([secret], shown, "a key rejection")
            assert_absent([good, revoked], shown, "a key rejection")
    # One answer for all of them: unknown, wrong, revoked, not even text.
    body = {"error": {"message": "invalid API key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    assert answers == {("invalid API key", json.dumps((401, body)), 401)}
    assert len(compared) == 2 * len(presented)  # every look-up compared hashes, whether a row was found or not
    before = len(compared)
    hold = meter.authorize(good, BODY, "ok-1")
    assert len(compared) == before + 1 and hold.amount > 0  # the valid key goes the same way
    meter.settle(hold, usage=usage(hold.prompt_tokens))

    # Redemption codes: unknown, wrong, not text: one answer that never echoes the code.
    code_answers = set()
    for number, code in enumerate(["rc-" + secrets.token_urlsafe(18), codes[0][:-1] + ("x" if codes[0][-1] != "x" else "y"),
                                   codes[0].upper(), secret_hash(codes[0]), "", None]):
        with pytest.raises(NotFound) as info:
            meter.redeem(uid, code)
        code_answers.add(str(info.value))
        assert_absent(codes + ([code] if isinstance(code, str) and code else []), error_texts(info.value), "a code refusal")
    assert code_answers == {"invalid redemption code"}
    balance = meter.balance(uid)
    assert meter.redeem(uid, codes[0]) == 500 and meter.balance(uid) == balance + 500
    with pytest.raises(DuplicateReference) as used:  # a used code says so (documented): only its holder learns it
        meter.redeem(uid, codes[0])
    assert_absent(codes, error_texts(used.value), "a used-code refusal")

    # The database holds only hashes, and only in their own columns: every text cell of every table scanned.
    cells = list(text_columns(meter))
    hash_columns = {("api_keys", "secret_hash"), ("redemption_codes", "code_hash")}
    everything = "\n".join(f"{t}.{c}={v!r}" for t, c, v in cells if (t, c) not in hash_columns)
    assert_absent([good, revoked, *codes], everything, "the database")
    stored = {v for t, c, v in cells if (t, c) in hash_columns}
    assert stored == {secret_hash(s) for s in (good, revoked, *codes)}  # the scan did read the hash columns
    scanned = {(t, c) for t, c, _ in cells}
    assert {("users", "name"), ("api_keys", "name"), ("api_keys", "display_prefix"), ("holds", "request_id"),
            ("usage_events", "request_id"), ("ledger_entries", "reference"), ("redemption_codes", "batch")} <= scanned


# ---------------------------------------------------------------------- secrets: logs, CLI, reports, exports


def test_no_secret_code_or_hash_reaches_logs_errors_the_cli_reports_or_exports(
    ledger_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    at_debug(caplog)
    day = CALENDAR.today() - timedelta(days=2)
    db = ledger_url
    shown: list[str] = []  # every text the flow produced, except the one-time print of a new secret
    once: list[str] = []  # the outputs that print a secret by design (key create, redeem create)

    def run(*args: str, stdin: str | None = None, code: int = 0, prints_secret: bool = False) -> Any:
        result = cli(caplog, db, *args, stdin=stdin)
        assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
        (once if prints_secret else shown).extend([result.stdout, result.stderr])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            shown.append(error_texts(result.exception))
        return result

    run("user", "create", "alice", "--json")
    run("grant", "alice", "signup", "--json")
    run("topup", "alice", "--amount", "10", "--currency", "CNY", "--reference", "order-1", "--json")
    k1 = json.loads(run("key", "create", "alice", "--name", "k1", "--json", prints_secret=True).stdout)
    k2_out = run("key", "create", "alice", "--name", "k2", "--limit-quota", "100000000", prints_secret=True)
    k2_secret = k2_out.stdout.splitlines()[-1].strip()
    codes = json.loads(run("redeem", "create", "--count", "3", "--quota", "500", "--json", prints_secret=True).stdout)["codes"]
    assert k1["secret"] in once[0] and k2_secret in once[2] and all(c in once[4] for c in codes)  # the one-time prints

    meter = Meter.open(db)
    try:
        uid = meter.find_user("alice")
        k3 = meter.create_key(uid, "k3")
        revoked = meter.create_key(uid, "to-revoke")
        wrong = k1["secret"][:-1] + ("z" if k1["secret"][-1] != "z" else "y")  # one character off
        unknown = SECRET_PREFIX + secrets.token_urlsafe(32)
        moment = datetime.combine(day, time(10), CALENDAR.zone)
        for number, secret in enumerate((k1["secret"], k2_secret, k3)):
            hold = meter.authorize(secret, BODY, f"req-{number}", at=moment + timedelta(minutes=number), channel="c1")
            shown.extend([repr(hold), repr(meter.settle(hold, usage=usage(hold.prompt_tokens)))])
        released = meter.authorize(k3, BODY, "req-released", at=moment + timedelta(minutes=9))
        shown.append(repr(meter.release(released)))
        shown.append(repr(meter.record_usage(k1["secret"], "req-deferred", usage(5), at=moment + timedelta(minutes=20))))
        for number, call in enumerate([
            lambda: meter.authorize(unknown, BODY, "bad-1"), lambda: meter.authorize(wrong, BODY, "bad-2"),
            lambda: meter.authorize(k1["secret"], {**BODY, "max_tokens": 10**9}, "bad-3", at=moment),
            lambda: meter.record_usage(wrong, "bad-4", usage(5)), lambda: meter.redeem(uid, "rc-" + "A" * 24),
        ]):
            with pytest.raises((KeyRejected, QuotaExceeded, NotFound)) as info:
                call()
            shown.append(error_texts(info.value))
        run("key", "revoke", str(key_id(meter, "to-revoke")), "--json")
        with pytest.raises(KeyRejected) as after_revoke:
            meter.authorize(revoked, BODY, "bad-5")
        shown.append(error_texts(after_revoke.value))
    finally:
        meter.close()

    run("redeem", "use", "alice", codes[0], "--json")
    run("redeem", "use", "alice", "-", "--json", stdin=codes[1] + "\n")
    run("redeem", "use", "alice", codes[0], code=2)  # used
    run("redeem", "use", "alice", codes[2][:-1] + ("Q" if codes[2][-1] != "Q" else "R"), code=2)  # wrong
    for args in (("key", "list", "--json"), ("key", "list"), ("user", "show", "alice", "--json"), ("user", "show", "alice"),
                 ("user", "list", "--json"), ("balance", "alice", "--json"), ("audit", "--json")):
        run(*args)
    run("reconcile", "--day", day.isoformat(), "--json")
    nightly = tmp_path / "nightly"
    worker = subprocess.run([sys.executable, "-m", "workers", "worker", "--once", "--json", "--out", str(nightly),
                             "--db", db], capture_output=True, text=True, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k not in ("METERING_DB", "METERING_TZ")})
    assert worker.returncode == 0, worker.stderr
    shown.extend([worker.stdout, worker.stderr])  # the real process's stderr (its log lines at INFO)
    for fmt in FORMATS:
        run("report", "--from", day.isoformat(), "--to", day.isoformat(), "--format", fmt, "--by", "day,user,model,key,channel")
    exports = tmp_path / "exports"
    exports.mkdir()
    for kind in KINDS:
        run("export", kind, "--from", day.isoformat(), "--to", day.isoformat(), "--dir", str(exports), "--out",
            f"{kind}.csv", "--json", "--excel")
    written = files_under(exports) | {f"nightly/{k}": v for k, v in files_under(nightly).items()}
    assert {f"{kind}.csv" for kind in KINDS} <= set(written) and any(k.startswith("nightly/usage-") for k in written)
    shown.extend(data.decode("utf-8-sig") for data in written.values())
    shown.append(caplog.text)

    everything = "\n".join(shown)
    assert "INSERT INTO api_keys" in caplog.text and "Row (" in caplog.text  # the SQL echo was captured at DEBUG
    assert_absent([k1["secret"], k2_secret, k3, revoked, wrong, unknown, *codes], everything, "the flow's output")
    assert "[SQL parameters hidden due to hide_parameters=True]" in caplog.text
    prefix = k1["prefix"]
    assert prefix == k1["secret"][: len(SECRET_PREFIX) + 4] + "..."
    assert prefix in written["usage.csv"].decode("utf-8-sig") and prefix in written["rollup.csv"].decode("utf-8-sig")


# ---------------------------------------------------------------------- hostile names


def test_hostile_names_are_stored_exactly_and_exported_harmlessly(meter: Meter, tmp_path: Path) -> None:
    tables_before = set(inspect(meter.engine).get_table_names())
    day = date(2026, 11, 2)
    moment = datetime.combine(day, time(9), CALENDAR.zone)
    users: dict[str, int] = {}
    for number, name in enumerate(HOSTILE_NAMES):
        users[name] = uid = meter.create_user(name)
        meter.adjust(uid, 10_000_000, f"fund-{number}", name)  # the note is a name too
        key_name = HOSTILE_NAMES[(number + 1) % len(HOSTILE_NAMES)]
        secret = meter.create_key(uid, key_name)
        hold = meter.authorize(secret, BODY, f"req-{number}", at=moment + timedelta(minutes=number))
        meter.settle(hold, usage=usage(hold.prompt_tokens))
    # Refused, naming the field; nothing stored.
    for bad in (*REFUSED_NAMES, *KEY_NAMES, "123", ""):
        with pytest.raises(InvalidField) as refused:
            meter.create_user(bad)
        assert refused.value.field == "name" and str(refused.value).startswith("name: ")
        assert refused.value.openai_error()[0] == 400
    for bad in REFUSED_NAMES:
        with pytest.raises(InvalidField) as refused:
            meter.create_key(users[HOSTILE_NAMES[0]], bad)
        assert refused.value.field == "name"
    for name in KEY_NAMES:  # key names have no white-space rule
        meter.create_key(users[HOSTILE_NAMES[0]], name)

    # Read back equal, byte for byte, through the API and straight from the database.
    assert [u["name"] for u in meter.users()] == list(HOSTILE_NAMES)
    assert all(meter.find_user(name) == uid for name, uid in users.items())
    names_by_key = [k["name"] for k in meter.keys()]
    assert names_by_key == [HOSTILE_NAMES[(n + 1) % len(HOSTILE_NAMES)] for n in range(len(HOSTILE_NAMES))] + list(KEY_NAMES)
    with meter.engine.connect() as connection:
        stored = connection.execute(text("SELECT name FROM users ORDER BY id")).scalars().all()
        notes = connection.execute(text("SELECT note FROM ledger_entries WHERE kind = 'adjustment' ORDER BY id")).scalars().all()
    assert [s.encode("utf-8") for s in stored] == [n.encode("utf-8") for n in HOSTILE_NAMES]
    assert notes == list(HOSTILE_NAMES)

    # Closed, exported, reported: formula cells neutralized, markup escaped, every table still there.
    assert close_day(meter, day, calendar=CALENDAR, now=moment + timedelta(days=2)).status == "closed"
    for kind in KINDS:
        out = tmp_path / f"{kind}.csv"
        export(meter.engine, kind, day, day, out, calendar=CALENDAR)
        rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8"), newline="")))  # CRs kept as written
        assert sorted(r["user_name"] for r in rows) == sorted(neutralize(n) for n in HOSTILE_NAMES), kind
        for r in rows:
            assert r["user_name"][:1] not in ("=", "+", "-", "@", "\t", "\r", "\n", "＝"), kind
    report = build_report(meter.engine, meter.prices, day, day, by=("user",), calendar=CALENDAR)
    page = render(report, "html")
    assert "<script>alert(1)</script>" not in page and html.escape("<script>alert(1)</script>") in page
    grouped = list(csv.DictReader(io.StringIO(render(report, "csv"), newline="")))
    assert sorted(r["user_name"] for r in grouped) == sorted(neutralize(n) for n in HOSTILE_NAMES)
    table = render(report, "table")  # rich markup in a name is shown literally, never interpreted
    assert "[bold red]markup[/]" in table and "[/]" in table
    assert set(inspect(meter.engine).get_table_names()) == tables_before
    assert count(meter, "SELECT COUNT(*) FROM users") == len(HOSTILE_NAMES)
    assert meter.audit().ok


def test_hostile_names_through_the_command_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = f"sqlite:///{tmp_path}/cli.db"
    for name in ("'; DROP TABLE users; --", "[/]", "[bold red]x[/]", '=HYPERLINK("http://x","y")', "😀\u202eabc"):
        created = cli(caplog, db, "user", "create", name, "--json")
        assert created.exit_code == 0, created.stderr
        assert json.loads(created.stdout)["name"] == name
        key = cli(caplog, db, "key", "create", name, "--name", name, "--json")
        assert key.exit_code == 0 and json.loads(key.stdout)["name"] == name
    listing = cli(caplog, db, "user", "list")  # a table: names printed literally, rich markup not interpreted
    assert listing.exit_code == 0, (listing.stderr, listing.exception)
    assert "[/]" in listing.stdout and "[bold red]x[/]" in listing.stdout
    keys = cli(caplog, db, "key", "list")
    assert keys.exit_code == 0 and "[bold red]x[/]" in keys.stdout, (keys.stderr, keys.exception)
    shown = cli(caplog, db, "user", "show", "[/]")
    assert shown.exit_code == 0 and "[/]" in shown.stdout
    too_long = cli(caplog, db, "key", "create", "[/]", "--name", "y" * 191)
    assert too_long.exit_code == 2 and re.search(r"^error: (--)?name: at most 190 characters", too_long.stderr)  # typed, named
    assert json.loads(cli(caplog, db, "user", "list", "--json").stdout)[0]["name"] == "'; DROP TABLE users; --"


# ---------------------------------------------------------------------- the SQLite file's mode


def test_a_new_sqlite_file_is_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    previous = os.umask(0)  # the worst case: every file 0666 unless the code chooses its mode
    try:
        for database in (tmp_path / "new.db", tmp_path / "made" / "for" / "it.db"):
            meter = Meter.open(f"sqlite:///{database}")
            try:
                meter.create_user("alice")  # a write: the -wal and -shm files exist while the meter is open
                files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
                assert all(f.exists() for f in files)
                assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
            finally:
                meter.close()
        # An existing file keeps the mode its operator chose (e.g. a backup group may read); SQLite gives it
        # to the -wal and -shm files too.
        chosen = tmp_path / "chosen.db"
        chosen.touch()
        chosen.chmod(0o640)
        meter = Meter.open(f"sqlite:///{chosen}")
        try:
            meter.create_user("bob")
            assert (mode(chosen), mode(Path(f"{chosen}-wal")), mode(Path(f"{chosen}-shm"))) == (0o640, 0o640, 0o640)
        finally:
            meter.close()
        # The engine alone (db upgrade, the export workers) creates it the same way.
        engine = make_engine(f"sqlite:///{tmp_path}/engine-only.db")
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        assert mode(tmp_path / "engine-only.db") == 0o600
    finally:
        os.umask(previous)


# ---------------------------------------------------------------------- export paths


@pytest.fixture
def export_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An export directory with planted symlinks leading outside it, and the outside directory."""
    inside, outside = tmp_path / "exports", tmp_path / "outside"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim.csv").write_bytes(b"do not overwrite\n")
    (inside / "planted.csv").symlink_to(outside / "victim.csv")  # to an existing file outside
    (inside / "dangling.csv").symlink_to(outside / "new.csv")  # to a file outside that does not exist yet
    (inside / "escape").symlink_to(outside, target_is_directory=True)  # a directory outside
    (inside / "manifested.csv.manifest.json").symlink_to(outside / "m.json")  # the manifest's name, planted
    (inside / "alias").symlink_to(inside / "sub", target_is_directory=True)  # inside to inside: fine
    (tmp_path / "exports-link").symlink_to(inside, target_is_directory=True)  # the directory itself a symlink: fine
    return inside, outside


@pytest.mark.parametrize("out", [
    "../outside/x.csv", "sub/../../outside/x.csv", "{outside}/x.csv", "planted.csv", "dangling.csv", "escape/x.csv",
    "manifested.csv", "{inside}", "sub/..",
])
def test_an_export_path_outside_the_chosen_directory_is_refused(
    export_dirs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, out: str
) -> None:
    inside, outside = export_dirs
    before = files_under(tmp_path)
    db = tmp_path / "ledger.db"
    target = out.format(inside=inside, outside=outside)
    result = cli(caplog, f"sqlite:///{db}", "export", "usage", "--from", "2026-11-01", "--to", "2026-11-02",
                 "--dir", str(inside), "--out", target)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert "error: --out: " in result.stderr and result.stdout == ""
    assert files_under(tmp_path) == before and not db.exists()  # nothing written, not even the database
    assert (outside / "victim.csv").read_bytes() == b"do not overwrite\n"


@pytest.mark.parametrize("out", ["inside.csv", "sub/../inside.csv", "alias/inside.csv", "{inside}/sub/inside.csv"])
def test_an_export_path_inside_the_chosen_directory_is_written(
    export_dirs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, out: str
) -> None:
    inside, _ = export_dirs
    for root in (inside, tmp_path / "exports-link"):
        result = cli(caplog, f"sqlite:///{tmp_path}/ledger.db", "export", "usage", "--from", "2026-11-01", "--to",
                     "2026-11-02", "--dir", str(root), "--out", out.format(inside=inside), "--json")
        assert result.exit_code == 0, (result.stderr, result.exception)
        assert json.loads(result.stdout)["rows"] == 0
    written = [p for p in inside.rglob("inside.csv")]
    assert written and all(p.resolve().is_relative_to(inside) for p in written)


def test_a_missing_export_directory_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    result = cli(caplog, f"sqlite:///{tmp_path}/ledger.db", "export", "usage", "--from", "2026-11-01", "--to",
                 "2026-11-02", "--dir", str(tmp_path / "nope"), "--out", "x.csv")
    assert result.exit_code == 2 and "error: --dir: " in result.stderr
    assert files_under(tmp_path) == {}
    engine = make_engine(f"sqlite:///{tmp_path}/lib.db")
    try:
        with pytest.raises(InvalidArgument) as refused:  # the library names its own field
            export(engine, "usage", date(2026, 11, 1), date(2026, 11, 1), tmp_path / "x.csv", calendar=CALENDAR,
                   root=tmp_path / "nope")
    finally:
        engine.dispose()
    assert refused.value.field == "root" and not (tmp_path / "x.csv").exists()


def test_the_worker_refuses_a_symlink_planted_in_its_export_directory(tmp_path: Path) -> None:
    out, outside = tmp_path / "nightly", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    day = date(2026, 11, 2)
    victim = outside / "victim.csv"
    victim.write_bytes(b"keep\n")
    Path(f"{victim}.manifest.json").write_bytes(b"{}\n")
    export_path(out, "rollup", day).symlink_to(victim)  # with a manifest beside its target: looks "already there"
    Path(f"{export_path(out, 'rollup', day)}.manifest.json").symlink_to(Path(f"{victim}.manifest.json"))
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        worker = Worker(meter, CALENDAR, out=out)
        with pytest.raises(InvalidArgument) as refused:
            worker.export_days([day])
        assert refused.value.field == "out" and "outside the export directory" in str(refused.value)
    finally:
        meter.close()
    assert victim.read_bytes() == b"keep\n" and files_under(outside) == {"victim.csv": b"keep\n",
                                                                         "victim.csv.manifest.json": b"{}\n"}
    assert export_path(out, "rollup", day).is_symlink()  # left for the operator to look at


# ---------------------------------------------------------------------- replays


REPLAY_SCRIPT = textwrap.dedent("""
    import json, sys
    from metering.ledger import Meter
    from pricing.usage import UsageRecord
    url, secret, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    meter = Meter.open(url)
    hold = meter.authorize(secret, body, "replayed")
    usage = UsageRecord(provider="openai", model="gpt-4o", input_tokens=hold.prompt_tokens, output_tokens=7)
    print(json.dumps([hold.id, meter.settle(hold, usage=usage).to_dict()]))
    meter.close()
""")


def test_one_request_id_replayed_a_thousand_times_charges_once(ledger_url: str) -> None:
    meter = Meter.open(ledger_url)
    uid = funded(meter, units=1_000_000)
    secret = meter.create_key(uid, "k", limit_quota=500_000)
    hold = meter.authorize(secret, BODY, "replayed")
    receipt = meter.settle(hold, usage=usage(hold.prompt_tokens))
    charged = 1_000_000 - receipt.quota
    replays = 0  # after the first authorize and settle
    try:
        for _ in range(500):  # this process
            assert meter.authorize(secret, BODY, "replayed") == hold
            assert meter.settle(hold, usage=usage(hold.prompt_tokens)) == receipt
            replays += 1
    finally:
        meter.close()
    restarted = Meter.open(ledger_url)  # a restart: a new engine, new connections, nothing cached
    try:
        for _ in range(499):
            again = restarted.authorize(secret, BODY, "replayed")
            assert again == hold
            assert restarted.settle(again, usage=usage(again.prompt_tokens)) == receipt
            replays += 1
    finally:
        restarted.close()
    fresh = subprocess.run([sys.executable, "-c", REPLAY_SCRIPT, ledger_url, secret, json.dumps(BODY)],
                           capture_output=True, text=True, cwd=ROOT, check=True)
    hold_id, fresh_receipt = json.loads(fresh.stdout)
    replays += 1
    assert replays == 1_000 and hold_id == hold.id and fresh_receipt == receipt.to_dict()

    final = Meter.open(ledger_url)
    try:
        assert count(final, "SELECT COUNT(*) FROM holds WHERE request_id = 'replayed'") == 1
        assert count(final, "SELECT COUNT(*) FROM usage_events WHERE request_id = 'replayed'") == 1
        assert count(final, "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'charge'") == 1
        assert count(final, "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'hold'") == 1
        assert count(final, "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'release'") == 1
        assert final.balance(uid) == charged
        (key,) = final.keys(uid)
        assert (key["used_quota"], key["reserved_quota"]) == (receipt.quota, 0)
        assert final.audit().ok
    finally:
        final.close()
