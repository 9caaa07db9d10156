"""HTTP basics: health, readiness, status, /metrics, the live stream, the UI page."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import agent
from agent.api import create_app
from agent.errors import ConfigError
from agent.runtime import Agent


@pytest.fixture
async def running(jsonl_config):
    a = Agent(jsonl_config)
    await a.start()
    yield a
    await a.stop()


@pytest.fixture
async def client(running, aiohttp_client):
    return await aiohttp_client(create_app(running))


async def test_healthz_and_readyz(client):
    r = await client.get("/healthz")
    assert r.status == 200 and await r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status == 200 and (await r.json())["ready"] is True


async def test_readyz_503_while_not_running(jsonl_config, aiohttp_client):
    a = Agent(jsonl_config)  # never started
    c = await aiohttp_client(create_app(a))
    assert (await c.get("/healthz")).status == 200
    r = await c.get("/readyz")
    body = await r.json()
    assert r.status == 503 and body["ready"] is False
    assert "agent is new" in body["problems"]


async def test_status_fields(client, running):
    await client.post("/api/v1/events", json=[{"name": "a", "value": 1}, {"name": "b"}])
    assert await running.flush(10)
    s = await (await client.get("/api/v1/status")).json()
    assert s["agent_id"] == "test-agent"
    assert s["version"] == agent.__version__
    assert s["state"] == "running"
    assert isinstance(s["uptime_s"], float) and s["uptime_s"] >= 0
    plugins = {p["name"]: p for p in s["plugins"]}
    assert plugins["jsonl"]["state"] == "loaded" and plugins["jsonl"]["error"] is None
    assert plugins["jsonl"]["package"] == "sidecar-agent" and "sink:jsonl" in plugins["jsonl"]["provides"]
    (sink,) = s["sinks"]
    assert sink["name"] == "out" and sink["sent"] == 2 and sink["failed"] == 0 and sink["lag_events"] == 0
    for key in ("attempts", "dead_lettered", "replayed", "dlq_pending", "last_error", "state"):
        assert key in sink
    assert s["components"] == [{"kind": "sink", "name": "out", "type": "jsonl", "plugin": "jsonl",
                                "state": "running", "error": None}]
    assert s["intake"]["committed"] == 2 and s["losses"] == {}


async def test_metrics_parse_and_follow_naming_rules(client, running):
    running.record("x", 1)
    await client.post("/api/v1/events", json={"name": "y"})
    assert await running.flush(10)
    r = await client.get("/metrics")
    assert r.status == 200 and r.content_type == "text/plain"
    text = await r.text()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "duplicate metric names"
    declared: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, mtype = line.split(" ", 3)
            assert name not in declared, f"TYPE twice for {name}"
            declared[name] = mtype
        elif line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
    assert set(declared) == helped
    assert len(families) == len(declared)  # no untyped strays: every sample sits under its TYPE
    for f in families:
        assert f.name.startswith("sidecar_agent_")
        assert f.type in ("counter", "gauge"), f"{f.name} is {f.type}"
        assert f.documentation
        exposed = f.name + "_total" if f.type == "counter" else f.name
        assert declared[exposed] == f.type
        assert not f.name.endswith("_total")
        for sample in f.samples:
            assert sample.name == exposed, sample.name
    for name, mtype in declared.items():
        assert name.endswith("_total") == (mtype == "counter"), name
    by_name = {f.name: f for f in families}
    assert by_name["sidecar_agent_events_committed"].type == "counter"
    assert by_name["sidecar_agent_events_committed"].samples[0].value == 2
    sent = {s.labels["sink"]: s.value for s in by_name["sidecar_agent_sink_sent_events"].samples}
    assert sent == {"out": 2}
    info = by_name["sidecar_agent_info"].samples[0]
    assert info.labels == {"agent_id": "test-agent", "version": agent.__version__}


async def _recv_events(ws, want: int, timeout: float = 10) -> list[dict]:
    got: list[dict] = []
    async with asyncio.timeout(timeout):
        while len(got) < want:
            msg = json.loads((await ws.receive()).data)
            if msg["type"] == "events":
                got.extend(msg["events"])
    return got


async def test_stream_delivers_posted_event(client):
    async with client.ws_connect("/api/v1/stream") as ws:
        r = await client.post("/api/v1/events", json={"name": "live.one", "value": 4, "tags": {"a": "b"}})
        assert r.status == 202
        (eid,) = (await r.json())["ids"]
        (e,) = await _recv_events(ws, 1)
        assert e["id"] == eid and e["name"] == "live.one" and e["value"] == 4 and e["tags"] == {"a": "b"}
        assert e["source"] == "http"


async def test_stream_honours_subscribe_filters(client):
    async with client.ws_connect("/api/v1/stream") as ws:
        await ws.send_json({"subscribe": {"names": ["wanted"], "prefixes": ["pre."]}})
        assert json.loads((await ws.receive()).data) == {"type": "subscribed"}
        await client.post("/api/v1/events", json=[{"name": "unwanted"}, {"name": "wanted"}, {"name": "pre.x"}])
        await client.post("/api/v1/events", json=[{"name": "other"}, {"name": "wanted", "value": 2}])
        got = await _recv_events(ws, 3)
        assert sorted(e["name"] for e in got) == ["pre.x", "wanted", "wanted"]
        await ws.send_json({"subscribe": {"kinds": ["counter"]}})
        assert json.loads((await ws.receive()).data) == {"type": "subscribed"}
        await client.post("/api/v1/events", json=[{"name": "g", "value": 1}, {"name": "c", "kind": "counter", "value": 1}])
        (e,) = await _recv_events(ws, 1)
        assert e["name"] == "c"


async def test_stream_rejects_foreign_origin(client):
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/api/v1/stream", headers={"Origin": "http://evil.example"})
    assert err.value.status == 403
    # the page's own origin is fine
    host = f"{client.server.host}:{client.server.port}"
    async with client.ws_connect("/api/v1/stream", headers={"Origin": f"http://{host}"}) as ws:
        assert not ws.closed


def test_refuses_non_loopback_host_without_token(tmp_path):
    with pytest.raises(ConfigError, match="server.token"):
        Agent({"agent": {"data_dir": str(tmp_path)}, "server": {"host": "0.0.0.0", "port": 0}})


async def test_real_server_on_port_0(jsonl_config):
    jsonl_config["server"] = {"enabled": True, "port": 0}
    async with Agent(jsonl_config) as a:
        assert a.server_url and not a.server_url.endswith(":0")
        async with aiohttp.ClientSession() as s, s.get(a.server_url + "/healthz") as r:
            assert r.status == 200


async def test_ui_page_has_csp(client):
    r = await client.get("/")
    assert r.status == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "object-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "<html" in (await r.text()).lower()


async def test_ui_files_are_served_with_types_etags_and_nothing_outside_the_page(client):
    r = await client.get("/ui/dashboard-core.js")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript")
    etag = r.headers["ETag"]
    assert "no-cache" in r.headers["Cache-Control"]
    r = await client.get("/ui/dashboard-core.js", headers={"If-None-Match": etag})
    assert r.status == 304 and r.headers["ETag"] == etag  # a repeat visit costs no body
    r = await client.get("/ui/style.css")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/css")
    r = await client.get("/ui/vendor/uplot/LICENSE")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain") and "MIT" in await r.text()
    # the package's Python files, dot-files, missing files and paths out of the package are 404
    r = await client.get("/ui/style.css", headers={"If-None-Match": "*"})
    assert r.status == 304
    # the page has its CSP however it is reached
    r = await client.get("/ui/index.html")
    assert r.status == 200 and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    for path in ("/ui/__init__.py", "/ui/../agent/config.py", "/ui/%2e%2e/agent/config.py",
                 "/ui/nothing-here.js", "/ui/vendor", "/ui/.hidden.js", "/ui/a%00.js"):
        r = await client.get(path)
        assert r.status == 404, path
