"""What the command line prints, and the processes it leaves behind (issue 13).

What is tested:

- Control characters in stored text: user and key names, references, batch labels, request ids, channel
  names (ESC sequences, CR, BEL, other C0 and C1 controls, DEL, bidi overrides, line separators) are
  stored exactly, and every table, line and error of the command line (``user create``/``show``/``list``,
  ``key create``/``list``, ``balance``, ``topup``, ``redeem create``, ``quarantine list``, ``report
  --format table``, ``prices validate``, errors naming them) prints them escaped (``\\x1b``, ``\\r``,
  ``\\u202e``) through the one function ``workers.cli.plumbing.printable``; ``--json`` output stays exact
  JSON that decodes to the stored text and carries none of them raw (SQLite, PostgreSQL, MariaDB).
- No orphaned export workers: ``metering export --jobs 2`` killed with ``kill -9`` mid-export leaves no
  worker process behind (a real subprocess on a 300,000-row SQLite ledger); the watchdog that covers
  systems without ``PR_SET_PDEATHSIG`` ends an orphan by itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, time as day_time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from workers.cli.plumbing import json_text, printable
from metering.ledger import Meter
from pricing.usage import UsageRecord
from tests.databases import scratch_directory
from tests.traffic import CALENDAR, FIRST_DAY
from workers.calendar import BusinessCalendar
from workers.cli.main import app
from workers.close.nightly import close_due_days

ROOT = Path(__file__).resolve().parents[1]
RUNNER = CliRunner()
#: A name built to clear the screen, move the cursor, ring the bell, return the carriage, reverse the text
#: (U+202E), start an 8-bit CSI (0x9B), delete (DEL) and break the line (U+2028).
HOSTILE = "evil\x1b[2J\x1b[1;1Hroot\r\x07\u202eexe.txt\x9b31m\x7f\u2028x"
SHOWN = "evil\\x1b[2J\\x1b[1;1Hroot\\r\\x07\\u202eexe.txt\\x9b31m\\x7f\\u2028x"
#: What must never reach a terminal raw (the set ``printable`` escapes, spelled out independently).
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
BODY = {"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]}


def invoke(*args: str) -> Any:
    return RUNNER.invoke(app, list(args), env={"COLUMNS": "250", "NO_COLOR": "1", "METERING_DB": None,
                                              "METERING_PRICE_TABLE": None, "METERING_TZ": None})


def clean(result: Any) -> str:
    """The command's stdout and stderr, asserted free of raw terminal controls (tabs and newlines are layout)."""
    both = result.stdout + result.stderr
    assert not RAW_CONTROL.search(both), repr(both)
    return both


