"""The ``metering`` command line: a public contract (docs and tests use these names and fields)."""

from __future__ import annotations

import json
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workers.cli.ledger import register as register_ledger_commands
from workers.cli.plumbing import EXIT_BAD_INPUT, emit, print_error, printable
from workers.cli.prices import register as register_pricing_commands
from metering.counting import count_request
from pricing.errors import BillingError, UnknownModel
from pricing.json_source import JsonLimitError, loads, read_json_file
from metering.images import parse_size
from metering.model_table import MODELS, fraction_text

app = typer.Typer(
    name="metering",
    help="Count, price and reconcile LLM API usage exactly.",
    no_args_is_help=True,
    add_completion=False,
)
stdout = Console()
register_pricing_commands(app)
register_ledger_commands(app)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` to stderr (escaped: ``workers.cli.plumbing``) and exit with ``code``."""
    print_error(message)
    raise typer.Exit(code)


def load_json(source: str) -> Any:
    """Parse JSON from a path or ``-`` (stdin) within ``pricing.json_source``'s limits; a problem names the line."""
    name = "<stdin>" if source == "-" else source
    try:
        text = read_json_file(source)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{name}: cannot read: {exc}")
    except JsonLimitError as exc:
        fail(f"{name}: {exc.msg}")
    try:
        return loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{name}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})")


def _image_sizes(values: list[str]) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    for value in values:
        url, sep, size = value.rpartition("=")
        if not sep or not url:
            fail(f"--image-size: must look like URL=WIDTHxHEIGHT, got {value!r}")
        try:
            sizes[url] = parse_size(size)
        except ValueError as exc:
            fail(f"--image-size: {exc}")
    return sizes


@app.command()
def count(
    request: Annotated[str, typer.Option("--request", "-r", help="Request body JSON file, or - for stdin.")],
    model: Annotated[Optional[str], typer.Option(help="Model to count for (default: the body's model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    image_size: Annotated[
        Optional[list[str]],
        typer.Option("--image-size", help="Size of a remote image: URL=WIDTHxHEIGHT (repeatable)."),
    ] = None,
    anthropic_exact: Annotated[
        bool,
        typer.Option(help="Claude: ask Anthropic's count_tokens endpoint (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL)."),
    ] = False,
) -> None:
    """Count the prompt tokens of a chat request body (OpenAI or Anthropic format, by the model)."""
    body = load_json(request)
    client = None
    if anthropic_exact:
        import anthropic

        try:
            client = anthropic.Anthropic()
        except anthropic.AnthropicError as exc:
            fail(f"--anthropic-exact: {exc}")
    try:
        result = count_request(
            body, model, image_sizes=_image_sizes(image_size or []), anthropic_client=client, fallback_to_estimate=False
        )
    except UnknownModel as exc:  # named by --model, or by the body's "model" field
        fail(f"{'--model' if model is not None else 'model'}: {exc}")
    except BillingError as exc:
        fail(str(exc))
    if as_json:
        emit(result.to_dict())
        return
    stdout.print(
        f"{escape(printable(result.model))} ({result.canonical_model}, {result.encoding or 'no encoding'}): "
        f"[bold]{result.prompt_tokens}[/] prompt tokens, {result.source}",
        highlight=False,
    )
    for note in result.notes:
        stdout.print(f"  note: {escape(printable(note))}", highlight=False)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List the models the counter knows, with provider and encoding."""
    rows = [
        {
            "model": name,
            "provider": spec.provider,
            "encoding": spec.encoding,
            "exact_offline": spec.exact_offline,
            "claude_safety_factor": None
            if spec.claude_safety_factor is None
            else fraction_text(spec.claude_safety_factor),
        }
        for name, spec in sorted(MODELS.items())
    ]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("model", "provider", "encoding", "offline count")
    for row in rows:
        kind = "exact" if row["exact_offline"] else f"estimate x{row['claude_safety_factor']}"
        table.add_row(row["model"], row["provider"], row["encoding"], kind)
    stdout.print(table)


def main() -> None:
    """Entry point for ``python -m metering`` (metering's commands; ``python -m workers`` adds the worker's)."""
    app()
