"""The Postgres / Supabase schema for the postgres and supabase sinks.

`migration_sql()` renders agent/table/sql/monitoring_events.sql for a schema and table
(`sidecar-agent supabase sql` prints it for the Supabase SQL editor); `apply()` runs
it against a database with asyncpg (`sidecar-agent postgres migrate --dsn DSN`).
The SQL is idempotent, so applying it twice is harmless.
"""

from __future__ import annotations

import re
from importlib import resources

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TEMPLATE = "monitoring_events.sql"


def check_identifier(name: str, what: str = "identifier") -> str:
    """Return `name` if it is a plain lower-case SQL identifier, else raise ValueError."""
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"invalid {what} {name!r}: use lower-case letters, digits and _ (max 63)")
    return name


def qualified(schema: str, table: str) -> str:
    """The quoted `"schema"."table"` name, after validating both parts."""
    return f'"{check_identifier(schema, "schema")}"."{check_identifier(table, "table")}"'


def migration_sql(schema: str = "public", table: str = "monitoring_events") -> str:
    """The idempotent DDL for the events table in `schema`.`table`."""
    check_identifier(schema, "schema")
    check_identifier(table, "table")
    text = resources.files(__package__).joinpath("sql", _TEMPLATE).read_text(encoding="utf-8")
    for token, value in (
        ("{{schema_lit}}", f"'{schema}'"),
        ("{{table_lit}}", f"'{table}'"),
        ("{{schema}}", f'"{schema}"'),
        ("{{table}}", f'"{table}"'),
        ("{{prefix}}", table),
    ):
        text = text.replace(token, value)
    return text


async def apply(dsn: str, schema: str = "public", table: str = "monitoring_events") -> None:
    """Apply the migration to the database at `dsn`, in one transaction."""
    import asyncpg

    sql = migration_sql(schema, table)
    con = await asyncpg.connect(dsn)
    try:
        async with con.transaction():
            # Serialize concurrent migrations (two agents starting at once).
            await con.execute("SELECT pg_advisory_xact_lock(hashtext('sidecar_agent.migration'))")
            await con.execute(sql)
    finally:
        await con.close()
