"""The nightly close (workers.close.nightly): each day exactly once, the books add up, faults change nothing.

Figures come from the rules of docs/worker.md and the bundled price table (1 CNY = $1 promotion,
reference rate 7.1 CNY per USD, azure-east cost ratio 0.9); every expected value is computed here from
the rows the test booked, independently of the close's own code path.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from metering.ledger.meter import Meter
from pricing.table import parse_price_table, default_price_table_path
from pricing.usage import UsageRecord
from tests.databases import SERVER_URLS, fresh_database
from tests.traffic import CALENDAR, FIRST_DAY, after, body, book_customers, book_day, moment
from workers.close.nightly import Interrupted, LeaseLost, close_day, close_due_days, days_to_close, reconcile
from workers.close.lease import claim

ROOT = Path(__file__).resolve().parent.parent
DAY1, DAY2, DAY3 = FIRST_DAY, FIRST_DAY + timedelta(days=1), FIRST_DAY + timedelta(days=2)
DAYS = tuple(FIRST_DAY + timedelta(days=n) for n in range(5))  # the kill test's days: work left for every kill


def rows(meter: Meter, sql: str, **params: Any) -> list[dict[str, Any]]:
    with meter.engine.connect() as connection:
        return [dict(r) for r in connection.execute(text(sql), params).mappings()]


def day_sql(column: str, day: date) -> tuple[str, dict[str, datetime]]:
    start, end = CALENDAR.bounds(day)
    return f"{column} >= :start AND {column} < :end", {"start": start, "end": end}


def test_each_day_closes_once_and_its_rollup_equals_its_events(meter: Meter) -> None:
    secrets = book_customers(meter)
    booked = {day: book_day(meter, secrets, day, 30, seed=1) for day in (DAY1, DAY2)}
    results = close_due_days(meter, calendar=CALENDAR, now=after(DAY2))
    assert [(r.day, r.status, r.fence) for r in results] == [(DAY1, "closed", 1), (DAY2, "closed", 1)]
    for day, counts in booked.items():
        where, params = day_sql("occurred_at", day)
        events = rows(meter, f"SELECT quota, usd FROM usage_events WHERE {where}", **params)
        rollup = rows(meter, "SELECT * FROM daily_rollups WHERE day = :day", day=day.isoformat())
        assert {r["occurred_day"] for r in rollup} == {day.isoformat()}
        assert sum(r["requests"] for r in rollup) == 30
        for outcome, n in counts.items():
            assert sum(r[outcome] for r in rollup) == n, outcome
        assert sum(r["quota"] for r in rollup) == sum(e["quota"] for e in events)
        assert sum(Decimal(r["usd"]) for r in rollup) == sum(Decimal(e["usd"]) for e in events)
        failed_quota = sum(r["quota"] for r in rollup if r["failed"] == r["requests"])
        assert failed_quota == 0  # a failed request is never spend
    assert rows(meter, "SELECT kind FROM discrepancies") == []
    assert days_to_close(meter, calendar=CALENDAR, now=after(DAY2)) == []
    again = close_day(meter, DAY1, calendar=CALENDAR, now=after(DAY2))
    assert (again.status, again.fence, again.totals) == ("already_closed", 1, results[0].totals)
    assert len(rows(meter, "SELECT id FROM daily_rollups")) == len({tuple(sorted(r.items())) for r in rows(
        meter, "SELECT day, occurred_day, user_id, key_id, model, channel, price_group FROM daily_rollups")})
    assert meter.audit().ok


def test_revenue_is_at_the_rate_each_customer_paid_and_cost_where_the_channel_is_configured(meter: Meter) -> None:
    secrets = book_customers(meter)
    book_day(meter, secrets, DAY1, 40, seed=2)
    close_due_days(meter, calendar=CALENDAR, now=after(DAY1))
    # book_customers: user 1 paid 50 CNY, user 2 paid 50 USDT, user 3 nothing. Each bought $50 = 25,000,000 units
    # (500,000 units per $1; the promotion's 1 CNY = $1 and USDT 1:1). USDT counts at 7.1 CNY per USD.
    paid_per_unit = {1: Decimal(50) / 25_000_000, 2: Decimal(50) * Decimal("7.1") / 25_000_000}
    rollup = rows(meter, "SELECT * FROM daily_rollups WHERE day = :day", day=DAY1.isoformat())
    assert {r["user_id"] for r in rollup} == {1, 2, 3}
    for row in rollup:
        rate = paid_per_unit.get(row["user_id"], Decimal(0))
        assert Decimal(row["revenue_cny"]) == (row["quota"] * rate).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
        ratio = {"openai-official": Decimal(1), "azure-east": Decimal("0.9")}.get(row["channel"])
        expected_cost = None if ratio is None else Decimal(row["usd"]) * ratio
        assert (None if row["upstream_cost_usd"] is None else Decimal(row["upstream_cost_usd"])) == expected_cost


def test_three_missed_nights_are_each_closed_once_in_order(meter: Meter) -> None:
    secrets = book_customers(meter)
    for day in (DAY1, DAY2, DAY3):
        book_day(meter, secrets, day, 5, seed=3)
    assert days_to_close(meter, calendar=CALENDAR, now=after(DAY3)) == [DAY1, DAY2, DAY3]
    assert close_day(meter, DAY2, calendar=CALENDAR, now=after(DAY3)).status == "blocked"  # DAY1 first
    results = close_due_days(meter, calendar=CALENDAR, now=after(DAY3))
    assert [(r.day, r.status, r.fence) for r in results] == [(d, "closed", 1) for d in (DAY1, DAY2, DAY3)]
    closes = rows(meter, "SELECT day, status, fence FROM day_closes ORDER BY day")
    assert closes == [{"day": d.isoformat(), "status": "closed", "fence": 1} for d in (DAY1, DAY2, DAY3)]
    assert close_due_days(meter, calendar=CALENDAR, now=after(DAY3)) == []


def test_a_day_is_not_closed_before_its_last_hold_can_have_expired(meter: Meter) -> None:
    secrets = book_customers(meter)
    late_hold = meter.authorize(secrets[0], body("gpt-4o", 3), "last-minute", at=moment(DAY1, 86_399))
    end = CALENDAR.bounds(DAY1)[1].replace(tzinfo=timezone.utc)
    early = close_day(meter, DAY1, calendar=CALENDAR, now=end + timedelta(minutes=5))
    assert early.status == "incomplete" and "hold TTL" in early.detail
    result = close_day(meter, DAY1, calendar=CALENDAR, now=end + timedelta(minutes=11))
    assert result.status == "closed"
    assert (result.totals["requests"], result.totals["aborted"], result.totals["quota"]) == (1, 1, 0)
    assert meter.hold(late_hold.request_id) and rows(meter, "SELECT status FROM holds") == [{"status": "expired"}]


def test_a_late_event_is_counted_on_the_next_open_day_and_the_closed_day_never_changes(meter: Meter) -> None:
    secrets = book_customers(meter)
    book_day(meter, secrets, DAY1, 10, seed=4)
    close_due_days(meter, calendar=CALENDAR, now=after(DAY1))
    closed = rows(meter, "SELECT * FROM daily_rollups WHERE day = :day ORDER BY id", day=DAY1.isoformat())
    summary = rows(meter, "SELECT summary FROM day_closes WHERE day = :day", day=DAY1.isoformat())
    hold = meter.authorize(secrets[0], body("gpt-4o", 5), "arrived-late", at=moment(DAY1, 3600))
    receipt = meter.settle(hold, usage=UsageRecord.from_openai("gpt-4o", {"prompt_tokens": hold.prompt_tokens,
                                                                          "completion_tokens": 9}))
    book_day(meter, secrets, DAY2, 10, seed=4)
    result = close_due_days(meter, calendar=CALENDAR, now=after(DAY2))[0]
    assert (result.day, result.late_events, result.discrepancies) == (DAY2, 1, {"late_event": 1})
    assert rows(meter, "SELECT * FROM daily_rollups WHERE day = :day ORDER BY id", day=DAY1.isoformat()) == closed
    assert rows(meter, "SELECT summary FROM day_closes WHERE day = :day", day=DAY1.isoformat()) == summary
    late_rows = rows(meter, "SELECT * FROM daily_rollups WHERE day = :day AND occurred_day = :old",
                     day=DAY2.isoformat(), old=DAY1.isoformat())
    assert [(r["requests"], r["quota"]) for r in late_rows] == [(1, receipt.quota)]
    finding = rows(meter, "SELECT kind, subject, actual FROM discrepancies WHERE day = :day", day=DAY2.isoformat())
    assert finding == [{"kind": "late_event", "subject": "arrived-late", "actual": receipt.quota}]


def test_a_price_difference_is_reported_and_applied_exactly_once(ledger_url: str) -> None:
    charged_with = Meter.open(ledger_url)
    secrets = book_customers(charged_with)
    uid = 1
    hold = charged_with.authorize(secrets[0], {**body("gpt-4o", 5), "max_tokens": 1000}, "mispriced", at=moment(DAY1, 100))
    receipt = charged_with.settle(hold, usage=UsageRecord.from_openai("gpt-4o", {"prompt_tokens": 1000,
                                                                                "completion_tokens": 1000}))
    charged_with.close()
    # The table the close re-prices with says gpt-4o cost half as much on that day: the charge was too high.
    source = default_price_table_path().read_text(encoding="utf-8")
    cheaper = source.replace("  gpt-4o-2024-05-13:\n",
                             '      - {effective_from: 2026-11-01T00:00:00Z, input: "1.25", output: "5.00", '
                             'max_output_tokens: 16384, source: "a test price cut"}\n  gpt-4o-2024-05-13:\n', 1)
    assert cheaper != source
    meter = Meter(Meter.open(ledger_url).engine, parse_price_table(cheaper))
    try:
        before = meter.balance(uid)
        result = close_day(meter, DAY1, calendar=CALENDAR, now=after(DAY1))
        assert result.discrepancies == {"price": 1, "tokens": 1}  # 1000 prompt tokens vs the ~12 counted locally
        # $1.25 / $5.00 per 1M: 1000 x 1.25e-6 + 1000 x 5e-6 = $0.00625 = 3125 units.
        finding = rows(meter, "SELECT expected, actual FROM discrepancies WHERE kind = 'price'")
        assert finding == [{"expected": 3125, "actual": receipt.quota}]
        assert meter.balance(uid) == before  # report only by default
        applied = reconcile(meter, DAY1, calendar=CALENDAR, apply=True, now=after(DAY1))
        assert (applied.status, applied.adjustments_posted) == ("already_closed", 1)
        assert meter.balance(uid) == before + receipt.quota - 3125
        assert reconcile(meter, DAY1, calendar=CALENDAR, apply=True, now=after(DAY1)).adjustments_posted == 0
        assert meter.balance(uid) == before + receipt.quota - 3125
        assert meter.audit().ok
    finally:
        meter.close()


def test_a_stop_request_writes_nothing_and_gives_the_day_back(meter: Meter) -> None:
    secrets = book_customers(meter)
    book_day(meter, secrets, DAY1, 5, seed=5)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        close_day(meter, DAY1, calendar=CALENDAR, now=after(DAY1), stop=stop)
    assert rows(meter, "SELECT status, owner FROM day_closes") == [{"status": "open", "owner": None}]
    assert rows(meter, "SELECT id FROM daily_rollups") == []
    assert close_day(meter, DAY1, calendar=CALENDAR, now=after(DAY1)).status == "closed"


def test_a_worker_whose_lease_lapsed_cannot_write(meter: Meter) -> None:
    secrets = book_customers(meter)
    book_day(meter, secrets, DAY1, 5, seed=6)
    t0 = datetime.now(timezone.utc).replace(tzinfo=None)
    rival: list[Any] = []

    def meanwhile(*_: object) -> None:  # while the first worker streams, its lease lapses and a rival claims
        if not rival:
            rival.append(claim(meter.engine, DAY1, "rival", t0 + timedelta(minutes=10), timedelta(minutes=1)))

    with pytest.raises(LeaseLost):
        close_day(meter, DAY1, calendar=CALENDAR, now=after(DAY1), owner="slow", progress=meanwhile,
                  lease=timedelta(minutes=5), clock=lambda: t0 + (timedelta(minutes=10) if rival else timedelta(0)))
    assert rival[0] is not None and rival[0].fence == 2
    assert rows(meter, "SELECT status, owner, fence FROM day_closes") == [{"status": "closing", "owner": "rival", "fence": 2}]
    assert rows(meter, "SELECT id FROM daily_rollups") == [] and rows(meter, "SELECT id FROM discrepancies") == []
    # The rival died too; once its lease lapses, a third worker closes the day, once.
    result = close_day(meter, DAY1, calendar=CALENDAR, now=after(DAY1), clock=lambda: t0 + timedelta(minutes=20))
    assert (result.status, result.fence) == ("closed", 3)


# ---------------------------------------------------------------------- processes

RACER = """
import sys, json
from datetime import datetime
from metering.ledger.meter import Meter
from tests.traffic import CALENDAR
from workers.close.nightly import close_due_days
meter = Meter.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
results = close_due_days(meter, calendar=CALENDAR, now=datetime.fromisoformat(sys.argv[2]))
print(json.dumps([[r.day.isoformat(), r.status] for r in results]))
"""


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready", process.stderr
    return process


def test_two_workers_at_once_close_each_day_exactly_once(meter: Meter) -> None:
    secrets = book_customers(meter)
    for day in (DAY1, DAY2, DAY3):
        book_day(meter, secrets, day, 8, seed=7)
    now = after(DAY3).isoformat()
    workers = [_spawn(RACER, str(meter.engine.url.render_as_string(hide_password=False)), now) for _ in range(2)]
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    import json

    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    closed_by = [day for output in outputs for day, status in output if status == "closed"]
    assert len(closed_by) == len(set(closed_by))  # never closed by both
    close_due_days(meter, calendar=CALENDAR, now=after(DAY3))  # a day one found busy and the other not yet reached
    closes = rows(meter, "SELECT day, status FROM day_closes ORDER BY day")
    assert closes == [{"day": d.isoformat(), "status": "closed"} for d in (DAY1, DAY2, DAY3)]
    for day in (DAY1, DAY2, DAY3):
        assert sum(r["requests"] for r in rows(meter, "SELECT requests FROM daily_rollups WHERE day = :d",
                                               d=day.isoformat())) == 8


KILLABLE = """
import sys, time
from datetime import datetime, timedelta
import workers.close.rollup
workers.close.rollup.BATCH = 2  # many small batches and slices: many points where the kill can land
workers.close.rollup.SLICE_EVENTS = 2
from metering.ledger.meter import Meter
from tests.traffic import CALENDAR
from workers.close.nightly import close_due_days
meter = Meter.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
started = []

