"""Export bench: the usage CSV export of N usage events on SQLite, next to a floor measured in the same run.

1. Generate N usage events (default 1,000,000) over three business days into a fresh SQLite database
   with the ledger's schema (``Meter``'s migrations), with sqlite3 ``executemany`` bulk inserts (not
   through the Meter: this measures the export, not the ledger). 100 users (a third with Chinese names
   holding commas and quotes, two with formula-like names), 200 keys, three models, two channels.
2. The floor: the export's own SELECT (same columns, joins, WHERE and ORDER BY id, compiled by
   SQLAlchemy for SQLite) run with the bare sqlite3 driver, streamed with ``fetchmany(10000)`` straight
   into ``csv.writer`` on a file: no transformation, no neutralization, no hashing, no fsync; with the
   cycle collector paused, as the export pauses it.
3. ``workers.export.exporter.export(engine, "usage", ...)`` of the three days as ``metering export`` runs it
   (``jobs=None``: one worker process per core, at most 4, on a range this large), the same with
   ``jobs=1`` (this process only), and the parallel export of one day (a third of the rows: the peak RSS
   must not grow with the rows). The two exports must write the same file.

Each measurement runs in its own child process, so each peak RSS (``VmHWM``) is that run's alone;
export and floor alternate (ABBA over ``--rounds``) and a figure is the median. The export's manifest
is checked: rows, sha256 of the file, quota total against SQL ``SUM``. Peak RSS of the workers: the
largest child's ``ru_maxrss``. Target (issue 5): 1,000,000 rows in at most 10 s, flat memory. The LAST line of stdout is one JSON object.

    .venv/bin/python bench/bench_export.py [--rows N] [--rounds R] [--db PATH] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

TARGET_SECONDS = 10.0  # for 1,000,000 rows
FIRST_DAY = date(2026, 11, 2)
DAYS = 3
TIME_ZONE = "Asia/Shanghai"
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5")
CHANNELS = ("azure-east", "openai-official", None)


# ------------------------------------------------------------------------------------------ generation


def user_name(number: int) -> str:
    """Realistic and hostile names: Chinese with commas and quotes, formula-like ones."""
    if number == 7:
        return "=cmd|' /C calc'!A0"
    if number == 8:
        return "+1"
    return f'张伟{number}, "VIP"' if number % 3 == 0 else f"user-{number}"


def generate(path: Path, rows: int) -> float:
    """A fresh database at ``path`` with ``rows`` usage events over ``DAYS`` days; returns the seconds taken."""
    from metering.ledger.database import make_engine
    from metering.ledger.schema import upgrade
    from workers.calendar import BusinessCalendar

    started = time.perf_counter()
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    start = BusinessCalendar(TIME_ZONE).bounds(FIRST_DAY)[0]
    span_us = DAYS * 86_400_000_000
    created = "2026-11-01 00:00:00.000000"
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("PRAGMA cache_size=-262144")
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT INTO users (id, name, price_group, balance, created_at) VALUES (?, ?, 'default', 0, ?)",
        [(n, user_name(n), created) for n in range(1, 101)])
    connection.executemany(
        "INSERT INTO api_keys (id, user_id, name, secret_hash, display_prefix, status, used_quota, reserved_quota,"
        " created_at) VALUES (?, ?, ?, ?, ?, 'enabled', 0, 0, ?)",
        [(n, (n - 1) % 100 + 1, f"key-{n}", f"{n:064x}", f"sk-mtr-{n:04d}...", created) for n in range(1, 201)])

    def events() -> Any:
        step = span_us // rows
        for n in range(1, rows + 1):
            at = (start + timedelta(microseconds=(n - 1) * step)).isoformat(sep=" ", timespec="microseconds")
            key = n % 200 + 1
            quota = 1000 + n % 977
            yield (n, f"req-{n:09d}", (key - 1) % 100 + 1, key, MODELS[n % 3], CHANNELS[n % 3], 100 + n % 50, n % 7,
                   20 + n % 30, quota, f"0.00{quota:04d}25", at, at)

    connection.executemany(
        "INSERT INTO usage_events (id, request_id, user_id, key_id, model, price_group, status, outcome, source,"
        " input_tokens, cached_input_tokens, cache_write_5m_tokens, cache_write_1h_tokens, output_tokens,"
        " reasoning_tokens, images, web_search_requests, quota, usd, price_version, payload_hash, occurred_at,"
        " created_at, channel) VALUES (?, ?, ?, ?, ?, 'default', 'charged', 'completed', 'upstream', ?, ?, 0, 0, ?,"
        " 0, 0, 0, ?, ?, '2024-05-13 00:00:00.000000', 'x', ?, ?, ?)",
        ((n, rid, uid, kid, model, i, c, o, q, usd, at, cr, ch)
         for (n, rid, uid, kid, model, ch, i, c, o, q, usd, at, cr) in events()))
    connection.execute("COMMIT")
    connection.close()
    return time.perf_counter() - started


# ----------------------------------------------------------------------------------------- measurements


def _usage_sql(last: date) -> str:
    """The export's SELECT, compiled for SQLite with its parameters inlined."""
    from sqlalchemy.dialects import sqlite

    from workers.calendar import BusinessCalendar
    from workers.export.kinds import UsagePlan

    query = UsagePlan(FIRST_DAY, last, BusinessCalendar(TIME_ZONE)).query()
    return str(query.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))


