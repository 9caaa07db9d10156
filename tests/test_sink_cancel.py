"""A cancel that reaches a built-in sink inside its write transaction propagates, and the
sink stays usable (issue 18, item 2: "a cancel can never be swallowed").

The history store's write is covered at each of its awaits in test_shutdown_bound.py;
the jsonl sink (one os.write in a thread) and the supabase sink (one HTTP request) hold
no transaction. Here: the postgres sink, on a real PostgreSQL, in both of its writes:

- the COPY into the table (its own implicit transaction), held on a lock another session
  takes on the table;
- the fallback transaction after a duplicate id (temp table + INSERT ... ON CONFLICT DO
  NOTHING), held on a row another session inserted and has not committed.

Each time the send is cancelled while PostgreSQL holds it: the cancel comes out as
CancelledError (never mapped to a sink error that the worker would retry or dead-letter),
nothing of the batch is committed, and the same batch sent again lands each id once.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from agent.builtin_plugins.postgres import PostgresOptions, PostgresSink

from tests.helpers import make_ctx, make_events


async def waiting_on_a_lock(admin: asyncpg.Connection, app: str) -> bool:
    rows = await admin.fetch(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'", app)
    return bool(rows)


@pytest.mark.parametrize("write", ["copy", "fallback_transaction"])
async def test_a_cancel_inside_the_postgres_write_propagates(pg_table, write: str) -> None:
    sink = PostgresSink("pgcancel", PostgresOptions(dsn=pg_table.dsn, schema=pg_table.schema, table=pg_table.table),
                        make_ctx("pgcancel"))
    await sink.start()
    events = make_events(50)
    admin = await asyncpg.connect(pg_table.dsn)
    blocker = await asyncpg.connect(pg_table.dsn)
    try:
        if write == "fallback_transaction":
            await sink.send(events[:1])  # a committed duplicate: the COPY fails at once, the fallback runs
        hold = blocker.transaction()
        await hold.start()
        if write == "copy":
            await blocker.execute(f"LOCK TABLE {pg_table.qname} IN ACCESS EXCLUSIVE MODE")
        else:  # an uncommitted row with one of the batch's ids: ON CONFLICT waits for its fate
            await blocker.execute(f"INSERT INTO {pg_table.qname} (id, event_type) VALUES ($1::uuid, 'held')",
                                  events[10].id)
        send = asyncio.create_task(sink.send(events))
        deadline = asyncio.get_running_loop().time() + 60
        while not await waiting_on_a_lock(admin, "sidecar-agent:pgcancel"):
            assert not send.done(), send
            assert asyncio.get_running_loop().time() < deadline, "the sink's write never reached the lock"
            await asyncio.sleep(0.02)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(send, 60)  # a generous bound; the cancel must come out as itself
        await hold.rollback()
        before = await pg_table.count_ids([e.id for e in events])
        assert sum(before.values()) == (1 if write == "fallback_transaction" else 0)  # nothing of it committed
        await sink.send(events)  # the sink is still usable, and the batch sent again lands once
        assert set((await pg_table.count_ids([e.id for e in events])).values()) == {1}
    finally:
        await blocker.close()
        await admin.close()
        await sink.close()
