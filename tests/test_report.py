"""Reports (workers.report.build): sections that add up to the roll-ups, exact money, safe rendering, charts.

Data is booked through the real ledger API and closed by the real close (tests/billing_data.py), except
where a figure must be known in advance: there the roll-up rows are inserted directly and the expected
figures are derived in the test from the bundled price table (stated next to each assertion).
"""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from metering.ledger.meter import Meter
from tests.billing_data import (
    CALENDAR,
    CUSTOMERS,
    DAY1,
    DAY2,
    book_customers,
    booked_and_closed,
    decimal_sum_sql,
    insert_rollup,
    mark_closed,
    scalar,
)
from workers.errors import InvalidArgument
from workers.export.exporter import export
from workers.report.build import BY_FIELDS, Report, build_report, render

PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
DAY3 = DAY2 + timedelta(days=1)


@pytest.fixture
def closed(meter: Meter) -> Meter:
    """Six customers, two days of traffic, both days closed."""
    booked_and_closed(meter)
    return meter


def report(meter: Meter, by: tuple[str, ...] = ("day",), last: object = DAY3) -> Report:
    return build_report(meter.engine, meter.prices, DAY1, last, by=by, calendar=CALENDAR)  # type: ignore[arg-type]


def test_json_totals_and_every_section_equal_the_rollups_sums(closed: Meter) -> None:
    data = json.loads(render(report(closed, by=("user", "model")), "json"))
    where = "day >= :first AND day <= :last"
    days = {"first": DAY1.isoformat(), "last": DAY3.isoformat()}
    for name in ("requests", "succeeded", "failed", "aborted", "quota"):
        expected = scalar(closed, f"SELECT SUM({name}) FROM daily_rollups WHERE {where}", **days)
        assert data["totals"][name] == expected, name
        for section in ("daily", "grouped", "invoice"):
            assert sum(row[name] for row in data[section]) == expected, (section, name)
        assert sum(row[name] for row in data["models"]) == expected
    for name in ("usd", "revenue_cny"):
        expected = decimal_sum_sql(closed, name, "daily_rollups", where, **days)
        assert Decimal(data["totals"][name]) == expected, name
        for section in ("daily", "grouped", "invoice"):
            assert sum(Decimal(row[name]) for row in data[section]) == expected, (section, name)
        assert isinstance(data["totals"][name], str)  # exact decimal text, never a JSON float
    # reference price = list USD x 7.1 (price_table.yaml: reference_rates CNY per_usd "7.1")
    assert Decimal(data["totals"]["reference_cny"]) == Decimal(data["totals"]["usd"]) * Decimal("7.1")
    assert data["totals"]["requests"] > 0 and data["totals"]["failed"] > 0
    assert [row["day"] for row in data["daily"]] == ["2026-11-02", "2026-11-03", "2026-11-04"]
    assert [row["closed"] for row in data["daily"]] == [True, True, False] and data["open_days"] == ["2026-11-04"]
    assert data["daily"][2]["requests"] == 0 and data["daily"][2]["usd"] == "0"
    assert {row["user_name"] for row in data["grouped"]} == {name for name, _, _ in CUSTOMERS}
    assert data["by"] == ["user", "model"] and set(data["grouped"][0]) >= {"user_id", "user_name", "model"}


def test_report_invoice_equals_the_invoice_export(closed: Meter, tmp_path: Path) -> None:
    built = report(closed)
    export(closed.engine, "invoice", DAY1, DAY3, tmp_path / "invoice.csv", calendar=CALENDAR)
    exported = pd.read_csv(tmp_path / "invoice.csv", dtype=str, keep_default_na=False)
    from_report = json.loads(render(built, "json"))["invoice"]
    assert len(from_report) == len(exported) == len(CUSTOMERS)
    for line, (_, row) in zip(from_report, exported.iterrows()):
        assert line["user_id"] == int(row["user_id"]) and line["month"] == row["month"]
        for name in ("requests", "succeeded", "failed", "aborted", "tokens", "quota"):
            assert line[name] == int(row[name])
        assert (line["usd"], line["revenue_cny"]) == (row["usd"], row["revenue_cny"])


def test_grouping_by_each_field(closed: Meter) -> None:
    for field, columns in BY_FIELDS.items():
        grouped = report(closed, by=(field,)).grouped
        assert list(grouped.columns[: len(columns)]) == list(columns)
        assert grouped["quota"].dtype == "int64" and all(isinstance(v, Decimal) for v in grouped["usd"])
        assert int(grouped["quota"].sum()) == scalar(closed, "SELECT SUM(quota) FROM daily_rollups")
    keyed = report(closed, by=("user", "key", "channel")).grouped
    assert list(keyed.columns[:5]) == ["user_id", "user_name", "key_id", "key_prefix", "channel"]
    assert all(prefix.startswith("sk-mtr-") for prefix in keyed["key_prefix"])


