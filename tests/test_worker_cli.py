"""The worker's command line (run as a real subprocess): help, bad input, worker --once, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from metering.ledger import Meter
from metering.ledger.meter import DEFAULT_HOLD_TTL
from tests.traffic import CALENDAR, book_customers, book_day

ROOT = Path(__file__).resolve().parents[1]


def workers_cli(*args: str, db: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m workers ARGS`` (the ``metering`` console script), no METERING_DB or METERING_TZ inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("METERING_DB", "METERING_TZ")}
    env |= {"NO_COLOR": "1", "COLUMNS": "200"}
    if db is not None:
        env["METERING_DB"] = db
    return subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("command", [[], ["worker"], ["reconcile"], ["report"], ["export"], ["demo"], ["count"], ["audit"]])
def test_every_command_has_help(command: list[str]) -> None:
    out = workers_cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_the_console_script_is_the_workers_app() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'metering = "workers.cli.main:app"' in text
    from workers.cli.counting import app as metering_app
    from workers.cli.main import app

    assert app is metering_app  # one app: metering's commands plus the worker's
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert {"worker", "reconcile", "report", "export", "demo", "count", "audit"} <= names


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["report", "--from", "2026-13-01", "--to", "2026-11-02"], "--from"),
        (["report", "--from", "2026-11-01", "--to", "yesterday"], "--to"),
        (["report", "--from", "2026-11-05", "--to", "2026-11-01"], "--from"),
        (["report", "--from", "2026-11-01", "--to", "2026-11-02", "--by", "day,colour"], "--by"),
        (["report", "--from", "2026-11-01", "--to", "2026-11-02", "--format", "pdf"], "--format"),
        (["export", "usage", "--from", "2026-11-31", "--to", "2026-12-01", "--out", "x.csv"], "--from"),
        (["export", "usage", "--from", "2026-11-05", "--to", "2026-11-01", "--out", "x.csv"], "--from"),
        (["export", "payments", "--from", "2026-11-01", "--to", "2026-11-02", "--out", "x.csv"], "kind"),
        (["reconcile", "--day", "2026/11/01"], "--day"),
        (["reconcile", "--day", "2999-01-01"], "--day"),
        (["worker", "--once", "--tz", "Mars/Olympus_Mons"], "--tz"),
        (["worker", "--json"], "--json"),
    ],
)
def test_bad_input_exits_2_naming_the_field_and_writes_nothing(tmp_path: Path, args: list[str], field: str) -> None:
    db = f"sqlite:///{tmp_path}/ledger.db"
    args = [str(tmp_path / a) if a == "x.csv" else a for a in args]
    out = workers_cli(*args, db=db)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"error: {field}: " in out.stderr
    assert out.stdout == ""
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "ledger.db").exists()


def test_worker_once_on_a_fresh_database_reports_what_ran(tmp_path: Path) -> None:
    out = workers_cli("worker", "--once", "--json", "--quiet", "--out", str(tmp_path / "out"),
                      db=f"sqlite:///{tmp_path}/fresh.db")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["folded"] == 0 and report["expired"] == 0
    assert report["closes"] == [] and report["exports"] == [] and report["errors"] == []
    assert report["time_zone"] == "Asia/Shanghai" and report["stopped"] is False


def last_complete_day() -> date:
    """The last business day a close may take now: its end plus the hold TTL has passed (docs/worker.md).

    Not simply yesterday: for the TTL after midnight in the business zone, yesterday is not complete yet.
    Within a minute of the next day becoming complete, wait for it, so the worker run that follows sees
    the same last day as this test."""
    while True:
        now = datetime.now(timezone.utc)
        last = CALENDAR.day_of(now - DEFAULT_HOLD_TTL) - timedelta(days=1)
        next_complete = CALENDAR.bounds(last + timedelta(days=1))[1] + DEFAULT_HOLD_TTL  # naive UTC
        wait = (next_complete - now.replace(tzinfo=None)).total_seconds()
        if wait > 60:
            return last
        time.sleep(max(wait, 0) + 1)


def test_worker_once_closes_the_missed_days_and_writes_their_exports(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    days = [last_complete_day() - timedelta(days=n) for n in (2, 1, 0)]
    meter = Meter.open(url)
    try:
        secrets = book_customers(meter)
        for day in days:
            book_day(meter, secrets, day, 12, seed=5)
    finally:
        meter.close()
    out_dir = tmp_path / "nightly"
    first = workers_cli("worker", "--once", "--json", "--quiet", "--out", str(out_dir), db=url)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert [(c["day"], c["status"]) for c in report["closes"]] == [(d.isoformat(), "closed") for d in days]
    assert sum(c["totals"]["requests"] for c in report["closes"]) == 36
    for day in days:
        for kind in ("usage", "rollup", "invoice"):
            assert (out_dir / f"{kind}-{day}.csv").exists()
            assert (out_dir / f"{kind}-{day}.csv.manifest.json").exists()
    assert len(report["exports"]) == 9
    # Run again: nothing is due, nothing is closed or written twice.
    again = json.loads(workers_cli("worker", "--once", "--json", "--quiet", "--out", str(out_dir), db=url).stdout)
    assert again["closes"] == [] and again["exports"] == []
    # reconcile of a closed day reads its stored result; --json for scripts.
    shown = workers_cli("reconcile", "--day", days[0].isoformat(), "--json", db=url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "already_closed"


def test_demo_one_day_runs_audits_ok_and_writes_its_files(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    out = workers_cli("demo", "--days", "1", "--quiet", "--json", "--out", str(out_dir))
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    summary = payload["summary"]
    assert summary["audit_ok"] is True and payload["ledger"]["audit_ok"] is True
    assert summary["days_closed"] == 1 and summary["requests"] > 100
    assert summary["succeeded"] + summary["failed"] + summary["aborted"] == summary["requests"]
    assert isinstance(summary["quota"], int) and summary["quota"] > 0
    for path in payload["files"]:
        assert Path(path).exists() and Path(path).stat().st_size > 0
    names = {Path(path).name for path in payload["files"]}
    day = payload["days"][0]
    assert {f"usage-{day}.csv", f"rollup-{day}.csv", f"invoice-{day}.csv", "report.html", "report.csv"} <= names
    assert (out_dir / "demo.db").exists()
