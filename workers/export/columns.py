"""The stable columns of each CSV export: name, type and meaning (docs/exports.md shows these very tables).

Types: ``text`` (neutralized against formula injection), ``integer``, ``decimal`` (exact decimal text,
never rounded through float), ``date`` (YYYY-MM-DD in the business time zone), ``month`` (YYYY-MM),
``timestamp`` (ISO 8601 in UTC, always with microseconds: ``2026-11-27T08:00:00.000000Z``).
A column is only ever added at the end; names and meanings never change.
"""

from __future__ import annotations

from typing import NamedTuple


class ExportColumn(NamedTuple):
    """One column of an export."""

    name: str
    type: str  # text | integer | decimal | date | month | timestamp
    meaning: str


TOKEN_COLUMNS = (
    ExportColumn("input_tokens", "integer", "uncached input tokens"),
    ExportColumn("cached_input_tokens", "integer", "input tokens read from the provider's prompt cache"),
    ExportColumn("cache_write_5m_tokens", "integer", "input tokens written to a 5-minute prompt cache"),
    ExportColumn("cache_write_1h_tokens", "integer", "input tokens written to a 1-hour prompt cache"),
    ExportColumn("output_tokens", "integer", "output tokens (reasoning included)"),
    ExportColumn("reasoning_tokens", "integer", "the reasoning part of output_tokens (informational, not priced apart)"),
    ExportColumn("images", "integer", "images generated or billed per item"),
    ExportColumn("web_search_requests", "integer", "web searches billed per request"),
)

USAGE_COLUMNS = (
    ExportColumn("day", "date", "business day of occurred_at, in the export's time zone"),
    ExportColumn("occurred_at", "timestamp", "when the request was made (it is priced at this time)"),
    ExportColumn("request_id", "text", "the gateway's request id (unique)"),
    ExportColumn("user_id", "integer", "the customer's id"),
    ExportColumn("user_name", "text", "the customer's name"),
    ExportColumn("key_id", "integer", "the API key's id"),
    ExportColumn("key_prefix", "text", "the key's display prefix (sk-mtr-AbCd...); never the secret or its hash"),
    ExportColumn("model", "text", "the model the request named"),
    ExportColumn("channel", "text", "the upstream channel that served it (empty when none was named)"),
    ExportColumn("price_group", "text", "the customer's pricing group at the time"),
    ExportColumn("status", "text", "charged, or pending (deferred usage not folded into the balance yet)"),
    ExportColumn("outcome", "text", "completed, or how a stream ended (aborted: billed for what was delivered)"),
    ExportColumn("source", "text", "where the token counts come from: upstream, local or estimated"),
    *TOKEN_COLUMNS,
    ExportColumn("quota", "integer", "quota units charged (500,000 units = $1 of list price, group multiplier applied)"),
    ExportColumn("usd", "decimal", "exact list-price value in USD, before the group multiplier"),
    ExportColumn("price_version", "timestamp", "effective_from of the price version the request was priced by"),
)

ROLLUP_COLUMNS = (
    ExportColumn("day", "date", "the closed business day that counted these requests"),
    ExportColumn("occurred_day", "date", "the business day the requests happened (earlier than day for late events)"),
    ExportColumn("user_id", "integer", "the customer's id"),
    ExportColumn("user_name", "text", "the customer's name"),
    ExportColumn("key_id", "integer", "the API key's id"),
    ExportColumn("key_prefix", "text", "the key's display prefix; never the secret or its hash"),
    ExportColumn("model", "text", "the model"),
    ExportColumn("channel", "text", "the upstream channel (empty when none was named)"),
    ExportColumn("price_group", "text", "the pricing group"),
    ExportColumn("requests", "integer", "requests: succeeded + failed + aborted"),
    ExportColumn("succeeded", "integer", "requests that completed"),
    ExportColumn("failed", "integer", "holds released because the upstream call failed (never billed)"),
    ExportColumn("aborted", "integer", "streams cut short (billed for what was delivered) and holds expired unsettled"),
    *TOKEN_COLUMNS,
    ExportColumn("quota", "integer", "quota units charged"),
    ExportColumn("usd", "decimal", "exact list-price value in USD"),
    ExportColumn("revenue_cny", "decimal", "revenue in CNY at the rate the customer paid (rounded to the fen per row)"),
    ExportColumn("upstream_cost_usd", "decimal", "usd x the channel's cost_ratio; empty where the channel's cost is not configured"),
)

INVOICE_COLUMNS = (
    ExportColumn("user_id", "integer", "the customer's id"),
    ExportColumn("user_name", "text", "the customer's name"),
    ExportColumn("price_group", "text", "the pricing group (a user whose group changed has one line per group)"),
    ExportColumn("month", "month", "the calendar month of the closed days (roll-up day, business time zone)"),
    ExportColumn("requests", "integer", "requests: succeeded + failed + aborted"),
    ExportColumn("succeeded", "integer", "requests that completed"),
    ExportColumn("failed", "integer", "failed requests (never billed)"),
    ExportColumn("aborted", "integer", "aborted streams and expired holds"),
    ExportColumn("tokens", "integer", "input + cached_input + cache writes (5m, 1h) + output tokens"),
    ExportColumn("quota", "integer", "quota units charged"),
    ExportColumn("usd", "decimal", "exact list-price value in USD"),
    ExportColumn("revenue_cny", "decimal", "revenue in CNY at the rates the customer paid (sum of the roll-up rows)"),
)

#: Every export kind and its columns, in file order.
COLUMNS: dict[str, tuple[ExportColumn, ...]] = {
    "usage": USAGE_COLUMNS,
    "rollup": ROLLUP_COLUMNS,
    "invoice": INVOICE_COLUMNS,
}


def column_names(kind: str) -> list[str]:
    """The header of an export of ``kind``."""
    return [column.name for column in COLUMNS[kind]]


def columns_markdown(kind: str) -> str:
    """The Markdown table of an export's columns (as in docs/exports.md)."""
    lines = ["| column | meaning | type |", "| --- | --- | --- |"]
    lines += [f"| `{c.name}` | {c.meaning} | {c.type} |" for c in COLUMNS[kind]]
    return "\n".join(lines)
