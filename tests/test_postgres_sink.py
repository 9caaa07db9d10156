"""The postgres sink against the real PostgreSQL server: what only it does. What every sink
does (exactly once, bad rows, outages, missing table, non-finite values) is in test_sink_contract.py."""

from __future__ import annotations

import asyncpg
import pytest
from agent.builtin_plugins.postgres import PostgresOptions, PostgresSink, map_pg_error

from agent.errors import PermanentError, RetryableError
from tests.helpers import make_ctx, make_events


def sink_for(table, **kw) -> PostgresSink:
    opts = PostgresOptions(dsn=kw.pop("dsn", table.dsn), schema=table.schema, table=table.table, **kw)
    return PostgresSink("postgres", opts, make_ctx("postgres"))


async def test_rows_inserted_counts_only_new_rows(pg_table):
    """Landing once per id is in test_sink_contract; this is the postgres sink's own stat."""
    sink = sink_for(pg_table)
    await sink.start()
    try:
        events = make_events(200)
        await sink.send(events)
        await sink.send(events)
        await sink.send(events[:50] + events[:50])  # duplicates inside one batch too
    finally:
        await sink.close()
    counts = await pg_table.count_ids([e.id for e in events])
    assert set(counts.values()) == {1}
    assert sink.ctx.stats["rows_inserted"] == 200


async def test_a_fresh_batch_is_copied_straight_in_and_a_resent_one_takes_the_conflict_path(pg_table):
    """New ids go in with one COPY into the table; a batch with ids already there (a retry
    after an unknown outcome, a replay) fails that COPY as a whole and is written through
    the staging table with ON CONFLICT DO NOTHING: new rows land, none twice."""
    sink = sink_for(pg_table)
    await sink.start()
    try:
        first, second = make_events(300), make_events(300)
        await sink.send(first)
        assert sink.ctx.stats["copy_conflicts"] == 0 and sink.ctx.stats["rows_inserted"] == 300
        await sink.send(first[200:] + second)  # 100 already there, 300 new
        assert sink.ctx.stats["copy_conflicts"] == 1 and sink.ctx.stats["rows_inserted"] == 600
        await sink.send(second[:10])
        assert sink.ctx.stats["copy_conflicts"] == 2 and sink.ctx.stats["rows_inserted"] == 600
    finally:
        await sink.close()
    counts = await pg_table.count_ids([e.id for e in first + second])
    assert set(counts.values()) == {1}
    (row,) = await pg_table.fetch("SELECT count(*) AS n FROM {t}")
    assert row["n"] == 600


async def test_same_rows_as_supabase_mapping(pg_table):
    """Both sinks share agent.rows: the REST row and the asyncpg record agree."""
    from agent.table.rows import COLUMNS, to_record, to_rest_row

    (e,) = make_events(1)
    rest, rec = to_rest_row(e), to_record(e)
    assert list(rest) == list(COLUMNS)
    assert rec[0] == rest["id"] and rec[2] == rest["event_type"] and rec[5].isoformat() == rest["timestamp"]


async def test_bad_credentials_are_permanent(pg_table):
    sink = sink_for(pg_table, dsn=pg_table.dsn.rsplit("/", 1)[0] + "/no_such_database_x")
    with pytest.raises(PermanentError, match="3D000"):
        await sink.start()


async def test_pool_limits_and_concurrent_sends(pg_table):
    import asyncio

    sink = sink_for(pg_table, min_pool=1, max_pool=2)
    await sink.start()
    try:
        batches = [make_events(100) for _ in range(6)]
        await asyncio.gather(*(sink.send(b) for b in batches))
        assert sink._pool is not None and sink._pool.get_size() <= 2
    finally:
        await sink.close()
    (row,) = await pg_table.fetch("SELECT count(*) AS n FROM {t}")
    assert row["n"] == 600


def _pg_error(cls: type, sqlstate: str) -> Exception:
    exc = cls("boom")
    exc.sqlstate = sqlstate  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    "exc,expected",
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), RetryableError),
        (asyncpg.exceptions.ConnectionFailureError("x"), RetryableError),
        (asyncpg.TooManyConnectionsError("x"), RetryableError),
        (asyncpg.CannotConnectNowError("x"), RetryableError),
        (asyncpg.exceptions.AdminShutdownError("x"), RetryableError),
        (asyncpg.exceptions.QueryCanceledError("x"), RetryableError),
        (asyncpg.exceptions.SerializationError("x"), RetryableError),
        (asyncpg.exceptions.DeadlockDetectedError("x"), RetryableError),
        (asyncpg.exceptions.LockNotAvailableError("x"), RetryableError),
        (asyncpg.exceptions.DiskFullError("x"), RetryableError),
        (ConnectionRefusedError(), RetryableError),
        (ConnectionResetError(), RetryableError),
        (TimeoutError(), RetryableError),
        (asyncpg.InterfaceError("connection is closed"), RetryableError),
        (asyncpg.exceptions.UniqueViolationError("x"), PermanentError),
        (asyncpg.exceptions.NotNullViolationError("x"), PermanentError),
        (asyncpg.exceptions.CheckViolationError("x"), PermanentError),
        (asyncpg.exceptions.UntranslatableCharacterError("x"), PermanentError),
        (asyncpg.exceptions.CharacterNotInRepertoireError("x"), PermanentError),
        (asyncpg.exceptions.NumericValueOutOfRangeError("x"), PermanentError),
        (asyncpg.exceptions.UndefinedTableError("x"), PermanentError),
        (asyncpg.exceptions.UndefinedColumnError("x"), PermanentError),
        (asyncpg.exceptions.InsufficientPrivilegeError("x"), PermanentError),
        (asyncpg.exceptions.PostgresSyntaxError("x"), PermanentError),
        (asyncpg.exceptions.InvalidPasswordError("x"), PermanentError),
        (asyncpg.exceptions.DataError("bad arg"), PermanentError),
        (ValueError("bad"), PermanentError),
    ],
)
def test_error_mapping(exc, expected):
    assert type(map_pg_error(exc)) is expected


def test_both_sinks_register_as_builtin_plugins():
    import msgspec

    from agent.plugin.host import PluginHost

    host = PluginHost().load()
    pg, sb = host.get("sinks", "postgres"), host.get("sinks", "supabase")
    assert pg.factory is PostgresSink and sb.factory.__name__ == "SupabaseSink"
    opts = msgspec.convert({"url": "https://x.supabase.co", "key": "k"}, sb.options)
    assert (opts.schema, opts.table, opts.timeout_s) == ("public", "monitoring_events", 10.0)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"dsn": "postgresql://x", "bogus": 1}, pg.options)
