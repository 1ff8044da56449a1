"""``metering import one-api`` is all or nothing, and its dry run is the run itself: tests on SQLite, PostgreSQL, MariaDB.

What is held here (docs/oneapi-import.md, "All or nothing"):

* **faults across the whole import** (the harness of tests/faults.py): a second, incremental import (new users,
  tokens and logs, a token disabled since, a balance moved, a pending event of another user to fold) is run
  with a dropped connection before one of its statements, a COMMIT whose answer is lost, and a SIGKILL before
  one of its statements (in a forked child). After each, the ledger's tables are either exactly as before the
  run (every column of every row) or exactly as a clean run leaves them (every column but ids and creation
  times, foreign ids compared by what they name), the only error that reaches the caller is ``LedgerBusy``
  (``maybe_applied`` when the COMMIT failed), and a rerun without a fault then gives the clean result. The
  log cursor is part of the tables compared: a failed run never moves it.
* **an exception, or a refusal, late in the run** (the progress callback raising mid-logs, a balance
  adjustment the ledger refuses after every other write): nothing is written, and the dry run refuses
  exactly what the run refuses.
* **dry-run parity**: for random sources and random earlier imports, the dry run writes nothing and its
  summary equals the real run's (hypothesis, SQLite), and the same on each database for a fixed case.
* **one import of a source at a time**: a second import of the same source waits for the first one's
  commit and then finds everything imported.

Fault points: in `make test`, the run's statements at evenly spread points (``POINTS``) for drops and kills,
and every COMMIT for lost answers; under METERING_SOAK=1, every statement.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, delete, insert, select
from sqlmodel import SQLModel

from metering.ledger import InvalidField, LedgerBusy, Meter
from metering.ledger.database import make_engine
from metering.ledger.meter import EVENTS, KEYS, USERS
from pricing.quote import MAX_QUOTA
from pricing.usage import UsageRecord
from tests import oneapi_schema as schema
from tests.databases import BACKENDS, scratch_database
from tests.faults import SOAK, Blocker, Faults, short_lock_waits, traced
from tests.test_oneapi_import import T0, populate, run_import
from workers.oneapi.importer import ImportConflict, import_oneapi
from workers.oneapi.source import OneApiSource, source_url

#: Statements faulted per backend and kind in `make test` (spread evenly over the run); every one under soak.
POINTS = {"drop": 10, "kill": 4}
#: Columns that differ between two equal runs: row ids, creation times, and the random secret of an import key.
VOLATILE = {"id", "created_at", "last_seen_at"}
FALLBACK_PREFIX = "one-api import ("


@pytest.fixture(autouse=True)
def hot_statements_traced() -> Iterator[None]:
    """The hot statements (run on the DBAPI cursor) pass through the harness in every test here."""
    with traced():
        yield


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, server_databases: Any, tmp_path: Path) -> Iterator[str]:
    """An empty ledger database of each backend (SQLite on tmpfs when there is one)."""
    with scratch_database(request.param, server_databases, tmp_path, "redteam-import-") as url:
        yield url


# ---------------------------------------------------------------------- the ledger's tables, exactly


def tables() -> list[Any]:
    """Every ledger table, parents first."""
    return list(SQLModel.metadata.sorted_tables)


def dump(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every ledger table, every column, by primary key: what "exactly as before" compares."""
    with engine.connect() as connection:
        return {t.name: [dict(r) for r in connection.execute(select(t).order_by(*t.primary_key.columns)).mappings()]
                for t in tables()}


