"""CSV exports (workers.export.exporter): stable columns, exact totals, formula-safe cells, atomic files, manifests.

Data is booked through the real ledger API and the days closed by the real close (tests/billing_data.py);
every expected figure is computed here from the database with SQL, independently of the export's code.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from metering.ledger.meter import Meter
from tests.billing_data import (
    CALENDAR,
    CUSTOMERS,
    DAY1,
    DAY2,
    book_customers,
    book_day,
    booked_and_closed,
    decimal_sum_sql,
    insert_rollup,
    scalar,
)
import workers.export.exporter as export_module
from workers.export.csv_safety import neutralize, neutralize_column
from workers.export.csv_writer import UTF8_BOM
from workers.errors import InvalidArgument
from workers.export.exporter import KINDS, count_rows, export, manifest_path
from workers.export.columns import COLUMNS, column_names, columns_markdown
from workers.export.kinds import UsagePlan

ROOT = Path(__file__).resolve().parent.parent
TOKENS = ("input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "output_tokens",
          "reasoning_tokens", "images", "web_search_requests")


@pytest.fixture
def closed(meter: Meter) -> Meter:
    """Six customers, two days of traffic, both days closed."""
    booked_and_closed(meter)
    return meter


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An empty directory for the files (the SQLite database lives in tmp_path)."""
    made = tmp_path / "exports"
    made.mkdir()
    return made


def read_csv(path: Path) -> list[list[str]]:
    """Every row (header first) of a CSV written without a BOM."""
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))


def day_window() -> dict[str, datetime]:
    return {"start": CALENDAR.bounds(DAY1)[0], "end": CALENDAR.bounds(DAY2)[1]}


# ------------------------------------------------------------------------------------------ usage


