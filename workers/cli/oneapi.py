"""``metering import one-api``: bring a one-api / new-api deployment's books into the ledger (workers/oneapi/importer.py).

Bad input (a --from that is no database we can read, a bad --source or --unknown-group, a conflict with the
ledger's users or keys) prints ``error: <field>: ...`` on stderr and exits 2 with nothing written. So does a run
that fails midway (``error: import: ...``): the import is one transaction, rolled back whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from workers.cli.ledger import DbOption, JsonOption, PricesOption, error_message, handled_errors, ledger_url, load_prices
from workers.cli.plumbing import emit, printable
from workers.cli.main import QuietOption, fail, open_meter, stderr, stdout
from workers.progress import showing, stage_bars

import_app = typer.Typer(help="Import another gateway's users, keys and usage into the ledger.", no_args_is_help=True)


@import_app.command("one-api")
def one_api(
    source_from: Annotated[str, typer.Option(
        "--from", help="The one-api / new-api database: a URL (sqlite:///one-api.db, postgres://..., mysql://...), "
        "one-api's SQL_DSN (user:pass@tcp(host:3306)/oneapi) or a SQLite file. Only read.", show_default=False)],
    source: Annotated[Optional[str], typer.Option(
        "--source", help="Name of the deployment, part of every request id (default: from --from, no password).",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Run the whole import and roll it back: the same checks and counts; nothing written.")] = False,
    unknown_group: Annotated[str, typer.Option(
        "--unknown-group", help="A user group the price table lacks: 'default' (import in default, warn) or "
        "'refuse' (exit 2 before writing).")] = "default",
    balance_sync: Annotated[bool, typer.Option(
        "--sync-balances/--no-sync-balances", help="Bring each balance to one-api's users.quota with one adjustment.")] = True,
    batch: Annotated[int, typer.Option("--batch", min=1, max=100_000, help="Logs read per query.")] = 2_000,
    db: DbOption = None,
    prices: PricesOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Import a one-api / new-api database: users, keys (same secrets), consume logs as usage, balances."""
    from workers.oneapi.importer import UNKNOWN_GROUP_POLICIES, ImportConflict, import_oneapi
    from workers.oneapi.source import OneApiSource, SourceError, check_source_name, default_source_name, source_url

    if unknown_group not in UNKNOWN_GROUP_POLICIES:
        fail("--unknown-group", f"must be one of {', '.join(UNKNOWN_GROUP_POLICIES)}, got {unknown_group!r}")
    try:
        url = source_url(source_from)
        name = check_source_name(source if source is not None else default_source_name(url))
        reader = OneApiSource(url)
    except SourceError as exc:
        fail(exc.field, exc.message)
    try:
        meter = _ledger(db, prices, dry_run)
        try:
            with stage_bars(stderr, showing(stdout, quiet or as_json)) as progress:
                summary = import_oneapi(meter, reader, name=name, dry_run=dry_run, unknown_group=unknown_group,
                                        sync_balances=balance_sync, batch=batch, progress=progress)
        except (ImportConflict, SourceError) as exc:
            fail(exc.field, exc.message)
        except handled_errors() as exc:
            fail(getattr(exc, "field", None) or "import", error_message(exc))
        finally:
            meter.close()
    finally:
        reader.close()
    if as_json:
        emit(summary)
    elif not quiet:
        _print(summary)


def _ledger(db: str | None, prices: Path | None, dry_run: bool) -> Any:
    """The ledger; a dry run neither creates nor migrates it (a new or older ledger is read as empty)."""
    if not dry_run:
        return open_meter(db, prices)
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from metering.ledger import Meter
    from metering.ledger.database import make_engine

    url = ledger_url(db)
    table = load_prices(prices)
    try:
        parsed = make_url(url)
        database = parsed.database if parsed.get_backend_name() == "sqlite" else None
        if parsed.get_backend_name() == "sqlite" and not (database and Path(database).is_file()):
            return Meter(create_engine("sqlite://"), table)  # no ledger yet: nothing to read, nothing made
        return Meter(make_engine(url), table)
    except handled_errors() as exc:
        fail("--db", error_message(exc))


def _print(summary: dict[str, Any]) -> None:
    """The summary as lines an operator reads."""
    users, keys, logs, quota, balances = (summary[k] for k in ("users", "keys", "logs", "quota", "balances"))
    print(printable(f"{'dry run: ' if summary['dry_run'] else ''}{summary['flavor']} database imported as {summary['source']!r}"))
    print(f"users: {users['read']} read, {users['created']} created, {users['existing']} already imported, "
          f"{users['group_defaulted']} put in group default, {users['renamed']} renamed")
    print(f"keys: {keys['read']} read, {keys['created']} created ({keys['revoked']} revoked), {keys['existing']} already "
          f"imported, {keys['skipped_invalid'] + keys['skipped_orphan']} skipped, {keys['fallback_created']} import keys")
    by_type = printable(", ".join(f"{kind} {count}" for kind, count in sorted(summary["by_type"].items())) or "none")
    print(f"logs: {logs['read']} read ({by_type}); consume: {logs['imported']} imported, {logs['quarantined']} "
          f"quarantined, {logs['already_imported']} already imported")
    for reason, count in sorted(summary["quarantine_reasons"].items()):
        print(f"  quarantined: {printable(reason)}: {count}")  # reasons quote model names from the logs
    print(f"quota: ours {quota['ours']}, one-api's {quota['one_api']}: {quota['differing_logs']} logs differ, "
          f"difference {quota['difference']:+d}")
    print(f"balances: {balances['adjusted']} adjusted, {balances['to_adjust']} to adjust "
          f"(total {balances['adjustment_total']:+d}); folded {summary['folded']} events")
    for warning in summary["warnings"]:
        stderr.print(f"warning: {printable(warning)}", highlight=False, markup=False, soft_wrap=True)
