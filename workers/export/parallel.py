"""The usage export on several processes (SQLite): slices of ids formatted side by side, written in order.

One process spends about 10 µs on a usage row, most of it SQLite producing the row and Python building
its objects (bench/bench_export.py). No slice of ids depends on another, so
``jobs`` worker processes each read and format slices of the range (with the one-process path's own
code, ``UsagePlan``, restricted to the slice's ids), and the exporting process writes their bytes in id order,
hashing as it goes, and adds up their totals exactly. At most ``2 x jobs`` slices are in flight, so
memory stays flat whatever the range; the files are the same bytes as one process writes
(tests/test_export.py checks it).

What a reader sees: the exporting process fixes the range's ids (the lowest and highest event id of its
days) in one read transaction. SQLite commits one writer at a time, so every event up to the highest id
was committed by then, and an event inserted later has a higher id: the set of rows is the one of that
moment. Each worker reads its slices in a transaction of its own, so a row's content is the one at the
moment its slice is read; the only content that changes after an event is written is its status
(pending -> charged, folded every 10 s), and the manifest's totals are always those of the rows in the file.

Workers are started with ``spawn`` (a fresh interpreter), never ``fork``: the worker process that runs
nightly exports has scheduler threads, and a forked child of a threaded process can inherit a held lock.

Workers die with the exporting process, even when it is killed with ``kill -9`` (which runs no cleanup):
on Linux each asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and
everywhere a watchdog thread exits the worker once its parent is gone (it is then re-parented, so
``os.getppid()`` changes), at most ``PARENT_CHECK_SECONDS`` later. No orphan keeps reading the ledger.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import date
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from workers.calendar import BusinessCalendar
from workers.export.kinds import EVENTS, Totals, UsagePlan, stream_chunks

#: Worker processes at most, whatever the machine (beyond this the exporting process's writing and SQLite's
#: shared file are the limit).
MAX_JOBS = 4
#: Below this many rows one process is quicker than starting workers (about 0.3 s each).
PARALLEL_MIN_ROWS = 200_000
#: Ids per slice: one task of a worker (about 4 MB of CSV for usage rows).
SLICE_IDS = 20_000
#: Rows per fetch inside a slice.
FETCH_ROWS = 10_000
#: How often a worker checks that the exporting process still exists (the fallback where no parent-death
#: signal can be asked for): an orphan outlives its parent by at most this long.
PARENT_CHECK_SECONDS = 0.2
#: prctl(2) option: the signal the kernel sends this process when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


class Slices(NamedTuple):
    """The ids a parallel export reads, fixed in one transaction, and the rows they hold."""

    bounds: list[tuple[int, int]]
    rows: int


class Formatted(NamedTuple):
    """One slice, formatted by a worker."""

    data: bytes
    rows: int
    integers: dict[str, int]
    decimals: dict[str, Decimal]


def default_jobs() -> int:
    """Worker processes an export uses when not told: the machine's cores, at most ``MAX_JOBS``."""
    return max(1, min(MAX_JOBS, os.cpu_count() or 1))


def usable(engine: Engine, kind: str) -> bool:
    """Whether this export can run on several processes: usage rows of an SQLite file others can open."""
    return kind == "usage" and engine.dialect.name == "sqlite" and not isinstance(
        engine.pool, (SingletonThreadPool, StaticPool))  # an in-memory database: only this process sees it


def slices(connection: Connection, plan: UsagePlan, *, minimum_rows: int) -> Slices | None:
    """The range's id slices, or None when it holds fewer than ``minimum_rows`` rows (one process is quicker)."""
    rows, low, high = connection.execute(
        select(func.count(), func.min(EVENTS.c.id), func.max(EVENTS.c.id)).where(plan.where())
    ).one()
    if not rows or rows < minimum_rows:
        return None
    bounds = [(lo, min(lo + SLICE_IDS - 1, high)) for lo in range(low, high + 1, SLICE_IDS)]
    return Slices(bounds, rows)


def formatted(engine: Engine, plan_args: tuple[date, date, str], ranges: Slices, jobs: int) -> Iterator[Formatted]:
    """Every slice formatted by ``jobs`` workers, in id order; at most ``2 x jobs`` slices in flight."""
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), url, *plan_args)) as pool:
        pending: deque[Future[Formatted]] = deque()
        try:
            for lo, hi in ranges.bounds:
                pending.append(pool.submit(_format_slice, lo, hi))
                if len(pending) >= 2 * jobs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def merge_totals(totals: Totals, part: Formatted) -> None:
    """Add a slice's totals to the export's, exactly."""
    for name, value in part.integers.items():
        totals.integers[name] += value
    for name, value in part.decimals.items():
        totals.add_decimals(name, (value,))


# ---------------------------------------------------------------------- in a worker process

_worker: dict[str, Any] = {}


def _start_worker(parent: int, url: str, first: date, last: date, time_zone: str) -> None:
    from metering.ledger.database import make_engine

    die_with_parent(parent)
    _worker["engine"] = make_engine(url)
    _worker["plan_args"] = (first, last, BusinessCalendar(time_zone))


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the process that started it) dies, however it dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no libc to ask: the watchdog below still ends the orphan
    if os.getppid() != parent:  # the parent died before the signal was asked for: nothing would send it
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="export-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)  # orphaned: no one will read what this worker formats


def _format_slice(lo: int, hi: int) -> Formatted:
    from metering.ledger.database import READ_ONLY
    from workers.export.exporter import cycle_collector_paused

    plan = UsagePlan(*_worker["plan_args"])
    plan.restrict(lo, hi)
    parts: list[bytes] = []
    rows = 0
    with _worker["engine"].connect() as connection, cycle_collector_paused():
        reader = connection.execution_options(**{READ_ONLY: True})  # one read transaction: totals and rows agree
        plan.add_totals(reader.execute(plan.totals_query()).one())
        for chunk in stream_chunks(reader, plan.query(), FETCH_ROWS):
            parts.append(plan.text(chunk).encode("utf-8"))
            rows += len(chunk)
    return Formatted(b"".join(parts), rows, plan.totals.integers, plan.totals.decimals)
