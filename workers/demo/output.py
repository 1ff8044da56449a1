"""What ``metering demo`` prints: the sample tables, then the traffic, the closes and the bottom line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_samples(out: Console, results: dict[str, Any]) -> None:
    """Section 1: the bundled samples' counts, their streams priced, and the scratch ledger."""
    requests = Table("sample", "model", "tokens", "source", title="Prompt counts")
    for row in results["requests"]:
        requests.add_row(Path(row["sample"]).stem, row["model"], str(row["prompt_tokens"]), row["source"])
    out.print(requests)
    streams = Table("sample", "status", "input", "cached", "output", "source", "USD", "quota", title="Stream usage, priced")
    for row in results["streams"]:
        usage = row["usage"]
        streams.add_row(Path(row["sample"]).stem, row["status"], str(usage["input_tokens"]),
                        str(usage["cached_input_tokens"]), str(usage["output_tokens"]), usage["source"],
                        row["priced"]["usd"], str(row["priced"]["quota"]))
    out.print(streams)
    ledger = results["ledger"]
    steps = Table("step", "units", title="Ledger (the samples, on a scratch SQLite)")
    for step in ledger["steps"]:
        steps.add_row(step["step"], f"{step['units']:+d}")
    steps.add_row("[bold]balance[/]", f"[bold]{ledger['balance']}[/]")
    out.print(steps)
    out.print("audit: ok" if ledger["audit_ok"] else f"audit: VIOLATIONS {ledger['violations']}", highlight=False)


def print_books(out: Console, results: dict[str, Any]) -> None:
    """Sections 2 and 3: the gateway's traffic, each day's close, the files written, the bottom line."""
    traffic = results["traffic"]
    change = results["price_change"]
    seen = Table("what the gateway saw", "requests", title=f"Gateway traffic, {len(results['days'])} days "
                 f"({results['days'][0]} .. {results['days'][-1]}, {results['time_zone']})")
    for outcome, count in traffic["outcomes"].items():
        seen.add_row(outcome, str(count))
    for scope, count in traffic["refused"].items():
        seen.add_row(f"refused: quota exceeded ({scope})", str(count))
    seen.add_row("models", ", ".join(f"{m} {n}" for m, n in traffic["by_model"].items()))
    seen.add_row("channels", ", ".join(f"{c} {n}" for c, n in traffic["by_channel"].items()))
    out.print(seen)
    out.print(f"price change: {change['model']} to ${change['input']} / ${change['output']} per 1M from "
              f"{change['effective_from']}; one gateway instance kept the old prices until {change['stale_instance_until']}",
              highlight=False)
    closes = Table("day", "status", "requests", "ok", "failed", "aborted", "quota", "USD", "CNY", "discrepancies",
                   "adjusted", title="Day closes (the worker)")
    for close in results["closes"]:
        totals = close["totals"]
        found = ", ".join(f"{kind} {n}" for kind, n in close["discrepancies"].items()) or "-"
        closes.add_row(close["day"], close["status"], *(str(totals.get(k, "")) for k in
                       ("requests", "succeeded", "failed", "aborted", "quota", "usd", "revenue_cny")),
                       found, str(close["adjustments_posted"]))
    out.print(closes)
    summary = results["summary"]
    bottom = Table("", "", title="Summary", show_header=False)
    found = ", ".join(f"{kind} {n}" for kind, n in summary["discrepancies"].items()) or "none"
    for label, value in (
        ("days closed", summary["days_closed"]),
        ("requests", f"{summary['requests']} ({summary['succeeded']} succeeded, {summary['failed']} failed, "
                     f"{summary['aborted']} aborted); {summary['refused']} refused for quota"),
        ("quota charged", f"{summary['quota']:,} units"),
        ("list value", f"${summary['usd']}"),
        ("revenue", f"¥{summary['revenue_cny']} (at the rates customers paid)"),
        ("upstream cost", f"${summary['upstream_cost_usd']}"),
        ("discrepancies", f"{found}; {summary['adjustments_posted']} adjustments posted"),
        ("audit", "ok" if summary["audit_ok"] else "VIOLATIONS: " + "; ".join(results["violations"])),
    ):
        bottom.add_row(label, str(value))
    out.print(bottom)
    files = results["files"]
    folder = str(Path(files[0]).parent) if files else ""
    out.print(f"wrote {len(files)} files to {folder}: " + ", ".join(Path(f).name for f in files), highlight=False)
    out.print(f"database: {results['database']}; {results['seconds']} s", highlight=False)


def print_demo(out: Console, results: dict[str, Any]) -> None:
    """Everything the demo shows, in order."""
    print_samples(out, results)
    print_books(out, results)
