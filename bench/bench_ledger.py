"""Ledger bench: authorize + settle per request through ``Meter``, next to a raw-driver floor.

Figures (see BENCHMARKS.md, "Ledger", for the target and the last figures seen):

1. Requests per second of ``meter.authorize(secret, BODY, request_id)`` then ``meter.settle(hold,
   usage=USAGE)``: a small OpenAI chat body (gpt-4o, 2 messages, max_tokens 100), distinct request ids,
   one user with an ample balance, with an unlimited key and with a limited key (limit far above what
   the run spends). On SQLite (a WAL file, the engine of ``metering.ledger.database``) and on PostgreSQL
   (psycopg 3), with 1, 4 and 8 worker processes, each with its own ``Meter.open(url)``.
2. The floor: the same statements with the raw driver (sqlite3 with the same pragmas and ``BEGIN
   IMMEDIATE``; psycopg 3 in autocommit mode with ``conn.transaction()``), amounts precomputed (no token
   counting, no pricing), in the Meter's order and transactions. Authorize: the key SELECT and the hold
   SELECT by request id, outside any transaction on SQLite and inside the authorize transaction on
   PostgreSQL (where the Meter's driver opens it with the first read), then the conditional UPDATE of the
   balance [and of the key's reserved counter], INSERT hold, INSERT entry (hold). Settle, as ``_charge``
   runs it: lock the user row, INSERT event (no SELECT of an earlier one: the unique request id refuses
   it), SELECT the hold, conditional UPDATE of the hold, INSERT entry (release), INSERT entry (charge),
   one UPDATE of the balance by both entries' sum [, one UPDATE of the key's reserved and used counters].
   The user-row lock is ``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL, a plain SELECT on SQLite (as
   SQLAlchemy renders it). Target: ledger >= 0.5x the floor, per database and concurrency.

Ledger and floor alternate (ABBA over rounds) at every (database, variant, concurrency), each measurement
``--seconds`` long; a figure is the median over rounds. The ledger and the floor use their own users
in the same database. After every ledger measurement ``meter.audit()`` must be ok; after every floor
measurement the floor user's balance must be its start minus count x charge, equal to the sum of its
entries, with no open hold. The LAST line of stdout is one JSON object. Exits 1 on a correctness failure.

    .venv/bin/python bench/bench_ledger.py [--quick] [--json-only] [--profile] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

import psycopg
from sqlalchemy import create_engine, text

from metering.ledger.database import SQLITE_BUSY_TIMEOUT_MS, normalize_url
from metering.ledger.meter import (
    Meter,
    _event_values,
    _payload_hash,
    secret_hash,
    utcnow,
)
from pricing.quote import price
from pricing.usage import UsageRecord

TARGET = 0.5  # ledger requests/s / floor requests/s, at every database and concurrency
CONCURRENCY = (1, 4, 8)
VARIANTS = ("unlimited", "limited")
PG_URL = os.environ.get("METERING_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BODY = {"model": "gpt-4o", "max_tokens": 100, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."}]}
USAGE = UsageRecord.from_openai("gpt-4o", {"prompt_tokens": 30, "completion_tokens": 2})
#: Each bench user's balance: more than any run spends. Credited by an adjustment: a top-up is capped at 10^9 CNY.
START_BALANCE = 10**15

HOLD_COLS = ("id, request_id, user_id, key_id, model, price_group, amount, prompt_tokens, prompt_source, "
             "limited_key, status, created_at, expires_at, resolved_at, channel")
EVENT_COLS = ("request_id", "hold_id", "user_id", "key_id", "model", "price_group", "status", "outcome", "source",
              "channel", "input_tokens", "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
              "output_tokens", "reasoning_tokens", "images", "web_search_requests", "quota", "usd", "price_version",
              "payload_hash", "occurred_at", "created_at")
SQL = {
    "key": "SELECT api_keys.id, api_keys.user_id, api_keys.status, api_keys.display_prefix, api_keys.expires_at, "
           "api_keys.allowed_models, api_keys.limit_quota, users.price_group FROM api_keys JOIN users "
           "ON users.id = api_keys.user_id WHERE api_keys.secret_hash = %s",
    "hold_by_request": f"SELECT {HOLD_COLS} FROM holds WHERE request_id = %s",
    "take": "UPDATE users SET balance = balance - %s WHERE id = %s AND balance >= %s",
    "reserve": "UPDATE api_keys SET reserved_quota = reserved_quota + %s WHERE id = %s "
               "AND limit_quota - used_quota - reserved_quota >= %s",
    "insert_hold": "INSERT INTO holds (request_id, user_id, key_id, model, price_group, amount, prompt_tokens, "
                   "prompt_source, limited_key, channel, status, created_at, expires_at) VALUES ("
                   + ", ".join(["%s"] * 13) + ")",
    "insert_entry": "INSERT INTO ledger_entries (user_id, key_id, kind, amount, hold_id, usage_event_id, reference, "
                    "note, created_at) VALUES (" + ", ".join(["%s"] * 9) + ")",
    "lock_user": "SELECT users.id FROM users WHERE users.id = %s FOR NO KEY UPDATE",  # SQLite: without FOR ...
    "insert_event": f"INSERT INTO usage_events ({', '.join(EVENT_COLS)}) VALUES ({', '.join(['%s'] * len(EVENT_COLS))})",
    "hold_by_id": "SELECT id, user_id, key_id, amount, limited_key FROM holds WHERE id = %s",
    "resolve": "UPDATE holds SET status = %s, resolved_at = %s WHERE id = %s AND status = %s",
    "move": "UPDATE users SET balance = balance + %s WHERE id = %s",
    "move_key": "UPDATE api_keys SET reserved_quota = reserved_quota - %s, used_quota = used_quota + %s WHERE id = %s",
}


class Floor:
    """authorize + settle with the raw driver: the same statements as the Meter, amounts precomputed."""

    def __init__(self, kind: str, url: str, plan: dict[str, Any]) -> None:
        self.plan, self.sqlite = plan, kind == "sqlite"
        if self.sqlite:
            import sqlite3

            self.conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                                        isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=WAL", f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}", "foreign_keys=ON", "synchronous=FULL"):
                self.conn.execute(f"PRAGMA {pragma}")
            self.sql = {k: v.replace("%s", "?").replace(" FOR NO KEY UPDATE", "") for k, v in SQL.items()}
            self.cur = self.conn.cursor()
        else:
            self.conn = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
            self.sql = {k: v + (" RETURNING id" if k.startswith("insert") else "") for k, v in SQL.items()}
            self.cur = self.conn.cursor()

    def _time(self, moment: datetime) -> Any:  # SQLAlchemy's DateTime text on SQLite, a datetime on PostgreSQL
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else moment

    def one(self, name: str, params: tuple) -> Any:
        rows = self.cur.execute(self.sql[name], params).fetchall()  # as the Meter: to the end of the statement
        return rows[0] if rows else None

    def run(self, name: str, params: tuple) -> int:
        return self.cur.execute(self.sql[name], params).rowcount

    def insert(self, name: str, params: tuple) -> int:
        cur = self.cur.execute(self.sql[name], params)
        return cur.lastrowid if self.sqlite else cur.fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if not self.sqlite:
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def lookup(self, secret: str, rid: str) -> tuple:
        key = self.one("key", (secret_hash(secret),))
        assert key is not None and key[2] == "enabled" and key[4] is None and key[5] is None
        assert self.one("hold_by_request", (rid,)) is None
        return key

    def hold(self, key: tuple, rid: str) -> int:
        p, t = self.plan, self._time
        key_id, user_id, group, limited, amount = key[0], key[1], key[7], key[6] is not None, p["amount"]
        created = utcnow()
        if self.run("take", (amount, user_id, amount)) != 1:
            raise RuntimeError("floor: quota exceeded (user)")
        if limited and self.run("reserve", (amount, key_id, amount)) != 1:
            raise RuntimeError("floor: quota exceeded (key)")
        hold_id = self.insert("insert_hold", (rid, user_id, key_id, "gpt-4o", group, amount, p["prompt_tokens"],
                                              p["prompt_source"], limited, None, "open", t(created),
                                              t(created + p["ttl"])))
        self.insert("insert_entry", (user_id, key_id, "hold", -amount, hold_id, None, f"hold:{rid}", None, t(utcnow())))
        return hold_id

    def request(self, secret: str, rid: str) -> None:
        p, t = self.plan, self._time
        if self.sqlite:  # authorize: the reads outside the write transaction (no write lock)...
            key = self.lookup(secret, rid)
            with self.transaction():
                hold_id = self.hold(key, rid)
        else:  # ...on PostgreSQL inside it (the Meter's driver opens it with the first read)
            with self.transaction():
                key = self.lookup(secret, rid)
                hold_id = self.hold(key, rid)
        key_id, user_id, quota = key[0], key[1], p["quota"]
        event = p["event"] | {"request_id": rid, "hold_id": hold_id, "user_id": user_id, "key_id": key_id,
                              "occurred_at": t(utcnow()), "created_at": t(utcnow())}
        with self.transaction():  # settle, as Meter._charge runs it
            self.one("lock_user", (user_id,))
            event_id = self.insert("insert_event", tuple(event[c] for c in EVENT_COLS))
            row = self.one("hold_by_id", (hold_id,))
            if self.run("resolve", ("settled", t(utcnow()), hold_id, "open")) != 1:
                raise RuntimeError("floor: hold not open")
            self.insert("insert_entry", (row[1], row[2], "release", row[3], hold_id, None, f"release:{hold_id}", None, t(utcnow())))
            self.insert("insert_entry", (user_id, key_id, "charge", -quota, hold_id, event_id, f"charge:{rid}", None, t(utcnow())))
            self.run("move", (row[3] - quota, user_id))
            if row[4]:
                self.run("move_key", (row[3], quota, key_id))


def ledger_request(meter: Meter, secret: str, rid: str) -> None:
    meter.settle(meter.authorize(secret, BODY, rid), usage=USAGE)


def load_factory(spec: str) -> Any:
    """``path/to/file.py:function``: a function(url) returning a Meter-like object (a prototype to compare)."""
    import importlib.util

    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("bench_ledger_extra", path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return getattr(module, name)


def worker(pipe: Any, kind: str, url: str, plan: dict[str, Any], wid: int, extra: Any) -> None:
    """One process: its own Meter, its own raw connection (and prototype); runs what the coordinator sends."""
    try:
        meters = {"ledger": Meter.open(url)} | ({"extra": extra(url)} if extra else {})
        floor = Floor(kind, url, plan)
        pipe.send("ready")
        while (msg := pipe.recv()) is not None:
            candidate, variant, tag, start_at, stop_at = msg
            secret, meter = plan["secrets"][candidate][variant], meters.get(candidate)
            call = partial(floor.request, secret) if meter is None else partial(ledger_request, meter, secret)
            time.sleep(max(0.0, start_at - time.monotonic()))
            n = 0
            while time.monotonic() < stop_at:
                call(f"{tag}-{wid}-{n}")
                n += 1
            pipe.send((n, time.monotonic()))
    except BaseException as exc:  # noqa: BLE001 (reported to the coordinator)
        import traceback

        pipe.send(("error", f"worker {wid}: {exc!r}\n{traceback.format_exc()}"))


def setup(url: str, candidates: Sequence[str]) -> dict[str, Any]:
    """Users, keys and the floor's precomputed amounts."""
    meter = Meter.open(url)
    try:
        plan: dict[str, Any] = {"secrets": {}, "users": {}, "ttl": meter.hold_ttl}
        for candidate in candidates:
            uid = meter.create_user(f"bench-{candidate}")
            assert meter.adjust(uid, START_BALANCE, f"bench-{candidate}", "bench funding")
            plan["users"][candidate] = uid
            plan["secrets"][candidate] = {"unlimited": meter.create_key(uid, "unlimited"),
                                          "limited": meter.create_key(uid, "limited", limit_quota=10**14)}
        now = datetime.now(UTC)
        amount, prompt, _ = meter.estimate(BODY, "gpt-4o", "default", now)
        priced = price(meter.prices, USAGE, now, "default")
        event = _event_values("", 0, 0, "gpt-4o", "default", USAGE, "completed", priced, _payload_hash(USAGE, "completed"), now)
        if url.startswith("sqlite"):  # SQLite stores DateTime as text
            event["price_version"] = event["price_version"].strftime("%Y-%m-%d %H:%M:%S.%f")
        plan.update(amount=amount, prompt_tokens=prompt.prompt_tokens, prompt_source=str(prompt.source),
                    quota=priced.quota, event=event)
        return plan
    finally:
        meter.close()


