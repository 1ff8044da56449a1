"""The ledger under storage faults (the harness is tests/faults.py), on SQLite, PostgreSQL and MariaDB.

What is tested: a connection dropped before any statement of a call (PostgreSQL ``pg_terminate_backend``,
MariaDB ``KILL CONNECTION``, SQLite a closed connection), a COMMIT applied whose answer is lost, a lock
wait given up while another connection holds the user's row lock, and a process SIGKILLed between any two
statements of authorize, settle, release, topup, redeem, grant, record_usage, fold_deferred, expire_holds
and the nightly close. After every fault the database must equal the reference model either before or
after the call (never a half-written state), ``Meter.audit()`` must be ok, any error that reached the
caller must be the typed, retryable ``LedgerBusy``, and retrying the same call (same request id,
reference or code) must end exactly at the model's state after it: one hold, one charge, one credit.
The close, killed right after each of its COMMITs and at seeded statements (several kills in a row), then
rerun, must leave exactly the books of a clean close of the same booked database.

Seeds: ``SEEDS`` (documented below) run in ``make test``; ``make soak`` (METERING_SOAK=1) runs many more
seeds and steps; ``METERING_FAULT_SEED=N`` replays one seed (a failure names its seed and backend).
Figures for docs/reliability.md: with METERING_FIGURES=path each test appends one JSON line of what it
ran (operations, faults injected by kind, LedgerBusy surfaced, violations). Prices and units: see
tests/faults.py (gpt-4o at 1.25 / 0.625 / 5 units per input / cached / output token).
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import traceback
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from metering.ledger import Meter
from metering.ledger.database import make_engine
from tests.databases import BACKENDS, fresh_database, scratch_database, scratch_directory
from tests.faults import OP_KINDS, SOAK, Faults, Figures, Scenario, child_was_killed, short_lock_waits, traced
from pricing.usage import UsageRecord
from tests.test_close import _books
from tests.test_ledger_model import prices
from tests.traffic import CALENDAR, FIRST_DAY, after, body, book_customers, book_day, moment
from workers.close.nightly import close_day, days_to_close

#: Seeds of the random scenarios: 3 per database in `make test` (16 calls each), 60 under `make soak` (40 calls).
SEEDS = tuple(range(60)) if SOAK else (0, 1, 2)
STEPS = 40 if SOAK else 16
if os.environ.get("METERING_FAULT_SEED"):
    SEEDS = (int(os.environ["METERING_FAULT_SEED"]),)
#: Seeded sequences of kills of the close (4 kills each at random statements, then a rerun), besides the
#: kills right after its COMMITs.
CLOSE_SEEDS = tuple(range(12)) if SOAK else (0, 1)
#: Share of the statements the sweeps fault in `make test`: a seeded sample for the kills (30 %) and for the drops
#: on PostgreSQL and MariaDB (40 %); every statement under `make soak`, and SQLite's drops always (they are cheap).
SWEEP_SHARE = {"kill": 1.0, "drop": 1.0} if SOAK else {"kill": 0.3, "drop": 0.4}
#: Calls that lock exactly one user's row, for the lock-wait test.
LOCKING_KINDS = ("authorize", "settle", "release", "topup", "redeem", "grant", "record", "fold")


@pytest.fixture(autouse=True)
def hot_statements_traced() -> Iterator[None]:
    """The hot statements (run on the DBAPI cursor) pass through the harness in every test here."""
    with traced():
        yield


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, server_databases: Any, tmp_path: Path) -> Iterator[str]:
    """An empty database of each backend; SQLite's file on tmpfs when there is one (every commit is synced)."""
    with scratch_database(request.param, server_databases, tmp_path, "ledger-faults-") as url:
        yield url


