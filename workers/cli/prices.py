"""Pricing commands of the ``metering`` command line: quote, quote-topup and ``prices ...``."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workers.cli.plumbing import EXIT_BAD_INPUT, cell, emit, json_safe, print_error, printable
from pricing.errors import BillingError, FieldError, PriceNotFound, PriceTableError, UnknownModel
from pricing.quote import decimal_text, now, price
from pricing.recharge import amount_text, quote_topup
from pricing.table import PriceTable, default_price_table_path, load_price_table
from pricing.usage import MAX_COUNT, InvalidUsage, UsageRecord

stdout = Console()
stderr = Console(stderr=True)

PricesOption = Annotated[
    Optional[Path],
    typer.Option("--prices", help="Price table YAML (default: $METERING_PRICE_TABLE, else the bundled table)."),
]
AtOption = Annotated[Optional[str], typer.Option("--at", help="Event time, ISO 8601 with a time zone (default: now).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
Count = Annotated[int, typer.Option(min=0, max=MAX_COUNT)]
#: A usage field of either provider -> the ``quote`` flag that sets it (errors name the flag).
USAGE_FLAGS = {
    "prompt_tokens": "--input", "input_tokens": "--input", "completion_tokens": "--output", "output_tokens": "--output",
    "cached_tokens": "--cached-input", "cache_read_input_tokens": "--cached-input",
    "cache_creation_input_tokens": "--cache-write", "cache_creation": "--cache-write",
    "ephemeral_5m_input_tokens": "--cache-write", "ephemeral_1h_input_tokens": "--cache-write-1h",
    "reasoning_tokens": "--reasoning", "images": "--images", "web_search_requests": "--web-search",
}

prices_app = typer.Typer(help="Validate, show, export and import the price table.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    print_error(message)
    return typer.Exit(EXIT_BAD_INPUT)


def _flagged(exc: BillingError, flags: dict[type, str]) -> str:
    """An error's message naming the command's flag: a usage field by its flag, else by the error's type."""
    if isinstance(exc, FieldError) and not exc.field.startswith("--"):
        last = exc.field.rsplit(".", 1)[-1]
        flag = USAGE_FLAGS.get(last) or flags.get(FieldError, exc.field)
        return f"{flag}: {exc.reason}"
    for kind, flag in flags.items():
        if isinstance(exc, kind) and not str(exc).startswith("--"):
            return f"{flag}: {exc}"
    return str(exc)


def _table(path: Path | None) -> PriceTable:
    try:
        return load_price_table(path)
    except PriceTableError as exc:
        raise _problems(exc) from None


def _problems(exc: PriceTableError) -> typer.Exit:
    """Print every problem as ``PATH:LINE: field: problem`` and return the exit to raise."""
    for problem in exc.problems:  # a problem quotes the file's keys, which may hold terminal controls
        stderr.print(printable(problem), highlight=False, soft_wrap=True, markup=False)
    return typer.Exit(EXIT_BAD_INPUT)


def _when(at: str | None, flag: str = "--at") -> datetime:
    if at is None:
        return now()
    try:
        moment = datetime.fromisoformat(at)
    except ValueError:
        raise _fail(f"{flag}: not an ISO 8601 time: {at!r}") from None
    if moment.tzinfo is None:
        raise _fail(f"{flag}: {at!r} has no time zone (add Z or +08:00)")
    try:
        moment.timestamp()  # 0001-01-01T00:00+01:00 is before the first representable instant
    except (OverflowError, ValueError):
        raise _fail(f"{flag}: {at!r} is out of range") from None
    return moment