def check(url: str, plan: dict[str, Any], candidate: str, done: int) -> list[str]:
    """The audit (after the ledger) or the floor user's balance arithmetic (after the floor)."""
    meter, problems = Meter.open(url), []
    try:
        uid = plan["users"][candidate]
        if candidate != "floor":
            problems += [f"audit: {v.invariant}: {v.subject}: {v.detail}" for v in meter.audit().violations]
        with meter.engine.connect() as c:
            entries = c.execute(text("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE user_id = :u"), {"u": uid}).scalar_one()
            open_holds = c.execute(text("SELECT COUNT(*) FROM holds WHERE user_id = :u AND status = 'open'"), {"u": uid}).scalar_one()
        balance, expected = meter.balance(uid), START_BALANCE - done * plan["quota"]
        if balance != expected or int(entries) != balance or open_holds:
            problems.append(f"{candidate}: balance {balance}, expected {expected} after {done} requests, "
                            f"entries sum {entries}, {open_holds} open holds")
        return problems
    finally:
        meter.close()


def pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be reached, or None."""
    try:
        psycopg.connect(normalize_url(PG_URL).replace("+psycopg", ""), connect_timeout=3).close()
        return None
    except psycopg.Error as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@contextmanager
def database(kind: str) -> Iterator[str]:
    """A fresh scratch database URL, dropped afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench_ledger_") as directory:
            yield f"sqlite:///{directory}/ledger.db"
        return
    name, admin_url = f"bench_ledger_{os.getpid()}", normalize_url(PG_URL)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        c.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            c.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def profile(url: str, plan: dict[str, Any], seconds: float, say: Any) -> dict[str, float]:
    """cProfile of the ledger (unlimited key) in this process: own time per request, split by where it is spent."""
    meter = Meter.open(url)
    secret = plan["secrets"]["ledger"]["unlimited"]
    for i in range(50):
        ledger_request(meter, secret, f"profile-warm-{i}")
    profiler, n, stop = cProfile.Profile(), 0, time.monotonic() + seconds
    profiler.enable()
    while time.monotonic() < stop:
        ledger_request(meter, secret, f"profile-{n}")
        n += 1
    profiler.disable()
    meter.close()
    split: dict[str, float] = {}
    for (file, _line, fn), (_cc, _nc, own, _ct, _callers) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        where = ("driver COMMIT" if "commit" in fn and file == "~" else "driver other" if file == "~" and
                 ("sqlite3" in fn or "psycopg" in fn) else "psycopg" if "psycopg" in file else "sqlalchemy"
                 if "sqlalchemy" in file else "metering+pricing" if "/metering/" in file or "/pricing/" in file else "other")
        split[where] = split.get(where, 0.0) + own
    per = {k: round(v / max(n, 1) * 1e6) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}
    say(f"  profile ({n} requests under cProfile, which inflates Python-heavy code): own time per request, us: "
        + ", ".join(f"{k} {v}" for k, v in per.items()))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    say("\n".join("    " + line[:150] for line in out.getvalue().splitlines()[7:] if line.strip()))
    return per