def _backend(url: str) -> str:
    return {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mariadb"}[url.split(":", 1)[0].split("+")[0]]


def _record(name: str, figures: Figures, **extra: Any) -> None:
    """Append this test's figures to $METERING_FIGURES (one JSON line), when set."""
    path = os.environ.get("METERING_FIGURES")
    if path:
        line = {"test": name, "operations": figures.operations, "faults": dict(figures.faults),
                "armed_not_reached": figures.armed_not_reached, "busy": dict(figures.busy),
                "outcomes": dict(figures.outcomes), "violations": figures.violations, **extra}
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line, sort_keys=True) + "\n")


@pytest.fixture
def scenario(request: pytest.FixtureRequest, ledger_url: str) -> Iterator[Scenario]:
    """A scenario (the test's ``seed`` parameter, else seed 0) on an empty database of each backend."""
    seed = request.node.callspec.params.get("seed", 0)
    run = Scenario(ledger_url, seed, _backend(ledger_url))
    run.setup()
    try:
        yield run
    finally:
        _record(request.node.name, run.figures)
        run.close()


# ---------------------------------------------------------------------------------------------- the ledger's calls


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_faults_leave_the_ledger_equal_to_the_model(scenario: Scenario, seed: int) -> None:
    """Random calls, each under a random fault (none, drop, lost COMMIT answer, kill) at a random statement."""
    for _ in range(STEPS):
        scenario.step()
    assert scenario.figures.operations >= STEPS and scenario.figures.violations == 0
    assert sum(scenario.figures.faults.values()) >= STEPS // 4, scenario.figures  # the faults did land


def _every_statement(scenario: Scenario, fault: str) -> None:
    """Each kind of call with ``fault`` at each of its statements (``ambiguous``: at each of its COMMITs);
    in `make test`, kills and the servers' drops at a seeded ``SWEEP_SHARE`` of them."""
    for kind in OP_KINDS:
        scenario.ensure(kind)
        scenario.step(kind, "none")  # learns how many statements and COMMITs this kind sends
        statements, commits = scenario.span[kind]
        points = list(range(commits if fault == "ambiguous" else statements))
        share = SWEEP_SHARE.get(fault, 1.0) if scenario.backend != "sqlite" or fault == "kill" else 1.0
        if share < 1:
            points = sorted(scenario.rng.sample(points, math.ceil(len(points) * share)))
        for at in points:
            scenario.ensure(kind)
            scenario.step(kind, fault, at)


def test_a_connection_dropped_at_any_statement_is_retried_or_a_typed_error(scenario: Scenario) -> None:
    """The connection dies before a statement: the ledger runs the call again, or raises LedgerBusy at a COMMIT."""
    _every_statement(scenario, "drop")
    figures = scenario.figures
    # Every statement of every kind of call: ~50 land (a planned call may send fewer than the first did).
    assert figures.faults["drop"] >= (40 if scenario.backend == "sqlite" or SOAK else 15), figures
    # A drop before the COMMIT of a write surfaces (it may have been applied); any other drop is retried.
    assert 0 < figures.busy["drop"] < figures.faults["drop"], figures


def test_a_commit_whose_answer_is_lost_is_retried_to_exactly_one_effect(scenario: Scenario) -> None:
    """A COMMIT applied and its answer lost: LedgerBusy(maybe_applied), and the caller's retry is exactly once."""
    _every_statement(scenario, "ambiguous")
    figures = scenario.figures
    assert figures.faults["ambiguous"] >= 10, figures
    # Each write whose COMMIT answer was lost surfaced as LedgerBusy(maybe_applied) (the harness fails the step
    # otherwise) and its retry found the first effect (checked against the model); a read's is retried inside.
    assert figures.busy["ambiguous"] >= 5, figures


def test_a_process_killed_at_any_statement_leaves_the_call_undone_or_done(scenario: Scenario) -> None:
    """SIGKILL before a statement: the call is entirely undone or entirely done, and its retry completes it."""
    _every_statement(scenario, "kill")
    assert scenario.figures.faults["kill"] >= (40 if SOAK else 12), scenario.figures


