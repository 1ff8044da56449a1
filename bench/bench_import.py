"""Import bench: ``metering import one-api`` of N consume logs, first run and rerun (docs/oneapi-import.md, "Speed").

The data (not timed): a one-api SQLite source with one user, one unlimited token and N consume logs of gpt-4o
(1,000 input + 200 output tokens each, one second apart), written with ``executemany``. Each round imports it
into a fresh ledger (``Meter.open``: SQLite in a temporary directory, or ``--db URL``, whose tables are dropped
first) in one process: the first import (read, priced, recorded, charged, the balance adjusted: one
transaction) and a rerun with nothing new, each timed with ``time.perf_counter`` (and the process's CPU time).
A figure is the best of ``--rounds`` (the machine is shared: the fastest round is the least disturbed one).
The LAST line of stdout is one JSON object.

    python bench/bench_import.py                       # 40,000 logs, SQLite ledger
    python bench/bench_import.py --logs 10000 --db postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import MetaData, create_engine  # noqa: E402

from metering.ledger.database import normalize_url  # noqa: E402
from metering.ledger.meter import Meter  # noqa: E402
from workers.oneapi.importer import import_oneapi  # noqa: E402
from workers.oneapi.source import OneApiSource, source_url  # noqa: E402

T0 = 1_748_736_000  # 2025-06-01T00:00:00Z: gpt-4o's 2024-10-02 prices are in force
ONE_API_TABLES = """
CREATE TABLE users (id integer PRIMARY KEY AUTOINCREMENT, username text UNIQUE, password text NOT NULL,
  display_name text, role integer DEFAULT 1, status integer DEFAULT 1, email text, access_token char(32) UNIQUE,
  quota integer DEFAULT 0, used_quota integer DEFAULT 0, request_count integer DEFAULT 0,
  "group" varchar(32) DEFAULT 'default', aff_code varchar(32) UNIQUE, inviter_id integer);
CREATE TABLE tokens (id integer PRIMARY KEY AUTOINCREMENT, user_id integer, "key" char(48) UNIQUE,
  status integer DEFAULT 1, name text, created_time integer, accessed_time integer, expired_time integer DEFAULT -1,
  remain_quota integer DEFAULT 0, unlimited_quota numeric DEFAULT false, used_quota integer DEFAULT 0,
  models text DEFAULT '', subnet text DEFAULT '');
CREATE TABLE logs (id integer PRIMARY KEY AUTOINCREMENT, user_id integer, created_at integer, type integer,
  content text, username text DEFAULT '', token_name text DEFAULT '', model_name text DEFAULT '',
  quota integer DEFAULT 0, prompt_tokens integer DEFAULT 0, completion_tokens integer DEFAULT 0,
  channel_id integer, request_id text DEFAULT '', elapsed_time integer DEFAULT 0, is_stream numeric DEFAULT false,
  system_prompt_reset numeric DEFAULT false);
"""


def write_source(path: Path, logs: int) -> None:
    """The one-api database: one user, one token, ``logs`` consume logs."""
    connection = sqlite3.connect(path)
    connection.executescript(ONE_API_TABLES)
    connection.execute("INSERT INTO users (id, username, password, quota, access_token, aff_code) "
                       "VALUES (1, 'alice', 'x', 1000000000, ?, 'a1')", ("t" * 32,))
    connection.execute("INSERT INTO tokens (id, user_id, \"key\", name, status, unlimited_quota) "
                       "VALUES (1, 1, ?, 'main', 1, 1)", ("A" * 48,))
    connection.executemany(
        "INSERT INTO logs (id, user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, "
        "token_name, channel_id, content) VALUES (?, 1, ?, 2, 'gpt-4o', 2250, 1000, 200, 'main', 3, '')",
        [(i, T0 + i) for i in range(1, logs + 1)])
    connection.commit()
    connection.close()


def empty(url: str) -> None:
    """Drop every table of the ledger at ``url`` (a server database reused between rounds)."""
    engine = create_engine(normalize_url(url))
    metadata = MetaData()
    metadata.reflect(engine)
    metadata.drop_all(engine)
    engine.dispose()


def one_round(source: str, ledger: str, logs: int) -> dict[str, float]:
    meter = Meter.open(ledger)
    figures: dict[str, float] = {}
    try:
        for run in ("first", "rerun"):
            reader = OneApiSource(source_url(source))
            wall, cpu = time.perf_counter(), time.process_time()
            summary = import_oneapi(meter, reader, name="bench")
            figures[f"{run}_s"] = time.perf_counter() - wall
            figures[f"{run}_cpu_s"] = time.process_time() - cpu
            reader.close()
            expected = logs if run == "first" else 0
            if summary["logs"]["imported"] != expected or (run == "first" and summary["folded"] != logs):
                raise SystemExit(f"{run}: imported {summary['logs']['imported']}, expected {expected}")
    finally:
        meter.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", help="a server ledger (its tables are dropped before each round)")
    options = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        write_source(Path(folder) / "one-api.db", options.logs)
        for number in range(options.rounds):
            ledger = options.db or f"sqlite:///{folder}/ledger-{number}.db"
            if options.db:
                empty(options.db)
            rounds.append(one_round(f"sqlite:///{folder}/one-api.db", ledger, options.logs))
    best = {key: min(r[key] for r in rounds) for key in rounds[0]}
    backend = (options.db or "sqlite").split(":", 1)[0]
    print(f"{options.logs:,} logs into {backend}: first import {best['first_s']:.2f} s "
          f"({best['first_s'] / options.logs * 1e6:.0f} us per log, CPU {best['first_cpu_s']:.2f} s), "
          f"rerun {best['rerun_s']:.2f} s; best of {options.rounds}")
    print(json.dumps({"logs": options.logs, "backend": backend, "rounds": rounds, "best": best}))


if __name__ == "__main__":
    main()
