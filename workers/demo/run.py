"""``metering demo``: the whole product on the embedded SQLite default, in well under a minute.

1. The samples: count the bundled requests, replay the bundled streams, run them through a scratch
   ledger and audit it (workers/demo/samples.py).
2. The gateway: customers with grants and promotion top-ups (CNY, USDT), limited and unlimited keys,
   then ``days`` days of generated traffic through the real Meter API (workers/demo/simulated_gateway.py), with a
   price change for gpt-4o in the middle that one gateway instance misses for a few hours.
3. The worker: closes every day (re-pricing finds the stale instance's charges and posts adjustments),
   writes the nightly CSV exports and the reports, audits the ledger.

The traffic is drawn from a seeded generator: two runs give the same requests, tokens and quota (the
days are the ones after today, so the promotion top-ups, made now, come before the traffic they pay for).
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pricing.table import PriceTable, default_price_table_path, parse_price_table
from workers.calendar import DEFAULT_TIME_ZONE, BusinessCalendar, days_between

T = TypeVar("T")
StageProgress = Callable[[str, int, "int | None"], None]

SEED = 20261128
#: The price change in the middle of the demo: gpt-4o gets cheaper.
PRICE_CHANGE_MODEL = "gpt-4o"
PRICE_CHANGE = {"input": "2.00", "cached_input": "1.00", "output": "8.00", "max_output_tokens": 16384}
#: How long after the change one gateway instance still prices with the old table.
STALE_FOR = timedelta(hours=3)
#: Files the demo writes in --out (removed first, so a rerun never mixes two runs' files).
OUTPUT_PATTERNS = ("usage-*.csv*", "rollup-*.csv*", "invoice-*.csv*", "report.html", "report.csv", "report-*.csv")
DEMO_DB = "demo.db"


class DemoError(ValueError):
    """Bad input to the demo, naming the option at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def price_table_with_change(effective_from: datetime) -> PriceTable:
    """The bundled price table plus one gpt-4o version effective at ``effective_from`` (a price cut)."""
    text = default_price_table_path().read_text(encoding="utf-8")
    fields = ", ".join(f'{name}: "{value}"' if isinstance(value, str) else f"{name}: {value}"
                       for name, value in PRICE_CHANGE.items())
    line = (f"      - {{effective_from: {effective_from.astimezone(timezone.utc).isoformat().replace('+00:00', 'Z')}, "
            f"{fields}, source: \"metering demo: a price cut in the middle of the demo\"}}\n")
    lines = text.splitlines(keepends=True)
    start = lines.index(f"  {PRICE_CHANGE_MODEL}:\n")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("  ") and not lines[i].startswith("   "))
    changed = parse_price_table("".join(lines[:end] + [line] + lines[end:]), "<demo price table>")
    entry, _ = changed.resolve(PRICE_CHANGE_MODEL)
    assert entry.version_at(effective_from.timestamp()).starts_at == effective_from.timestamp()
    return changed


def _tracked(progress: StageProgress | None) -> Callable[[Iterable[T], str], Iterator[T]]:
    """workers.demo.samples's progress wrapper (iterable, label) on top of a stage callback."""

    def track(items: Iterable[T], label: str) -> Iterator[T]:
        listed = list(items)
        for done, item in enumerate(listed, start=1):
            yield item
            if progress is not None:
                progress(label, done, len(listed))

    return track


def _fresh_sqlite(out: Path) -> str:
    """The default database: a new demo.db in --out (a previous run's is removed)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        (out / f"{DEMO_DB}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{(out / DEMO_DB).resolve()}"


def _remove_old_outputs(out: Path) -> None:
    """Remove a previous run's reports and exports, so a rerun never mixes two runs' files."""
    for pattern in OUTPUT_PATTERNS:
        for old in out.glob(pattern):
            old.unlink()


def _open(url: str, prices: PriceTable) -> Any:
    """The demo's meter; a database that cannot be opened or is not empty is a DemoError naming --db."""
    from sqlalchemy.exc import SQLAlchemyError

    from metering.ledger import LedgerError, Meter

    try:
        meter = Meter.open(url, prices=prices)
        users = meter.users()
    except (SQLAlchemyError, LedgerError, ValueError) as exc:
        raise DemoError("--db", (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]) from None
    if users:
        meter.close()
        raise DemoError("--db", "the demo needs an empty database (this one has users)")
    return meter