def test_a_lock_wait_that_times_out_is_retried_or_a_typed_error(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holds the user's row lock; the ledger's connections give up waiting after 20 ms
    (PostgreSQL ``lock_timeout``), at once (MariaDB ``innodb_lock_wait_timeout = 0``) or after a 20 ms busy
    timeout (SQLite, whose lock is the database's)."""
    # Three attempts instead of the ledger's eight: the held lock then gives up sooner; the path is the same.
    monkeypatch.setattr("metering.ledger.meter.MAX_RETRIES", 3)
    run = Scenario(ledger_url, 0, _backend(ledger_url))
    run.setup()
    run.faults.close()
    run.meter.close()
    engine = make_engine(ledger_url)
    short_lock_waits(engine)
    run.meter = Meter(engine, run.meter.prices, run.meter.hold_ttl)
    run.faults = Faults(engine)
    try:
        for kind in LOCKING_KINDS:
            let_go = run.locked_step(kind, ledger_url, hold_on=False)
            assert let_go[0] not in ("busy", "unexpected"), (kind, let_go)  # retried inside the ledger
            held = run.locked_step(kind, ledger_url, hold_on=True)
            assert held == ("busy", False), (kind, held)  # typed, retryable, and nothing was written
    finally:
        _record(f"lock waits [{_backend(ledger_url)}]", run.figures)
        run.close()
    assert run.figures.busy["lock wait"] == len(LOCKING_KINDS)


# ---------------------------------------------------------------------------------------------- the close

NOW = after(FIRST_DAY + timedelta(days=1))


def _book(url: str) -> None:
    """Two days of traffic, a deferred event the close must fold and a hold it must expire."""
    meter = Meter.open(url, prices=prices())
    try:
        secrets = book_customers(meter)
        for day in (FIRST_DAY, FIRST_DAY + timedelta(days=1)):
            book_day(meter, secrets, day, 8, seed=11)
        meter.record_usage(secrets[1], "deferred-late", UsageRecord.from_openai("gpt-4o", {
            "prompt_tokens": 30, "completion_tokens": 7}), at=moment(FIRST_DAY + timedelta(days=1), 7_200))
        meter.authorize(secrets[0], body("gpt-4o", 2), "left-open", at=moment(FIRST_DAY + timedelta(days=1), 80_000))
    finally:
        meter.close()


def _close_all(meter: Meter, run: int) -> None:
    """Close every due day; run ``run`` sees the clock 10 minutes later per run, so a killed run's 5-minute
    lease has lapsed for the next one (as it would have in real time)."""
    shift = timedelta(minutes=10 * run)
    clock = lambda: datetime.now(timezone.utc).replace(tzinfo=None) + shift  # noqa: E731
    for day in days_to_close(meter, calendar=CALENDAR, now=NOW):
        result = close_day(meter, day, calendar=CALENDAR, now=NOW, clock=clock)
        assert result.status in ("closed", "already_closed"), result


def _killed_close(url: str, run: int, at: int) -> bool:
    """Close in a forked child that SIGKILLs itself before statement ``at``; True if the kill landed."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            meter = Meter(make_engine(url), prices())
            faults = Faults(meter.engine, in_child=True)
            faults.arm("kill", at)
            _close_all(meter, run)
        except BaseException:  # noqa: BLE001 (reported through the exit status)
            traceback.print_exc()
            code = 4
        os._exit(code)
    return child_was_killed(pid, "the close's child")


class Copies:
    """Copies of one booked database: SQLite files (the backup API), PostgreSQL ``CREATE DATABASE ... TEMPLATE``."""

    def __init__(self, backend: str, server_databases: Any, directory: Path) -> None:
        self.backend, self.directory, self.made = backend, directory, 0
        if backend == "sqlite":
            self.base = f"sqlite:///{directory}/base.db"
            return
        session = fresh_database(backend, server_databases, directory)  # skips (fails under CI) without a server
        self.admin = create_engine(make_engine(session).url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        self.prefix = f"metering_faults_{os.getpid()}"
        self.base = self._create("base")

    def _create(self, name: str, template: str | None = None) -> str:
        database = f"{self.prefix}_{name}"
        with self.admin.connect() as admin:
            if template:  # a template may have no session: end any the server still winds down
                admin.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                              {"d": template})
            admin.execute(text(f"DROP DATABASE IF EXISTS {database}"))
            admin.execute(text(f"CREATE DATABASE {database}" + (f" TEMPLATE {template}" if template else "")))
        return self.admin.url.set(database=database).render_as_string(hide_password=False)

    def copy(self, name: str) -> str:
        """A new database holding exactly what the base holds now."""
        self.made += 1
        if self.backend == "sqlite":
            path = self.directory / f"{name}.db"
            path.unlink(missing_ok=True)
            source, target = sqlite3.connect(self.base.removeprefix("sqlite:///")), sqlite3.connect(path)
            source.backup(target)
            source.close()
            target.close()
            return f"sqlite:///{path}"
        return self._create(name, template=f"{self.prefix}_base")

    def drop(self) -> None:
        """Drop every database made (PostgreSQL)."""
        if self.backend == "sqlite":
            return
        with self.admin.connect() as admin:
            names = admin.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                                  {"p": f"{self.prefix}_%"}).scalars().all()
            for database in names:
                admin.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                              {"d": database})
                admin.execute(text(f"DROP DATABASE IF EXISTS {database}"))
        self.admin.dispose()


@pytest.fixture(params=("sqlite", "postgresql"))
def copies(request: pytest.FixtureRequest, server_databases: Any, tmp_path: Path) -> Iterator[Copies]:
    """A booked base database of each kind (SQLite on tmpfs when there is one) and copies of it."""
    with scratch_directory(tmp_path, "ledger-close-") as directory:
        made = Copies(request.param, server_databases, directory)
        try:
            _book(made.base)
            yield made
        finally:
            made.drop()


def test_a_close_killed_after_any_commit_or_at_seeded_statements_reruns_to_the_clean_result(copies: Copies) -> None:
    """Each run kills a close of a copy of the same booked database right after one of its COMMITs (every
    COMMIT on SQLite, a seeded sample on PostgreSQL in `make test`) or at a seeded statement, up to 4 times
    in a row, then reruns it: the books must equal a clean close's and the audit be ok."""
    clean_url = copies.copy("clean")
    clean = Meter.open(clean_url, prices=prices())
    counter = Faults(clean.engine)  # where the kills may land: the statements and COMMITs of a whole close
    _close_all(clean, 0)
    statements, after_commits = counter.statements, [at + 1 for at in counter.commit_at]
    counter.close()
    clean.close()
    expected = _books(clean_url)
    rng = random.Random(f"close-{copies.backend}")
    if copies.backend != "sqlite" and not SOAK:
        after_commits = sorted(rng.sample(after_commits, 4))
    # A single kill right after each chosen COMMIT, then seeded sequences of kills at random statements.
    plans = [[at] for at in after_commits] + [
        [rng.randrange(statements)] + [rng.randrange(statements // 2) for _ in range(3)] for _ in CLOSE_SEEDS
    ]
    figures = Figures()
    for number, plan in enumerate(plans):
        url = copies.copy(f"killed_{number}")
        run = 0
        for run, at in enumerate(plan, start=1):
            figures.operations += 1
            if not _killed_close(url, run, at):
                break  # the close finished before that statement: nothing left to kill
            figures.faults["kill"] += 1
        rerun = Meter.open(url, prices=prices())
        _close_all(rerun, run + 1)
        report = rerun.audit()
        rerun.close()
        assert report.ok, (plan, report.violations)
        assert _books(url) == expected, f"killed at {plan}: the rerun close differs from the clean close"
    _record(f"close kills [{copies.backend}]", figures, close_statements=statements, close_commits=len(counter.commit_at))
    assert figures.faults["kill"] >= len(plans), figures
