"""Postgres sink: writes events straight into PostgreSQL with asyncpg.

A batch is first COPYed (binary, asyncpg's copy_records_to_table) straight into the
table: one statement, so all of it lands or none does, at the speed of COPY itself. Only
when that COPY meets an id that is already there (23505: a batch sent again after a
retry, a restart or a DLQ replay) is it written the idempotent way, in one transaction:
COPY into a per-connection temp table, then
`INSERT INTO target SELECT ... FROM temp ON CONFLICT (id) DO NOTHING`. Either way
re-sending a batch never duplicates rows (`copy_conflicts` counts the second path).
The pool reconnects after a server restart; connection loss, timeouts and transient
SQLSTATEs raise RetryableError, bad data and schema or permission problems raise
PermanentError, and so does an event that cannot be converted to a row
(agent.table.rows), so the core's bisection sends only that event to the DLQ.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import asyncpg
import msgspec

from agent.plugin import (
    COLUMNS,
    BaseSink,
    Event,
    PermanentError,
    PluginContext,
    RegisterComponent,
    RetryableError,
    check_identifier,
    hookimpl,
    sqlstate_retryable,
    to_record,
)


class PostgresOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[sinks.postgres]` options."""

    dsn: str
    schema: str = "public"
    table: str = "monitoring_events"
    min_pool: Annotated[int, msgspec.Meta(ge=0)] = 1
    max_pool: Annotated[int, msgspec.Meta(gt=0)] = 4
    command_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


_RETRYABLE_TYPES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,  # e.g. "connection is closed", "pool is closing"
    OSError,  # refused, reset, unreachable
    asyncio.TimeoutError,
    TimeoutError,
)


def map_pg_error(exc: BaseException) -> Exception:
    """Map an asyncpg / OS error to RetryableError or PermanentError."""
    msg = f"postgres: {type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None)
        msg = f"postgres: {code} {exc}"[:500]
        retryable = sqlstate_retryable(code)
        if retryable is None and isinstance(exc, _RETRYABLE_TYPES):
            retryable = True
        # Unknown SQLSTATE class: assume transient; the retry budget still ends in the DLQ.
        return PermanentError(msg) if retryable is False else RetryableError(msg)
    if isinstance(exc, asyncpg.exceptions.DataError):
        # Client-side encoding failure (asyncpg.DataError is an InterfaceError subclass).
        return PermanentError(msg)
    if isinstance(exc, _RETRYABLE_TYPES):
        return RetryableError(msg)
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return PermanentError(msg)
    return RetryableError(msg)


class PostgresSink(BaseSink):
    """Idempotent COPY-based batch writes into a PostgreSQL table."""

    # send() may run concurrently (each call takes its own pooled connection): the delivery
    # worker keeps this many batches in flight by default, as many as the default pool.
    max_in_flight = 4

    def __init__(self, name: str, options: PostgresOptions, ctx: PluginContext) -> None:
        self.name = name
        self.options = options
        self.ctx = ctx
        schema = check_identifier(options.schema, "schema")
        table = check_identifier(options.table, "table")
        if options.min_pool > options.max_pool:
            raise ValueError("min_pool must not exceed max_pool")
        cols = ", ".join(f'"{c}"' for c in COLUMNS)
        self._temp = f"_sidecar_stage_{table}"[:63]
        self._create_temp = (
            f'CREATE TEMP TABLE IF NOT EXISTS "{self._temp}" '
            f'(LIKE "{schema}"."{table}" INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
        )
        self._prepare = f"SET LOCAL client_min_messages = warning; {self._create_temp}"
        self._insert = (
            f'INSERT INTO "{schema}"."{table}" ({cols}) SELECT {cols} FROM "{self._temp}" ON CONFLICT ("id") DO NOTHING'
        )
        self._schema, self._table = schema, table
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        ctx.stats.setdefault("nonfinite_values", 0)
        ctx.stats.setdefault("rows_sent", 0)
        ctx.stats.setdefault("rows_inserted", 0)
        ctx.stats.setdefault("copy_conflicts", 0)

    async def _ensure_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                o = self.options
                self._pool = await asyncpg.create_pool(
                    o.dsn,
                    min_size=o.min_pool,
                    max_size=o.max_pool,
                    command_timeout=o.command_timeout_s,
                    timeout=o.connect_timeout_s,
                    server_settings={"application_name": f"sidecar-agent:{self.name}"},
                    # A released connection is only rolled back if a transaction was left
                    # open: the sink sets no session state, so asyncpg's default reset
                    # query (RESET ALL, UNLISTEN *, ...) would be one more round trip per batch.
                    reset=_keep_session,
                )
            return self._pool

    async def start(self) -> None:
        """Open the pool. If the server is down, log it and connect on the first send."""
        try:
            await self._ensure_pool()
        except Exception as exc:
            mapped = map_pg_error(exc)
            if isinstance(mapped, PermanentError):
                raise mapped from exc
            self.ctx.log.warning("postgres sink %s: database not reachable yet: %s", self.name, exc)

    async def send(self, events: list[Event]) -> None:
        if not events:
            return
        records = [to_record(e, self.ctx.stats) for e in events]  # PermanentError for an unconvertible event
        try:
            pool = await self._ensure_pool()
            async with pool.acquire() as con:
                try:
                    status = await con.copy_records_to_table(
                        self._table, schema_name=self._schema, records=records, columns=COLUMNS
                    )
                except asyncpg.UniqueViolationError:
                    # Some ids are there already (the COPY wrote nothing): only the new ones go in.
                    self.ctx.stats["copy_conflicts"] += 1
                    status = await self._insert_new(con, records)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, ValueError, TypeError) as exc:
            raise map_pg_error(exc) from exc
        self.ctx.stats["rows_sent"] += len(records)
        self.ctx.stats["rows_inserted"] += _inserted(status)

    async def _insert_new(self, con: asyncpg.Connection, records: list[tuple[Any, ...]]) -> str:
        """Write the rows whose id is not in the table yet, in one transaction."""
        async with con.transaction():
            # One round trip; SET LOCAL quiets the "already exists" NOTICE.
            await con.execute(self._prepare)
            await con.copy_records_to_table(self._temp, records=records, columns=COLUMNS)
            return str(await con.execute(self._insert))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=self.options.connect_timeout_s)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                pool.terminate()


async def _keep_session(con: asyncpg.Connection) -> None:
    """The pool's reset for a released connection, after asyncpg's own rollback of an open
    transaction: nothing more (see _ensure_pool)."""


def _inserted(status: Any) -> int:
    # "INSERT 0 <n>" or "COPY <n>"
    try:
        return int(str(status).rsplit(" ", 1)[-1])
    except ValueError:
        return 0


@hookimpl
def register_sinks(register: RegisterComponent) -> None:
    register("postgres", PostgresSink, options=PostgresOptions)
