"""Reconcile bench: closing one business day of N usage events, next to a bare SQL GROUP BY floor.

Figures (issue 5, "Scale"; see BENCHMARKS.md, "Reconcile"):

1. Seconds of ``workers.close.nightly.close_day(meter, day, calendar=BusinessCalendar(), now=...)`` on a day of
   1,000,000 usage events (and of 3,000,000 with ``--also-3m``, the default), on SQLite (a WAL file, the
   engine of ``metering.ledger.database``) and on PostgreSQL (psycopg 3): the whole close, i.e. expiring
   and folding (nothing to do), the watermark, re-pricing every event and rolling it up, the token audit
   against the holds, the failed and expired holds, the paid rates, the ledger's invariants (the checks
   of ``metering.ledger.audit.run_audit``, over the whole database) and the fenced write. Per-event cost =
   close seconds / events; peak RSS = ``ru_maxrss`` of the process that ran the close (cross-checked with
   its ``VmHWM``); close CPU = that process's user + system time during the close, all threads.
2. The floor, measured in the same process: one bare SQL GROUP BY over the same rows with the raw driver
   (sqlite3 / psycopg), ``SELECT user_id, key_id, model, channel, price_group, count(*), sum(<each token
   kind>), sum(quota) FROM usage_events WHERE occurred_at in the day GROUP BY user_id, key_id, model,
   channel, price_group``, every result row fetched.

Targets: a 1M-event close in at most 10 s (10 us per event; 30 s at 3M) on each database, peak RSS at
most 300 MB at every size, and linear growth: the per-event cost at 3M at most 1.25x the one at 1M.

The data (not timed) is one business day (Asia/Shanghai) of a gateway's traffic, written with bulk
INSERTs (sqlite3 ``executemany``; PostgreSQL ``COPY``) into a fresh schema (``Meter.open``): 50 users
(45 paid by CNY or USDT top-ups, 5 on grants only), 100 keys (a quarter limited), 8 models of the bundled
price table (skewed weights) over 4 configured channels, an unconfigured one and none; each event takes
one of 400 usage shapes per model, priced once per shape with ``pricing.quote.quota`` and
``pricing.quote.price`` (Claude shapes include cache writes, web searches and a few long-context ones),
3 % aborted streams, 8 % local or estimated counts. 3,000 holds (2,000 settled into events, 700 released,
300 expired; ``--settled-holds N`` settles N events through holds instead, N = the event count for a
gateway that holds every request), each with its hold and release entries; every event has its charge
entry; balances and the
limited keys' counters are exact, so the invariant audit is clean. Planted: 7 events charged one unit
more than they re-price to (price discrepancies) and 11 settled holds whose local prompt count is far
from the upstream's (token discrepancies). Every round checks the close's recorded summary against the
generated figures (events, requests, succeeded/failed/aborted, tokens, quota, USD, discrepancies by kind).

The data is written by a child process, and each round runs in another fresh child: a child inherits
its parent's ``ru_maxrss`` across fork and exec, so the process that starts them stays small and the
round's ``ru_maxrss`` is the close's own. A round runs the close and the floor, in alternating order; the day is reopened (its roll-up, discrepancies and day row
deleted) before each round. A figure is the median over rounds; peak RSS is the highest over rounds.
The LAST line of stdout is one JSON object. Exits 1 on a correctness failure.

    .venv/bin/python bench/bench_reconcile.py [--quick] [--events N] [--also-3m/--no-3m] [--rounds R]
        [--databases sqlite,postgresql] [--settled-holds N] [--profile] [--json-only]

PostgreSQL: a scratch database ``metering_bench_reconcile`` on METERING_BENCH_POSTGRES_URL's server
(default postgresql://postgres@127.0.0.1:5432/test), created and dropped by the run; SQLite: a temp file.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("METERING_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
PG_DATABASE = "metering_bench_reconcile"
DAY = date(2026, 12, 1)
TIME_ZONE = "Asia/Shanghai"
SECONDS_PER_EVENT_TARGET = 10e-6  # 10 s per 1,000,000 events
RSS_TARGET_MB = 300
LINEAR_TOLERANCE = 1.25  # per-event cost at 3x the events / at 1x
USERS, KEYS, UNPAID_USERS = 50, 100, 5
SHAPES_PER_MODEL = 400
SETTLED_HOLDS, HOLDS_RELEASED, HOLDS_EXPIRED = 2000, 700, 300  # --settled-holds changes the first
PLANTED_PRICE, PLANTED_TOKENS = 7, 11
UNITS_PER_CNY = 500_000  # the shipped promotion: 1 CNY = $1 of credit, 500,000 units per $
# model, provider, weight
MODELS = (
    ("gpt-4o-mini", "openai", 26), ("gpt-4o", "openai", 14), ("gpt-4.1", "openai", 9), ("gpt-5", "openai", 8),
    ("gpt-5-mini", "openai", 13), ("o3", "openai", 5), ("claude-sonnet-4-5", "anthropic", 18),
    ("claude-haiku-4-5", "anthropic", 7),
)
CHANNELS = {  # provider -> (channel, weight); relay-hk has no configured cost, None names no channel
    "openai": (("openai-official", 6), ("azure-east", 3), (None, 1)),
    "anthropic": (("anthropic-official", 5), ("aws-bedrock", 4), ("relay-hk", 1)),
}
TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                "output_tokens", "reasoning_tokens", "images", "web_search_requests")
EVENT_COLS = ("id", "request_id", "hold_id", "user_id", "key_id", "model", "price_group", "status", "outcome", "source",
              *TOKEN_FIELDS, "quota", "usd", "price_version", "payload_hash", "occurred_at", "created_at", "channel")
ENTRY_COLS = ("id", "user_id", "key_id", "kind", "amount", "hold_id", "usage_event_id", "reference", "note", "created_at")
HOLD_COLS = ("id", "request_id", "user_id", "key_id", "model", "price_group", "amount", "prompt_tokens", "prompt_source",
             "limited_key", "status", "created_at", "expires_at", "resolved_at", "channel")
USER_COLS = ("id", "name", "price_group", "balance", "created_at")
KEY_COLS = ("id", "user_id", "name", "secret_hash", "display_prefix", "status", "expires_at", "allowed_models",
            "limit_quota", "used_quota", "reserved_quota", "created_at")
ORDER_COLS = ("id", "reference", "user_id", "amount", "currency", "rate_id", "usd_credit", "quota", "created_at")
CHUNK = 50_000


def label(events: int) -> str:
    """1000000 -> 1m, 300000 -> 300k."""
    return f"{events // 10**6}m" if events % 10**6 == 0 else f"{events // 1000}k" if events % 1000 == 0 else str(events)


def mb(kilobytes: int) -> float:
    return round(kilobytes / 1024, 1)  # ru_maxrss is in KiB on Linux


# ---------------------------------------------------------------------- databases


@contextmanager
def database(kind: str) -> Iterator[str]:
    """A fresh scratch database URL, dropped afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench_reconcile_") as directory:
            yield f"sqlite:///{directory}/reconcile.db"
        return
    from sqlalchemy import create_engine, text

    from metering.ledger.database import normalize_url

    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})

    def drop() -> None:
        with admin.connect() as c:
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{PG_DATABASE}'"))
            c.execute(text(f"DROP DATABASE IF EXISTS {PG_DATABASE}"))

    drop()
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {PG_DATABASE}"))
    try:
        yield admin.url.set(database=PG_DATABASE).render_as_string(hide_password=False)
    finally:
        drop()
        admin.dispose()


def pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be reached, or None."""
    import psycopg

    from metering.ledger.database import normalize_url

    try:
        psycopg.connect(normalize_url(PG_URL).replace("+psycopg", ""), connect_timeout=3).close()
        return None
    except psycopg.Error as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def raw_connect(url: str) -> Any:
    """The raw driver's connection (autocommit on PostgreSQL; sqlite3 managing no transactions itself)."""
    if url.startswith("sqlite"):
        import sqlite3

        connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        connection.execute("PRAGMA busy_timeout=30000")
        return connection
    import psycopg

    from metering.ledger.database import normalize_url

    return psycopg.connect(normalize_url(url).replace("+psycopg", ""), autocommit=True)


def stored_time(url: str, moment: datetime) -> Any:
    """A naive UTC datetime as the tables store it (SQLAlchemy's text form on SQLite)."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if url.startswith("sqlite") else moment


# ---------------------------------------------------------------------- the data


def make_shapes(prices: Any, at: datetime, rng: random.Random) -> dict[str, list[tuple[tuple[int, ...], int, Fraction]]]:
    """Per model: SHAPES_PER_MODEL (token counts in TOKEN_FIELDS order, quota, exact usd), priced once each."""
    from pricing.quote import price, quota
    from pricing.usage import UsageRecord

    shapes: dict[str, list[tuple[tuple[int, ...], int, Fraction]]] = {}
    for model, provider, _weight in MODELS:
        pool = []
        for n in range(SHAPES_PER_MODEL):
            prompt = int(rng.lognormvariate(7.0, 1.2)) + 20  # ~1,100 median, a long tail
            output = int(rng.lognormvariate(5.5, 1.0)) + 1
            counts = dict.fromkeys(TOKEN_FIELDS, 0)
            if provider == "openai":
                cached = (prompt // 1024) * 1024 if rng.random() < 0.3 else 0  # OpenAI caches whole 1,024 blocks... roughly
                counts.update(input_tokens=prompt - cached, cached_input_tokens=cached, output_tokens=output)
                if model in ("o3", "gpt-5", "gpt-5-mini"):
                    counts["reasoning_tokens"] = rng.randint(0, output)
            else:
                if n < 4 and model == "claude-sonnet-4-5":
                    prompt = 200_001 + rng.randint(0, 50_000)  # the long-context tier
                read = rng.randint(0, prompt) if rng.random() < 0.4 else 0
                write = rng.randint(0, prompt - read) if rng.random() < 0.2 else 0
                write_1h = write if rng.random() < 0.1 else 0
                counts.update(input_tokens=prompt - read - write, cached_input_tokens=read,
                              cache_write_5m_tokens=write - write_1h, cache_write_1h_tokens=write_1h,
                              output_tokens=output, web_search_requests=rng.randint(1, 3) if rng.random() < 0.03 else 0)
            usage = UsageRecord(provider=provider, model=model, **counts)
            exact = price(prices, usage, at, "default")
            assert exact.quota == quota(prices, usage, at.timestamp(), "default")
            pool.append((tuple(counts[name] for name in TOKEN_FIELDS), exact.quota, exact.usd))
        shapes[model] = pool
    return shapes


class Expected:
    """What the close must find (checked after every round)."""

    def __init__(self) -> None:
        self.events = self.succeeded = self.aborted = self.failed = self.requests = self.quota = 0
        self.tokens = dict.fromkeys(TOKEN_FIELDS, 0)
        self.usd = Fraction(0)
        self.discrepancies = {"price": PLANTED_PRICE, "tokens": PLANTED_TOKENS}

    def to_json(self) -> dict[str, Any]:
        return self.__dict__ | {"usd": str(self.usd)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Expected":
        made = cls()
        made.__dict__.update(data | {"usd": Fraction(data["usd"])})
        return made

    def check(self, summary: dict[str, Any]) -> list[str]:
        totals = summary["totals"]
        want = {"events": self.events, "late_events": 0, "discrepancies": self.discrepancies, "requests": self.requests,
                "succeeded": self.succeeded, "failed": self.failed, "aborted": self.aborted, "quota": self.quota,
                "usd": self.usd, **self.tokens}
        got = {"events": summary["events"], "late_events": summary["late_events"],
               "discrepancies": summary["discrepancies"], **{k: totals[k] for k in want if k in totals}}
        got["usd"] = Fraction(Decimal(totals["usd"]))
        return [f"{name}: close found {got.get(name)!r}, expected {value!r}" for name, value in want.items()
                if got.get(name) != value]


def generate(url: str, events: int, seed: int, settled: int, say: Any) -> tuple[Expected, dict[str, Any]]:
    """Schema through ``Meter.open``, then the day's rows with bulk INSERTs (COPY on PostgreSQL).

    Runs in its own process (``run_generate``): a child inherits its parent's ``ru_maxrss``, so the
    process that starts the measured children must stay small."""
    from metering.ledger.meter import Meter
    from pricing.quote import decimal_text
    from workers.calendar import BusinessCalendar

    started = time.perf_counter()
    meter = Meter.open(url)
    prices, ttl = meter.prices, meter.hold_ttl
    meter.close()
    start, end = BusinessCalendar(TIME_ZONE).bounds(DAY)
    rng = random.Random(seed)
    shapes = make_shapes(prices, (start + timedelta(hours=12)).replace(tzinfo=timezone.utc), rng)
    usd_text = {model: [decimal_text(usd) for _, _, usd in pool] for model, pool in shapes.items()}
    version = {model: prices.resolve(model)[0].versions[-1].version.effective_from.astimezone(timezone.utc).replace(tzinfo=None)
               for model, _, _ in MODELS}
    sqlite = url.startswith("sqlite")
    t = (lambda moment: moment.strftime("%Y-%m-%d %H:%M:%S.%f")) if sqlite else (lambda moment: moment)
    before = start - timedelta(days=30)
    expected = Expected()

    user_of_key = {k: (k - 1) % USERS + 1 for k in range(1, KEYS + 1)}
    limited = {k for k in range(1, KEYS + 1) if k % 4 == 0}
    balance = dict.fromkeys(range(1, USERS + 1), 0)
    used = dict.fromkeys(limited, 0)
    users = [(u, f"bench-user-{u}", "default", 0, t(before)) for u in range(1, USERS + 1)]
    keys = [(k, user_of_key[k], f"key-{k}", f"{k:064x}", f"sk-mtr-{k:04d}", "enabled", None, None,
             10**15 if k in limited else None, 0, 0, t(before)) for k in range(1, KEYS + 1)]
    orders, entries_head = [], []
    entry_id = 0
    for u in range(1, USERS + 1):
        entry_id += 1
        if u > USERS - UNPAID_USERS:  # grants only: no paid rate, revenue 0
            units = 100_000
            entries_head.append((entry_id, u, None, "grant", units, None, None, f"grant:signup:{u}", None, t(before)))
        else:
            cny = rng.randint(1_000, 200_000)
            units = cny * UNITS_PER_CNY
            currency, rate_id = ("CNY", "cny-promo") if u % 5 else ("USDT", "usdt")
            orders.append((u, f"order-{u}", u, str(cny), currency, rate_id, str(cny), units, t(before)))
            entries_head.append((entry_id, u, None, "topup", units, None, None, f"topup:order-{u}", None, t(before)))
        balance[u] += units

    # Which events are settled holds (evenly spread), and which of those / of all events are planted.
    settled = min(settled, events)
    hold_every = events / settled if settled else 0
    settled_events = {int(h * hold_every + hold_every / 2) + 1: h + 1 for h in range(settled)}
    planted_tokens = set(sorted(settled_events)[3::max(1, len(settled_events) // PLANTED_TOKENS)][:PLANTED_TOKENS])
    planted_price = {events // (PLANTED_PRICE + 1) * (n + 1) + 2 for n in range(PLANTED_PRICE)}
    assert len(settled_events) == settled and len(planted_tokens) == PLANTED_TOKENS
    key_weights = [1 / (rank + 1) ** 0.8 for rank in range(KEYS)]  # a few heavy keys, a long tail
    key_order = list(range(1, KEYS + 1))
    rng.shuffle(key_order)
    model_names = [m for m, _, _ in MODELS]
    provider = {m: p for m, p, _ in MODELS}
    span = (end - start) / events

    conn = raw_connect(url)
    writer = Writer(conn, sqlite)
    writer.rows("users", USER_COLS, users)  # balances are set at the end
    writer.rows("api_keys", KEY_COLS, keys)
    writer.rows("topup_orders", ORDER_COLS, orders)
    writer.rows("ledger_entries", ENTRY_COLS, entries_head)

    hold_id = settled
    for first in range(1, events + 1, CHUNK):
        count = min(CHUNK, events - first + 1)
        picked_keys = rng.choices(key_order, weights=key_weights, k=count)
        picked_models = rng.choices(model_names, weights=[w for _, _, w in MODELS], k=count)
        rolls = [rng.random() for _ in range(count)]
        event_rows, entry_rows, holds = [], [], []
        for offset in range(count):
            event_id = first + offset
            key_id, model = picked_keys[offset], picked_models[offset]
            user_id = user_of_key[key_id]
            shape = int(rolls[offset] * 1e6) % SHAPES_PER_MODEL
            tokens, units, usd = shapes[model][shape]
            roll = (rolls[offset] * 1e9) % 1000 / 1000
            channel = _weighted(CHANNELS[provider[model]], (rolls[offset] * 1e12) % 1000 / 1000)
            outcome = "aborted" if roll < 0.03 else "completed"
            source = "local" if roll > 0.94 else "estimated" if roll > 0.92 else "upstream"
            occurred = start + span * (event_id - 1) + timedelta(microseconds=int(rolls[offset] * 1000))
            request_id = f"req-{event_id:010d}"
            charged = units + 1 if event_id in planted_price else units
            hid = settled_events.get(event_id)
            if hid is not None:
                source = "upstream"
                prompt = tokens[0] + tokens[1] + tokens[2] + tokens[3]
                local = prompt * 2 + 100 if event_id in planted_tokens else prompt
                amount = units * 2 + 100
                limited_key = key_id in limited
                settled_at = occurred + timedelta(seconds=2)  # the event is priced at the hold's time: it occurred then
                holds.append((hid, request_id, user_id, key_id, model, "default", amount, local, "local", limited_key,
                              "settled", t(occurred), t(occurred + ttl), t(settled_at), channel))
                entry_id += 1
                entry_rows.append((entry_id, user_id, key_id, "hold", -amount, hid, None, f"hold:{request_id}", None,
                                   t(occurred)))
                entry_id += 1
                entry_rows.append((entry_id, user_id, key_id, "release", amount, hid, None, f"release:{hid}", None,
                                   t(settled_at)))
            event_rows.append((event_id, request_id, hid, user_id, key_id, model, "default", "charged", outcome, source,
                               *tokens, charged, usd_text[model][shape], t(version[model]), f"{shape:064x}",
                               t(occurred), t(occurred + timedelta(milliseconds=5)), channel))
            entry_id += 1
            entry_rows.append((entry_id, user_id, key_id, "charge", -charged, hid, event_id, f"charge:{request_id}", None,
                               t(occurred + timedelta(milliseconds=5))))
            balance[user_id] -= charged
            if key_id in limited:
                used[key_id] += charged
            expected.events += 1
            expected.requests += 1
            expected.quota += charged
            expected.usd += usd
            if outcome == "completed":
                expected.succeeded += 1
            else:
                expected.aborted += 1
            for index, name in enumerate(TOKEN_FIELDS):
                expected.tokens[name] += tokens[index]
        writer.rows("holds", HOLD_COLS, holds)
        writer.rows("usage_events", EVENT_COLS, event_rows)
        writer.rows("ledger_entries", ENTRY_COLS, entry_rows)
        say(f"\r  generating {kind_of(url)} {label(events)}: {first + count - 1:,} events", end="")
    unsettled, unsettled_entries = [], []
    for n in range(HOLDS_RELEASED + HOLDS_EXPIRED):
        hold_id += 1
        status = "released" if n < HOLDS_RELEASED else "expired"
        key_id = key_order[n % KEYS]
        user_id = user_of_key[key_id]
        model = model_names[n % len(model_names)]
        created = start + timedelta(seconds=rng.randint(0, 86_399 - 700))
        resolved = created + (timedelta(seconds=3) if status == "released" else ttl)
        amount = rng.randint(1_000, 50_000)
        unsettled.append((hold_id, f"req-unsettled-{hold_id}", user_id, key_id, model, "default", amount, 500, "local",
                          key_id in limited, status, t(created), t(created + ttl), t(resolved),
                          _weighted(CHANNELS[provider[model]], rng.random())))
        entry_id += 1
        unsettled_entries.append((entry_id, user_id, key_id, "hold", -amount, hold_id, None, f"hold:req-unsettled-{hold_id}",
                                  None, t(created)))
        entry_id += 1
        unsettled_entries.append((entry_id, user_id, key_id, "release", amount, hold_id, None, f"release:{hold_id}", None,
                                  t(resolved)))
        expected.requests += 1
        if status == "released":
            expected.failed += 1
        else:
            expected.aborted += 1
    writer.rows("holds", HOLD_COLS, unsettled)
    writer.rows("ledger_entries", ENTRY_COLS, unsettled_entries)
    writer.finish(balance, used, {"users": USERS, "api_keys": KEYS, "topup_orders": USERS, "holds": hold_id,
                                  "usage_events": events, "ledger_entries": entry_id})
    conn.close()
    say(f"\r  generated {kind_of(url)} {label(events)}: {events:,} events, {hold_id:,} holds, {entry_id:,} entries "
        f"in {time.perf_counter() - started:.0f} s")
    return expected, {"start": start, "end": end, "ttl": ttl}


def kind_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _weighted(choices: Sequence[tuple[Any, int]], roll: float) -> Any:
    total = sum(w for _, w in choices)
    point = roll * total
    for value, weight in choices:
        if point < weight:
            return value
        point -= weight
    return choices[-1][0]


class Writer:
    """Bulk INSERTs: sqlite3 executemany in one transaction per call; PostgreSQL COPY."""

    def __init__(self, conn: Any, sqlite: bool) -> None:
        self.conn, self.sqlite = conn, sqlite
        if sqlite:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # loading only; the close's engine sets its own pragmas
            conn.execute("PRAGMA cache_size=-262144")  # 256 MB of page cache for the index inserts (loading only)
        else:  # a bulk load: foreign keys are checked by construction (holds come after the events naming them)
            conn.execute("SET session_replication_role = replica")

    def rows(self, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        if not rows:
            return
        if self.sqlite:
            self.conn.execute("BEGIN")
            self.conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows)
            self.conn.execute("COMMIT")
            return
        with self.conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def finish(self, balance: dict[int, int], used: dict[int, int], last_ids: dict[str, int]) -> None:
        conn = self.conn
        if self.sqlite:
            conn.execute("BEGIN")
        conn.cursor().executemany("UPDATE users SET balance = %s WHERE id = %s".replace("%s", "?" if self.sqlite else "%s"),
                                  [(b, u) for u, b in balance.items()])
        conn.cursor().executemany("UPDATE api_keys SET used_quota = %s WHERE id = %s".replace("%s", "?" if self.sqlite else "%s"),
                                  [(q, k) for k, q in used.items()])
        if self.sqlite:
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return
        for table, last in last_ids.items():
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})")
        conn.execute("VACUUM ANALYZE")  # what autovacuum does after a day of inserts (and not during the timing)


def reopen_day(url: str) -> None:
    """Undo a close of DAY: its roll-up rows, discrepancies and day row."""
    conn = raw_connect(url)
    mark = "?" if url.startswith("sqlite") else "%s"
    if url.startswith("sqlite"):
        conn.execute("BEGIN IMMEDIATE")
    for table in ("daily_rollups", "discrepancies", "day_closes"):
        conn.execute(f"DELETE FROM {table} WHERE day = {mark}", (DAY.isoformat(),))
    if url.startswith("sqlite"):
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


# ---------------------------------------------------------------------- the measured child


FLOOR_SQL = (
    "SELECT user_id, key_id, model, channel, price_group, count(*), "
    + ", ".join(f"sum({name})" for name in TOKEN_FIELDS)
    + ", sum(quota) FROM usage_events WHERE occurred_at >= {p} AND occurred_at < {p} "
    "GROUP BY user_id, key_id, model, channel, price_group"
)


def floor(url: str, start: datetime, end: datetime) -> tuple[float, int]:
    """The bare GROUP BY with the raw driver: seconds, groups."""
    conn = raw_connect(url)
    sql = FLOOR_SQL.replace("{p}", "?" if url.startswith("sqlite") else "%s")
    began = time.perf_counter()
    rows = conn.execute(sql, (stored_time(url, start), stored_time(url, end))).fetchall()
    seconds = time.perf_counter() - began
    conn.close()
    return seconds, len(rows)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One round in this fresh process: the close and the floor (in ``spec['order']``), with ru_maxrss."""
    from metering.ledger.meter import Meter
    from workers.calendar import BusinessCalendar
    from workers.close.nightly import close_day

    url = spec["url"]
    start, end = datetime.fromisoformat(spec["start"]), datetime.fromisoformat(spec["end"])
    now = datetime.fromisoformat(spec["now"])
    meter = Meter.open(url)
    out: dict[str, Any] = {"rss_ready_mb": mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}
    for step in spec["order"]:
        if step == "floor":
            out["floor_s"], out["floor_groups"] = floor(url, start, end)
            out["rss_after_floor_mb"] = mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            continue
        profiler = cProfile.Profile() if spec.get("profile") else None
        used = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        if profiler:
            profiler.enable()
        result = close_day(meter, DAY, calendar=BusinessCalendar(TIME_ZONE), now=now)
        if profiler:
            profiler.disable()
        out["close_s"] = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_SELF)
        out["close_cpu_s"] = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
        out["rss_after_close_mb"] = mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        out["status"], out["detail"] = result.status, result.detail
        if profiler:
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(25)
            out["profile"] = text.getvalue()
    meter.close()
    out["peak_rss_mb"] = mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    out["vm_hwm_mb"] = high_water_mb()
    return out


