"""one-api and new-api databases for the import tests: the tables as GORM's AutoMigrate creates them, and builders.

The columns follow the projects' GORM models (read from the sources, not copied):

* one-api (songquanpeng/one-api, v0.6): model/user.go (``User``), model/token.go (``Token``: ``key`` char(48),
  ``expired_time`` -1, ``remain_quota``/``used_quota`` bigint, ``models``, ``subnet``), model/log.go (``Log``:
  ``token_name``, ``channel_id``, ``request_id``, ``elapsed_time``, ``is_stream``, ``system_prompt_reset``).
* new-api (QuantumNous/new-api): model/user.go (``group`` varchar(64), ``deleted_at``), model/token.go
  (``model_limits_enabled``, ``model_limits``, ``allow_ips``, ``group``, ``deleted_at``), model/log.go (``use_time``,
  ``is_stream``, ``channel_id``, ``token_id``, ``group``, ``ip``, ``other``).

Types per dialect as GORM maps them: a Go ``int`` is ``integer`` on SQLite and ``bigint`` on MySQL and
PostgreSQL; an unsized ``string`` is ``text`` / ``longtext`` / ``text`` (``varchar(191)`` on MySQL when indexed);
``bool`` is ``numeric`` / ``boolean`` / ``boolean``; the primary key ``integer PRIMARY KEY AUTOINCREMENT`` /
``bigint AUTO_INCREMENT`` / ``bigserial``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from sqlalchemy import MetaData, Table, create_engine, insert, text
from sqlalchemy.engine import make_url

from metering.ledger.database import normalize_url

_TYPES = {
    "sqlite": {"pk": "integer PRIMARY KEY AUTOINCREMENT", "int": "integer", "str": "text", "istr": "text",
               "bool": "numeric", "time": "datetime"},
    "mysql": {"pk": "bigint AUTO_INCREMENT PRIMARY KEY", "int": "bigint", "str": "longtext", "istr": "varchar(191)",
              "bool": "boolean", "time": "datetime(3)"},
    "postgresql": {"pk": "bigserial PRIMARY KEY", "int": "bigint", "str": "text", "istr": "text", "bool": "boolean",
                   "time": "timestamptz"},
}

#: (column, type, constraint) of each flavor's tables, in the models' field order.
SCHEMAS: dict[str, dict[str, list[tuple[str, str, str]]]] = {
    "one-api": {
        "users": [("id", "pk", ""), ("username", "istr", "UNIQUE"), ("password", "str", "NOT NULL"),
                  ("display_name", "istr", ""), ("role", "int", "DEFAULT 1"), ("status", "int", "DEFAULT 1"),
                  ("email", "istr", ""), ("github_id", "istr", ""), ("wechat_id", "istr", ""),
                  ("access_token", "char(32)", "UNIQUE"), ("quota", "int", "DEFAULT 0"), ("used_quota", "int", "DEFAULT 0"),
                  ("request_count", "int", "DEFAULT 0"), ("group", "varchar(32)", "DEFAULT 'default'"),
                  ("aff_code", "varchar(32)", "UNIQUE"), ("inviter_id", "int", "")],
        "tokens": [("id", "pk", ""), ("user_id", "int", ""), ("key", "char(48)", "UNIQUE"), ("status", "int", "DEFAULT 1"),
                   ("name", "istr", ""), ("created_time", "int", ""), ("accessed_time", "int", ""),
                   ("expired_time", "int", "DEFAULT -1"), ("remain_quota", "int", "DEFAULT 0"),
                   ("unlimited_quota", "bool", "DEFAULT false"), ("used_quota", "int", "DEFAULT 0"),
                   ("models", "str", "DEFAULT ''"), ("subnet", "str", "DEFAULT ''")],
        "logs": [("id", "pk", ""), ("user_id", "int", ""), ("created_at", "int", ""), ("type", "int", ""),
                 ("content", "str", ""), ("username", "istr", "DEFAULT ''"), ("token_name", "istr", "DEFAULT ''"),
                 ("model_name", "istr", "DEFAULT ''"), ("quota", "int", "DEFAULT 0"), ("prompt_tokens", "int", "DEFAULT 0"),
                 ("completion_tokens", "int", "DEFAULT 0"), ("channel_id", "int", ""), ("request_id", "istr", "DEFAULT ''"),
                 ("elapsed_time", "int", "DEFAULT 0"), ("is_stream", "bool", "DEFAULT false"),
                 ("system_prompt_reset", "bool", "DEFAULT false")],
    },
    "new-api": {
        "users": [("id", "pk", ""), ("username", "istr", "UNIQUE"), ("password", "str", "NOT NULL"),
                  ("display_name", "istr", ""), ("role", "int", "DEFAULT 1"), ("status", "int", "DEFAULT 1"),
                  ("email", "istr", ""), ("github_id", "istr", ""), ("oidc_id", "istr", ""), ("wechat_id", "istr", ""),
                  ("telegram_id", "istr", ""), ("access_token", "char(32)", "UNIQUE"), ("quota", "int", "DEFAULT 0"),
                  ("used_quota", "int", "DEFAULT 0"), ("request_count", "int", "DEFAULT 0"),
                  ("group", "varchar(64)", "DEFAULT 'default'"), ("aff_code", "varchar(32)", "UNIQUE"),
                  ("aff_count", "int", "DEFAULT 0"), ("aff_quota", "int", "DEFAULT 0"), ("aff_history", "int", "DEFAULT 0"),
                  ("inviter_id", "int", ""), ("deleted_at", "time", ""), ("linux_do_id", "istr", ""),
                  ("setting", "str", ""), ("remark", "varchar(255)", "")],
        "tokens": [("id", "pk", ""), ("user_id", "int", ""), ("key", "char(48)", "UNIQUE"), ("status", "int", "DEFAULT 1"),
                   ("name", "istr", ""), ("created_time", "int", ""), ("accessed_time", "int", ""),
                   ("expired_time", "int", "DEFAULT -1"), ("remain_quota", "int", "DEFAULT 0"),
                   ("unlimited_quota", "bool", ""), ("model_limits_enabled", "bool", ""),
                   ("model_limits", "varchar(1024)", "DEFAULT ''"), ("allow_ips", "str", "DEFAULT ''"),
                   ("used_quota", "int", "DEFAULT 0"), ("group", "str", "DEFAULT ''"), ("deleted_at", "time", "")],
        "logs": [("id", "pk", ""), ("user_id", "int", ""), ("created_at", "int", ""), ("type", "int", ""),
                 ("content", "str", ""), ("username", "istr", "DEFAULT ''"), ("token_name", "istr", "DEFAULT ''"),
                 ("model_name", "istr", "DEFAULT ''"), ("quota", "int", "DEFAULT 0"), ("prompt_tokens", "int", "DEFAULT 0"),
                 ("completion_tokens", "int", "DEFAULT 0"), ("use_time", "int", "DEFAULT 0"), ("is_stream", "bool", ""),
                 ("channel_id", "int", ""), ("token_id", "int", "DEFAULT 0"), ("group", "istr", ""),
                 ("ip", "istr", "DEFAULT ''"), ("other", "str", "")],
    },
}


def _dialect(url: str) -> str:
    backend = make_url(url).get_backend_name()
    return "mysql" if backend in ("mysql", "mariadb") else backend


def create_statements(flavor: str, dialect: str) -> list[str]:
    """The CREATE TABLE statements GORM's AutoMigrate issues for ``flavor`` on ``dialect`` (indexes left out)."""
    quote = '"' if dialect == "postgresql" else "`"
    statements = []
    for table, columns in SCHEMAS[flavor].items():
        parts = [f"{quote}{name}{quote} {_TYPES[dialect].get(kind, kind)} {extra}".strip() for name, kind, extra in columns]
        statements.append(f"CREATE TABLE {quote}{table}{quote} ({', '.join(parts)})")
    return statements