def normalized(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """``shape`` of the tables now."""
    return shape(dump(engine))


def shape(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[Any, ...]]]:
    """The tables without ids and creation times, each foreign id replaced by what it names (a user's name,
    a key's user, name and secret hash, an event's request id): what "exactly as a clean run" compares."""
    users = {r["id"]: r["name"] for r in rows["users"]}
    keys = {r["id"]: (users[r["user_id"]], r["name"],
                      "random" if r["name"].startswith(FALLBACK_PREFIX) else r["secret_hash"]) for r in rows["api_keys"]}
    events = {r["id"]: r["request_id"] for r in rows["usage_events"]}
    holds = {r["id"]: r["request_id"] for r in rows["holds"]}
    named = {"user_id": users, "redeemed_by": users, "key_id": keys, "usage_event_id": events, "hold_id": holds}
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, found in rows.items():
        shaped = []
        for row in found:
            row = {k: (named[k].get(v, v) if k in named and v is not None else v) for k, v in row.items()
                   if k not in VOLATILE}
            if table == "api_keys" and row["name"].startswith(FALLBACK_PREFIX):
                row["secret_hash"] = row["display_prefix"] = "random"
            if table == "import_links" and row["kind"] in ("user", "token", "fallback_key"):
                row["local_id"] = (users if row["kind"] == "user" else keys)[row["local_id"]]
            shaped.append(tuple(sorted(row.items(), key=lambda item: item[0])))
        out[table] = sorted(shaped, key=repr)
    return out


def restore(url: str, saved: dict[str, list[dict[str, Any]]]) -> None:
    """Put every table back to ``saved`` (rows deleted children first, inserted parents first, ids kept)."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for table in reversed(tables()):
                connection.execute(delete(table))
            for table in tables():
                if saved[table.name]:
                    connection.execute(insert(table), saved[table.name])
    finally:
        engine.dispose()


def difference(actual: dict[str, Any], expected: dict[str, Any]) -> str:
    """The tables that differ, and the first rows of each side that the other lacks."""
    out = []
    for name in expected:
        if actual.get(name) != expected[name]:
            a, e = actual.get(name, []), expected[name]
            extra, missing = [r for r in a if r not in e][:2], [r for r in e if r not in a][:2]
            out.append(f"{name}: {len(a)} rows (expected {len(e)}); unexpected {extra}; missing {missing}")
    return "; ".join(out) or "no difference"


# ---------------------------------------------------------------------- the source and the ledger before the run


def grow(url: str) -> None:
    """What the deployment did after the first import: a new user with a limited key, new logs (priced,
    refused, orphaned, on a deleted token), a token disabled, a key's room and a balance moved."""
    schema.add(url, "users", [{"id": 4, "username": "carol", "password": "x", "quota": 2_000_000, "group": "default",
                               "access_token": "w" * 32, "aff_code": "d4"}])
    schema.add(url, "tokens", [{"id": 5, "user_id": 4, "key": "E" * 48, "name": "carol-key", "status": 1,
                                "remain_quota": 50_000, "unlimited_quota": False, "models": "gpt-4o,gpt-4o-mini"}])
    schema.execute(url, "UPDATE tokens SET status = 2 WHERE id = 1")  # disabled since: revoked here too
    schema.execute(url, "UPDATE tokens SET remain_quota = 60000 WHERE id = 3")
    schema.execute(url, "UPDATE users SET quota = 4000000 WHERE id = 1")

    def log(id: int, user: int, model: str, prompt: int, token: str, kind: int = 2) -> dict[str, Any]:
        return {"id": id, "user_id": user, "created_at": T0 + 600 + id, "type": kind, "model_name": model,
                "prompt_tokens": prompt, "completion_tokens": 50, "quota": 1_000, "channel_id": 4, "content": "",
                "token_name": token}

    schema.add(url, "logs", [
        log(10, 1, "gpt-4o", 800, "main"), log(11, 1, "gpt-4o", 900, "capped"), log(12, 4, "gpt-4o-mini", 5_000, "carol-key"),
        log(13, 4, "gpt-4o", 1_200, "carol-key"), log(14, 2, "gpt-4o", 300, "gone"),       # bob's first import key
        log(15, 1, "no-such-model", 10, "main"), log(16, 55, "gpt-4o", 10, "main"),        # quarantined twice
        log(17, 1, "gpt-4o", 100, "deleted-one"), log(18, 4, "", 0, "", kind=1),           # a top-up: counted only
        *[log(id, 1 + id % 2, "gpt-4o-mini", 100 * id, "main" if id % 2 == 0 else "bobkey") for id in range(19, 25)],
    ])


