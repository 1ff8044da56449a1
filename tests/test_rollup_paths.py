"""The close's two ways of reading a day agree: the database's GROUP BY and the row-by-row pass.

On SQLite and PostgreSQL ``workers.close.rollup`` rolls up a day's own events in SQL and re-prices them there
with the integer formula of ``pricing.quote.quota``'s precompiled path, handing back to Python only the
events it cannot clear. The row-by-row pass (MariaDB's path, and the fallback) judges every event with
``pricing.quote.quota`` itself. For any events both must give the same roll-up and the same
discrepancies, in the same order, so hypothesis generates days of events here: charged right and wrong,
prompt counts near and past the token audit's tolerance, a price version that starts in the middle of
the day, fractional group multipliers, long-context prompts, counts beyond the SQL's 64-bit-safe range,
USD texts of every shape, events at the day's edges and past the watermark. The day is sliced into many
small GROUP BY slices so that merging slices is exercised too.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, delete, func, insert, select

from metering.ledger.meter import Meter
from metering.ledger.tables import ApiKey
from pricing.quote import quota
from pricing.table import PriceTable, default_price_table_path, parse_price_table
from pricing.usage import UsageRecord
from tests.databases import fresh_database
from tests.traffic import CALENDAR, FIRST_DAY
import workers.close.rollup as rollup
from workers.close.rollup import EVENTS, HOLDS, TOKEN_FIELDS, DayTotals, Window

KEYS = ApiKey.__table__  # type: ignore[attr-defined]
DAY = FIRST_DAY
STARTS_AT, ENDS_AT = CALENDAR.bounds(DAY)  # naive UTC
#: A new claude-sonnet-4-5 version takes effect at this moment of the day (naive UTC): events before it
#: are priced at the old version, which the SQL re-pricing leaves to Python.
NEW_VERSION_AT = STARTS_AT + timedelta(hours=5)
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "claude-opus-4-1")
GROUPS = ("default", "vip", "reseller")
CHANNELS = (None, "", "azure-east", "openai-official")
#: Texts the usd column could hold: what the meter writes (decimal_text) and shapes it never writes.
ODD_USD = ("0", "12", "5.", ".5", "0.10", "0.000000000001", "0.0000000000001", ".0000000000001",
           "123456789.123456789", "1E-3", "-0.5", "7.100000000000000000001")


def price_table() -> PriceTable:
    """The bundled table, plus two groups with fractional multipliers and a claude-sonnet-4-5 price change mid-day."""
    data = yaml.safe_load(default_price_table_path().read_text(encoding="utf-8"))
    data["groups"].update({"vip": "0.8", "reseller": "1.15"})
    versions = data["models"]["claude-sonnet-4-5"]["versions"]
    changed = dict(versions[-1], effective_from=NEW_VERSION_AT.isoformat() + "Z", input="2.70", output="13.50")
    versions.append(changed)
    return parse_price_table(yaml.safe_dump(data, allow_unicode=True), "test table")


PRICES = price_table()


@pytest.fixture(scope="module", params=sorted(rollup.GROUPED_DIALECTS))
def day_meter(request: pytest.FixtureRequest, server_databases: dict[str, Any],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Meter, list[tuple[int, int]]]]:
    """A database of each grouped dialect with two users and three keys (no events yet)."""
    url = fresh_database(request.param, server_databases, tmp_path_factory.mktemp(request.param))
    meter = Meter.open(url, prices=PRICES)
    owners = []
    for name in ("张伟", "acme"):
        uid = meter.create_user(name)
        meter.create_key(uid, f"{name}-1")
        owners.append(uid)
    meter.create_key(owners[1], "acme-2", limit_quota=10**9)
    with meter.engine.connect() as connection:
        keys = [(int(user), int(key)) for key, user in connection.execute(select(KEYS.c.id, KEYS.c.user_id))]
    try:
        yield meter, keys
    finally:
        meter.close()


def token_counts() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 2_000), st.integers(0, 300_000), st.sampled_from((0, 1, 2**40, 10**13)))


@st.composite
def events(draw: st.DrawFn, keys: list[tuple[int, int]]) -> dict[str, Any]:
    """One usage event row (and maybe its hold), charged right or wrong."""
    user_id, key_id = draw(st.sampled_from(keys))
    model, group = draw(st.sampled_from(MODELS)), draw(st.sampled_from(GROUPS))
    tokens = {name: draw(token_counts()) if name != "images" else 0 for name in TOKEN_FIELDS}
    tokens["reasoning_tokens"] = min(tokens["reasoning_tokens"], tokens["output_tokens"])  # a part of output
    second = draw(st.one_of(st.integers(0, 86_399), st.sampled_from((-1, 0, 86_399, 86_400))))
    occurred_at = STARTS_AT + timedelta(seconds=second, microseconds=draw(st.sampled_from((0, 999_999))))
    usage = UsageRecord(provider=PRICES.resolve(model)[0].provider, model=model, **tokens)
    charged = quota(PRICES, usage, _posix(occurred_at), group) + draw(
        st.sampled_from((0, 0, 0, 0, 1, -1, 10**6)))
    usd = draw(st.one_of(st.just(str(Decimal(charged) / 500_000)), st.sampled_from(ODD_USD)))
    prompt = sum(tokens[name] for name in TOKEN_FIELDS[:4])
    hold = None
    if draw(st.booleans()):
        local = draw(st.one_of(st.integers(0, 400_000), st.sampled_from((prompt, prompt + 16, prompt + 17, prompt - 16,
                                                                         prompt - 17, prompt * 10 // 11, 2**40))))
        hold = {"prompt_tokens": max(0, local), "prompt_source": draw(st.sampled_from(("local", "upstream")))}
    return {
        "user_id": user_id, "key_id": key_id, "model": model, "price_group": group,
        "channel": draw(st.sampled_from(CHANNELS)), "outcome": draw(st.sampled_from(("completed", "aborted"))),
        "source": draw(st.sampled_from(("upstream", "local", "estimated"))), **tokens, "quota": max(0, charged),
        "usd": usd, "occurred_at": occurred_at, "hold": hold,
    }


def _posix(moment: datetime) -> float:
    """A naive UTC time as a POSIX timestamp (``datetime.timestamp`` would read it as local time)."""
    return (moment - datetime(1970, 1, 1)).total_seconds()


def _store(meter: Meter, day_events: list[dict[str, Any]]) -> int:
    """Replace the database's events and holds with ``day_events``; returns the highest event id."""
    with meter.engine.begin() as connection:
        connection.execute(delete(EVENTS))
        connection.execute(delete(HOLDS))
        for number, event in enumerate(day_events):
            event = dict(event)
            hold = event.pop("hold")
            hold_id = None
            if hold is not None:
                hold_id = connection.execute(insert(HOLDS).values(
                    request_id=f"r{number}", user_id=event["user_id"], key_id=event["key_id"], model=event["model"],
                    price_group=event["price_group"], amount=event["quota"], limited_key=False, status="settled",
                    created_at=event["occurred_at"], expires_at=event["occurred_at"] + timedelta(minutes=10),
                    resolved_at=event["occurred_at"], channel=event["channel"], **hold,
                )).inserted_primary_key[0]
            connection.execute(insert(EVENTS).values(
                request_id=f"r{number}", hold_id=hold_id, status="charged", price_version=event["occurred_at"],
                payload_hash="0" * 64, created_at=event["occurred_at"], **event,
            ))
        return int(connection.execute(select(func.coalesce(func.max(EVENTS.c.id), 0))).scalar_one())


