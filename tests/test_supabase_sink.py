"""The supabase sink against the emulator (real supabase-py client, real PostgreSQL): what only
it does. What every sink does (exactly once, bad rows, outages, missing table, non-finite
values) is in test_sink_contract.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from agent.builtin_plugins.supabase import SupabaseOptions, SupabaseSink, map_api_error, parse_retry_after
from postgrest.exceptions import APIError

from agent.errors import PermanentError, RetryableError
from tests.helpers import make_ctx, make_events


def sink_for(emu, table, **kw) -> SupabaseSink:
    opts = SupabaseOptions(url=emu.url, key=kw.pop("key", emu.key), table=table.table, **kw)
    return SupabaseSink("supabase", opts, make_ctx("supabase"))


async def test_503_then_retry_lands_once(supabase_emulator, pg_table):
    sink = sink_for(supabase_emulator, pg_table)
    events = make_events(20)
    supabase_emulator.fail_next(1, status=503, retry_after=2)
    await sink.start()
    try:
        with pytest.raises(RetryableError) as info:
            await sink.send(events)
        assert info.value.retry_after == 2
        await sink.send(events)
    finally:
        await sink.close()
    assert set((await pg_table.count_ids([e.id for e in events])).values()) == {1}


async def test_connection_dropped_after_commit_then_retry_lands_once(supabase_emulator, pg_table):
    sink = sink_for(supabase_emulator, pg_table)
    events = make_events(20)
    await sink.start()
    try:
        supabase_emulator.drop_next(1, after_commit=True)
        with pytest.raises(RetryableError):
            await sink.send(events)
        supabase_emulator.drop_next(1)
        with pytest.raises(RetryableError):
            await sink.send(events)
        await sink.send(events)
    finally:
        await sink.close()
    assert set((await pg_table.count_ids([e.id for e in events])).values()) == {1}


async def test_timeout_is_retryable(supabase_emulator, pg_table):
    sink = sink_for(supabase_emulator, pg_table, timeout_s=0.2)
    supabase_emulator.delay_s = 1.0
    await sink.start()
    try:
        with pytest.raises(RetryableError, match="timeout"):
            await sink.send(make_events(1))
    finally:
        supabase_emulator.delay_s = 0
        await sink.close()


async def test_wrong_key_is_permanent(supabase_emulator, pg_table):
    sink = sink_for(supabase_emulator, pg_table, key="wrong")
    await sink.start()
    try:
        with pytest.raises(PermanentError, match="401"):
            await sink.send(make_events(1))
    finally:
        await sink.close()


async def test_anon_key_cannot_write(supabase_emulator, pg_table):
    sink = sink_for(supabase_emulator, pg_table, key=supabase_emulator.anon_key)
    await sink.start()
    try:
        with pytest.raises(PermanentError, match="42501"):
            await sink.send(make_events(1))
    finally:
        await sink.close()


async def test_realtime_subscriber_receives_inserts(supabase_emulator, pg_table):
    from supabase import AsyncClientOptions, acreate_client

    http = httpx.AsyncClient(timeout=5)
    reader = await acreate_client(
        supabase_emulator.url, supabase_emulator.anon_key, options=AsyncClientOptions(httpx_client=http)
    )
    got: asyncio.Queue = asyncio.Queue()
    channel = reader.channel("dashboard")
    channel.on_postgres_changes("INSERT", got.put_nowait, table=pg_table.table, schema="public")
    await channel.subscribe()
    sink = sink_for(supabase_emulator, pg_table)
    events = make_events(3)
    events[2].data = {"blob": "x" * 9000}  # too big for one NOTIFY: emulator re-selects by id
    try:
        assert channel.is_joined
        await sink.start()
        await sink.send(events)
        received = [await asyncio.wait_for(got.get(), 10) for _ in events]
    finally:
        await sink.close()
        await reader.remove_all_channels()
        await http.aclose()
    assert sorted(p["data"]["record"]["id"] for p in received) == sorted(e.id for e in events)
    p = received[0]["data"]
    assert p["type"] == "INSERT" and p["table"] == pg_table.table and p["schema"] == "public"
    assert p["errors"] is None and {"name": "value", "type": "float8"} in p["columns"]
    assert p["commit_timestamp"].endswith("Z")
    assert any(
        len(r["data"]["record"]["data"]["blob"]) == 9000 for r in received if r["data"]["record"]["data"].get("blob")
    )


async def test_rest_reads_through_supabase_py(supabase_emulator, pg_table):
    from supabase import AsyncClientOptions, acreate_client

    sink = sink_for(supabase_emulator, pg_table)
    events = make_events(10)
    await sink.start()
    await sink.send(events)
    await sink.close()
    http = httpx.AsyncClient(timeout=5)
    try:
        c = await acreate_client(
            supabase_emulator.url, supabase_emulator.anon_key, options=AsyncClientOptions(httpx_client=http)
        )
        res = (
            await c.table(pg_table.table)
            .select("id,value")
            .gte("value", 3)
            .lt("value", 7)
            .order("value", desc=True)
            .limit(3)
            .execute()
        )
        assert [r["value"] for r in res.data] == [6.0, 5.0, 4.0]
        res = await c.table(pg_table.table).select("*").in_("id", [events[0].id, events[1].id]).execute()
        assert {r["id"] for r in res.data} == {events[0].id, events[1].id}
        res = await c.table(pg_table.table).select("id").eq("event_type", "cpu.percent").execute()
        assert len(res.data) == 10
    finally:
        await http.aclose()


@pytest.mark.parametrize(
    "code,status,expected",
    [
        ("503", 503, RetryableError),
        ("502", 502, RetryableError),
        ("500", 500, RetryableError),
        ("429", 429, RetryableError),
        ("408", 408, RetryableError),
        ("400", 400, PermanentError),
        ("401", 401, PermanentError),
        ("403", 403, PermanentError),
        ("404", 404, PermanentError),
        ("413", 413, PermanentError),
        ("PGRST000", 503, RetryableError),
        ("PGRST001", 503, RetryableError),
        ("PGRST003", 504, RetryableError),
        ("PGRST102", 400, PermanentError),
        ("PGRST204", 400, PermanentError),
        ("PGRST205", 404, PermanentError),
        ("PGRST301", 401, PermanentError),
        ("22P05", 400, PermanentError),
        ("22P02", 400, PermanentError),
        ("23502", 400, PermanentError),
        ("23505", 409, PermanentError),
        ("42501", 401, PermanentError),
        ("42P01", 404, PermanentError),
        ("42703", 400, PermanentError),
        ("08006", 503, RetryableError),
        ("53300", 503, RetryableError),
        ("57014", 500, RetryableError),
        ("40001", 500, RetryableError),
        ("40P01", 500, RetryableError),
        (None, 503, RetryableError),
        (None, 401, PermanentError),
        (None, None, RetryableError),
    ],
)
def test_error_mapping(code, status, expected):
    exc = APIError({"code": code, "message": "m", "details": None, "hint": None})
    mapped = map_api_error(exc, status, retry_after=1.5)
    assert type(mapped) is expected
    if expected is RetryableError:
        assert mapped.retry_after == 1.5


def test_parse_retry_after():
    import datetime as dt

    now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 01 Jan 2025 00:00:30 GMT", now) == 30.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


async def test_concurrent_sends_each_see_their_own_status(supabase_emulator, pg_table):
    """The delivery worker keeps several batches in flight (max_in_flight = 16): a failed
    request's status and Retry-After must not be overwritten by another request's answer."""
    sink = sink_for(supabase_emulator, pg_table)
    batches = [make_events(30) for _ in range(8)]
    supabase_emulator.delay_s = 0.05  # so the requests overlap
    supabase_emulator.fail_next(1, status=503, retry_after=7)
    await sink.start()
    try:
        results = await asyncio.gather(*(sink.send(b) for b in batches), return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]
        assert len(failed) == 1 and isinstance(failed[0], RetryableError) and failed[0].retry_after == 7
        assert "503" in str(failed[0])
        (again,) = [b for b, r in zip(batches, results, strict=True) if r is failed[0]]
        await sink.send(again)
    finally:
        await sink.close()
    ids = [e.id for b in batches for e in b]
    assert set((await pg_table.count_ids(ids)).values()) == {1}