def prepare(ledger_url: str, source: str) -> None:
    """The ledger before the faulted run: a first import, and a user of our own with a pending event."""
    populate(source, "one-api")
    meter = Meter.open(ledger_url)
    try:
        run_import(meter, source)
        native = meter.create_user("native")
        meter.adjust(native, 1_000_000, "seed-native", "a credit of our own")
        secret = meter.create_key(native, "own")
        meter.record_usage(secret, "native-deferred", UsageRecord(
            provider="openai", model="gpt-4o", input_tokens=100, output_tokens=10), at=datetime.now(timezone.utc))
    finally:
        meter.close()
    grow(source)


class Run:
    """The faulted import on one ledger: the state before it, a clean run's result, and the harness."""

    def __init__(self, ledger_url: str, source: str) -> None:
        self.url, self.source = ledger_url, source
        self.meter = Meter(make_engine(ledger_url), Meter.open(ledger_url).prices)
        self.faults = Faults(self.meter.engine)
        self.before = dump(self.meter.engine)
        self.faults.reset()
        self.summary = self.attempt()
        assert isinstance(self.summary, dict), self.summary
        self.statements, self.commits = self.faults.statements, list(self.faults.commit_at)
        self.clean = normalized(self.meter.engine)
        assert self.clean != shape(self.before), "the run must write something"
        self.back()

    def attempt(self) -> dict[str, Any] | BaseException:
        """One import; its summary or the exception it raised."""
        source = OneApiSource(source_url(self.source))
        try:
            return import_oneapi(self.meter, source, name="prod")
        except Exception as exc:  # noqa: BLE001 (judged by the caller: only LedgerBusy may reach it)
            return exc
        finally:
            source.close()

    def back(self) -> None:
        """The ledger as before the run again."""
        restore(self.url, self.before)
        assert dump(self.meter.engine) == self.before

    def judge(self, label: str, result: dict[str, Any] | BaseException | str) -> str:
        """The ledger after a faulted run is before or clean; a rerun then gives the clean result. Returns which."""
        if isinstance(result, BaseException) and not isinstance(result, LedgerBusy):
            raise AssertionError(f"{label}: an untyped error reached the caller: {result!r}") from result
        now = dump(self.meter.engine)
        if now == self.before:
            state = "before"
        elif shape(now) == self.clean:
            state = "clean"
            assert not isinstance(result, LedgerBusy) or result.maybe_applied, \
                f"{label}: applied, yet reported as not applied ({result})"
        else:
            raise AssertionError(f"{label}: a half-written ledger: {difference(shape(now), self.clean)}"
                                 f" / vs before: {difference(shape(now), shape(self.before))}")
        if isinstance(result, dict):
            assert state == "clean" and result == self.summary, f"{label}: {result} differs from the clean summary"
        self.faults.reset()
        rerun = self.attempt()
        assert isinstance(rerun, dict), f"{label}: the rerun failed: {rerun!r}"
        assert normalized(self.meter.engine) == self.clean, f"{label}: the rerun differs from a clean run"
        if state == "before":
            assert rerun == self.summary, f"{label}: the rerun's summary differs from a clean run's"
        assert self.meter.audit().ok
        self.back()
        return state

    def in_child(self, at: int) -> bool:
        """The import in a forked child that SIGKILLs itself before statement ``at``; True if the kill landed."""

        def attempt() -> str | None:
            result = self.attempt()
            return None if isinstance(result, dict) else repr(result)

        return self.faults.killed_in_child(self.meter, at, attempt)

    def close(self) -> None:
        self.faults.close()
        self.meter.close()


def spread(count: int, points: int | None) -> list[int]:
    """``points`` statement indexes spread evenly over ``count`` (all of them when None)."""
    if points is None or points >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / (points - 1)) for i in range(points)})


