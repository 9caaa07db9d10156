"""A sink that dead-letters batches says so in the log: a WARNING naming the sink and the
error, at most once a minute per sink and error code (issue 17: an unmigrated Postgres
table dead-lettered every batch with nothing in the log)."""

from __future__ import annotations

import logging
import uuid

from agent.errors import PermanentError, RetryableError
from agent.pipeline.deadletter_log import DeadLetterLog, error_code
from tests.helpers import await_until, make_agent


def test_error_code_is_the_type_and_its_sqlstate_or_http_status():
    assert error_code(PermanentError('postgres: 42P01 relation "x" does not exist')) == "PermanentError 42P01"
    assert error_code(RetryableError("supabase: HTTP 503 Service Unavailable")) == "RetryableError 503"
    assert error_code(PermanentError("ERROR bad value")) == "PermanentError"  # a capital word is no code
    assert error_code(ValueError("boom")) == "ValueError"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_once_a_minute_per_error_code_with_a_count_of_the_rest(caplog):
    clock = Clock()
    warn = DeadLetterLog("pg", clock=clock)
    missing = PermanentError('postgres: 42P01 relation "public.monitoring_events" does not exist')
    with caplog.at_level(logging.WARNING, logger="sidecar_agent.delivery"):
        warn(500, missing)
        for _ in range(3):
            warn(100, missing)  # the same error within the minute: held back, counted
        warn(7, RetryableError("postgres: 53300 too many connections"))  # another code: its own line
        clock.now += 61
        warn(1, missing)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("sink pg: 500 events dead-lettered: postgres: 42P01 relation")
    assert "53300 too many connections" in lines[1]
    assert lines[2].startswith("sink pg: 1 events dead-lettered: postgres: 42P01")
    assert "(and 3 more batches, 300 events, with this error since the last line)" in lines[2]
    assert all(r.levelname == "WARNING" for r in caplog.records)


async def test_a_postgres_sink_on_an_unmigrated_table_warns_naming_it(tmp_path, pg_database, caplog):
    table = f"never_migrated_{uuid.uuid4().hex[:8]}"
    sinks = {"pg": {"type": "postgres", "dsn": pg_database, "table": table}}
    agent = make_agent(tmp_path / "data", sinks, server={"enabled": False}, dashboard={"store": False})
    await agent.start()
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar_agent.delivery"):
            for batch in range(3):
                agent.record("orders.placed", 1.0)
                await agent.flush(60)
                want = batch + 1
                await await_until(lambda want=want: agent.workers["pg"].stats.dead_lettered >= want, timeout=60,
                                  what="the batch to be dead-lettered")
        lines = [r for r in caplog.records if r.name == "sidecar_agent.delivery" and "dead-lettered" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]  # three batches, one line: throttled
        msg = lines[0].getMessage()
        assert lines[0].levelname == "WARNING"
        assert msg.startswith("sink pg: 1 events dead-lettered: postgres: 42P01"), msg
        assert table in msg and "dlq list --sink pg" in msg
    finally:
        await agent.stop()
