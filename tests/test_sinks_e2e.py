"""The supabase and postgres sinks through the whole agent, against the real PostgreSQL
(the supabase sink through the PostgREST emulator): every event lands exactly once,
counted by id, across retries, DLQ replays and agent restarts. (Bad rows bisected into
the DLQ while the rest lands: test_sink_contract.py, for every sink that classifies.)"""

from __future__ import annotations

import pytest

from agent.runtime import Agent
from tests.helpers import agent_config, await_until, post_events


def _sink(kind: str, emu, table) -> dict:
    if kind == "supabase":
        return {"type": "supabase", "url": emu.url, "key": emu.key, "table": table.table}
    return {"type": "postgres", "dsn": table.dsn, "table": table.table}


def e2e_config(tmp_path, sink: dict) -> dict:
    """The sink as `db` with the default policies (fast retries, a patient breaker); no store."""
    return agent_config(tmp_path / "data", dashboard={"store": False}, dlq={"replay_per_s": 50},
                        sinks={"db": {**sink, "batch_size": 50, "policies": ["timeout", "retry", "circuit_breaker"],
                                      "retry": {"max_attempts": 2, "initial_backoff_ms": 10, "max_backoff_ms": 20},
                                      "circuit_breaker": {"failure_threshold": 50, "reset_timeout_s": 0.2}}})


@pytest.mark.parametrize("kind", ["supabase", "postgres"])
async def test_exactly_once_across_retries_dlq_replay_and_restart(tmp_path, supabase_emulator, pg_table, kind):
    emu = supabase_emulator
    cfg = e2e_config(tmp_path, _sink(kind, emu, pg_table))
    ids: list[str] = []
    async with Agent(cfg) as agent:
        ids += await post_events(agent, [{"name": "e2e.ok", "value": i} for i in range(120)])
        assert await agent.flush(20)
        if kind == "supabase":
            emu.fail_next(1, status=503)  # one retry succeeds
            ids += await post_events(agent, [{"name": "e2e.retried", "value": i} for i in range(30)])
            assert await agent.flush(20)
            emu.drop_next(1, after_commit=True)  # the write landed but the answer was lost
            ids += await post_events(agent, [{"name": "e2e.dropped", "value": i} for i in range(30)])
            assert await agent.flush(20)
            emu.fail_next(10, status=503)  # retries spent: the batch goes to the DLQ, then replays
            ids += await post_events(agent, [{"name": "e2e.dlq", "value": i} for i in range(30)])
            await await_until(lambda: agent.workers["db"].stats.replayed >= 30, timeout=20, what="DLQ replay")
        # Unsent events wait in the journal across a restart.
        agent.flags.set("sinks.db.enabled", False, "test")
        ids += await post_events(agent, [{"name": "e2e.restart", "value": i} for i in range(40)])
    async with Agent(cfg) as agent:
        agent.flags.clear("sinks.db.enabled", "test")
        assert await agent.flush(20)
        assert agent.dlq.depth("db") == 0
        assert agent.ledger.total() == 0
    counts = await pg_table.count_ids(ids)
    assert sorted(set(counts.values())) == [1], {i: n for i, n in counts.items() if n != 1}



async def test_realtime_subscriber_receives_rows_written_by_the_agent(tmp_path, supabase_emulator, pg_table):
    from supabase import acreate_client

    emu = supabase_emulator
    got: list[dict] = []
    client = await acreate_client(emu.url, emu.anon_key)
    channel = client.channel("e2e")
    channel.on_postgres_changes("INSERT", schema="public", table=pg_table.table,
                                callback=lambda payload: got.append(payload))
    await channel.subscribe()
    try:
        # joined = the emulator has installed the table's trigger and is listening
        await await_until(lambda: channel.is_joined, what="the channel join")
        async with Agent(e2e_config(tmp_path, _sink("supabase", emu, pg_table))) as agent:
            ids = await post_events(agent, [{"name": "rt", "value": i} for i in range(5)])
            assert await agent.flush(20)
            await await_until(lambda: len(got) >= 5, timeout=10, what="realtime inserts")
    finally:
        await client.remove_all_channels()
    seen = {p["data"]["record"]["id"] for p in got}
    assert set(ids) <= seen