def build(url: str, flavor: str) -> None:
    """Create the three tables of ``flavor`` in the (empty) database at ``url``."""
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        for statement in create_statements(flavor, _dialect(url)):
            connection.execute(text(statement))
    engine.dispose()


def add(url: str, table: str, rows: Iterable[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` (columns left out take GORM's defaults)."""
    rows = list(rows)
    if not rows:
        return
    engine = create_engine(normalize_url(url))
    reflected = Table(table, MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        for row in rows:
            connection.execute(insert(reflected).values(**row))
    engine.dispose()


def execute(url: str, sql: str, **params: Any) -> None:
    """Run one statement on the source (a test changing the deployment between imports)."""
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        connection.execute(text(sql), params)
    engine.dispose()


def source_database(backend: str, made: dict[str, Any], tmp_path: Any) -> str:
    """An empty database of ``backend`` for the source (on the servers: a second database of this session)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/one-api.db"
    from tests.databases import _unavailable

    session_url = made[backend]
    if isinstance(session_url, Exception):
        _unavailable(backend, f"{type(session_url).__name__}: {session_url}".splitlines()[0])
    name = f"oneapi_src_{os.getpid()}"
    admin = create_engine(session_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        if backend == "postgresql":  # the previous test's source connections, if any are left
            connection.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return make_url(session_url).set(database=name).render_as_string(hide_password=False)


def drop_source_database(backend: str, made: dict[str, Any]) -> None:
    """Drop the source database ``source_database`` made (end of the session)."""
    session_url = made.get(backend)
    if not isinstance(session_url, str):
        return
    name = f"oneapi_src_{os.getpid()}"
    admin = create_engine(session_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        if backend == "postgresql":
            connection.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    admin.dispose()
