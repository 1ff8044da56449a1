"""The top of the ``metering`` command line: metering's commands plus worker, reconcile, report, export, demo.

Data flows pricing <- metering <- workers, so ``metering`` cannot register commands that need workers: this
module takes metering's ``app`` and adds them; the console script is ``workers.cli.main:app`` and
``python -m workers`` runs it (``python -m metering`` still runs metering's own commands).

Bad input (a bad day, a day out of bounds or before the ledger's first usage, --from after --to, an
unknown --by field or time zone) prints ``error: <field>: ...`` on stderr and exits 2 before anything is
written; stored text is printed escaped (``workers.cli.plumbing``).
"""

from __future__ import annotations

import logging
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from workers.cli.counting import app
from workers.cli.ledger import DbOption, JsonOption, PricesOption, ledger_url, load_prices, open_ledger
from workers.cli.plumbing import emit, print_error, printable
from workers.cli.plumbing import fail as fail_with
from workers.calendar import TZ_ENV, BusinessCalendar, check_day, check_range, parse_day
from workers.close.nightly import check_used_day
from workers.errors import InvalidArgument
from workers.export.exporter import KINDS
from workers.progress import row_bar, showing, stage_bars
from workers.report.options import BY_FIELDS, FORMATS

stdout = Console()
stderr = Console(stderr=True)
EXIT_FAILED = 1

#: The report's and export's argument names -> the command line's.
FLAGS = {"kind": "kind", "start": "--from", "end": "--to", "out": "--out", "root": "--dir", "day": "--day",
         "by": "--by", "prices": "--prices"}

TzOption = Annotated[
    Optional[str],
    typer.Option("--tz", help=f"Business time zone (default: ${TZ_ENV}, else Asia/Shanghai).", show_default=False),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines.")]
FromOption = Annotated[str, typer.Option("--from", help="First business day, YYYY-MM-DD.", show_default=False)]
ToOption = Annotated[str, typer.Option("--to", help="Last business day (included), YYYY-MM-DD.", show_default=False)]


# ---------------------------------------------------------------------- plumbing


def fail(field: str, message: str) -> NoReturn:
    """Print ``error: field: message`` on stderr (escaped) and exit 2 (bad input)."""
    fail_with(f"{field}: {message}")


def refuse(exc: InvalidArgument) -> NoReturn:
    """Exit 2 for a library's ``InvalidArgument``, naming the command line's flag for its field."""
    fail(FLAGS.get(exc.field, exc.field), exc.message)


def _calendar(tz: str | None) -> BusinessCalendar:
    try:
        return BusinessCalendar.from_env(tz)
    except ValueError as exc:
        fail("--tz" if tz else TZ_ENV, str(exc).removeprefix("time zone: "))


def _day(text: str, field: str) -> date:
    """A day a command may name (``workers.calendar.check_day``: from 2000 to a year ahead)."""
    try:
        return check_day(parse_day(text, field), field)
    except InvalidArgument as exc:
        fail(field, exc.message)
    except ValueError as exc:
        fail(field, str(exc).removeprefix(f"{field}: "))


def _range(start: str, end: str) -> tuple[date, date]:
    """The days --from to --to (``workers.calendar.check_range``: in order, at most ten years)."""
    first, last = _day(start, "--from"), _day(end, "--to")
    try:
        check_range(first, last)
    except InvalidArgument as exc:
        refuse(exc)
    return first, last


def open_meter(db: str | None, prices: Path | None = None) -> Any:
    """The ledger (schema brought to head); a bad price table exits 2 naming --prices, a database --db."""
    return open_ledger(db, load_prices(prices))


def _wide() -> Console:
    """The terminal as it is; a pipe gets room for the tables (rich would give it 80 columns)."""
    return stdout if stdout.is_terminal else Console(width=120)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Our own lines at INFO; the libraries' (alembic, APScheduler's "Running job" every 10 s) only from WARNING.
    logging.getLogger("metering").setLevel(logging.WARNING if quiet else logging.INFO)


# ---------------------------------------------------------------------- worker