@pytest.fixture
def run(ledger_url: str, tmp_path: Path) -> Iterator[Run]:
    source = f"sqlite:///{tmp_path}/one-api.db"
    prepare(ledger_url, source)
    made = Run(ledger_url, source)
    try:
        yield made
    finally:
        made.close()


# ---------------------------------------------------------------------- faults across the whole import


def test_a_connection_dropped_before_any_statement_leaves_the_ledger_as_before_or_as_a_clean_run(run: Run) -> None:
    """A drop before statement k (and at the COMMIT): LedgerBusy and nothing written, or retried to the clean run."""
    points = spread(run.statements, None if SOAK else POINTS["drop"])
    points = sorted({*points, *run.commits})  # the COMMITs too: a drop there is a COMMIT that failed, not applied
    states = []
    for at in points:
        run.faults.arm("drop", at)
        result = run.attempt()
        fired = bool(run.faults.fired) and run.faults.fired[-1].index == at
        run.faults.fired.clear()
        states.append(run.judge(f"drop before statement {at} of {run.statements}", result))
        assert fired, f"the drop armed at {at} never fired"
    print(f"drops at {points} of {run.statements} statements: {states}")
    assert states.count("before") >= len(points) // 2, states  # most drops land inside the import's transaction


def test_a_commit_whose_answer_is_lost_is_the_clean_run_and_its_rerun_changes_nothing(run: Run) -> None:
    """The COMMIT applied, its answer lost: LedgerBusy(maybe_applied) and the clean result; the rerun adds nothing."""
    states = []
    for commit in range(len(run.commits)):
        run.faults.arm("ambiguous", commit)
        states.append(run.judge(f"answer of COMMIT {commit} lost", run.attempt()))
    assert states[-1] == "clean", states  # the last COMMIT is the import's own: applied


def test_a_process_killed_before_any_statement_leaves_the_ledger_as_before(run: Run) -> None:
    """SIGKILL before statement k: the transaction dies with the process; nothing of the run is left."""
    points = spread(run.statements, None if SOAK else POINTS["kill"])
    killed = 0
    for at in points:
        landed = run.in_child(at)
        killed += landed
        state = run.judge(f"kill before statement {at} of {run.statements}", "killed" if landed else "completed")
        assert state == ("before" if landed else "clean"), (at, state)
    assert killed == len(points)


def test_a_lock_wait_given_up_rolls_the_run_back_and_the_rerun_completes(ledger_url: str, tmp_path: Path) -> None:
    """Another connection holds a user's row lock (SQLite: the write lock) and the ledger gives up lock waits
    after 20 ms: the import raises LedgerBusy having written nothing; once the lock is free, a rerun completes."""
    source = f"sqlite:///{tmp_path}/one-api.db"
    prepare(ledger_url, source)
    engine = make_engine(ledger_url)
    short_lock_waits(engine)
    meter = Meter(engine, Meter.open(ledger_url).prices)
    try:
        before = dump(meter.engine)
        blocker = Blocker(ledger_url, meter.find_user("alice"))
        try:
            with pytest.raises(LedgerBusy) as busy:
                run_import(meter, source)
            assert not busy.value.maybe_applied
        finally:
            blocker.release()
        assert dump(meter.engine) == before
        summary = run_import(meter, source)
        assert summary["users"]["created"] == 1 and summary["logs"]["imported"] == 12 and meter.audit().ok
    finally:
        meter.close()


def test_an_exception_mid_run_writes_nothing(ledger_url: str, tmp_path: Path) -> None:
    """The progress callback raising after the first batch of logs (users, keys and events already written)."""
    source = f"sqlite:///{tmp_path}/one-api.db"
    prepare(ledger_url, source)
    meter = Meter.open(ledger_url)
    try:
        before = dump(meter.engine)
        calls: list[tuple[str, int, Any]] = []

        def progress(stage: str, done: int, total: Any) -> None:
            calls.append((stage, done, total))
            if done:
                raise KeyboardInterrupt("the operator pressed ^C")

        reader = OneApiSource(source_url(source))
        try:
            with pytest.raises(KeyboardInterrupt):
                import_oneapi(meter, reader, name="prod", batch=5, progress=progress)
        finally:
            reader.close()
        assert calls[-1][1] == 5 and dump(meter.engine) == before
    finally:
        meter.close()


