"""The usage export's fast lines are csv.writer's lines, and several processes write the same file as one.

``UsagePlan.text`` builds each line with ``",".join`` from columns quoted and neutralized at once, and
the database joins the integer cells (``joined_integers``: printf on SQLite, concat_ws elsewhere). The
oracle here is the plain way: the raw cells read with SQL, neutralized one by one with
``workers.export.csv_safety.neutralize`` and written by ``csv.writer``. Texts are hostile on purpose: commas,
quotes, CR and LF, formula starts (ASCII and fullwidth), Chinese, emoji.
"""

from __future__ import annotations

import csv
import io
import string
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from metering.ledger.meter import Meter
from pricing.usage import UsageRecord
from tests.traffic import CALENDAR, body, moment
from workers.export.csv_safety import neutralize
from workers.export.exporter import export, manifest_path
from workers.export.columns import column_names
from workers.export.kinds import TOKEN_FIELDS, UsagePlan
from workers.export.times import iso_utc

DAY = date(2026, 11, 2)
HOSTILE = ("=HYPERLINK(\"http://x\")", "+1", "-x", "@SUM(1)", "@\tx", "＝1+1", "－5", '张伟, "VIP"', "a\r\nb", "a\nb",
           "a,b", 'say "hi"', "plain", "😀 ok", "x" * 40)