# ---------------------------------------------------------------------- the one escaping function


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[31mred", "\\x1b[31mred"), ("a\rb\nc\td", "a\\rb\\nc\\td"), ("bell\x07", "bell\\x07"), ("\x00", "\\x00"),
    ("del\x7f", "del\\x7f"), ("csi\x9b2J", "csi\\x9b2J"), ("nel\x85", "nel\\x85"), ("\u202eevil", "\\u202eevil"),
    ("\u2066iso\u2069", "\\u2066iso\\u2069"), ("\u200fmark\u061c", "\\u200fmark\\u061c"), ("line\u2028sep", "line\\u2028sep"),
    ("lone \udc80", "lone \\udc80"),
    ("张伟, \"VIP\"", "张伟, \"VIP\""), ("👨\u200d👩\u200d👧 [bold]x[/]", "👨\u200d👩\u200d👧 [bold]x[/]"), ("a\\x1b", "a\\x1b"),
])
def test_printable_escapes_terminal_controls_and_keeps_everything_else(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_json_text_is_the_same_json_without_raw_controls() -> None:
    payload = {"name": HOSTILE, "張": ["\x9b", "\u202e", "\x1b"], "n": 5}
    written = json_text(payload)
    assert json.loads(written) == payload
    assert not RAW_CONTROL.search(written) and "張" in written  # non-ASCII stays readable
    assert "\\u009b" in written and "\\u202e" in written and "\\u001b" in written


# ---------------------------------------------------------------------- every command's output


def hostile_ledger(url: str) -> int:
    """A user, key, reference, quarantined request and closed day all named with HOSTILE; the user's id."""
    meter = Meter.open(url)
    try:
        uid = meter.create_user(HOSTILE)
        meter.topup(uid, "50", "CNY", f"order {HOSTILE}")
        secret = meter.create_key(uid, HOSTILE)
        at = datetime.combine(FIRST_DAY, day_time(3), CALENDAR.zone)
        hold = meter.authorize(secret, BODY, f"req {HOSTILE}", at=at, channel=f"ch {HOSTILE}"[:64])
        meter.settle(hold, usage=UsageRecord.from_openai("gpt-4o", {"prompt_tokens": hold.prompt_tokens,
                                                                      "completion_tokens": 3}))
        refused = meter.authorize(secret, BODY, f"bad {HOSTILE}", at=at + timedelta(minutes=1))
        with pytest.raises(ValueError):
            meter.settle(refused, response={"usage": {"prompt_tokens": -1, "completion_tokens": 1}})  # quarantined
        meter.release(refused)
        close_due_days(meter, calendar=CALENDAR, now=datetime.combine(FIRST_DAY + timedelta(days=1), day_time(3),
                                                                      timezone.utc))
        return uid
    finally:
        meter.close()


def test_every_table_and_line_prints_stored_controls_escaped(ledger_url: str) -> None:
    uid = hostile_ledger(ledger_url)
    db = ("--db", ledger_url)
    day = FIRST_DAY.isoformat()
    outputs = {
        "user list": invoke("user", "list", *db), "user show": invoke("user", "show", str(uid), *db),
        "key list": invoke("key", "list", *db), "balance": invoke("balance", str(uid), *db),
        "quarantine list": invoke("quarantine", "list", *db),
        "report table": invoke("report", "--from", day, "--to", day, "--by", "user,key,model,channel", *db),
        "user create": invoke("user", "create", f"two {HOSTILE}", *db),
        "key create": invoke("key", "create", str(uid), "--name", f"k {HOSTILE}", *db),
        "topup": invoke("topup", str(uid), "--amount", "1", "--currency", "CNY", "--reference", f"o {HOSTILE}", *db),
        "redeem create": invoke("redeem", "create", "--count", "1", "--quota", "5", "--batch", f"b {HOSTILE}"[:64], *db),
        "duplicate user": invoke("user", "create", HOSTILE, *db),  # an error naming it
        "unknown user": invoke("balance", HOSTILE + "?", *db),
    }
    for command, result in outputs.items():
        expected_exit = 2 if command in ("duplicate user", "unknown user") else 0
        assert result.exit_code == expected_exit, (command, result.stdout, result.stderr, result.exception)
        printed = clean(result)
        if command not in ("redeem create", "report table"):
            assert "evil\\x1b[2J" in printed, (command, printed)
    assert SHOWN in outputs["user list"].stdout and SHOWN in outputs["user show"].stdout
    assert f"o {SHOWN}" in outputs["topup"].stdout and "evil\\x1b[2J" in outputs["report table"].stdout
    assert "b evil\\x1b[2J" in outputs["redeem create"].stdout
    # --json: exact JSON of the stored text, nothing raw in the bytes.
    for args, pick in ((("user", "list"), lambda rows: rows[0]["name"]), (("key", "list"), lambda rows: rows[0]["name"]),
                       (("balance", str(uid)), lambda row: row["name"]),
                       (("quarantine", "list"), lambda rows: rows[0]["request_id"])):
        result = invoke(*args, "--json", *db)
        assert result.exit_code == 0, result.stderr
        clean(result)
        assert HOSTILE in pick(json.loads(result.stdout)), args


def test_a_price_table_key_with_controls_is_reported_escaped(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text('"bad\\e[2Jkey\\u202e": 1\n', encoding="utf-8")  # YAML's own escapes: ESC and U+202E
    result = invoke("prices", "validate", str(path))
    assert result.exit_code == 2
    assert "bad\\x1b[2Jkey\\u202e: Extra inputs are not permitted" in clean(result)


# ---------------------------------------------------------------------- export workers die with their parent


def big_ledger(path: Path, rows: int) -> None:
    """A SQLite ledger with ``rows`` usage events on FIRST_DAY, written with sqlite3's executemany (seconds)."""
    from metering.ledger.database import make_engine
    from metering.ledger.schema import upgrade

    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    start = BusinessCalendar("Asia/Shanghai").bounds(FIRST_DAY)[0]
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("BEGIN")
    connection.execute("INSERT INTO users (id, name, price_group, balance, created_at) VALUES (1, 'u', 'default', 0, ?)",
                       (str(start),))
    connection.execute("INSERT INTO api_keys (id, user_id, name, secret_hash, display_prefix, status, used_quota,"
                       " reserved_quota, created_at) VALUES (1, 1, 'k', 'h', 'sk-mtr-x...', 'enabled', 0, 0, ?)", (str(start),))
    step = 80_000_000_000 // rows  # microseconds: every event inside the day (80,000 of its 86,400 s)
    events = ((n, f"req-{n:09d}", str(start + timedelta(microseconds=n * step))) for n in range(1, rows + 1))
    connection.executemany(
        "INSERT INTO usage_events (id, request_id, user_id, key_id, model, price_group, status, outcome, source,"
        " input_tokens, cached_input_tokens, cache_write_5m_tokens, cache_write_1h_tokens, output_tokens, reasoning_tokens,"
        " images, web_search_requests, quota, usd, price_version, payload_hash, occurred_at, created_at, channel)"
        " VALUES (?, ?, 1, 1, 'gpt-4o', 'default', 'charged', 'completed', 'upstream', 100, 0, 0, 0, 20, 0, 0, 0, 225,"
        " '0.00045', '2024-10-02 00:00:00.000000', 'x', ?, ?, NULL)",  # gpt-4o since 2024-10-02 (data/price_table.yaml):
        # 100 x $2.50/1M + 20 x $10/1M = $0.00045 = 225 units at 500,000 units per $
        ((n, request, at, at) for n, request, at in events))
    connection.execute("COMMIT")
    connection.close()


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def gone_within(pids: list[int], seconds: float) -> dict[int, float]:
    """Wait up to ``seconds`` for every pid to stop; when each stopped (seconds), the survivors killed."""
    started, stopped = time.monotonic(), {}
    while len(stopped) < len(pids) and time.monotonic() - started < seconds:
        for pid in pids:
            if pid not in stopped and not running(pid):
                stopped[pid] = time.monotonic() - started
        time.sleep(0.005)
    for pid in set(pids) - set(stopped):
        os.kill(pid, signal.SIGKILL)  # never leave them to the next test
    return stopped


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_export_workers_die_with_their_parent_on_kill_9(tmp_path: Path) -> None:
    with scratch_directory(tmp_path, "orphans-") as directory:
        big_ledger(directory / "ledger.db", 300_000)  # about 2 s of export with two workers on this machine
        out = directory / "usage.csv"
        exporter = subprocess.Popen(
            [sys.executable, "-m", "workers", "export", "usage", "--from", FIRST_DAY.isoformat(), "--to",
             FIRST_DAY.isoformat(), "--out", str(out), "--jobs", "2", "--quiet", "--db", f"sqlite:///{directory}/ledger.db"],
            cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("METERING_")})
        try:
            deadline = time.monotonic() + 60
            # Under way: the two workers started and a first slice is written (so each ran its initializer).
            while time.monotonic() < deadline and exporter.poll() is None:
                parts = [p for p in directory.glob(".usage.csv.*") if p.stat().st_size > 100_000]
                if parts and len(children_of(exporter.pid)) >= 2:
                    break
                time.sleep(0.01)
            children = children_of(exporter.pid)
            assert exporter.poll() is None, "the export ended before it could be killed: give it more rows"
            assert len(children) >= 2, children
            exporter.send_signal(signal.SIGKILL)
            exporter.wait(timeout=10)
            stopped = gone_within(children, 5.0)
        finally:
            if exporter.poll() is None:
                exporter.kill()
                exporter.wait()
    assert set(stopped) == set(children), f"orphans left running: {set(children) - set(stopped)}"
    assert max(stopped.values()) < 2.0, stopped
    assert not out.exists()  # killed before its rename: no half-written export under the real name


def test_an_orphaned_worker_without_the_parent_death_signal_exits_by_itself(tmp_path: Path) -> None:
    """The fallback: a worker whose platform has no prctl notices that its parent is gone."""
    script = tmp_path / "middle.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        code = (
            "import os, sys, time\\n"
            "sys.path.insert(0, {str(ROOT)!r})\\n"
            "from workers.export.parallel import die_with_parent\\n"
            "sys.platform = 'darwin'  # no PR_SET_PDEATHSIG: only the watchdog\\n"
            "die_with_parent(os.getppid())\\n"
            "print('ready', flush=True)\\n"
            "time.sleep(60)\\n"
        )
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        print(child.pid, flush=True)
        time.sleep(60)
    """))
    middle = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        orphan = int(middle.stdout.readline())  # type: ignore[union-attr]
        assert running(orphan)
        middle.send_signal(signal.SIGKILL)
        middle.wait(timeout=10)
        stopped = gone_within([orphan], 5.0)
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()
    assert orphan in stopped and stopped[orphan] < 1.0, stopped