def test_a_refusal_after_every_other_write_rolls_the_whole_run_back_and_the_dry_run_refuses_it_too(
    ledger_url: str, tmp_path: Path,
) -> None:
    """users.quota at the ledger's largest amount with charges imported: the adjustment (the run's last write)
    would be beyond 10^18 units and is refused; users, keys, events, charges and the cursor go with it."""
    source = f"sqlite:///{tmp_path}/one-api.db"
    populate(source, "one-api")
    schema.execute(source, "UPDATE users SET quota = :q WHERE id = 1", q=MAX_QUOTA)
    meter = Meter.open(ledger_url)
    try:
        before = dump(meter.engine)
        refused = []
        for dry_run in (True, False):
            with pytest.raises(InvalidField) as caught:
                run_import(meter, source, dry_run=dry_run)
            refused.append(str(caught.value))
            assert caught.value.field == "amount" and dump(meter.engine) == before
        assert refused[0] == refused[1]
    finally:
        meter.close()


def test_a_balance_beyond_the_ledger_is_a_conflict_before_anything_is_written(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path}/one-api.db"
    populate(source, "new-api")
    schema.execute(source, "UPDATE users SET quota = :q WHERE id = 2", q=MAX_QUOTA + 1)
    meter = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        before = dump(meter.engine)
        for dry_run in (True, False):
            with pytest.raises(ImportConflict, match="users.quota: user 2"):
                run_import(meter, source, dry_run=dry_run)
        assert dump(meter.engine) == before
    finally:
        meter.close()


# ---------------------------------------------------------------------- the dry run is the run


def test_the_dry_run_reports_what_the_run_does_and_writes_nothing_on_each_database(ledger_url: str, tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path}/one-api.db"
    prepare(ledger_url, source)
    meter = Meter.open(ledger_url)
    try:
        before = dump(meter.engine)
        dry = run_import(meter, source, dry_run=True)
        assert dump(meter.engine) == before
        real = run_import(meter, source)
        assert dry == {**real, "dry_run": True}
        # Counts a dry run used to leave out or get wrong: the fold of another user's pending event, the
        # keys revoked since, the rooms synced, the balances adjusted after the charges.
        assert real["folded"] == 12 + 1 and real["keys"]["revoked_since"] == 1 and real["keys"]["room_synced"] >= 1
        assert real["balances"]["adjusted"] >= 1 and real["logs"]["quarantined"] == 2
        again = run_import(meter, source, dry_run=True)
        assert again == {**run_import(meter, source), "dry_run": True}
    finally:
        meter.close()


LOG = st.fixed_dictionaries({
    "type": st.sampled_from([1, 2, 2, 2, 3]),
    "user_id": st.sampled_from([1, 2, 3, 9]),
    "model_name": st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "nope", ""]),
    "prompt_tokens": st.integers(-3, 50_000),
    "completion_tokens": st.integers(-3, 5_000),
    "quota": st.integers(0, 100_000),
    "token_name": st.sampled_from(["main", "capped", "old", "gone", ""]),
    "created_at": st.sampled_from([T0, T0 + 86_400, 0, 4_102_444_800]),
})


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logs=st.lists(LOG, min_size=1, max_size=20), first=st.integers(0, 20),
       balances=st.lists(st.integers(-1_000, 10**9), min_size=3, max_size=3), flavor=st.sampled_from(["one-api", "new-api"]),
       sync=st.booleans(), disable=st.booleans())