def oracle(rows: list[dict[str, Any]], day_of: Any) -> bytes:
    """The CSV text of usage rows the plain way: csv.writer over cells neutralized one by one."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(column_names("usage"))
    for r in rows:
        texts = [neutralize(r[name]) for name in ("request_id", "user_name", "key_prefix", "model", "channel",
                                                  "price_group", "status", "outcome", "source")]
        writer.writerow([day_of(r["occurred_at"]), iso_utc(r["occurred_at"]), texts[0], r["user_id"], texts[1],
                         r["key_id"], *texts[2:], *(r[name] for name in TOKEN_FIELDS), r["quota"], r["usd"],
                         iso_utc(r["price_version"])])
    return buffer.getvalue().encode("utf-8")


def usage_rows(meter: Meter) -> list[dict[str, Any]]:
    sql = ("SELECT e.occurred_at, e.request_id, e.user_id, u.name AS user_name, e.key_id, k.display_prefix AS key_prefix, "
           "e.model, COALESCE(e.channel, '') AS channel, e.price_group, e.status, e.outcome, e.source, "
           + ", ".join(f"e.{name}" for name in TOKEN_FIELDS) + ", e.quota, e.usd, e.price_version "
           "FROM usage_events e JOIN users u ON u.id = e.user_id JOIN api_keys k ON k.id = e.key_id ORDER BY e.id")
    with meter.engine.connect() as connection:
        found = [dict(r) for r in connection.execute(text(sql)).mappings()]
    for row in found:  # SQLite hands timestamps back as their stored text
        for name in ("occurred_at", "price_version"):
            if isinstance(row[name], str):
                row[name] = datetime.fromisoformat(row[name])
    return found


def book_hostile(meter: Meter) -> None:
    """One user per hostile name, each with a request whose id and channel are hostile too."""
    for number, name in enumerate(HOSTILE):
        uid = meter.create_user(name)
        meter.topup(uid, "5", "CNY", f"order-{number}", at=moment(DAY, 10))
        secret = meter.create_key(uid, f"key-{number}")
        for repeat, model in enumerate(("gpt-4o", "claude-sonnet-4-5")):
            request_id = f"{HOSTILE[(number + repeat) % len(HOSTILE)]}#{number}-{repeat}"
            hold = meter.authorize(secret, body(model, 5 + number), request_id, at=moment(DAY, 600 + 97 * number + repeat),
                                   channel=HOSTILE[(number + 3 + repeat) % len(HOSTILE)])
            usage = UsageRecord(provider="openai" if model.startswith("gpt") else "anthropic", model=model,
                                input_tokens=hold.prompt_tokens, output_tokens=7 * number + 1)
            meter.settle(hold, usage=usage)


def test_usage_lines_are_what_csv_writer_writes_on_every_database(meter: Meter, tmp_path: Path) -> None:
    book_hostile(meter)
    out = tmp_path / "usage.csv"
    export(meter.engine, "usage", DAY, DAY, out, calendar=CALENDAR)
    expected = oracle(usage_rows(meter), lambda moment: CALENDAR.day_of(moment).isoformat())
    assert out.read_bytes() == expected
    assert len(expected.splitlines()) > len(HOSTILE) * 2  # (cells with line breaks add lines)


@pytest.mark.parametrize("jobs", [2, None])
def test_several_processes_write_the_same_bytes_and_manifest_as_one(tmp_path: Path, jobs: int | None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.export.parallel as export_parallel

    monkeypatch.setattr(export_parallel, "SLICE_IDS", 3)  # many slices, so their order and merging matter
    monkeypatch.setattr(export_parallel, "PARALLEL_MIN_ROWS", 1)  # None: parallel as soon as there are rows
    monkeypatch.setattr(export_parallel, "default_jobs", lambda: 2)
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        book_hostile(meter)
        export(meter.engine, "usage", DAY, DAY, tmp_path / "one.csv", calendar=CALENDAR, jobs=1)
        export(meter.engine, "usage", DAY, DAY, tmp_path / "many.csv", calendar=CALENDAR, jobs=jobs)
    finally:
        meter.close()
    one, many = manifest_path(tmp_path / "one.csv"), manifest_path(tmp_path / "many.csv")
    assert (tmp_path / "many.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert many.read_text().replace("many.csv", "one.csv") == one.read_text()


def test_jobs_must_be_a_whole_number_of_processes(tmp_path: Path) -> None:
    from workers.errors import InvalidArgument

    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(InvalidArgument, match="jobs"):
                export(meter.engine, "usage", DAY, DAY, tmp_path / "x.csv", calendar=CALENDAR, jobs=bad)  # type: ignore[arg-type]
    finally:
        meter.close()
    assert not (tmp_path / "x.csv").exists()


cells = st.text(alphabet=st.sampled_from(string.printable + "＝＋－＠张伟😀\x00"), max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(cells, cells, cells, cells, st.one_of(st.none(), cells), cells,
                          st.lists(st.integers(-2**63, 2**63 - 1), min_size=9, max_size=9)), min_size=1, max_size=20))
def test_a_chunk_is_written_as_csv_writer_writes_it(rows: list[tuple[Any, ...]]) -> None:
    """Without a database: ``UsagePlan.text`` against csv.writer, for any text cells and any 64-bit integers."""
    plan = UsagePlan(DAY, DAY, CALENDAR)
    at = CALENDAR.bounds(DAY)[0] + timedelta(hours=3)
    stored = at.isoformat(sep=" ", timespec="microseconds")  # as SQLite keeps a timestamp
    chunk, expected_rows = [], []
    for request_id, name, prefix, model, channel, group, integers in rows:
        chunk.append((stored, request_id, 7, name, 9, prefix, model, "" if channel is None else channel, group,
                      "charged", "completed", "upstream", ",".join(map(str, integers)), "0.5", stored))
        expected_rows.append({"occurred_at": at, "request_id": request_id, "user_id": 7, "user_name": name, "key_id": 9,
                              "key_prefix": prefix, "model": model, "channel": channel or "", "price_group": group,
                              "status": "charged", "outcome": "completed", "source": "upstream",
                              **dict(zip((*TOKEN_FIELDS, "quota"), integers)), "usd": "0.5", "price_version": at})
    header_end = len(",".join(column_names("usage"))) + 2
    assert plan.text(chunk).encode("utf-8") == oracle(expected_rows, lambda _: DAY.isoformat())[header_end:]