def measure_floor(db: Path, out: Path, last: date) -> dict[str, Any]:
    """The bare SELECT streamed into csv.writer."""
    import gc

    sql = _usage_sql(last)
    gc.disable()  # as the export does while it streams (workers.export.exporter.cycle_collector_paused)
    started = time.perf_counter()
    connection = sqlite3.connect(db)
    cursor = connection.execute(sql)
    rows = 0
    with open(out, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        while chunk := cursor.fetchmany(10_000):
            writer.writerows(chunk)
            rows += len(chunk)
    return {"seconds": time.perf_counter() - started, "rows": rows}


def measure_export(db: Path, out: Path, last: date, jobs: int | None) -> dict[str, Any]:
    """``workers.export.exporter.export`` of the usage rows with ``jobs`` processes (None: as the command line does)."""
    from metering.ledger.database import make_engine
    from workers.calendar import BusinessCalendar
    from workers.export.exporter import export

    engine = make_engine(f"sqlite:///{db}")
    started = time.perf_counter()
    manifest = export(engine, "usage", FIRST_DAY, last, out, calendar=BusinessCalendar(TIME_ZONE), jobs=jobs)
    seconds = time.perf_counter() - started
    engine.dispose()
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker, if any
    return {"seconds": seconds, "rows": manifest["rows"], "manifest": manifest,
            "workers_peak_rss_mb": round(workers_peak, 1)}


def measure_baseline() -> dict[str, Any]:
    """Imports and an engine only: the RSS every child starts from."""
    from metering.ledger.database import make_engine  # noqa: F401
    from workers.export.exporter import export  # noqa: F401

    return {"seconds": 0.0, "rows": 0}


def child(args: argparse.Namespace) -> None:
    """Run one measurement and print it as JSON with this process's peak RSS."""
    db, out, last = Path(args.db), Path(args.out), date.fromisoformat(args.last)
    if args.child == "floor":
        result = measure_floor(db, out, last)
    elif args.child == "baseline":
        result = measure_baseline()
    else:
        result = measure_export(db, out, last, None if args.child == "export" else 1)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset at exec, unlike ru_maxrss, which a child inherits from its
    parent on Linux); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_child(kind: str, db: Path, out: Path, last: date) -> dict[str, Any]:
    """One measurement in a fresh process."""
    argv = [sys.executable, __file__, "--child", kind, "--db", str(db), "--out", str(out), "--last", last.isoformat()]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_manifest(db: Path, out: Path, manifest: dict[str, Any], rows: int) -> list[str]:
    """The manifest's rows, sha256 and quota total against the file and the database."""
    import hashlib

    problems = []
    if manifest["rows"] != rows:
        problems.append(f"manifest rows {manifest['rows']} != {rows}")
    if hashlib.sha256(out.read_bytes()).hexdigest() != manifest["sha256"]:
        problems.append("manifest sha256 differs from the file's")
    quota = sqlite3.connect(db).execute("SELECT SUM(quota) FROM usage_events").fetchone()[0]
    if manifest["totals"]["quota"] != quota:
        problems.append(f"manifest quota {manifest['totals']['quota']} != SQL SUM {quota}")
    return problems