def test_usage_export_has_one_row_per_event_and_totals_equal_the_databases(closed: Meter, tmp_path: Path) -> None:
    out = tmp_path / "usage.csv"
    manifest = export(closed.engine, "usage", DAY1, DAY2, out, calendar=CALENDAR)
    rows = read_csv(out)
    where = "occurred_at >= :start AND occurred_at < :end"
    count = scalar(closed, f"SELECT COUNT(*) FROM usage_events WHERE {where}", **day_window())
    assert rows[0] == column_names("usage") and len(rows) - 1 == count == manifest["rows"] > 40
    # Totals: the database's own SUMs over the same range.
    for name in ("quota", *TOKENS):
        assert manifest["totals"][name] == scalar(closed, f"SELECT SUM({name}) FROM usage_events WHERE {where}",
                                                  **day_window()), name
    assert Decimal(manifest["totals"]["usd"]) == decimal_sum_sql(closed, "usd", "usage_events", where, **day_window())
    assert manifest["totals"]["requests"] == count
    # Ordered by id; the day is the business day of occurred_at (Asia/Shanghai), not the UTC date.
    ids = [r[0] for r in _sql_rows(closed, f"SELECT request_id FROM usage_events WHERE {where} ORDER BY id")]
    header = rows[0]
    assert [neutralize(i) for i in ids] == [r[header.index("request_id")] for r in rows[1:]]
    for row in rows[1:]:
        moment = datetime.strptime(row[header.index("occurred_at")], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert row[header.index("day")] == CALENDAR.day_of(moment).isoformat()
    assert {r[header.index("day")] for r in rows[1:]} == {DAY1.isoformat(), DAY2.isoformat()}
    # Keys appear by their display prefix only.
    prefixes = {r[header.index("key_prefix")] for r in rows[1:]}
    assert all(p.startswith("sk-mtr-") and p.endswith("...") and len(p) == 14 for p in prefixes)
    assert count_rows(closed.engine, "usage", DAY1, DAY2, calendar=CALENDAR) == count


def test_usage_export_of_one_day_holds_that_business_days_events_only(closed: Meter, tmp_path: Path) -> None:
    manifest = export(closed.engine, "usage", DAY2, DAY2, tmp_path / "d2.csv", calendar=CALENDAR)
    start, end = CALENDAR.bounds(DAY2)
    assert manifest["rows"] == scalar(closed, "SELECT COUNT(*) FROM usage_events WHERE occurred_at >= :s AND occurred_at < :e",
                                      s=start, e=end)
    assert {row[0] for row in read_csv(tmp_path / "d2.csv")[1:]} == {DAY2.isoformat()}


# ------------------------------------------------------------------------------------ rollup, invoice


def test_rollup_export_is_every_rollup_row_and_totals_equal_the_databases(closed: Meter, tmp_path: Path) -> None:
    manifest = export(closed.engine, "rollup", DAY1, DAY2, tmp_path / "rollup.csv", calendar=CALENDAR)
    rows = read_csv(tmp_path / "rollup.csv")
    where = "day >= :first AND day <= :last"
    days = {"first": DAY1.isoformat(), "last": DAY2.isoformat()}
    assert len(rows) - 1 == manifest["rows"] == scalar(closed, f"SELECT COUNT(*) FROM daily_rollups WHERE {where}", **days)
    for name in ("requests", "succeeded", "failed", "aborted", "quota", *TOKENS):
        assert manifest["totals"][name] == scalar(closed, f"SELECT SUM({name}) FROM daily_rollups WHERE {where}", **days)
    for name in ("usd", "revenue_cny", "upstream_cost_usd"):
        assert Decimal(manifest["totals"][name]) == decimal_sum_sql(closed, name, "daily_rollups", where, **days), name
    # Failed requests are counted, never billed: the close gives them their own rows with quota 0.
    assert manifest["totals"]["failed"] > 0 and manifest["totals"]["requests"] == sum(
        manifest["totals"][k] for k in ("succeeded", "failed", "aborted"))
    header = rows[0]
    assert rows[0] == column_names("rollup") and count_rows(closed.engine, "rollup", DAY1, DAY2, calendar=CALENDAR) == len(rows) - 1
    keys = [tuple(r[header.index(c)] for c in ("day", "occurred_day", "user_id", "key_id", "model", "channel")) for r in rows[1:]]
    assert len(set(keys)) == len(keys)


def test_invoice_export_sums_the_rollups_per_user_and_month_exactly(closed: Meter, tmp_path: Path) -> None:
    manifest = export(closed.engine, "invoice", DAY1, DAY2, tmp_path / "invoice.csv", calendar=CALENDAR)
    frame = pd.read_csv(tmp_path / "invoice.csv", dtype=str, keep_default_na=False)
    assert list(frame.columns) == column_names("invoice") and len(frame) == manifest["rows"] == len(CUSTOMERS)
    assert set(frame["month"]) == {"2026-11"} and count_rows(closed.engine, "invoice", DAY1, DAY2, calendar=CALENDAR) == len(frame)
    for _, line in frame.iterrows():
        user = int(line["user_id"])
        where = "user_id = :user AND day >= :first AND day <= :last"
        params = {"user": user, "first": DAY1.isoformat(), "last": DAY2.isoformat()}
        for name in ("requests", "succeeded", "failed", "aborted", "quota"):
            assert int(line[name]) == scalar(closed, f"SELECT SUM({name}) FROM daily_rollups WHERE {where}", **params)
        tokens = " + ".join(TOKENS[:5])
        assert int(line["tokens"]) == scalar(closed, f"SELECT SUM({tokens}) FROM daily_rollups WHERE {where}", **params)
        for name in ("usd", "revenue_cny"):
            assert Decimal(line[name]) == decimal_sum_sql(closed, name, "daily_rollups", where, **params)
        assert len(line["revenue_cny"].split(".")[1]) == 2  # CNY keeps its fen
    assert manifest["totals"]["quota"] == scalar(closed, "SELECT SUM(quota) FROM daily_rollups")


def test_invoice_lines_spanning_chunks_are_summed_once(closed: Meter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 2 rows split every invoice line (and the other exports) across chunks: nothing changes."""
    for kind in KINDS:
        whole = export(closed.engine, kind, DAY1, DAY2, tmp_path / f"whole-{kind}.csv", calendar=CALENDAR)
        monkeypatch.setattr(export_module, "CHUNK_ROWS", 2)
        split = export(closed.engine, kind, DAY1, DAY2, tmp_path / f"split-{kind}.csv", calendar=CALENDAR)
        monkeypatch.setattr(export_module, "CHUNK_ROWS", 10_000)
        assert (tmp_path / f"split-{kind}.csv").read_bytes() == (tmp_path / f"whole-{kind}.csv").read_bytes(), kind
        assert (split["sha256"], split["totals"]) == (whole["sha256"], whole["totals"])


# ------------------------------------------------------------------------------ files and manifests


def test_exporting_twice_gives_byte_identical_files_and_the_manifest_describes_the_file(closed: Meter, folder: Path) -> None:
    for kind in KINDS:
        out = folder / f"{kind}.csv"
        first = export(closed.engine, kind, DAY1, DAY2, out, calendar=CALENDAR)
        csv_bytes, manifest_bytes = out.read_bytes(), manifest_path(out).read_bytes()
        second = export(closed.engine, kind, DAY1, DAY2, out, calendar=CALENDAR)
        assert out.read_bytes() == csv_bytes and manifest_path(out).read_bytes() == manifest_bytes and first == second
        on_disk = json.loads(manifest_bytes)
        assert on_disk == first
        assert on_disk["sha256"] == hashlib.sha256(csv_bytes).hexdigest() and on_disk["bytes"] == len(csv_bytes)
        assert (on_disk["kind"], on_disk["from"], on_disk["to"], on_disk["time_zone"], on_disk["file"]) == (
            kind, "2026-11-02", "2026-11-03", "Asia/Shanghai", f"{kind}.csv")
        assert on_disk["columns"] == column_names(kind) and on_disk["rows"] == len(read_csv(out)) - 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        name for kind in KINDS for name in (f"{kind}.csv", f"{kind}.csv.manifest.json"))  # no temporary file left


def test_a_bom_only_under_excel_and_chinese_names_round_trip(closed: Meter, tmp_path: Path) -> None:
    plain = export(closed.engine, "invoice", DAY1, DAY2, tmp_path / "plain.csv", calendar=CALENDAR)
    excel = export(closed.engine, "invoice", DAY1, DAY2, tmp_path / "excel.csv", calendar=CALENDAR, excel=True)
    plain_bytes, excel_bytes = (tmp_path / "plain.csv").read_bytes(), (tmp_path / "excel.csv").read_bytes()
    assert not plain_bytes.startswith(UTF8_BOM) and excel_bytes == UTF8_BOM + plain_bytes
    assert (plain["encoding"], excel["encoding"]) == ("utf-8", "utf-8-sig")
    assert excel["sha256"] == hashlib.sha256(excel_bytes).hexdigest()
    frame = pd.read_csv(tmp_path / "excel.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert list(frame.columns)[0] == "user_id"  # the BOM is not glued to the first header
    assert set(frame["user_name"]) == {neutralize(name) for name, _, _ in CUSTOMERS}
    assert '张伟, "VIP"' in set(frame["user_name"])
    assert '"张伟, ""VIP"""' in plain_bytes.decode("utf-8")  # RFC 4180 quoting of the comma and quotes


def test_formula_cells_are_neutralized_in_text_columns_and_numbers_stay_numbers(meter: Meter, tmp_path: Path) -> None:
    secrets = book_customers(meter)
    book_day(meter, secrets, DAY1)
    users = {name: meter.find_user(name) for name, _, _ in CUSTOMERS}
    key = meter.keys(users["-x"])[0]["id"]
    # A correction row with a negative quota and amounts (not something a close writes; inserted directly).
    insert_rollup(meter, user_id=users["-x"], key_id=key, model="=HYPERLINK(\"http://x\")", channel="@evil",
                  requests=1, succeeded=1, quota=-1500, usd="-0.003", revenue_cny="-0.02", upstream_cost_usd="-0.0027")
    export(meter.engine, "rollup", DAY1, DAY1, tmp_path / "rollup.csv", calendar=CALENDAR)
    export(meter.engine, "usage", DAY1, DAY1, tmp_path / "usage.csv", calendar=CALENDAR)
    rollup = read_csv(tmp_path / "rollup.csv")
    header = rollup[0]
    line = next(r for r in rollup[1:] if r[header.index("quota")] == "-1500")
    assert line[header.index("user_name")] == "'-x"
    assert line[header.index("model")] == "'=HYPERLINK(\"http://x\")" and line[header.index("channel")] == "'@evil"
    assert (line[header.index("usd")], line[header.index("revenue_cny")], line[header.index("upstream_cost_usd")]) == (
        "-0.003", "-0.02", "-0.0027")
    usage = read_csv(tmp_path / "usage.csv")
    header = usage[0]
    names = {r[header.index("user_name")] for r in usage[1:]}
    assert names == {"'=cmd|' /C calc'!A0", "'+1", "'-x", "'@SUM(1)", '张伟, "VIP"', "<script>alert(1)</script>"}
    request_ids = [r[header.index("request_id")] for r in usage[1:]]
    assert sum(i.startswith("'-2026-11-02-") for i in request_ids) == len(CUSTOMERS)  # ids starting with "-"
    for kind, rows in (("usage", usage), ("rollup", rollup)):
        text_columns = [rows[0].index(c.name) for c in COLUMNS[kind] if c.type == "text"]
        for row in rows[1:]:
            assert not any(row[i].startswith(tuple("=+-@\t\r")) for i in text_columns), row


def test_neutralize_follows_owasp_and_leaves_safe_columns_alone() -> None:
    for first in ("=", "+", "-", "@", "\t", "\r", "\n", "＝", "＋", "－", "＠"):
        assert neutralize(first + "1+1") == "'" + first + "1+1"
    assert neutralize("a=1") == "a=1" and neutralize("") == "" and neutralize(None) == "" and neutralize("张伟") == "张伟"
    safe = ("alice", "", "张伟")
    assert neutralize_column(safe) is safe  # a column with nothing to do is not copied
    assert neutralize_column(("a", "=b", "", "-c", "＠d")) == ["a", "'=b", "", "'-c", "'＠d"]
    assert neutralize_column(("a", "=b", None)) == ["a", "'=b", None]  # None stays an empty cell
    assert neutralize_column(("a\x00=b", "+c")) == ["a\x00=b", "'+c"]  # a NUL inside a cell: cell by cell


def test_a_failure_mid_write_leaves_no_file_and_no_temporary(closed: Meter, folder: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = UsagePlan.text
    calls = {"n": 0}

    def failing(self: UsagePlan, chunk: object) -> str:
        calls["n"] += 1
        if calls["n"] == 2:  # the first chunk is written, then the failure
            raise OSError("disk full")
        return real(self, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(export_module, "CHUNK_ROWS", 10)
    monkeypatch.setattr(UsagePlan, "text", failing)
    out = folder / "usage.csv"
    with pytest.raises(OSError, match="disk full"):
        export(closed.engine, "usage", DAY1, DAY2, out, calendar=CALENDAR)
    assert calls["n"] == 2 and list(folder.iterdir()) == []
    # Over an earlier export: the old file and its manifest stay, whole and matching.
    monkeypatch.setattr(UsagePlan, "text", real)
    old = export(closed.engine, "usage", DAY1, DAY1, out, calendar=CALENDAR)
    old_bytes = out.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(UsagePlan, "text", failing)
    with pytest.raises(OSError):
        export(closed.engine, "usage", DAY1, DAY2, out, calendar=CALENDAR)
    assert out.read_bytes() == old_bytes and json.loads(manifest_path(out).read_bytes()) == old
    assert sorted(p.name for p in folder.iterdir()) == ["usage.csv", "usage.csv.manifest.json"]


def test_a_kill_mid_export_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    """SIGKILL from inside the export (after its first chunk is written): no CSV, no manifest."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    meter = Meter.open(url)
    book_day(meter, book_customers(meter), DAY1, requests=4)
    meter.close()
    script = textwrap.dedent(f"""
        import os, signal
        from datetime import date
        from pathlib import Path
        from metering.ledger.database import make_engine
        from tests.billing_data import CALENDAR
        import workers.export.exporter as export_module
        export_module.CHUNK_ROWS = 3
        def progress(rows):
            if rows >= 3:
                os.kill(os.getpid(), signal.SIGKILL)
        export_module.export(make_engine({url!r}), "usage", date(2026, 11, 2), date(2026, 11, 2),
                             Path({str(tmp_path / "usage.csv")!r}), calendar=CALENDAR, progress=progress)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (tmp_path / "usage.csv").exists() and not manifest_path(tmp_path / "usage.csv").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".usage.csv.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".part")  # a kill cannot clean up; the name says what it is


def test_progress_reports_the_rows_written_so_far(closed: Meter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(export_module, "CHUNK_ROWS", 25)
    manifest = export(closed.engine, "usage", DAY1, DAY2, tmp_path / "u.csv", calendar=CALENDAR, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == manifest["rows"] and seen[0] == 25


# ------------------------------------------------------------------------------------------ refusals


def test_bad_requests_raise_a_typed_error_naming_the_field(tmp_path: Path) -> None:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        cases = [
            (("usage", DAY2, DAY1, tmp_path / "a.csv"), "start"),
            (("ledger", DAY1, DAY1, tmp_path / "a.csv"), "kind"),
            (("usage", DAY1, DAY1, tmp_path / "missing" / "a.csv"), "out"),
            (("usage", DAY1, DAY1, tmp_path), "out"),
            (("usage", datetime(2026, 11, 2), DAY1, tmp_path / "a.csv"), "start"),
            (("usage", DAY1, "2026-11-02", tmp_path / "a.csv"), "end"),
        ]
        for (kind, start, end, out), field in cases:
            with pytest.raises(InvalidArgument) as raised:
                export(meter.engine, kind, start, end, out, calendar=CALENDAR)  # type: ignore[arg-type]
            assert isinstance(raised.value, ValueError) and raised.value.field == field
            assert str(raised.value).startswith(f"{field}: ")
        assert [p.name for p in tmp_path.iterdir() if p.suffix == ".csv"] == []
    finally:
        meter.close()


def test_an_empty_range_exports_a_header_and_zero_totals(tmp_path: Path) -> None:
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        for kind in KINDS:
            manifest = export(meter.engine, kind, DAY1, DAY2, tmp_path / f"{kind}.csv", calendar=CALENDAR)
            assert read_csv(tmp_path / f"{kind}.csv") == [column_names(kind)] and manifest["rows"] == 0
            assert manifest["totals"]["quota"] == 0 and manifest["totals"]["usd"] == "0"
    finally:
        meter.close()


def test_docs_list_every_column_of_every_export() -> None:
    docs = (ROOT / "docs" / "exports.md").read_text(encoding="utf-8")
    for kind in KINDS:
        assert columns_markdown(kind) in docs, f"docs/exports.md: the {kind} table differs from workers/export/columns.py"


def _sql_rows(meter: Meter, sql: str) -> list[tuple[object, ...]]:
    from sqlalchemy import text

    with meter.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(text(sql), day_window())]


def test_a_part_file_left_by_a_killed_writer_is_removed_by_the_next_commit(tmp_path: Path) -> None:
    from workers.atomic_file import STALE_PART_SECONDS, write_atomically

    target = tmp_path / "usage.csv"
    stale, fresh = tmp_path / ".usage.csv.dead.part", tmp_path / ".usage.csv.live.part"
    for part in (stale, fresh):
        part.write_bytes(b"half a file")
    old = time.time() - STALE_PART_SECONDS - 60
    os.utime(stale, (old, old))
    write_atomically(target, b"whole\n")
    assert target.read_bytes() == b"whole\n"
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a writer still running
