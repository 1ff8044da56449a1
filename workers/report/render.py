"""A report as text: rich tables, CSV (the grouped section), JSON (every section) or one HTML file.

Money is written as exact decimal text everywhere (CNY amounts keep their two decimals); JSON keeps
integers as numbers and money as strings. Names are data, never markup: rich cells are ``Text``
objects (a ``[bold]`` in a name is printed as is) with terminal controls escaped (``\x1b``, as every
command prints stored text: ``workers.cli.plumbing``), HTML cells are escaped, CSV text cells are
neutralized against formula injection. Nothing depends on the wall clock: the same report renders to
the same bytes.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from workers.cli.plumbing import cell
import workers.report.charts as charts
from workers.export.csv_safety import neutralize
from workers.decimals import decimal_text, money_text

if TYPE_CHECKING:
    from workers.report.build import Report

#: Section attribute -> title, in the order every format shows them.
SECTIONS = {
    "daily": "Daily summary", "grouped": "Grouped", "invoice": "Monthly invoice per user", "models": "Per-model usage",
    "discrepancies": "Discrepancies", "margin": "Margin per channel (channels whose cost is configured)",
}
TEXT_COLUMNS = {"user_name", "key_prefix", "model", "channel", "price_group", "kind", "subject", "detail",
                "adjustment_reference"}
TABLE_WIDTH = 200


def cell_text(column: str, value: Any) -> str:
    """A cell as text: exact decimals (CNY with its fen), integers, yes/no, "" for missing."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal):
        return money_text(value) if column.endswith("_cny") else decimal_text(value)
    if isinstance(value, float):  # never expected: money and counts are never floats
        raise TypeError(f"{column}: a float reached the report ({value!r})")
    return str(value)


def json_value(column: str, value: Any) -> Any:
    """A cell for JSON: integers and booleans as such, money as exact strings, missing as null."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, bool) or hasattr(value, "dtype") and value.dtype == bool:
        return bool(value)
    if isinstance(value, Decimal):
        return cell_text(column, value)
    if hasattr(value, "item"):  # numpy integers
        return value.item()
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A frame's rows as JSON-ready dicts."""
    columns = list(frame.columns)
    return [{c: json_value(c, v) for c, v in zip(columns, row)} for row in frame.itertuples(index=False, name=None)]


def _sections(report: Report) -> list[tuple[str, str, pd.DataFrame]]:
    titled = dict(SECTIONS, grouped=f"Grouped by {', '.join(report.by)}")
    return [(name, titled[name], getattr(report, name)) for name in SECTIONS]


def _totals_rows(report: Report) -> list[tuple[str, str]]:
    return [(name, cell_text(name, value)) for name, value in report.totals.items()]


# ------------------------------------------------------------------------------------------------ table


def render_table(report: Report) -> str:
    """Rich tables, as plain text."""
    out = io.StringIO()
    console = Console(file=out, width=TABLE_WIDTH, color_system=None, force_terminal=False, soft_wrap=False,
                      emoji=False, highlight=False)
    console.print(Text(f"Billing report {report.start} .. {report.end} ({report.time_zone})"))
    if report.open_days:
        console.print(Text(f"not closed yet (figures missing or partial): {', '.join(report.open_days)}"))
    totals = Table(title="Totals", title_justify="left")
    totals.add_column("total")
    totals.add_column("value", justify="right")
    for name, value in _totals_rows(report):
        totals.add_row(cell(name), cell(value))
    console.print(totals)
    for _, title, frame in _sections(report):
        table = Table(title=title, title_justify="left")
        for column in frame.columns:
            table.add_column(str(column), justify="left" if column in TEXT_COLUMNS or column == "day" else "right")
        for row in frame.itertuples(index=False, name=None):
            table.add_row(*(cell(cell_text(c, v)) for c, v in zip(frame.columns, row)))
        if frame.empty:
            console.print(Text(f"{title}: none"))
        else:
            console.print(table)
    return out.getvalue()


# -------------------------------------------------------------------------------------------------- csv


def render_csv(report: Report) -> str:
    """The grouped section as CSV (text cells neutralized against formula injection)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    frame = report.grouped
    writer.writerow(list(frame.columns))
    for row in frame.itertuples(index=False, name=None):
        writer.writerow([neutralize(cell_text(c, v)) if c in TEXT_COLUMNS else cell_text(c, v)
                         for c, v in zip(frame.columns, row)])
    return out.getvalue()


# ------------------------------------------------------------------------------------------------- json


def report_json(report: Report) -> dict[str, Any]:
    """Every section and the totals, JSON-ready (money as exact decimal strings)."""
    return {
        "from": report.start.isoformat(), "to": report.end.isoformat(), "time_zone": report.time_zone,
        "by": list(report.by), "reference_cny_per_usd": decimal_text(report.reference_cny_per_usd),
        "open_days": report.open_days, "unpriced_channels": report.unpriced_channels,
        "totals": {name: json_value(name, value) for name, value in report.totals.items()},
        **{name: records(frame) for name, _, frame in _sections(report)},
    }


def render_json(report: Report) -> str:
    """The report as indented JSON."""
    return json.dumps(report_json(report), ensure_ascii=False, indent=2) + "\n"


# ------------------------------------------------------------------------------------------------- html

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "Microsoft YaHei", sans-serif;
       margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0 1em 1em 0; }
.warning { color: #a40; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False, name=None):
        cells = []
        for column, value in zip(frame.columns, row):
            numeric = column not in TEXT_COLUMNS and column not in ("day", "month")
            opening = '<td class="n">' if numeric else "<td>"
            cells.append(f"{opening}{html.escape(cell_text(column, value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    text = html.escape(caption)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def render_html(report: Report) -> str:
    """One self-contained HTML file: the sections as tables and three embedded PNG charts."""
    days = list(report.daily["day"])
    title = html.escape(f"Billing report {report.start} .. {report.end} ({report.time_zone})")
    parts = [f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>',
             f"<style>{STYLE}</style>\n</head>\n<body>", f"<h1>{title}</h1>"]
    if report.open_days:
        parts.append(f'<p class="warning">Not closed yet (figures missing or partial): '
                     f"{html.escape(', '.join(report.open_days))}</p>")
    if report.unpriced_channels:
        names = ", ".join(name or "(none named)" for name in report.unpriced_channels)
        parts.append(f"<p>Channels without a configured cost (left out of the margin): {html.escape(names)}</p>")
    parts.append("<h2>Totals</h2>")
    parts.append("<table><tbody>" + "".join(f"<tr><th>{html.escape(n)}</th><td class=\"n\">{html.escape(v)}</td></tr>"
                                           for n, v in _totals_rows(report)) + "</tbody></table>")
    parts.append("<h2>Charts</h2>")
    parts.append(_image(charts.daily_spend_by_model(report.rollups, days), "Daily spend per model (list USD)"))
    parts.append(_image(charts.top_users(report.rollups), f"Top {charts.TOP_USERS} users by spend (list USD)"))
    parts.append(_image(charts.revenue_against_reference(report.daily, report.reference_cny_per_usd),
                        f"Promotion revenue (CNY) against the reference price (USD x {report.reference_cny_per_usd})"))
    for _, section_title, frame in _sections(report):
        parts.append(f"<h2>{html.escape(section_title)}</h2>")
        parts.append(_html_table(frame))
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


RENDERERS: dict[str, Callable[[Report], str]] = {
    "table": render_table, "csv": render_csv, "json": render_json, "html": render_html,
}
