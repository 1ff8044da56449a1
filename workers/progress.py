"""Rich progress bars for the long commands (reconcile, export, demo); silent when quiet or not a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

#: The close's progress callback: (stage, done, total or None).
StageProgress = Callable[[str, int, "int | None"], None]


def showing(console: Console, quiet: bool) -> bool:
    """Whether to draw bars: not under --quiet, and only on a terminal."""
    return not quiet and console.is_terminal


@contextmanager
def stage_bars(console: Console, enabled: bool) -> Iterator[StageProgress | None]:
    """A ``progress(stage, done, total)`` callback drawing one bar per stage; None when disabled."""
    if not enabled:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


@contextmanager
def row_bar(console: Console, enabled: bool, label: str) -> Iterator[Callable[[int], None] | None]:
    """A ``progress(rows)`` callback drawing a counter of rows written; None when disabled."""
    with stage_bars(console, enabled) as update:
        yield None if update is None else (lambda rows: update(label, rows, None))