def bench_database(kind: str, args: argparse.Namespace, say: Any, figures: dict[str, Any]) -> list[str]:
    candidates = ("ledger", "floor") + (("extra",) if args.extra else ())
    extra = load_factory(args.extra) if args.extra else None
    with database(kind) as url:
        plan = setup(url, candidates)
        context = mp.get_context("fork")
        pipes, procs = [], []
        for wid in range(max(CONCURRENCY)):
            parent, child = context.Pipe()
            proc = context.Process(target=worker, args=(child, kind, url, plan, wid, extra), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        problems: list[str] = []
        done = dict.fromkeys(candidates, 0)
        rates: dict[tuple, list[float]] = {}
        try:
            for p in pipes:
                if (msg := p.recv()) != "ready":
                    raise RuntimeError(msg[1])

            def measure(candidate: str, variant: str, conc: int, seconds: float, tag: str) -> float:
                start = time.monotonic() + 0.2
                for p in pipes[:conc]:
                    p.send((candidate, variant, tag, start, start + seconds))
                results = [p.recv() for p in pipes[:conc]]
                errors = [r[1] for r in results if r[0] == "error"]
                if errors:
                    raise RuntimeError("\n".join(errors))
                count = sum(r[0] for r in results)
                done[candidate] += count
                return count / (max(r[1] for r in results) - start)

            for candidate in candidates:  # warm-up: connections, statement caches, prepared statements
                for variant in args.variants:
                    measure(candidate, variant, max(CONCURRENCY), 0.3, f"warm-{candidate}-{variant}")
            for r in range(args.rounds):
                for variant in args.variants:
                    for conc in CONCURRENCY:
                        order = candidates if (r + conc) % 2 == 0 else candidates[::-1]
                        for candidate in order:
                            rate = measure(candidate, variant, conc, args.seconds, f"r{r}-{candidate}-{variant}-{conc}")
                            rates.setdefault((variant, conc, candidate), []).append(rate)
                            found = check(url, plan, candidate, done[candidate])
                            problems += found
                            for line in found[:10]:
                                print(f"LEDGER CHECK FAILED ({kind}): {line}", file=sys.stderr, flush=True)
                        say(f"  round {r + 1} {kind} {variant:9} x{conc}: " + ", ".join(
                            f"{c} {rates[(variant, conc, c)][-1]:5.0f}/s" for c in candidates))
        finally:
            for p, proc in zip(pipes, procs):
                with suppress(OSError):  # a worker that failed has gone
                    p.send(None)
                proc.join(10)
        for variant in args.variants:
            for conc in CONCURRENCY:
                ledger = statistics.median(rates[(variant, conc, "ledger")])
                floor = statistics.median(rates[(variant, conc, "floor")])
                ratio = ledger / floor
                paired = statistics.median(a / b for a, b in zip(rates[(variant, conc, "ledger")], rates[(variant, conc, "floor")]))
                key = f"{kind}_{variant}_c{conc}"
                figures.update({f"{key}_ledger_rps": round(ledger), f"{key}_floor_rps": round(floor),
                                f"{key}_ratio": round(ratio, 3), f"{key}_ratio_paired": round(paired, 3),
                                f"{key}_met": ratio >= TARGET})
                say(f"  {kind:10} {variant:9} x{conc}: ledger {ledger:7.0f} req/s, floor {floor:7.0f} req/s, ledger/floor "
                    f"{ratio:.2f} (round-by-round {paired:.2f})  (target >= {TARGET})  {'MET' if ratio >= TARGET else 'NOT MET'}")
                if extra:
                    proto = statistics.median(rates[(variant, conc, "extra")])
                    figures.update({f"{key}_extra_rps": round(proto), f"{key}_extra_ratio": round(proto / floor, 3)})
                    say(f"  {'':10} {'':9}     extra ({args.extra.rpartition(':')[2]}) {proto:7.0f} req/s, extra/floor {proto / floor:.2f}")
        figures[f"{kind}_requests"] = done
        if args.profile:
            figures[f"{kind}_profile_us"] = profile(url, plan, 3.0, say)
        return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke run (~30 s)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("--profile", action="store_true", help="also cProfile the ledger in one process")
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: unlimited, limited")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 3, quick 0.5)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--extra", metavar="FILE.py:FUNC", help="also time FUNC(url) -> a Meter-like prototype")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (0.5 if args.quick else 3.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.variants = [v for v in args.variants.split(",") if v]

    def say(line: str = "") -> None:
        if not args.json_only:
            print(line, flush=True)

    started = time.perf_counter()
    figures: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "quick": args.quick, "rounds": args.rounds, "seconds": args.seconds, "concurrency": list(CONCURRENCY),
        "variants": args.variants, "sqlite": __import__("sqlite3").sqlite_version, "psycopg": psycopg.__version__,
    }
    say(f"bench_ledger: Python {figures['python']}, {figures['cpus']} cpus, SQLite {figures['sqlite']}, psycopg "
        f"{figures['psycopg']}; {args.rounds} round(s) of {args.seconds} s per measurement")
    problems: list[str] = []
    for kind in args.databases.split(","):
        if kind == "postgresql" and (down := pg_unreachable()):
            say(f"  postgresql: not reachable at {PG_URL} ({down}); skipped")
            figures["postgresql_skipped"] = down
            continue
        problems += bench_database(kind, args, say, figures)
    met = [v for k, v in figures.items() if k.endswith("_met")]
    figures["all_met"] = bool(met) and all(met)
    figures["check_failures"] = len(problems)
    figures["elapsed"] = round(time.perf_counter() - started, 1)
    verdict = ("nothing measured" if not met else "target MET everywhere measured" if figures["all_met"]
               else "target NOT MET somewhere (see above)")
    say(f"{len(problems)} CHECK FAILURE(S)" if problems else f"ALL CHECKS OK: audit ok after every ledger run, floor "
        f"balances exact ({figures['elapsed']} s); {verdict}")
    print(json.dumps(figures), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
