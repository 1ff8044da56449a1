"""CSV billing exports (usage, rollup, invoice): stable columns, atomic files, a manifest, constant memory.

``export(engine, kind, start, end, out, calendar=...)`` streams the rows of business days
``start..end`` from the database in chunks (``stream_results``/``yield_per``: server-side cursors on
PostgreSQL and MariaDB), writes them chunk by chunk to a temporary file beside ``out`` (hashing as it
goes), fsyncs it and renames it onto ``out``; then writes ``out.manifest.json`` the same way. The old
manifest (if any) is removed before the new CSV is renamed into place, so a manifest on disk always
describes the CSV beside it: a CSV without a manifest is not known to be complete. Nothing in either
file depends on the wall clock: the same range exported twice gives byte-identical files.

The columns of each kind are in ``workers.export.columns`` and docs/exports.md. Text cells are
neutralized against formula injection (``workers.export.csv_safety``); numbers are written as they are.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from metering.ledger.database import READ_ONLY
from workers.atomic_file import AtomicFile, write_atomically
from workers.calendar import BusinessCalendar, check_range
from workers.containment import contained
from workers.export.csv_writer import UTF8_BOM, CsvChunkWriter
from workers.errors import InvalidArgument
from workers.export.columns import COLUMNS, column_names
import workers.export.parallel as parallel
from workers.export.kinds import PLANS, InvoicePlan, UsagePlan, stream_chunks

#: The export kinds.
KINDS = tuple(COLUMNS)
#: Rows fetched and written per chunk (memory stays flat: one chunk in flight).
CHUNK_ROWS = 10_000
#: The manifest's format; bumped if its keys ever change meaning.
MANIFEST_FORMAT = 1


def manifest_path(out: Path) -> Path:
    """Where the manifest of the CSV ``out`` goes: ``out`` + ``.manifest.json``."""
    return Path(f"{out}.manifest.json")


def check_request(kind: str, start: date, end: date, out: Path | None = None, root: Path | None = None) -> None:
    """Refuse a bad export request with ``InvalidArgument`` naming the field (kind, start, end, out, root).

    ``root``: the export directory ``out`` must stay inside (``workers.containment``: symlinks and ``..``
    resolved); None leaves ``out`` wherever the caller put it.
    """
    if kind not in KINDS:
        raise InvalidArgument("kind", f"unknown export {kind!r} (choose from {', '.join(KINDS)})")
    check_range(start, end)
    if out is None:
        return
    out = Path(out)
    if out.is_dir():
        raise InvalidArgument("out", f"{out} is a directory: give the CSV file's path")
    if not out.parent.is_dir():
        raise InvalidArgument("out", f"the directory {out.parent} does not exist")
    if root is not None:
        contained(out, root, "out", "root")


def export(
    engine: Engine, kind: str, start: date, end: date, out: Path, *, calendar: BusinessCalendar,
    excel: bool = False, progress: Callable[[int], None] | None = None, jobs: int | None = 1, root: Path | None = None,
) -> dict[str, Any]:
    """Write the ``kind`` export of business days ``start..end`` to ``out`` atomically; returns the manifest.

    ``excel`` puts a UTF-8 BOM first. ``progress(rows)`` is called after each chunk with the rows written so far.
    ``jobs``: processes for a usage export on an SQLite file (``workers.export.parallel``). 1, the default:
    this process only. None: the machine's cores (at most 4) once the range holds enough rows to pay for
    starting them (the command line's default). Workers are spawned, so a script that asks for them must
    guard its top level with ``if __name__ == "__main__":``. The bytes are the same either way.
    ``root``: refuse (``InvalidArgument``, field ``out``) an ``out`` that resolves outside this directory.
    """
    check_request(kind, start, end, out, root)
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise InvalidArgument("jobs", f"expected a whole number of processes (at least 1) or None, got {jobs!r}")
    out = Path(out)
    plan = PLANS[kind](start, end, calendar)
    encoder = CsvChunkWriter()
    rows = 0
    with AtomicFile(out) as target, cycle_collector_paused():
        target.write((UTF8_BOM if excel else b"") + encoder.encode_rows([column_names(kind)]))
        with engine.connect() as connection:
            reader = connection.execution_options(**{READ_ONLY: True}, **_snapshot(engine))
            wanted = parallel.default_jobs() if jobs is None else jobs
            ranges = None
            if isinstance(plan, UsagePlan) and wanted > 1 and parallel.usable(engine, kind):
                ranges = parallel.slices(reader, plan, minimum_rows=parallel.PARALLEL_MIN_ROWS if jobs is None else 1)
                reader.rollback()  # the ids are fixed: the workers read in transactions of their own
            if ranges is not None:
                for part in parallel.formatted(engine, (start, end, calendar.time_zone), ranges, wanted):
                    target.write(part.data)
                    parallel.merge_totals(plan.totals, part)
                    rows += part.rows
                    if progress is not None:
                        progress(rows)
            elif isinstance(plan, UsagePlan):
                plan.add_totals(reader.execute(plan.totals_query()).one())  # same transaction: same rows
                for chunk in stream_chunks(reader, plan.query(), CHUNK_ROWS):
                    target.write(plan.text(chunk).encode("utf-8"))
                    rows += len(chunk)
                    if progress is not None:
                        progress(rows)
            else:
                for chunk in stream_chunks(reader, plan.query(), CHUNK_ROWS):
                    lines = plan.rows(chunk)
                    target.write(encoder.encode_rows(lines))
                    rows += len(lines)
                    if progress is not None:
                        progress(rows)
        if isinstance(plan, InvoicePlan):
            lines = plan.finish()
            target.write(encoder.encode_rows(lines))
            rows += len(lines)
        manifest = {
            "format": MANIFEST_FORMAT, "kind": kind, "from": start.isoformat(), "to": end.isoformat(),
            "time_zone": calendar.time_zone, "file": out.name, "encoding": "utf-8-sig" if excel else "utf-8",
            "rows": rows, "bytes": target.size, "sha256": target.sha256, "columns": column_names(kind),
            "totals": plan.totals.to_json(),
        }
        manifest_path(out).unlink(missing_ok=True)  # never an old manifest beside a new CSV
        target.commit()
    write_atomically(manifest_path(out), manifest_bytes(manifest))
    if progress is not None:
        progress(rows)
    return manifest


def _snapshot(engine: Engine) -> dict[str, str]:
    """Execution options that make every query of one export read one snapshot.

    SQLite's read transaction is one already; PostgreSQL's default (READ COMMITTED) takes a new snapshot
    per statement, so the usage export's totals query and its rows could see different events."""
    return {} if engine.dialect.name == "sqlite" else {"isolation_level": "REPEATABLE READ"}


@contextmanager
def cycle_collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while rows stream (and restore it after).

    An export allocates a few hundred thousand short-lived tuples per chunk and no reference cycles;
    reference counting frees them all. With the collector on, those allocations trigger full
    collections that re-scan every long-lived object of the process, which measured about a third of
    the export's time (bench/bench_export.py). Memory does not grow: nothing an export makes is cyclic.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest file's bytes: indented UTF-8 JSON, keys in a fixed order, a final newline."""
    return (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def count_rows(engine: Engine, kind: str, start: date, end: date, *, calendar: BusinessCalendar) -> int:
    """How many data rows the ``kind`` export of ``start..end`` would write now (for a progress bar's total)."""
    check_request(kind, start, end)
    plan = PLANS[kind](start, end, calendar)
    with engine.connect() as connection:
        return int(connection.execution_options(**{READ_ONLY: True}).execute(plan.count()).scalar_one())