@app.command()
def worker(
    once: Annotated[bool, typer.Option("--once", help="Run every job that is due once, then exit (cron, CronJobs).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Directory for the nightly CSV exports.")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Post the re-pricing adjustments of each close.")] = False,
    db: DbOption = None,
    tz: TzOption = None,
    prices: PricesOption = None,
    quiet: QuietOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: print one JSON object of what ran.")] = False,
) -> None:
    """Keep the books: fold deferred usage (10 s), expire holds (1 min), close days at 00:10 and export them."""
    from workers.jobs import Worker

    if as_json and not once:
        fail("--json", "only with --once (the long-running worker logs to stderr)")
    if out is not None and out.exists() and not out.is_dir():
        fail("--out", f"{out} is not a directory")
    calendar = _calendar(tz)
    _setup_logging(quiet)
    meter = open_meter(db, prices)
    try:
        jobs = Worker(meter, calendar, out=out, apply=apply)
        if not once:
            from workers.scheduler import serve

            raise typer.Exit(serve(jobs))
        report = jobs.run_once()
    finally:
        meter.close()
    if as_json:
        emit(report)
    elif not quiet:
        closed = ", ".join(f"{c['day']} {c['status']}" for c in report["closes"]) or "none due"
        print(f"folded {report['folded']}, expired {report['expired']}, closes: {closed}, "
              f"exports: {len(report['exports'])}, errors: {len(report['errors'])}")
    if report["errors"]:
        raise typer.Exit(EXIT_FAILED)


# ---------------------------------------------------------------------- reconcile


@app.command()
def reconcile(
    day: Annotated[
        Optional[str], typer.Option("--day", help="Business day YYYY-MM-DD (default: yesterday); from the ledger's "
                                    "first usage to yesterday.", show_default=False)
    ] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Post adjustment entries for price discrepancies (once).")] = False,
    db: DbOption = None,
    tz: TzOption = None,
    prices: PricesOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Close a business day (and the open days before it, in order; never a day after it): re-price, audit
    tokens and invariants, roll up; report (or --apply) differences. A closed day shows its stored result."""
    calendar = _calendar(tz)
    today = calendar.today()
    target = _day(day, "--day") if day is not None else today - timedelta(days=1)
    if target >= today:
        fail("--day", f"{target} is not over yet in {calendar.time_zone} (today is {today})")
    from workers.close.nightly import reconcile as reconcile_day

    meter = open_meter(db, prices)
    try:
        with stage_bars(stderr, showing(stdout, quiet or as_json)) as progress:
            result = reconcile_day(meter, target, calendar=calendar, apply=apply, progress=progress)
    except InvalidArgument as exc:  # a day before the ledger's first usage: nothing was written
        refuse(exc)
    finally:
        meter.close()
    payload = result.to_dict()
    if as_json:
        emit(payload)
    else:
        _print_close(payload)
    if result.status not in ("closed", "already_closed"):  # incomplete, busy or blocked: nothing written
        print_error(f"{target}: {result.status}: {result.detail}")
        raise typer.Exit(EXIT_FAILED)


def _print_close(payload: dict[str, Any]) -> None:
    print(f"{payload['day']}: {payload['status']}", end="")
    if payload.get("events") is not None:
        print(f", {payload['events']} events ({payload.get('late_events', 0)} late)", end="")
    discrepancies = payload.get("discrepancies") or {}
    shown = ", ".join(f"{kind} {count}" for kind, count in sorted(discrepancies.items())) or "none"
    print(f"; discrepancies: {shown}; adjustments posted: {payload.get('adjustments_posted', 0)}")
    totals = payload.get("totals") or {}
    if totals:
        table = Table("total", "value")
        for name, value in totals.items():
            table.add_row(str(name), str(value))
        _wide().print(table)


# ---------------------------------------------------------------------- report


@app.command()
def report(
    start: FromOption,
    end: ToOption,
    by: Annotated[str, typer.Option("--by", help=f"Group by, comma-separated: {', '.join(BY_FIELDS)}.")] = "day",
    fmt: Annotated[str, typer.Option("--format", help=f"{' | '.join(FORMATS)}.")] = "table",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write to this file (default: stdout).")] = None,
    db: DbOption = None,
    tz: TzOption = None,
    prices: PricesOption = None,
) -> None:
    """Summaries of the closed days: daily totals, invoices, per-model usage, discrepancies, margin (HTML with charts)."""
    first, last = _range(start, end)
    from workers.report.build import build_report, check_by, render

    try:
        fields = check_by([field.strip() for field in by.split(",") if field.strip()])
    except InvalidArgument as exc:
        fail("--by", exc.message)
    if fmt not in FORMATS:
        fail("--format", f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if out is not None and out.is_dir():
        fail("--out", f"{out} is a directory")
    if out is not None and not out.parent.is_dir():
        fail("--out", f"the directory {out.parent} does not exist")
    calendar = _calendar(tz)
    meter = open_meter(db, prices)
    try:
        check_used_day(meter.engine, calendar, first, "start", empty_ok=True)  # --from before the first usage
        rendered = render(build_report(meter.engine, meter.prices, first, last, by=fields, calendar=calendar), fmt)
    except InvalidArgument as exc:
        refuse(exc)
    finally:
        meter.close()
    if out is not None:
        from workers.atomic_file import write_atomically

        write_atomically(out, rendered.encode("utf-8") if isinstance(rendered, str) else rendered)
    elif isinstance(rendered, bytes):
        sys.stdout.buffer.write(rendered)
    else:
        sys.stdout.write(rendered if rendered.endswith("\n") else rendered + "\n")


# ---------------------------------------------------------------------- export


@app.command()
def export(
    kind: Annotated[str, typer.Argument(help=f"What to export: {' | '.join(KINDS)}.", show_default=False)],
    start: FromOption,
    end: ToOption,
    out: Annotated[Path, typer.Option("--out", help="The CSV file to write (a PATH.manifest.json beside it).")],
    excel: Annotated[bool, typer.Option("--excel", help="UTF-8 with a BOM, for Excel in Chinese locales.")] = False,
    root: Annotated[Optional[Path], typer.Option(
        "--dir", help="Export directory: a relative --out is taken inside it, and --out must resolve inside it "
        "(symlinks and .. followed), else exit 2 with nothing written.", show_default=False)] = None,
    db: DbOption = None,
    tz: TzOption = None,
    quiet: QuietOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    jobs: Annotated[int, typer.Option(
        "--jobs", min=0, help="Processes for a usage export on SQLite: 0 = the machine's cores (at most 4) once "
        "the range is large enough to gain from them; 1 = this process only. The file is the same.")] = 0,
) -> None:
    """Write a CSV export with stable columns, atomically, beside its manifest (rows, totals, sha256)."""
    if kind not in KINDS:
        fail("kind", f"unknown export {kind!r} (choose from {', '.join(KINDS)})")
    first, last = _range(start, end)
    if root is not None:
        if not root.is_dir():
            fail("--dir", f"{root} is not an existing directory")
        out = root / out  # a relative --out is inside --dir; an absolute one stays as given (and is checked)
    if out.is_dir():
        fail("--out", f"{out} is a directory: give the CSV file's path")
    calendar = _calendar(tz)
    from workers.export.exporter import check_request, export as write_export

    try:
        check_request(kind, first, last, out, root)
    except InvalidArgument as exc:
        refuse(exc)
    meter = open_meter(db)
    try:
        check_used_day(meter.engine, calendar, first, "start", empty_ok=True)  # --from before the first usage
        with row_bar(stderr, showing(stdout, quiet or as_json), f"{kind} rows") as progress:
            manifest = write_export(meter.engine, kind, first, last, out, calendar=calendar, excel=excel,
                                    progress=progress, jobs=jobs or None, root=root)
    except InvalidArgument as exc:
        refuse(exc)
    finally:
        meter.close()
    if as_json:
        emit(manifest)
    elif not quiet:
        print(f"wrote {printable(out)}: {manifest.get('rows')} rows, sha256 {manifest.get('sha256')}")


# ---------------------------------------------------------------------- demo


@app.command()
def demo(
    days: Annotated[int, typer.Option("--days", min=1, max=31, help="Days of gateway traffic to simulate.")] = 3,
    out: Annotated[Path, typer.Option("--out", help="Directory for the database, reports and CSVs.")] = Path("demo-out"),
    db: Annotated[
        Optional[str], typer.Option("--db", help="An empty database URL (default: a new SQLite file in --out).")
    ] = None,
    quiet: QuietOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The main job: sample counts, then days of realistic traffic through the ledger, closed, reported, exported."""
    from workers.demo.run import DemoError, run_demo
    from workers.demo.output import print_demo

    if out.exists() and not out.is_dir():
        fail("--out", f"{out} is not a directory")
    if db is not None:
        ledger_url(db)  # a SQLite file in a missing directory is refused before anything is made
    try:
        with stage_bars(stderr, showing(stdout, quiet or as_json)) as progress:
            results = run_demo(days=days, out=out, db=db, progress=progress)
    except DemoError as exc:
        fail(exc.field, str(exc))
    if as_json:
        emit(results)
    else:
        print_demo(_wide(), results)
    if not (results["ledger"]["audit_ok"] and results["summary"]["audit_ok"]):
        raise typer.Exit(EXIT_FAILED)


# ---------------------------------------------------------------------- gateway (the [gateway] extra)

gateway_app = typer.Typer(help="The reference relay (needs the gateway extra: pip install 'llm-metering\\[gateway]').",
                          no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")


@gateway_app.command("serve")
def gateway_serve(
    config: Annotated[Path, typer.Option("--config", help="Gateway YAML: upstreams, backup addresses, timeouts.",
                                         show_default=False)],
    db: DbOption = None,
    prices: PricesOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8080,
) -> None:
    """Serve /v1/chat/completions, /v1/messages and the billing endpoints, metered by the ledger at --db."""
    try:
        import uvicorn

        from gateway import create_app, load_config
        from gateway.config import ConfigError
    except ImportError as exc:
        fail("gateway", f"the [gateway] extra is not installed ({exc.name}): pip install 'llm-metering[gateway]'")
    try:
        settings = load_config(config)
    except ConfigError as exc:
        fail("--config", str(exc))
    meter = open_meter(db, prices)
    try:
        uvicorn.run(create_app(meter, settings), host=host, port=port, log_level="info")
    finally:
        meter.close()


def main() -> None:
    """Entry point for ``python -m workers``."""
    app()


def _register_import() -> None:
    """``metering import ...`` (workers/cli/oneapi.py imports this module's plumbing, so it is added last)."""
    from workers.cli.oneapi import import_app

    app.add_typer(import_app, name="import")


_register_import()