def run_generate(url: str, events: int, seed: int, settled: int, quiet: bool) -> tuple[Expected, dict[str, Any]]:
    """``generate`` in a child process (progress on stderr)."""
    spec = {"url": url, "events": events, "seed": seed, "settled": settled, "quiet": quiet}
    done = subprocess.run([sys.executable, __file__, "--generate", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError("generating the data failed (see above)")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    window = {"start": datetime.fromisoformat(data["start"]), "end": datetime.fromisoformat(data["end"]),
              "ttl": timedelta(seconds=data["ttl"])}
    return Expected.from_json(data["expected"]), window


def generate_child(spec: dict[str, Any]) -> dict[str, Any]:
    def say(line: str = "", end: str = "\n") -> None:
        if not spec["quiet"]:
            print(line, end=end, file=sys.stderr, flush=True)

    expected, window = generate(spec["url"], spec["events"], spec["seed"], spec["settled"], say)
    return {"expected": expected.to_json(), "start": window["start"].isoformat(), "end": window["end"].isoformat(),
            "ttl": window["ttl"].total_seconds()}


def high_water_mb() -> float | None:
    """VmHWM of this process image (Linux), a cross-check of ru_maxrss (which a child inherits across fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the measured child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def recorded_summary(url: str) -> dict[str, Any] | None:
    conn = raw_connect(url)
    mark = "?" if url.startswith("sqlite") else "%s"
    row = conn.execute(f"SELECT status, summary FROM day_closes WHERE day = {mark}", (DAY.isoformat(),)).fetchone()
    conn.close()
    return None if row is None or row[0] != "closed" else json.loads(row[1])


# ---------------------------------------------------------------------- the run


def bench_size(kind: str, events: int, args: argparse.Namespace, say: Any, figures: dict[str, Any]) -> list[str]:
    key = f"{kind}_{label(events)}"
    problems: list[str] = []
    with database(kind) as url:
        expected, window = run_generate(url, events, args.seed, args.settled_holds, args.json_only)
        now = (window["end"] + window["ttl"] + timedelta(hours=1)).replace(tzinfo=timezone.utc)
        runs = []
        for r in range(args.rounds):
            reopen_day(url)
            order = ["close", "floor"] if r % 2 == 0 else ["floor", "close"]
            spec = {"url": url, "start": window["start"].isoformat(), "end": window["end"].isoformat(),
                    "now": now.isoformat(), "order": order, "profile": args.profile and r == 0}
            run = run_child(spec)
            summary = recorded_summary(url)
            found = [f"{key}: the close's status is {run['status']} ({run['detail']})"] if run["status"] != "closed" or summary is None \
                else [f"{key}: {line}" for line in expected.check(summary)]
            for line in found:
                print(f"RECONCILE CHECK FAILED: {line}", file=sys.stderr, flush=True)
            problems += found
            runs.append(run)
            say(f"  round {r + 1} {kind:10} {label(events):>4}: close {run['close_s']:6.2f} s (CPU {run['close_cpu_s']:.1f}), "
                f"floor {run['floor_s']:5.2f} s "
                f"({run['floor_groups']} groups), peak RSS {run['peak_rss_mb']:.0f} MB (VmHWM {run['vm_hwm_mb']}, ready {run['rss_ready_mb']:.0f})"
                f"  [{' then '.join(order)}]")
            if "profile" in run:
                say(run["profile"])
    close_s = statistics.median(r["close_s"] for r in runs)
    floor_s = statistics.median(r["floor_s"] for r in runs)
    peak = max(r["peak_rss_mb"] for r in runs)
    per_event = close_s / events * 1e6
    figures.update({
        f"{key}_events": events, f"{key}_close_s": round(close_s, 2), f"{key}_floor_s": round(floor_s, 3),
        f"{key}_ratio": round(close_s / floor_s, 1), f"{key}_us_per_event": round(per_event, 2),
        f"{key}_floor_us_per_event": round(floor_s / events * 1e6, 2), f"{key}_peak_rss_mb": peak,
        f"{key}_ready_rss_mb": max(r["rss_ready_mb"] for r in runs),
        f"{key}_vm_hwm_mb": max((r["vm_hwm_mb"] or 0) for r in runs),
        f"{key}_close_s_rounds": [round(r["close_s"], 2) for r in runs],
        f"{key}_close_cpu_s": round(statistics.median(r["close_cpu_s"] for r in runs), 2),
        f"{key}_time_met": per_event <= SECONDS_PER_EVENT_TARGET * 1e6, f"{key}_rss_met": peak <= RSS_TARGET_MB,
    })
    say(f"  {kind:10} {label(events):>4}: close {close_s:6.2f} s ({per_event:.2f} us/event, CPU {figures[f'{key}_close_cpu_s']:.1f} s), "
        f"floor {floor_s:5.2f} s, "
        f"close/floor {close_s / floor_s:5.1f}, peak RSS {peak:.0f} MB  (targets: <= {SECONDS_PER_EVENT_TARGET * 1e6:.0f} "
        f"us/event: {'MET' if figures[f'{key}_time_met'] else 'NOT MET'}; <= {RSS_TARGET_MB} MB: "
        f"{'MET' if figures[f'{key}_rss_met'] else 'NOT MET'})")
    return problems


def scan_workers() -> int:
    from workers.close.rollup import SCAN_WORKERS

    return SCAN_WORKERS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=None, help="events in the day (default 1,000,000; quick 100,000)")
    parser.add_argument("--also-3m", dest="also_3m", action="store_true", default=True,
                        help="also measure 3x the events (3,000,000 by default): the linear-growth figure (default)")
    parser.add_argument("--no-3m", dest="also_3m", action="store_false", help="measure --events only")
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per size (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="100,000 events (and 300,000), one round: a smoke run")
    parser.add_argument("--profile", action="store_true", help="cProfile the close in the first round of each size")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--settled-holds", type=int, default=SETTLED_HOLDS,
                        help=f"events that settle a hold (default {SETTLED_HOLDS}; the rest are deferred-mode events); "
                             "give the event count for a gateway that holds every request")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.generate:
        print(json.dumps(generate_child(json.loads(args.generate))), flush=True)
        return 0
    args.events = args.events or (100_000 if args.quick else 1_000_000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    sizes = [args.events] + ([3 * args.events] if args.also_3m else [])

    def say(line: str = "", end: str = "\n") -> None:
        if not args.json_only:
            print(line, end=end, flush=True)

    import sqlite3

    import psycopg

    started = time.perf_counter()
    figures: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version, "psycopg": psycopg.__version__, "quick": args.quick, "rounds": args.rounds,
        "sizes": sizes, "day": DAY.isoformat(), "time_zone": TIME_ZONE, "scan_workers": scan_workers(),
        "settled_holds": args.settled_holds, "load_average_start": list(os.getloadavg()),
        "targets": {"us_per_event": SECONDS_PER_EVENT_TARGET * 1e6, "peak_rss_mb": RSS_TARGET_MB,
                    "linear_tolerance": LINEAR_TOLERANCE},
    }
    say(f"bench_reconcile: Python {figures['python']}, {figures['cpus']} cpus, SQLite {figures['sqlite']}, psycopg "
        f"{figures['psycopg']}; sizes {', '.join(label(n) for n in sizes)}, {args.rounds} round(s) each")
    problems: list[str] = []
    for kind in args.databases.split(","):
        if kind == "postgresql" and (down := pg_unreachable()):
            say(f"  postgresql: not reachable at {PG_URL} ({down}); skipped")
            figures["postgresql_skipped"] = down
            continue
        for events in sizes:
            problems += bench_size(kind, events, args, say, figures)
        if len(sizes) == 2:
            small, big = (f"{kind}_{label(n)}_us_per_event" for n in sizes)
            growth = figures[big] / figures[small]
            figures[f"{kind}_growth_per_event"] = round(growth, 3)
            figures[f"{kind}_{label(sizes[1])}_linear_met"] = growth <= LINEAR_TOLERANCE
            say(f"  {kind:10} per-event cost at {label(sizes[1])} / at {label(sizes[0])}: {growth:.2f} "
                f"(target <= {LINEAR_TOLERANCE}): {'MET' if growth <= LINEAR_TOLERANCE else 'NOT MET'}")
    met = [v for k, v in figures.items() if k.endswith("_met")]
    figures["all_met"] = bool(met) and all(met)
    figures["check_failures"] = len(problems)
    figures["elapsed"] = round(time.perf_counter() - started, 1)
    figures["load_average_end"] = list(os.getloadavg())
    verdict = ("nothing measured" if not met else "targets MET everywhere measured" if figures["all_met"]
               else "targets NOT MET somewhere (see above)")
    say(f"{len(problems)} CHECK FAILURE(S)" if problems else f"ALL CHECKS OK: every close recorded the generated totals "
        f"and exactly the planted discrepancies ({figures['elapsed']} s); {verdict}")
    print(json.dumps(figures), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