def progress(*_):  # tell the parent the close is under way (once), then go slowly
    if not started:
        started.append(True)
        print("busy", flush=True)
    time.sleep(0.05)

close_due_days(meter, calendar=CALENDAR, now=datetime.fromisoformat(sys.argv[2]), lease=timedelta(seconds=1),
               progress=progress)
print("done", flush=True)
"""


def _books(url: str) -> dict[str, list[dict[str, Any]]]:
    """Everything a close writes or moves, without row ids and wall-clock times."""
    engine = create_engine(url.replace("sqlite:///", "sqlite:///") if url.startswith("sqlite") else
                           url.replace("postgresql://", "postgresql+psycopg://"))
    queries = {
        "days": "SELECT day, status, watermark_event_id, summary FROM day_closes ORDER BY day",
        "rollups": "SELECT * FROM daily_rollups ORDER BY day, occurred_day, user_id, key_id, model, channel, price_group",
        "findings": "SELECT day, kind, subject, user_id, expected, actual, detail FROM discrepancies ORDER BY day, kind, subject",
        "balances": "SELECT id, balance FROM users ORDER BY id",
        "entries": "SELECT user_id, kind, amount, reference FROM ledger_entries ORDER BY kind, reference",
        "holds": "SELECT request_id, status FROM holds ORDER BY request_id",
    }
    try:
        with engine.connect() as connection:
            books = {name: [dict(r) for r in connection.execute(text(sql)).mappings()] for name, sql in queries.items()}
    finally:
        engine.dispose()
    for row in books["rollups"]:
        row.pop("id")
    return books


@pytest.fixture(params=("sqlite", "postgresql"))
def twin_urls(request: pytest.FixtureRequest, server_databases: dict[str, str | Exception], tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two empty databases of one kind: one for the clean run, one for the run that gets killed."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/clean.db", f"sqlite:///{tmp_path}/killed.db"
        return
    killed = fresh_database("postgresql", server_databases, tmp_path)
    admin = create_engine(SERVER_URLS["postgresql"].replace("postgresql://", "postgresql+psycopg://"),
                          isolation_level="AUTOCOMMIT")
    name = f"metering_clean_{os.getpid()}"
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        connection.execute(text(f"CREATE DATABASE {name}"))
    yield killed.rsplit("/", 1)[0] + f"/{name}", killed
    with admin.connect() as connection:
        connection.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    admin.dispose()


def test_kill_9_at_random_points_of_a_close_then_a_rerun_equals_one_clean_run(twin_urls: tuple[str, str]) -> None:
    clean_url, killed_url = twin_urls
    for url in (clean_url, killed_url):  # the same seeded traffic, row for row, in both databases
        booked = Meter.open(url)
        secrets = book_customers(booked)
        for day in DAYS:
            book_day(booked, secrets, day, 12, seed=8)
        booked.authorize(secrets[0], body("gpt-4o", 2), "left-open", at=moment(DAY3, 80_000))  # expires at the close
        booked.close()
    now = after(DAYS[-1])
    clean = Meter.open(clean_url)
    close_due_days(clean, calendar=CALENDAR, now=now)
    clean.close()
    rng = random.Random(20261128)
    kills = 0
    for _ in range(8):
        worker = _spawn(KILLABLE, killed_url, now.isoformat())
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
        if worker.stdout.readline().strip() != "busy":  # nothing left to close
            worker.communicate(timeout=60)
            break
        time.sleep(rng.uniform(0.0, 0.4))  # a seeded random point of the close under way
        if worker.poll() is None:
            worker.send_signal(signal.SIGKILL)
            kills += 1
        worker.communicate(timeout=60)
        time.sleep(1.1)  # the killed worker's 1 s lease lapses
        if kills == 4:
            break
    assert kills >= 3, "the kills should land while the close runs"
    rerun = Meter.open(killed_url)
    close_due_days(rerun, calendar=CALENDAR, now=now)
    assert rerun.audit().ok
    rerun.close()
    assert _books(killed_url) == _books(clean_url)


def test_a_day_closed_before_the_first_activity_does_not_block_the_days_after_it(meter: Meter) -> None:
    secrets = book_customers(meter)
    book_day(meter, secrets, DAY3, 4, seed=9)
    early = close_day(meter, DAY1, calendar=CALENDAR, now=after(DAY3))  # an operator closes an empty day first
    assert (early.status, early.events) == ("closed", 0)
    # The catch-up starts at the first usage (DAY3), never before it; the early close is its previous close.
    assert days_to_close(meter, calendar=CALENDAR, now=after(DAY3)) == [DAY3]
    results = close_due_days(meter, calendar=CALENDAR, now=after(DAY3))
    assert [(r.day, r.status) for r in results] == [(DAY3, "closed")]
    assert results[0].totals["requests"] == 4
