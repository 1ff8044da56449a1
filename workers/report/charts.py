"""The HTML report's charts (matplotlib, Agg), as PNG bytes: the same data gives the same bytes.

No pyplot and no global backend switch: each chart is a ``Figure`` drawn by ``FigureCanvasAgg``, under
an ``rc_context`` with the deterministic settings (``svg.hashsalt`` fixed, no ``Software`` metadata,
no date: PNGs from Agg carry none), a fixed size and DPI, and math text off (a ``$`` in a user name
stays a dollar sign). Names are drawn as given (DejaVu Sans, plus a CJK font where one is installed;
a glyph no font has is drawn as a box, never an error). Amounts become floats here, for drawing only:
every figure a reader can copy comes from the report's tables, which are exact.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import matplotlib
import pandas as pd
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Fonts tried for names, in order (those installed are used; DejaVu Sans ships with matplotlib).
FONTS = ("DejaVu Sans", "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "Microsoft YaHei", "SimHei")
SIZE, DPI = (8.0, 4.0), 100
TOP_USERS = 10
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def _installed_fonts() -> list[str]:
    available = {entry.name for entry in font_manager.fontManager.ttflist}
    return [name for name in FONTS if name in available] or ["DejaVu Sans"]


def _settings() -> dict[str, object]:
    return {
        "svg.hashsalt": "metering-report", "svg.fonttype": "path", "path.simplify": True,
        "text.parse_math": False, "text.usetex": False, "font.family": "sans-serif",
        "font.sans-serif": _installed_fonts(), "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
        "figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 9,
    }


@contextmanager
def _figure() -> Iterator[Figure]:
    with matplotlib.rc_context(_settings()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        figure = Figure(figsize=SIZE, dpi=DPI)
        FigureCanvasAgg(figure)
        yield figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None}, dpi=DPI)
    return buffer.getvalue()


def _drawn(values: pd.Series) -> list[float]:
    """Amounts as floats, for drawing only."""
    return [float(value) if isinstance(value, Decimal) else float(value or 0) for value in values]


def daily_spend_by_model(rollups: pd.DataFrame, days: list[str]) -> bytes:
    """Stacked bars: list USD per day, one stack per model."""
    with _figure() as figure:
        axes = figure.add_subplot()
        models = sorted(set(rollups["model"])) if not rollups.empty else []
        bottom = [0.0] * len(days)
        for model in models:
            rows = rollups[rollups["model"] == model]
            per_day = {day: sum(_drawn(group["usd"])) for day, group in rows.groupby("day", sort=True)}
            heights = [per_day.get(day, 0.0) for day in days]
            axes.bar(days, heights, bottom=bottom, label=model)
            bottom = [b + h for b, h in zip(bottom, heights)]
        if not models:
            axes.bar(days, bottom)
        axes.set_title("Daily spend per model (list USD)")
        axes.set_ylabel("USD")
        axes.tick_params(axis="x", labelrotation=45)
        if models:
            axes.legend(fontsize=7, loc="best")
        figure.tight_layout()
        return _png(figure)


def top_users(rollups: pd.DataFrame, limit: int = TOP_USERS) -> bytes:
    """Horizontal bars: the ``limit`` users with the highest list USD."""
    with _figure() as figure:
        axes = figure.add_subplot()
        spend: list[tuple[float, int, str]] = []
        if not rollups.empty:
            for (user_id, name), group in rollups.groupby(["user_id", "user_name"], sort=True):
                spend.append((sum(_drawn(group["usd"])), int(user_id), str(name)))
        spend.sort(key=lambda item: (-item[0], item[1]))
        shown = list(reversed(spend[:limit]))
        axes.barh([f"{name} (#{user_id})" for _, user_id, name in shown], [usd for usd, _, _ in shown],
                  color=PALETTE[0])
        axes.set_title(f"Top {limit} users by spend (list USD)")
        axes.set_xlabel("USD")
        figure.tight_layout()
        return _png(figure)


def revenue_against_reference(daily: pd.DataFrame, rate: Decimal) -> bytes:
    """Per day: revenue in CNY at the promotion's rates against the reference price (list USD x ``rate``)."""
    with _figure() as figure:
        axes = figure.add_subplot()
        days = list(daily["day"])
        positions = list(range(len(days)))
        width = 0.4
        axes.bar([p - width / 2 for p in positions], _drawn(daily["revenue_cny"]), width, label="revenue (CNY paid)")
        axes.bar([p + width / 2 for p in positions], _drawn(daily["reference_cny"]), width,
                 label=f"reference price (USD x {rate})")
        axes.set_xticks(positions, days)
        axes.set_title("Promotion revenue against the reference price (CNY)")
        axes.set_ylabel("CNY")
        axes.tick_params(axis="x", labelrotation=45)
        axes.legend(fontsize=7, loc="best")
        figure.tight_layout()
        return _png(figure)