def test_margin_of_a_configured_channel(meter: Meter) -> None:
    """Known rows, so the margin is known: azure-east costs 0.9 of list price (price_table.yaml channels)."""
    book_customers(meter)
    user = meter.find_user("-x")
    key = meter.keys(user)[0]["id"]
    insert_rollup(meter, user_id=user, key_id=key, model="gpt-4o", channel="azure-east", requests=3, succeeded=3,
                  quota=5_000_000, usd="10", revenue_cny="10.00")
    insert_rollup(meter, user_id=user, key_id=key, model="gpt-4o", channel="", requests=1, succeeded=1,
                  quota=500_000, usd="1", revenue_cny="1.00")
    mark_closed(meter, DAY1)
    built = report(meter, last=DAY1)
    [azure] = built.margin.to_dict("records")
    # upstream cost: 10 USD list x 0.9 = 9 USD; at the reference 7.1 CNY/USD = 63.9 CNY; revenue 10.00 CNY
    # (1 CNY = $1 promotion: $10 of credit cost the customer 10 CNY), so the margin is 10.00 - 63.9 = -53.9.
    assert azure["channel"] == "azure-east" and azure["cost_ratio"] == Decimal("0.9")
    assert azure["upstream_cost_usd"] == Decimal("9") and azure["upstream_cost_cny"] == Decimal("63.9")
    assert azure["margin_cny"] == Decimal("-53.9") and azure["revenue_cny"] == Decimal("10.00")
    assert built.unpriced_channels == [""]  # the row with no channel named is left out of the margin
    totals = json.loads(render(built, "json"))["totals"]
    assert (totals["margin_revenue_cny"], totals["upstream_cost_cny"], totals["margin_cny"]) == ("10.00", "63.90", "-53.90")
    # revenue 11.00 CNY against the reference price of the same $11 of list value: 11 x 7.1 = 78.1 CNY
    assert (totals["revenue_cny"], totals["reference_cny"]) == ("11.00", "78.10")


def test_discrepancies_section_lists_what_the_closes_found(meter: Meter) -> None:
    from sqlalchemy import insert

    from metering.ledger.tables import Discrepancy

    book_customers(meter)
    with meter.engine.begin() as connection:
        connection.execute(insert(Discrepancy.__table__).values(  # type: ignore[attr-defined]
            day=DAY1.isoformat(), kind="price", subject="req-<b>", user_id=1, expected=100, actual=120,
            detail="charged 120, re-priced 100", created_at=CALENDAR.bounds(DAY2)[0]))
    built = report(meter, last=DAY1)
    assert built.discrepancies.to_dict("records") == [{
        "day": "2026-11-02", "kind": "price", "subject": "req-<b>", "user_id": 1, "expected": 100, "actual": 120,
        "detail": "charged 120, re-priced 100", "adjustment_reference": ""}]
    assert json.loads(render(built, "json"))["totals"]["discrepancies"] == 1
    assert "req-&lt;b&gt;" in render(built, "html") and "req-<b>" not in render(built, "html")


def test_html_is_self_contained_with_three_png_charts_and_escaped_names(closed: Meter) -> None:
    built = report(closed, by=("user",))
    page = render(built, "html")
    images = PNG.findall(page)
    assert len(images) == 3
    assert all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page.lower()
    assert "张伟, &quot;VIP&quot;" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    assert render(report(closed, by=("user",)), "html") == page  # the same data gives the same bytes (charts too)


def test_table_prints_names_literally_and_csv_neutralizes_them(meter: Meter) -> None:
    book_customers(meter)
    user = meter.create_user("[bold]boss[/bold]")
    meter.create_key(user, "k")
    key = next(k["id"] for k in meter.keys(user))
    insert_rollup(meter, user_id=user, key_id=key, model="gpt-4o", requests=1, succeeded=1, quota=-7, usd="-0.000014")
    formula = meter.find_user("=cmd|' /C calc'!A0")
    formula_key = next(k["id"] for k in meter.keys(formula))
    insert_rollup(meter, user_id=formula, key_id=formula_key, model="gpt-4o", requests=2, succeeded=2, quota=10, usd="0.00002")
    built = report(meter, by=("user",), last=DAY1)
    table = render(built, "table")
    assert "[bold]boss[/bold]" in table and "=cmd|' /C calc'!A0" in table and "not closed yet" in table
    lines = render(built, "csv").splitlines()
    assert lines[0] == "user_id,user_name,requests,succeeded,failed,aborted,tokens,quota,usd,revenue_cny"
    assert any(line.endswith(",-7,-0.000014,0.00") and "[bold]boss[/bold]" in line for line in lines)
    assert any("'=cmd|' /C calc'!A0" in line for line in lines)


def test_a_report_of_days_without_data(meter: Meter) -> None:
    built = report(meter)
    assert built.open_days == ["2026-11-02", "2026-11-03", "2026-11-04"] and built.grouped.empty
    data = json.loads(render(built, "json"))
    assert data["totals"]["quota"] == 0 and data["totals"]["usd"] == "0" and len(data["daily"]) == 3
    assert len(PNG.findall(render(built, "html"))) == 3
    assert "none" in render(built, "table")


def test_bad_arguments_raise_a_typed_error_naming_the_field(meter: Meter) -> None:
    cases = [({"start": DAY2, "end": DAY1}, "start"), ({"by": ("day", "region")}, "by"), ({"by": ()}, "by"),
             ({"by": "user"}, "by"), ({"by": ("day", "day")}, "by"), ({"end": "2026-11-03"}, "end")]
    for arguments, field in cases:
        call = {"start": DAY1, "end": DAY2, "by": ("day",)} | arguments
        with pytest.raises(InvalidArgument) as raised:
            build_report(meter.engine, meter.prices, call["start"], call["end"], by=call["by"], calendar=CALENDAR)
        assert raised.value.field == field and isinstance(raised.value, ValueError)
    with pytest.raises(InvalidArgument) as raised:
        render(report(meter), "pdf")
    assert raised.value.field == "format"
