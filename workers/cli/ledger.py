"""Ledger commands of the ``metering`` command line: db, user, key, topup, grant, redeem, balance, audit,
quarantine.

A public contract (docs/ledger.md and tests use these names, fields and exit codes). The database is
``--db URL``, else ``$METERING_DB``, else ``sqlite:///metering.db``; every command brings the schema to
head first (``db upgrade`` does only that). USER is a user's name or id. ``--json`` prints one JSON
document. Errors print ``error: <field>: ...`` on stderr (the flag or argument at fault) and exit 2, and a
bad flag is refused before the ledger is opened wherever the price table alone can tell; ``audit`` exits 1
when an invariant is broken. Secrets (API keys, redemption codes) are printed once, by the command that creates them, and
never again: the database keeps only their sha256.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from workers.cli.plumbing import cell, emit, fail, printable
from pricing.errors import BillingError
from pricing.quote import MAX_QUOTA, decimal_text

T = TypeVar("T")
stdout = Console()
stderr = Console(stderr=True)
EXIT_VIOLATIONS = 1
SECRET_WARNING = "shown this once: the ledger stores only its sha256 and cannot show it again; copy it now"

DbOption = Annotated[
    Optional[str],
    typer.Option("--db", help="Ledger database URL (default: $METERING_DB, else sqlite:///metering.db).", show_default=False),
]
PricesOption = Annotated[
    Optional[Path],
    typer.Option("--prices", help="Price table YAML (default: $METERING_PRICE_TABLE, else the bundled table)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def _user_reference(field: str) -> Callable[[Optional[str]], Optional[str]]:
    """A parameter callback refusing, before any database is opened, a USER that can be no user (exit 2)."""

    def check(value: Optional[str]) -> Optional[str]:
        from metering.ledger.errors import InvalidField
        from metering.ledger.inputs import user_ref

        if value is not None:
            try:
                user_ref(value, field)  # the ledger's own rule (Meter.find_user): an id within 64 bits, or a name
            except InvalidField as exc:
                fail(str(exc))
        return value

    return check


UserArgument = Annotated[str, typer.Argument(help="The user's name or id.", show_default=False,
                                             callback=_user_reference("USER"))]

db_app = typer.Typer(help="The ledger's database: create or upgrade its schema.", no_args_is_help=True)
user_app = typer.Typer(help="Create, show and list users.", no_args_is_help=True)
key_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
redeem_app = typer.Typer(help="Create and use single-use redemption codes.", no_args_is_help=True)
quarantine_app = typer.Typer(
    help="Rejected or capped usage kept for finance (never dropped): list it, approve a capped charge's rest.",
    no_args_is_help=True,
)
#: Currencies a top-up may be paid in (the price table's recharge rates name them).
CURRENCIES = ("CNY", "USDT", "USD")


def register(app: typer.Typer) -> None:
    """Add the ledger commands to the main ``metering`` app."""
    app.add_typer(db_app, name="db")
    app.add_typer(user_app, name="user")
    app.add_typer(key_app, name="key")
    app.command("topup")(topup)
    app.command("grant")(grant)
    app.add_typer(redeem_app, name="redeem")
    app.command("balance")(balance)
    app.command("audit")(audit)
    app.add_typer(quarantine_app, name="quarantine")


# ---------------------------------------------------------------------- plumbing


def error_message(exc: Exception, flags: dict[str, str] | None = None) -> str:
    """What to tell the operator: our errors as they are, a database's error by its driver's first line.

    An error naming an argument of the library call (``reference: ...``) names the command's flag instead
    (``--reference: ...``) when ``flags`` maps it. A price table's problems are joined on one line.
    """
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from pricing.errors import PriceTableError

    if isinstance(exc, DBAPIError) and exc.orig is not None:
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        return f"database: {first}"
    if isinstance(exc, SQLAlchemyError):
        return f"database: {str(exc).splitlines()[0]}"
    if isinstance(exc, PriceTableError):
        return "; ".join(str(problem) for problem in exc.problems)
    text = str(exc)
    field = getattr(exc, "field", None)
    if flags and isinstance(field, str) and field in flags and text.startswith(f"{field}: "):
        return f"{flags[field]}: {text[len(field) + 2:]}"
    return text


def handled_errors() -> tuple[type[Exception], ...]:
    """The errors a command reports as ``error: ...`` (exit 2); imported late, so other commands stay fast."""
    from sqlalchemy.exc import SQLAlchemyError

    from metering.ledger.schema import SchemaError

    return (BillingError, ValueError, SchemaError, SQLAlchemyError)


def ledger_url(db: str | None) -> str:
    """The ledger's URL (``--db``, else ``$METERING_DB``, else the default), refused (exit 2 naming where it
    came from) when it cannot be parsed or names a SQLite file in a directory that does not exist: a
    mistyped path creates nothing, not even the directory."""
    from metering.ledger.database import DB_ENV, database_url, missing_directory

    url, flag = database_url(db), "--db" if db else DB_ENV
    try:
        missing = missing_directory(url)
    except handled_errors() as exc:
        fail(f"{flag}: {error_message(exc)}")
    if missing is not None:
        fail(f"{flag}: the directory {missing} does not exist (nothing was created; create it first)")
    return url


def open_ledger(db: str | None, table: Any) -> Any:
    """The ledger at ``db`` (``ledger_url``), schema brought to head, pricing by ``table``; exit 2 naming --db."""
    from metering.ledger import Meter

    url = ledger_url(db)
    try:
        return Meter.open(url, prices=table)
    except handled_errors() as exc:
        fail(f"{'--db' if db else 'METERING_DB'}: {error_message(exc)}")


def load_prices(prices: Path | None) -> Any:
    """The price table (``--prices``, else ``$METERING_PRICE_TABLE``, else the bundled one); exit 2 naming it."""
    from pricing.table import PRICE_TABLE_ENV, load_price_table

    try:
        return load_price_table(prices)
    except handled_errors() as exc:
        fail(f"{'--prices' if prices is not None else PRICE_TABLE_ENV}: {error_message(exc)}")


def _with_meter(
    db: str | None, prices: Path | None, work: Callable[[Any], T], *, check: Callable[[Any], None] | None = None,
    flags: dict[str, str] | None = None,
) -> T:
    """Open the ledger (schema brought to head), run ``work(meter)``, close; every known error exits 2.

    ``check(price_table)`` runs before the database is opened: a flag the price table refuses (an unknown
    group, grant or currency) is reported without creating or touching the database. ``flags`` maps the
    library's argument names to the command's flags in error messages.
    """
    table = load_prices(prices)
    if check is not None:
        check(table)
    meter = open_ledger(db, table)
    try:
        return work(meter)
    except handled_errors() as exc:
        fail(error_message(exc, flags))
    finally:
        meter.close()


def _shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "<invalid URL>"


def _user_id(meter: Any, user: str, field: str = "USER") -> int:
    """The id of the user ``user`` names (a name or an id); exit 2 naming ``field`` when there is none."""
    from metering.ledger.errors import InvalidField, NotFound

    try:
        return meter.find_user(user)
    except NotFound as exc:
        fail(f"{field}: {exc}")
    except InvalidField as exc:
        fail(f"{field}: {exc.message}")


def _known(flag: str, noun: str, name: str, known: Any) -> None:
    """Exit 2 naming ``flag`` unless ``name`` is one of ``known`` (a price table's groups, grants...)."""
    if name not in known:
        fail(f"{flag}: unknown {noun} {name!r} (known: {', '.join(sorted(known))})")


def _usd(meter: Any, units: int) -> str:
    """Quota units as list-price USD: exact when the units per USD allow it (500,000 does), else 12 places."""
    value = Fraction(units, meter.prices.units_per_usd)
    denominator = value.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    if denominator == 1:
        return decimal_text(value)
    return str((Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal("1e-12")))


def _wide() -> Console:
    """The terminal as it is; a pipe gets room for the tables (rich would give it 80 columns)."""
    return stdout if stdout.is_terminal else Console(width=200)


# ---------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Create the schema or upgrade it to the newest migration (safe to run anywhere, any time)."""
    from metering.ledger.database import make_engine
    from metering.ledger.schema import head_revision, upgrade

    url = ledger_url(db)
    try:
        engine = make_engine(url)
        try:
            revision = upgrade(engine)
        finally:
            engine.dispose()
    except handled_errors() as exc:
        fail(f"{'--db' if db else 'METERING_DB'}: {error_message(exc)}")
    if as_json:
        emit({"database": _shown_url(url), "revision": revision, "head": head_revision()})
        return
    print(f"ok: {printable(_shown_url(url))} is at revision {revision} (head)")


# ---------------------------------------------------------------------- users


@user_app.command("create")
def user_create(
    name: Annotated[str, typer.Argument(help="A unique name (not only digits: USER arguments read digits as an id).")],
    group: Annotated[str, typer.Option("--group", help="Pricing group of the price table.")] = "default",
    db: DbOption = None,
    prices: PricesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a user with a zero balance."""
    from sqlalchemy.exc import IntegrityError

    if not name.strip() or name != name.strip():
        fail("NAME: a user name must not be empty or start or end with spaces")
    if name.isdigit():
        fail(f"NAME: a user name cannot be only digits ({name!r}): USER arguments take digits as a user id")

    def work(meter: Any) -> dict[str, Any]:
        try:
            meter.find_user(name)
        except BillingError:
            pass
        else:
            fail(f"NAME: user {name!r} already exists")
        try:
            return meter.user(meter.create_user(name, group=group))
        except IntegrityError:
            fail(f"NAME: user {name!r} already exists")

    created = _with_meter(db, prices, work, check=lambda table: _known("--group", "group", group, table.groups),
                          flags={"name": "NAME", "group": "--group"})
    if as_json:
        emit(created)
        return
    print(f"created user {created['id']} {printable(created['name'])} (group {printable(created['group'])})")


@user_app.command("show")
def user_show(user: UserArgument, db: DbOption = None, as_json: JsonOption = False) -> None:
    """A user: id, name, group, balance and keys (never their secrets)."""

    def work(meter: Any) -> dict[str, Any]:
        uid = _user_id(meter, user)
        return meter.user(uid) | {"usd": _usd(meter, meter.balance(uid)), "keys": _keys(meter, uid)}

    shown = _with_meter(db, None, work)
    if as_json:
        emit(shown)
        return
    print(f"user {shown['id']} {printable(shown['name'])}: group {printable(shown['group'])}, balance {shown['balance']} "
          f"units (${shown['usd']})")
    for key in shown["keys"]:
        print(f"  key {key['id']} {printable(key['name'])} {printable(key['prefix'])} {key['status']}, {_limit_text(key)}")


@user_app.command("list")
def user_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Every user, by id."""
    users = _with_meter(db, None, lambda meter: meter.users())
    if as_json:
        emit(users)
        return
    table = Table("id", "name", "group", "balance")
    for row in users:
        table.add_row(str(row["id"]), cell(row["name"]), cell(row["group"]), str(row["balance"]))
    _wide().print(table)


# ---------------------------------------------------------------------- keys


def _keys(meter: Any, user_id: int | None) -> list[dict[str, Any]]:
    """The meter's key rows plus ``charged_quota``: quota charged through the key (from usage events)."""
    from sqlalchemy import func, select

    from metering.ledger.tables import UsageEvent

    events = UsageEvent.__table__  # type: ignore[attr-defined]
    with meter.engine.connect() as connection:
        charged = dict(
            connection.execute(
                select(events.c.key_id, func.sum(events.c.quota)).where(events.c.status == "charged").group_by(events.c.key_id)
            ).all()
        )
    return [key | {"charged_quota": int(charged.get(key["id"], 0))} for key in meter.keys(user_id)]


def _limit_text(key: dict[str, Any]) -> str:
    if key["limit_quota"] is None:
        return f"unlimited, {key['charged_quota']} charged"
    return f"limit {key['limit_quota']}, used {key['used_quota']}, reserved {key['reserved_quota']}"


def _expiry(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--expires: not an ISO 8601 time: {text!r}")
    if moment.tzinfo is None:
        fail(f"--expires: {text!r} has no time zone (add Z or +08:00)")
    try:
        moment.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last representable time once in UTC
        fail(f"--expires: {text!r} is out of range")
    if moment <= datetime.now(timezone.utc):
        fail(f"--expires: {text!r} is in the past")
    return moment


def _model_list(text: str) -> list[str]:
    from metering.models import resolve_model

    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        fail("--models: give at least one model, e.g. --models gpt-4o,claude-sonnet-4-5")
    for model in models:
        try:
            resolve_model(model)
        except BillingError as exc:
            fail(f"--models: {exc}")
    return models


@key_app.command("create")
def key_create(
    user: UserArgument,
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "default",
    limit_quota: Annotated[
        Optional[int], typer.Option("--limit-quota", min=0, max=MAX_QUOTA,
                                    help="Most quota units the key may spend (default: unlimited).")
    ] = None,
    unlimited: Annotated[bool, typer.Option("--unlimited", help="No limit of its own (the default): only the balance.")] = False,
    models: Annotated[Optional[str], typer.Option("--models", help="Allowed models, comma-separated (default: all).")] = None,
    expires: Annotated[Optional[str], typer.Option("--expires", help="Expiry, ISO 8601 with a time zone.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key and print its secret, this once (only its sha256 is stored)."""
    from sqlalchemy import select

    from metering.ledger.meter import secret_hash
    from metering.ledger.tables import ApiKey

    if unlimited and limit_quota is not None:
        fail("--unlimited: give either --limit-quota N or --unlimited, not both")
    allowed = _model_list(models) if models is not None else None
    expires_at = _expiry(expires) if expires is not None else None

    def work(meter: Any) -> tuple[str, dict[str, Any]]:
        uid = _user_id(meter, user)
        secret = meter.create_key(uid, name, limit_quota=limit_quota, models=allowed, expires_at=expires_at)
        keys = ApiKey.__table__  # type: ignore[attr-defined]
        with meter.engine.connect() as connection:
            key_id = connection.execute(select(keys.c.id).where(keys.c.secret_hash == secret_hash(secret))).scalar_one()
        (row,) = [k for k in _keys(meter, uid) if k["id"] == key_id]
        return secret, row

    secret, row = _with_meter(db, None, work, flags={"name": "--name", "expires_at": "--expires",
                                                      "limit_quota": "--limit-quota"})
    if as_json:
        emit(row | {"secret": secret, "warning": f"the secret is {SECRET_WARNING}"})
        return
    print(f"created key {row['id']} {printable(row['name'])} for user {row['user_id']} ({_limit_text(row)})")
    print(secret)
    stderr.print(f"warning: the secret above is {SECRET_WARNING}", highlight=False, soft_wrap=True, markup=False)


@key_app.command("list")
def key_list(
    user: Annotated[Optional[str], typer.Argument(help="Only this user's keys (name or id).",
                                                  callback=_user_reference("USER"))] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """API keys (prefix only, never the secret), with limits and usage."""
    rows = _with_meter(db, None, lambda meter: _keys(meter, None if user is None else _user_id(meter, user)))
    if as_json:
        emit(rows)
        return
    table = Table("id", "user", "name", "prefix", "status", "limit", "used", "reserved", "charged", "models", "expires")
    for row in rows:
        table.add_row(
            str(row["id"]), str(row["user_id"]), cell(row["name"]), cell(row["prefix"]), cell(row["status"]),
            "unlimited" if row["limit_quota"] is None else str(row["limit_quota"]), str(row["used_quota"]),
            str(row["reserved_quota"]), str(row["charged_quota"]),
            cell("all" if row["models"] is None else ",".join(row["models"])),
            row["expires_at"] or "never",
        )
    _wide().print(table)


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id (see key list).")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Disable a key for good (its open holds still settle); revoking twice is not an error."""
    from metering.ledger.errors import InvalidField
    from metering.ledger.inputs import row_id

    try:
        row_id(key_id, "KEY_ID")  # before the ledger is opened: a 70-bit id is refused, not looked up
    except InvalidField as exc:
        fail(str(exc))

    def work(meter: Any) -> bool:
        if not any(k["id"] == key_id for k in meter.keys()):
            fail(f"KEY_ID: no API key {key_id}")
        return bool(meter.revoke_key(key_id))

    changed = _with_meter(db, None, work)
    if as_json:
        emit({"id": key_id, "status": "revoked", "changed": changed})
        return
    print(f"revoked key {key_id}" if changed else f"key {key_id} was already revoked")


# ---------------------------------------------------------------------- credits


def topup(
    user: UserArgument,
    amount: Annotated[str, typer.Option("--amount", help="Amount paid, e.g. 10 or 99.90.")],
    currency: Annotated[str, typer.Option("--currency", help="CNY, USDT or USD.")],
    reference: Annotated[str, typer.Option("--reference", help="The payment's id: a retry with it credits once.")],
    db: DbOption = None,
    prices: PricesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Credit a paid top-up at the recharge rate in force, once per --reference."""
    from metering.ledger.inputs import identifier
    from pricing.errors import FieldError, PriceNotFound
    from pricing.recharge import amount_text, topup_amount

    if currency.upper() not in CURRENCIES:
        fail(f"--currency: must be one of {', '.join(CURRENCIES)}, got {currency!r}")
    from metering.ledger.errors import InvalidField

    try:
        identifier(reference, "--reference")
        topup_amount(amount)
    except (FieldError, InvalidField) as exc:
        fail(str(exc).replace("amount: ", "--amount: ", 1) if exc.field == "amount" else str(exc))

    def work(meter: Any) -> dict[str, Any]:
        uid = _user_id(meter, user)
        try:
            units = meter.topup(uid, amount, currency.upper(), reference)
        except PriceNotFound as exc:  # no recharge rate in force for this currency
            fail(f"--currency: {exc}")
        return {"user_id": uid, "reference": reference, "amount": amount_text(topup_amount(amount)),
                "currency": currency.upper(), "quota": units, "balance": meter.balance(uid)}

    result = _with_meter(db, prices, work, flags={"amount": "--amount", "reference": "--reference"})
    if as_json:
        emit(result)
        return
    print(f"top-up {printable(reference)}: {result['quota']} units to user {result['user_id']}; balance {result['balance']}")


def grant(
    user: UserArgument,
    kind: Annotated[str, typer.Argument(help="A grant of the price table, e.g. signup.")],
    db: DbOption = None,
    prices: PricesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give the price table's grant KIND, once per user (0 units the second time)."""

    def work(meter: Any) -> dict[str, Any]:
        uid = _user_id(meter, user)
        units = meter.grant(uid, kind)
        return {"user_id": uid, "kind": kind, "quota": units, "granted": units > 0, "balance": meter.balance(uid)}

    result = _with_meter(db, prices, work, check=lambda table: _known("KIND", "grant", kind, table.grants))
    if as_json:
        emit(result)
        return
    if result["granted"]:
        print(f"granted {printable(kind)}: {result['quota']} units to user {result['user_id']}; balance {result['balance']}")
    else:
        print(f"user {result['user_id']} already had the {printable(kind)} grant; balance {result['balance']}")


@redeem_app.command("create")
def redeem_create(
    count: Annotated[int, typer.Option("--count", min=1, max=100_000, help="How many codes.")],
    quota: Annotated[int, typer.Option("--quota", min=1, max=MAX_QUOTA, help="Quota units each code is worth.")],
    batch: Annotated[Optional[str], typer.Option("--batch", help="A label for the batch (default: time + random).")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create single-use codes and print them, this once (only their sha256 is stored)."""
    import secrets

    from metering.ledger.errors import InvalidField
    from metering.ledger.inputs import identifier

    label = batch or datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
    try:
        identifier(label, "--batch", 64)
    except InvalidField as exc:
        fail(str(exc))
    codes = _with_meter(db, None, lambda meter: meter.create_redemption_codes(count, quota, batch=label))
    if as_json:
        emit({"batch": label, "count": len(codes), "quota": quota, "codes": codes,
               "warning": f"the codes are {SECRET_WARNING}"})
        return
    print(f"batch {printable(label)}: {len(codes)} codes of {quota} units")
    for code in codes:
        print(code)
    stderr.print(f"warning: the codes above are {SECRET_WARNING}", highlight=False, soft_wrap=True, markup=False)


@redeem_app.command("use")
def redeem_use(
    user: UserArgument,
    code: Annotated[str, typer.Argument(help="The code, or - to read it from stdin (keeps it out of ps).")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Redeem a code for USER: credited once, under any concurrency; a used code is refused."""
    if code == "-":
        code = sys.stdin.readline().strip()

    from metering.ledger.errors import DuplicateReference, NotFound

    def work(meter: Any) -> dict[str, Any]:
        uid = _user_id(meter, user)
        try:
            units = meter.redeem(uid, code)
        except (NotFound, DuplicateReference) as exc:
            fail(f"CODE: {exc}")
        return {"user_id": uid, "quota": units, "balance": meter.balance(uid)}

    result = _with_meter(db, None, work)
    if as_json:
        emit(result)
        return
    print(f"redeemed {result['quota']} units for user {result['user_id']}; balance {result['balance']}")


# ---------------------------------------------------------------------- reading


def balance(user: UserArgument, db: DbOption = None, as_json: JsonOption = False) -> None:
    """A user's balance in quota units (open holds already taken out), and its list-price USD."""

    def work(meter: Any) -> dict[str, Any]:
        row = meter.user(_user_id(meter, user))
        return {"user_id": row["id"], "name": row["name"], "balance": row["balance"], "usd": _usd(meter, row["balance"])}

    result = _with_meter(db, None, work)
    if as_json:
        emit(result)
        return
    print(f"{printable(result['name'])} ({result['user_id']}): {result['balance']} units (${result['usd']})")


def audit(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Check every invariant of docs/ledger.md: exit 0 and "ok", or exit 1 and each violation."""
    from metering.ledger import quarantine

    report, quarantined = _with_meter(db, None, lambda meter: (meter.audit(), quarantine.count(meter._read)))
    violations = [{"invariant": v.invariant, "subject": v.subject, "detail": v.detail} for v in report.violations]
    if as_json:
        emit({"ok": report.ok, "violations": violations, "quarantined": quarantined})
    elif report.ok:
        print("ok")
    else:
        print(f"{len(violations)} violation{'s' if len(violations) != 1 else ''}:")
        for v in violations:
            print(printable(f"  {v['invariant']}: {v['subject']}: {v['detail']}"))
    if quarantined and not as_json:
        # Not a broken invariant (nothing was written for them), but requests served and not billed yet.
        print(f"note: {quarantined} rejected usage payload{'s' if quarantined != 1 else ''} in quarantine "
              "(metering quarantine list)")
    if not report.ok:
        raise typer.Exit(EXIT_VIOLATIONS)


# ---------------------------------------------------------------------- quarantine


@quarantine_app.command("list")
def quarantine_list(
    user: Annotated[Optional[str], typer.Option("--user", help="Only this user's (name or id).",
                                                callback=_user_reference("--user"))] = None,
    request_id: Annotated[Optional[str], typer.Option("--request-id", help="Only this request's.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="At most this many, newest first.")] = 100,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rejected usage payloads kept for finance, newest first: why, where, and whether billed since."""
    from metering.ledger import quarantine
    from metering.ledger.errors import InvalidField
    from metering.ledger.inputs import identifier

    if request_id is not None:
        try:
            identifier(request_id, "--request-id")
        except InvalidField as exc:
            fail(str(exc))

    def work(meter: Any) -> list[dict[str, Any]]:
        uid = None if user is None else _user_id(meter, user, "--user")
        return quarantine.listing(meter._read, request_id=request_id, user_id=uid, limit=limit)

    rows = _with_meter(db, None, work)
    if as_json:
        emit(rows)
        return
    table = Table("id", "last seen", "source", "action", "request", "user", "model", "field", "reason", "tries", "settled")
    for row in rows:
        table.add_row(
            str(row["id"]), row["last_seen_at"][:19], cell(row["source"]), cell(row["action"]), cell(row["request_id"] or "-"),
            str(row["user_id"] or "-"), cell(row["model"] or "-"), cell(row["field"] or "-"), cell(row["reason"][:120]),
            str(row["attempts"]), "yes" if row["settled"] else "no",
        )
    _wide().print(table)


@quarantine_app.command("approve")
def quarantine_approve(
    quarantine_id: Annotated[int, typer.Argument(metavar="ID", help="A capped usage's id (metering quarantine list).")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Charge the rest of a capped usage (reported beyond its hold's worst case): one adjustment, once."""
    from metering.ledger.errors import InvalidField
    from metering.ledger.inputs import row_id

    try:
        row_id(quarantine_id, "ID")  # before the ledger is opened
    except InvalidField as exc:
        fail(str(exc))
    charged = _with_meter(db, None, lambda meter: meter.approve_capped(quarantine_id), flags={"quarantine_id": "ID"})
    if as_json:
        emit({"id": quarantine_id, "charged": charged})
    elif charged:
        print(f"quarantined usage {quarantine_id}: {charged} units charged")
    else:
        print(f"quarantined usage {quarantine_id}: approved before, nothing charged now")


__all__ = [
    "db_app", "error_message", "handled_errors", "key_app", "ledger_url", "load_prices", "open_ledger", "quarantine_app",
    "redeem_app", "register", "user_app",
]
