"""`sidecar-agent supabase sql` and `sidecar-agent postgres migrate`: the table the
postgres and supabase sinks write to."""

from __future__ import annotations

import argparse
import asyncio


def supabase_sql(args: argparse.Namespace) -> int:
    """Print the migration SQL for Supabase's SQL editor."""
    from agent.table.ddl import migration_sql

    print(migration_sql(schema=args.schema, table=args.table))
    return 0


def postgres_migrate(args: argparse.Namespace) -> int:
    """Apply the migration to a Postgres database (idempotent)."""
    from agent.table.ddl import apply

    asyncio.run(apply(args.dsn, args.schema, args.table))
    print(f"migrated {args.schema}.{args.table}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `supabase` and `postgres` subcommands."""
    s = sub.add_parser("supabase", help="Supabase helpers")
    s.add_argument("action", choices=["sql"])
    s.add_argument("--schema", default="public")
    s.add_argument("--table", default="monitoring_events")
    s.set_defaults(fn=supabase_sql)
    p = sub.add_parser("postgres", help="Postgres helpers")
    p.add_argument("action", choices=["migrate"])
    p.add_argument("--dsn", required=True)
    p.add_argument("--schema", default="public")
    p.add_argument("--table", default="monitoring_events")
    p.set_defaults(fn=postgres_migrate)
