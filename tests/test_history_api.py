"""History endpoints, the implicit store sink, ui-config and sink lag, on a running agent."""

from __future__ import annotations

import time
import uuid

import aiohttp
import pytest

from tests.dashboard_support import start_agent
from tests.helpers import post_events


@pytest.fixture
async def agent(tmp_path):
    a = await start_agent(tmp_path, dashboard={"supabase_url": "http://sb.example", "supabase_anon_key": "anon-k"},
                          sinks={"supabase": {"url": "http://sb.example", "key": "service-secret-key",
                                              "table": "events_x", "policies": []}},
                          flags={"sinks": {"supabase": {"enabled": False}}})
    yield a
    await a.stop(timeout=2)


async def test_ingested_events_are_queryable(agent):
    now = time.time()
    async with aiohttp.ClientSession() as s:
        ids = await post_events(agent, session=s, events=[{"name": "req.latency", "kind": "histogram", "value": v / 10, "ts": now - 30 + v,
                                      "tags": {"route": "/a" if v % 2 else "/b"}, "session_id": "sess-1"}
                                     for v in range(20)])
        await post_events(agent, session=s, events=[{"id": ids[0], "name": "req.latency", "kind": "histogram", "value": 99}])  # a repeat
        assert await agent.flush(5)
        async with s.get(agent.server_url + "/api/v1/events", params={"name": "req.latency", "limit": "8"}) as r:
            page = await r.json()
        assert len(page["events"]) == 8 and page["next"]
        async with s.get(agent.server_url + "/api/v1/events",
                         params={"name": "req.latency", "limit": "100", "cursor": page["next"]}) as r:
            rest = await r.json()
        assert len(rest["events"]) == 12 and rest["next"] is None
        async with s.get(agent.server_url + "/api/v1/events", params={"session": "sess-1", "limit": "5000"}) as r:
            assert len((await r.json())["events"]) == 20
        async with s.get(agent.server_url + "/api/v1/series",
                         params={"name": "req.latency", "from": str(now - 120), "to": str(now + 60),
                                 "step": "60", "agg": "count", "tag.route": "/a"}) as r:
            body = await r.json()
        assert r.status == 200 and body["level"] == "minute"
        assert sum(v for v in body["v"] if v) == 10
        async with s.get(agent.server_url + "/api/v1/names") as r:
            names = {n["name"]: n for n in (await r.json())["names"]}
        assert names["req.latency"]["kind"] == "histogram" and names["req.latency"]["tag_keys"] == ["route"]
        assert names["req.latency"]["count"] == 20
        # all=1 counts every event of every name, per step, raw and from the roll-ups
        await post_events(agent, session=s, events=[{"name": "other", "value": 1, "ts": now - 25 + i} for i in range(5)])
        assert await agent.flush(5)
        for step in ("1", "60"):
            async with s.get(agent.server_url + "/api/v1/series",
                             params={"all": "1", "agg": "count", "from": str(now - 40), "to": str(now + 1),
                                     "step": step}) as r:
                body = await r.json()
            assert r.status == 200 and sum(v for v in body["v"] if v) == 25, (step, body)
        # counts at the raw level are made in SQL: per bucket, they match the events
        async with s.get(agent.server_url + "/api/v1/series",
                         params={"name": "req.latency", "agg": "count", "from": str(now - 40), "to": str(now + 1),
                                 "step": "2", "tag.route": "/a"}) as r:
            body = await r.json()
        assert body["level"] == "raw"
        want = [0] * len(body["t"])
        for v in range(1, 20, 2):  # the /a events, at now - 30 + v
            want[int((now - 30 + v - body["from"]) // 2)] += 1
        assert [c or 0 for c in body["v"]] == want


async def test_rate_and_bucket_quantiles_over_http(agent):
    """Counters posted as deltas chart as a rate; `_bucket` series as a quantile, not an average."""
    start = (int(time.time()) - 300) // 20 * 20  # on a step boundary: each step holds two posts
    async with aiohttp.ClientSession() as s:
        await post_events(agent, session=s, events=[{"name": "jobs", "kind": "counter", "value": 4, "ts": start + 10 * i}
                                                    for i in range(20)])
        buckets = {"0.1": 8, "1": 10, "+Inf": 10}
        await post_events(agent, session=s, events=[{"name": "rt_bucket", "kind": "counter", "value": v,
                                                     "ts": start + 10 * i, "tags": {"le": le}}
                                                    for i in range(20) for le, v in buckets.items()])
        assert await agent.flush(5)
        async with s.get(agent.server_url + "/api/v1/series",
                         params={"name": "jobs", "agg": "rate", "from": str(start), "to": str(start + 200),
                                 "step": "20"}) as r:
            body = await r.json()
        assert r.status == 200 and body["agg"] == "rate"
        assert [v for v in body["v"] if v is not None] == pytest.approx([0.4] * 10)
        async with s.get(agent.server_url + "/api/v1/series",
                         params={"name": "rt_bucket", "agg": "quantile", "q": "0.9", "from": str(start),
                                 "to": str(start + 200), "step": "20"}) as r:
            body = await r.json()
        assert r.status == 200 and body["q"] == 0.9
        # rank 9 of 10 falls in (0.1, 1], one of its two observations in: 0.1 + 0.9 * 1/2
        assert [v for v in body["v"] if v is not None] == pytest.approx([0.55] * 10)


async def test_bad_queries_name_the_problem(agent):
    async with aiohttp.ClientSession() as s:
        for path, params, needle in [
            ("/api/v1/series", {}, "name is required"),
            ("/api/v1/series", {"name": "x", "agg": "median"}, "agg must be one of"),
            ("/api/v1/series", {"name": "x", "from": "10", "to": "5"}, "to must be after from"),
            ("/api/v1/events", {"from": "yesterday"}, "from must be a number"),
            ("/api/v1/events", {"cursor": "nope"}, "cursor is malformed"),
            ("/api/v1/series", {"all": "1", "agg": "avg"}, "all=1 (every name) only makes sense with agg=count"),
            ("/api/v1/series", {"all": "1", "name": "x", "agg": "count"}, "give name or all=1, not both"),
            # beyond what SQLite's integers hold: a 400, not an OverflowError's 500 (found by schemathesis)
            ("/api/v1/series", {"name": "x", "from": "1e30", "to": "1e31"}, "to must be between 0 and 1e+11"),
            ("/api/v1/series", {"name": "x", "step": "1e20"}, "step must be between 0 and 1e+09"),
            ("/api/v1/events", {"from": "-1e30"}, "from must be between 0 and 1e+11"),
            ("/api/v1/series", {"name": "x_bucket", "agg": "quantile"}, "agg=quantile needs q"),
            ("/api/v1/series", {"name": "latency", "agg": "quantile", "q": "0.9"}, "agg=quantile needs q"),
            ("/api/v1/series", {"name": "x_bucket", "agg": "quantile", "q": "1.5"}, "q must be between 0 and 1"),
        ]:
            async with s.get(agent.server_url + path, params=params) as r:
                assert r.status == 400
                assert needle in (await r.json())["error"]


async def test_ui_config_has_public_values_only(agent):
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.server_url + "/api/v1/ui-config") as r:
            text = await r.text()
            cfg = await r.json()
    assert cfg["data_source"] == "websocket"
    assert cfg["supabase"] == {"url": "http://sb.example", "anon_key": "anon-k", "table": "events_x", "schema": "public"}
    assert "service-secret-key" not in text
    agent.flags.set("dashboard.data_source", "dual", actor="test")
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.server_url + "/api/v1/ui-config") as r:
            assert (await r.json())["data_source"] == "dual"


async def test_sinks_report_lag_seconds(agent):
    async with aiohttp.ClientSession() as s:
        await post_events(agent, session=s, events=[{"name": "x", "value": 1, "ts": time.time() - 5, "id": str(uuid.uuid4())}])
        await agent.flush(1)  # the supabase sink is switched off, so its cursor waits
        async with s.get(agent.server_url + "/api/v1/sinks") as r:
            sinks = {k["name"]: k for k in (await r.json())["sinks"]}
    assert sinks["store"]["lag_s"] is None and sinks["store"]["lag_events"] == 0
    if not sinks["supabase"]["enabled"]:
        assert sinks["supabase"]["lag_s"] >= 4