def test_for_random_sources_and_earlier_imports_the_dry_run_is_the_run(
    logs: list[dict[str, Any]], first: int, balances: list[int], flavor: str, sync: bool, disable: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A first import of the logs up to ``first``, then changes, then the dry run and the run: the same summary."""
    folder = tmp_path_factory.mktemp("parity")
    url = f"sqlite:///{folder}/src.db"
    populate(url, flavor)
    schema.execute(url, "DELETE FROM logs")
    token_ids = {"main": 1, "old": 2, "capped": 3}
    rows = [{"id": n + 1, **row, **({"token_id": token_ids.get(row["token_name"], 0)} if flavor == "new-api" else {})}
            for n, row in enumerate(logs)]
    schema.add(url, "logs", rows[:first])
    meter = Meter.open(f"sqlite:///{folder}/ledger.db")
    try:
        run_import(meter, url)
        schema.add(url, "logs", rows[first:])
        for user_id, balance in zip((1, 2, 3), balances):
            schema.execute(url, "UPDATE users SET quota = :q WHERE id = :id", q=balance, id=user_id)
        if disable:
            schema.execute(url, "UPDATE tokens SET status = 2 WHERE id = 3")
        before = dump(meter.engine)
        dry = run_import(meter, url, dry_run=True, sync_balances=sync)
        assert dump(meter.engine) == before
        assert run_import(meter, url, sync_balances=sync) == {**dry, "dry_run": False}
        assert meter.audit().ok
    finally:
        meter.close()


def test_a_dry_run_on_a_ledger_without_the_import_tables_reads_it_as_empty(tmp_path: Path) -> None:
    """No ledger yet: the run into an empty ledger, rolled back; its summary is what a first real run reports."""
    source = f"sqlite:///{tmp_path}/one-api.db"
    populate(source, "one-api")
    bare = Meter(create_engine(f"sqlite:///{tmp_path}/bare.db"), Meter.open("sqlite://").prices)
    try:
        dry = run_import(bare, source, dry_run=True)
        with pytest.raises(ImportConflict, match="--db"):
            run_import(bare, source)
    finally:
        bare.close()
    fresh = Meter.open(f"sqlite:///{tmp_path}/ledger.db")
    try:
        assert run_import(fresh, source) == {**dry, "dry_run": False}
    finally:
        fresh.close()


# ---------------------------------------------------------------------- one import of a source at a time


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_second_import_of_the_same_source_waits_for_the_first_and_imports_nothing_twice(
    backend: str, server_databases: Any, tmp_path: Path,
) -> None:
    with scratch_database(backend, server_databases, tmp_path, "redteam-import-") as url:
        source = f"sqlite:///{tmp_path}/one-api.db"
        populate(source, "new-api")
        meter = Meter.open(url)
        try:
            started, go = threading.Event(), threading.Event()
            results: dict[str, Any] = {}

            def first() -> None:
                def progress(stage: str, done: int, total: Any) -> None:
                    started.set()
                    assert go.wait(30)

                reader = OneApiSource(source_url(source))
                try:
                    results["first"] = import_oneapi(meter, reader, name="prod", progress=progress)
                finally:
                    reader.close()

            thread = threading.Thread(target=first)
            thread.start()
            assert started.wait(30)
            second = threading.Thread(target=lambda: results.setdefault("second", run_import(meter, source)))
            second.start()
            time.sleep(0.5)
            assert second.is_alive() and "second" not in results  # waiting for the first import's lock
            go.set()
            thread.join(30)
            second.join(30)
            assert results["first"]["logs"]["imported"] == 4
            assert results["second"]["logs"]["imported"] == 0 and results["second"]["logs"]["already_imported"] == 7
            assert results["second"]["users"]["created"] == 0 and results["second"]["balances"]["adjusted"] == 0
            with meter.engine.connect() as connection:
                assert connection.execute(select(EVENTS.c.id)).all().__len__() == 4
                assert len(connection.execute(select(USERS.c.id)).all()) == 3
                assert len(connection.execute(select(KEYS.c.id)).all()) == 5
            assert meter.audit().ok
        finally:
            meter.close()