def _both_ways(meter: Meter, window: Window) -> tuple[bool, DayTotals, DayTotals]:
    grouped, rows = DayTotals(), DayTotals()
    day = window.day.isoformat()
    own = and_(EVENTS.c.occurred_at >= window.starts_at, EVENTS.c.occurred_at < window.ends_at,
               EVENTS.c.id <= window.watermark)
    with meter.engine.connect() as connection, mock.patch.object(rollup, "SLICE_EVENTS", 3):
        with rollup.localcontext(rollup.EXACT):
            took = rollup._scan_grouped(connection, PRICES, window, grouped, None, None)
            rollup._scan_rows(connection, PRICES, None, own, rows, day, None, None)
    return took, grouped, rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_the_grouped_pass_equals_the_row_by_row_pass(day_meter: tuple[Meter, list[tuple[int, int]]],
                                                     data: st.DataObject) -> None:
    meter, keys = day_meter
    day_events = data.draw(st.lists(events(keys), max_size=30), label="events")
    highest = _store(meter, day_events)
    watermark = data.draw(st.sampled_from((highest, max(0, highest - 2))), label="watermark")
    window = Window(DAY, STARTS_AT, ENDS_AT, watermark, None)
    took, grouped, rows = _both_ways(meter, window)
    assert took, "the grouped pass gave up on counts that fit"
    assert grouped.events == rows.events
    assert grouped.counters == rows.counters
    assert grouped.usd == rows.usd  # Decimal equality: the same exact sums
    assert grouped.discrepancies == rows.discrepancies  # the same findings, in event id order


def test_the_row_by_row_pass_flags_exactly_the_planted_discrepancies(day_meter: tuple[Meter, list[tuple[int, int]]]) -> None:
    """A fixed day, with the findings written out by hand: both passes must report exactly these."""
    meter, keys = day_meter
    user_id, key_id = keys[0]
    at = STARTS_AT + timedelta(hours=8)
    base = {"user_id": user_id, "key_id": key_id, "model": "gpt-4o", "price_group": "default", "channel": None,
            "outcome": "completed", "source": "upstream", **dict.fromkeys(TOKEN_FIELDS, 0), "occurred_at": at}
    # gpt-4o: $2.50 / 1M input, $10 / 1M output (the bundled table, from OpenAI's pricing page):
    # 1,000 in + 100 out = $0.0025 + $0.001 = $0.0035 = 1,750 units.
    right = dict(base, input_tokens=1_000, output_tokens=100, quota=1_750, usd="0.0035", hold=None)
    wrong = dict(right, quota=1_751, usd="0.003502", hold=None)
    far = dict(right, hold={"prompt_tokens": 1_200, "prompt_source": "local"})  # 200 off: > max(16, 120)
    near = dict(right, hold={"prompt_tokens": 1_100, "prompt_source": "local"})  # 100 off: <= 110
    highest = _store(meter, [right, wrong, far, near])
    took, grouped, rows = _both_ways(meter, Window(DAY, STARTS_AT, ENDS_AT, highest, None))
    found = [(d["kind"], d["subject"], d["expected"], d["actual"]) for d in rows.discrepancies]
    assert found == [("price", "r1", 1_750, 1_751), ("tokens", "r2", 1_200, 1_000)]
    assert took and grouped.discrepancies == rows.discrepancies
    slot = rows.counters[(DAY.isoformat(), user_id, key_id, "gpt-4o", "", "default")]
    assert slot[:2] == [4, 4] and slot[4] == 4_000 and slot[8] == 400 and slot[12] == 4 * 1_750 + 1
    assert rows.usd[(DAY.isoformat(), user_id, key_id, "gpt-4o", "", "default")] == Decimal("0.014002")