def shown_url(url: str) -> str:
    """The database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def run_samples(progress: StageProgress | None) -> dict[str, Any]:
    """Section 1: the bundled samples counted, replayed, and run through a scratch ledger."""
    from workers.demo.samples import run_demo as run_sample_demo, run_ledger_demo

    samples = resources.files("metering").joinpath("samples")
    track = _tracked(progress)
    results = run_sample_demo(samples, track)
    with tempfile.TemporaryDirectory(prefix="metering-demo-") as scratch:
        results["ledger"] = run_ledger_demo(samples, f"sqlite:///{scratch}/samples.db", track)
    return results


def run_demo(*, days: int = 3, out: Path = Path("demo-out"), db: str | None = None,
             progress: StageProgress | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Run the whole demo; a JSON-ready summary (see print_demo for what is shown)."""
    from pricing.table import load_price_table

    if days < 1:
        raise DemoError("--days", f"must be at least 1, got {days}")
    began = time.monotonic()
    results = run_samples(progress)
    out.mkdir(parents=True, exist_ok=True)
    url = db or _fresh_sqlite(out)
    calendar = BusinessCalendar(DEFAULT_TIME_ZONE)
    first = calendar.today(now) + timedelta(days=1)
    span = days_between(first, first + timedelta(days=days - 1))
    start, end = calendar.bounds(first)[0], calendar.bounds(span[-1])[1]
    change_at = (start + (end - start) / 2).replace(minute=0, second=0, microsecond=0, tzinfo=timezone.utc)
    prices = price_table_with_change(change_at)
    meter = _open(url, prices)
    try:
        _remove_old_outputs(out)
        results.update(_run_books(meter, calendar, span, change_at, out, progress, load_price_table()))
    finally:
        meter.close()
    results["database"] = shown_url(url)
    results["seconds"] = round(time.monotonic() - began, 1)
    return results


def _run_books(meter: Any, calendar: BusinessCalendar, span: list[date], change_at: datetime, out: Path,
               progress: StageProgress | None, old_prices: PriceTable) -> dict[str, Any]:
    """Sections 2 and 3: the traffic, the closes, the exports and the reports."""
    from metering.ledger import Meter
    from workers.demo.simulated_gateway import Gateway, open_accounts, run_traffic
    from workers.jobs import Worker

    rng = random.Random(SEED)
    accounts = open_accounts(meter, calendar, span[0])
    gateway = Gateway(meter, rng, accounts)
    stale = Meter(meter.engine, old_prices, meter.hold_ttl)
    run_traffic(gateway, calendar, span, stale, change_at, change_at + STALE_FOR, progress)
    close_at = calendar.bounds(span[-1])[1].replace(tzinfo=timezone.utc) + timedelta(hours=1)
    worker = Worker(meter, calendar, out=out, apply=True, owner="metering-demo", progress=progress)
    closes = worker.close(close_at)
    closed = [result.day for result in closes if result.status == "closed"]
    exports = worker.export_days(closed)
    reports = _write_reports(meter, calendar, span, out)
    audit = meter.audit()
    return {
        "days": [day.isoformat() for day in span],
        "time_zone": calendar.time_zone,
        "price_change": {"model": PRICE_CHANGE_MODEL, "effective_from": change_at.astimezone(calendar.zone).isoformat(),
                         **PRICE_CHANGE, "stale_instance_until": (change_at + STALE_FOR).astimezone(calendar.zone).isoformat()},
        "customers": [{"user_id": a.user_id, "name": a.customer.name, "keys": sorted(a.secrets),
                       "balance": meter.balance(a.user_id)} for a in accounts],
        "traffic": gateway.stats.to_dict(),
        "closes": [result.to_dict() for result in closes],
        "files": sorted([e["path"] for e in exports] + reports),
        "summary": summarize(closes, gateway.stats.to_dict(), audit.ok),
        "violations": [f"{v.invariant}: {v.subject}: {v.detail}" for v in audit.violations],
    }


def _write_reports(meter: Any, calendar: BusinessCalendar, span: list[date], out: Path) -> list[str]:
    """The HTML report (charts) and CSV reports of the demo's days."""
    from workers.report.build import build_report, render

    written = []
    for name, by, fmt in (("report.html", ("day",), "html"), ("report.csv", ("day",), "csv"),
                          ("report-by-user-model.csv", ("user", "model"), "csv")):
        rendered = render(build_report(meter.engine, meter.prices, span[0], span[-1], by=by, calendar=calendar), fmt)
        path = out / name
        if isinstance(rendered, bytes):
            path.write_bytes(rendered)
        else:
            path.write_text(rendered, encoding="utf-8")
        written.append(str(path))
    return written


def summarize(closes: list[Any], traffic: dict[str, Any], audit_ok: bool) -> dict[str, Any]:
    """The demo's bottom line: days closed, requests by outcome, quota, money, discrepancies, audit."""
    counters = ("requests", "succeeded", "failed", "aborted", "quota")
    sums = {name: sum(int(c.totals.get(name, 0)) for c in closes) for name in counters}
    money = {name: str(sum((Decimal(c.totals[name]) for c in closes if c.totals.get(name) is not None), Decimal(0)))
             for name in ("usd", "revenue_cny", "upstream_cost_usd")}
    discrepancies: dict[str, int] = {}
    for close in closes:
        for kind, count in close.discrepancies.items():
            discrepancies[kind] = discrepancies.get(kind, 0) + count
    return {
        "days_closed": sum(1 for c in closes if c.status == "closed"),
        **sums, "refused": sum(traffic["refused"].values()), **money,
        "discrepancies": dict(sorted(discrepancies.items())),
        "adjustments_posted": sum(c.adjustments_posted for c in closes),
        "audit_ok": audit_ok,
    }