def _usage(
    table: PriceTable, model: str, input_tokens: int, output: int, cached: int, write: int, write_1h: int,
    reasoning: int, images: int, web_search: int,
) -> UsageRecord:
    """A usage record from the numbers exactly as the model's provider reports them."""
    entry, _ = table.resolve(model)
    if entry.provider == "anthropic":
        if write_1h > write:
            raise InvalidUsage("--cache-write-1h", "is the 1-hour part of --cache-write and cannot exceed it")
        usage: dict[str, Any] = {
            "input_tokens": input_tokens,
            "output_tokens": output,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": write,
            "cache_creation": {"ephemeral_5m_input_tokens": write - write_1h, "ephemeral_1h_input_tokens": write_1h},
            "server_tool_use": {"web_search_requests": web_search},
        }
        return UsageRecord.from_anthropic(model, usage, images=images)
    if write or write_1h:
        raise InvalidUsage("--cache-write", "OpenAI models report no cache writes: drop --cache-write/--cache-write-1h")
    usage = {
        "prompt_tokens": input_tokens,
        "completion_tokens": output,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    return UsageRecord.from_openai(model, usage, images=images, web_search_requests=web_search)


def register(app: typer.Typer) -> None:
    """Add the pricing commands to the main ``metering`` app."""
    app.command("quote")(quote)
    app.command("quote-topup")(quote_topup_command)
    app.add_typer(prices_app, name="prices")


def quote(
    model: Annotated[str, typer.Option("--model", help="Model name or alias as the gateway received it.")],
    input_tokens: Annotated[
        int, typer.Option("--input", min=0, max=MAX_COUNT, help="OpenAI: prompt_tokens (cached included). Anthropic: input_tokens.")
    ],
    output: Annotated[int, typer.Option("--output", min=0, max=MAX_COUNT, help="completion_tokens / output_tokens.")],
    cached_input: Annotated[
        int, typer.Option("--cached-input", min=0, max=MAX_COUNT, help="OpenAI: cached_tokens. Anthropic: cache_read_input_tokens.")
    ] = 0,
    cache_write: Annotated[
        int, typer.Option("--cache-write", min=0, max=MAX_COUNT, help="Anthropic: cache_creation_input_tokens (all of them).")
    ] = 0,
    cache_write_1h: Annotated[
        int, typer.Option("--cache-write-1h", min=0, max=MAX_COUNT, help="Anthropic: the part of --cache-write with a 1-hour TTL.")
    ] = 0,
    reasoning: Annotated[
        int, typer.Option("--reasoning", min=0, max=MAX_COUNT, help="OpenAI: reasoning_tokens (a part of --output, not added).")
    ] = 0,
    images: Annotated[int, typer.Option("--images", min=0, max=MAX_COUNT, help="Images, for per-image prices.")] = 0,
    requests: Annotated[int, typer.Option("--requests", min=0, max=MAX_COUNT, help="Requests, for per-request prices.")] = 1,
    web_search: Annotated[int, typer.Option("--web-search", min=0, max=MAX_COUNT, help="Web searches, for per-search prices.")] = 0,
    group: Annotated[str, typer.Option("--group", help="Pricing group (its multiplier applies).")] = "default",
    at: AtOption = None,
    as_json: JsonOption = False,
    prices: PricesOption = None,
) -> None:
    """Price one request's usage: exact USD and integer quota, by the price version in force at --at."""
    table = _table(prices)
    try:
        usage = _usage(
            table, model, input_tokens, output, cached_input, cache_write, cache_write_1h, reasoning, images, web_search
        )
        priced = price(table, usage, _when(at), group, requests=requests)
    except BillingError as exc:
        flags: dict[type, str] = {UnknownModel: "--model"}
        if isinstance(exc, PriceNotFound):  # an unknown group, or no price version yet at --at
            flags[PriceNotFound] = "--group" if group not in table.groups else "--at"
        raise _fail(_flagged(exc, flags)) from None
    if as_json:
        emit(priced.to_dict())
        return
    stdout.print(
        f"{escape(printable(priced.model))} (priced as {escape(printable(priced.priced_model))}, version of "
        f"{priced.price_version.isoformat()}): ${decimal_text(priced.usd)} list, x{decimal_text(priced.multiplier)} "
        f"({escape(printable(priced.group))}) -> "
        f"[bold]{priced.quota}[/] quota units",
        highlight=False,
    )
    if priced.fallback_used:
        stdout.print("  note: unknown model priced with the table's fallback model", highlight=False)


def quote_topup_command(
    amount: Annotated[str, typer.Option("--amount", help="Amount paid, e.g. 10 or 99.90.")],
    currency: Annotated[str, typer.Option("--currency", help="CNY, USDT or USD.")],
    at: AtOption = None,
    as_json: JsonOption = False,
    prices: PricesOption = None,
) -> None:
    """What a payment buys: USD credit and quota at the recharge rate in force, and its reference price."""
    table = _table(prices)
    try:
        result = quote_topup(table, amount, currency.upper(), _when(at))
    except BillingError as exc:
        raise _fail(_flagged(exc, {FieldError: "--amount", PriceNotFound: "--currency"})) from None
    if as_json:
        emit(result.to_dict())
        return
    reference = (
        f" (the same credit costs {decimal_text(result.reference_price)} {result.reference_currency} at the official rate)"
        if result.reference_price is not None
        else ""
    )
    stdout.print(
        f"{escape(printable(amount_text(result.amount)))} {result.currency} at {escape(printable(result.label))}: "
        f"${decimal_text(result.usd_credit)} credit = "
        f"[bold]{result.quota}[/] quota units{reference}",
        highlight=False,
    )


@prices_app.command("validate")
def validate(path: Annotated[Optional[Path], typer.Argument(help="Price table YAML (default: the one in use).")] = None) -> None:
    """Validate a price table; every problem is printed as PATH:LINE: field: problem (exit 2)."""
    table = _table(path)
    stdout.print(f"ok: {escape(printable(table.source))}: {len(table.models)} models, {len(table.groups)} groups",
                 highlight=False)


@prices_app.command("show")
def show(
    model: Annotated[Optional[str], typer.Option("--model", help="Only this model (name or alias).")] = None,
    at: AtOption = None,
    as_json: JsonOption = False,
    prices: PricesOption = None,
) -> None:
    """Show the prices in force at --at (USD per 1M tokens)."""
    table = _table(prices)
    moment = _when(at).timestamp()
    try:
        entries = [table.resolve(model)[0]] if model else list(table.models.values())
    except BillingError as exc:
        raise _fail(f"--model: {exc}") from None
    rows = []
    for entry in entries:
        try:
            version = entry.version_at(moment).version
        except BillingError:
            continue
        rows.append({"model": entry.name, "provider": entry.provider, "aliases": list(entry.aliases),
                     **json.loads(version.model_dump_json(exclude_none=True))})
    if as_json:
        emit(rows)
        return
    table_out = Table("model", "input", "cached", "output", "since", title=cell(f"Prices in force ({table.source})"))
    for row in rows:
        table_out.add_row(cell(row["model"]), row["input"], row.get("cached_input", "-"), row["output"], row["effective_from"][:10])
    stdout.print(table_out)


@prices_app.command("export")
def export(
    format_: Annotated[str, typer.Option("--format", help="Only one-api (one-api / new-api options JSON).")] = "one-api",
    at: AtOption = None,
    prices: PricesOption = None,
) -> None:
    """Export the prices in force at --at as one-api / new-api options JSON (on stdout)."""
    from pricing.oneapi import dumps_oneapi, export_caveats, export_oneapi, lossy_keys

    if format_ != "one-api":
        raise _fail(f"--format: only one-api is supported, got {format_!r}")
    table, moment = _table(prices), _when(at)
    data = export_oneapi(table, moment)
    print(json_safe(dumps_oneapi(data)), end="")
    # What the gateways cannot express goes to stderr, so stdout stays a clean JSON document.
    for caveat in export_caveats(table, moment):
        stderr.print(f"note: {printable(caveat)}", highlight=False, soft_wrap=True, markup=False)
    for section, key in lossy_keys(data):
        stderr.print(f"note: {section}[{key!r}] rounded to 12 significant digits", highlight=False, markup=False)


@prices_app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="one-api / new-api options JSON file.")],
    effective_from: Annotated[
        Optional[str], typer.Option("--effective-from", help="When the imported prices take effect (default: now).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the YAML here (default: stdout).")] = None,
    prices: PricesOption = None,
) -> None:
    """Turn one-api / new-api options JSON into a price table YAML (sections it lacks come from the table in use)."""
    from pricing.json_source import JsonLimitError, read_json_file
    from pricing.oneapi import import_oneapi

    try:
        text = read_json_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"{path}: cannot read: {exc}") from None
    except JsonLimitError as exc:
        raise _fail(f"{path}: {exc.msg}") from None
    try:
        yaml_text = import_oneapi(text, effective_from=_when(effective_from, "--effective-from"), template=_table(prices),
                                  source=str(path))
    except PriceTableError as exc:
        raise _problems(exc) from None
    if out is None:
        print(yaml_text, end="")
        return
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(yaml_text, encoding="utf-8")
    temporary.replace(out)  # never a half-written table
    stdout.print(f"wrote {escape(printable(out))}", highlight=False)


__all__ = ["default_price_table_path", "prices_app", "register"]