def main() -> None:
    """Generate, measure (ABBA), check, print; the last line is one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="usage events to generate and export")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of export and floor")
    parser.add_argument("--db", help="database file to use (generated when missing)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the CSV files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--last", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.rows < 1:
        parser.error("--rounds and --rows must be at least 1")
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    db = Path(args.db) if args.db else work / "usage.db"
    generated = None
    if not db.exists():
        generated = generate(db, args.rows)
        print(f"generated {args.rows:,} usage events in {generated:.1f} s ({db})", flush=True)
    rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM usage_events").fetchone()[0]
    last = FIRST_DAY + timedelta(days=DAYS - 1)
    export_csv, floor_csv = work / "usage.csv", work / "floor.csv"

    baseline = run_child("baseline", db, export_csv, last)
    exports, singles, floors = [], [], []
    for round_number in range(args.rounds):
        order = ("export", "export-1", "floor") if round_number % 2 == 0 else ("floor", "export-1", "export")
        for kind in order:
            result = run_child(kind, db, floor_csv if kind == "floor" else export_csv, last)
            {"export": exports, "export-1": singles, "floor": floors}[kind].append(result)
            workers = f", workers' peak RSS {result['workers_peak_rss_mb']} MB" if kind == "export" else ""
            print(f"{kind:>12}: {result['seconds']:6.2f} s, {result['rows']:,} rows, peak RSS {result['peak_rss_mb']} MB"
                  f"{workers}", flush=True)
            if kind != "floor":
                problems = check_manifest(db, export_csv, result["manifest"], rows)
                if problems:
                    print(f"{kind}: {problems}", file=sys.stderr)
                    sys.exit(1)
    if exports[-1]["manifest"]["sha256"] != singles[-1]["manifest"]["sha256"]:
        problems.append("one process and several wrote different files")
    one_day = run_child("export", db, work / "one-day.csv", FIRST_DAY)
    print(f"{'one day':>12}: {one_day['seconds']:6.2f} s, {one_day['rows']:,} rows, peak RSS {one_day['peak_rss_mb']} MB, "
          f"workers' {one_day['workers_peak_rss_mb']} MB")

    export_s = statistics.median(r["seconds"] for r in exports)
    single_s = statistics.median(r["seconds"] for r in singles)
    floor_s = statistics.median(r["seconds"] for r in floors)
    scaled_target = TARGET_SECONDS * rows / 1_000_000
    summary = {
        "bench": "export", "rows": rows, "database": "sqlite", "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "generated_seconds": None if generated is None else round(generated, 2),
        "export_seconds": round(export_s, 2), "one_process_seconds": round(single_s, 2),
        "floor_seconds": round(floor_s, 2), "export_over_floor": round(export_s / floor_s, 2),
        "one_process_over_floor": round(single_s / floor_s, 2), "rows_per_second": round(rows / export_s),
        "target_seconds": round(scaled_target, 2), "target_met": export_s <= scaled_target,
        "peak_rss_mb": {"baseline": baseline["peak_rss_mb"], "export": max(r["peak_rss_mb"] for r in exports),
                        "export_workers": max(r["workers_peak_rss_mb"] for r in exports),
                        "one_process": max(r["peak_rss_mb"] for r in singles),
                        "export_one_day": one_day["peak_rss_mb"], "floor": max(r["peak_rss_mb"] for r in floors)},
        "one_day_rows": one_day["rows"], "one_day_seconds": round(one_day["seconds"], 2),
        "csv_bytes": exports[-1]["manifest"]["bytes"],
        "runs": {"export": [round(r["seconds"], 2) for r in exports], "one_process": [round(r["seconds"], 2) for r in singles],
                 "floor": [round(r["seconds"], 2) for r in floors]},
        "load_average": [round(x, 2) for x in os.getloadavg()], "ok": not problems, "problems": problems,
    }
    if not args.keep:
        for file in (export_csv, floor_csv, work / "one-day.csv"):
            file.unlink(missing_ok=True)
            Path(f"{file}.manifest.json").unlink(missing_ok=True)
        if not args.db:
            for file in work.glob("usage.db*"):
                file.unlink()
            work.rmdir()
    print(json.dumps(summary))
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
