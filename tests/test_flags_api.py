"""The flags HTTP API: list, set, clear, health, token, audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api import create_app
from agent.runtime import Agent

TOKEN = "s3cret"


@pytest.fixture
async def client(tmp_path: Path, aiohttp_client):
    cfg = {
        "agent": {"data_dir": str(tmp_path / "data")},
        "server": {"enabled": False, "token": TOKEN},
        "sinks": {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": []}},
    }
    async with Agent(cfg) as agent:
        yield await aiohttp_client(create_app(agent))


# Reads need the token too (docs/security.md); values are JSON, never text/plain.
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


async def test_list_shows_core_flags_with_layers(client) -> None:
    resp = await client.get("/api/v1/flags", headers=AUTH)
    assert resp.status == 200
    flags = {f["name"]: f for f in (await resp.json())["flags"]}
    assert flags["sinks.out.enabled"]["value"] is True
    assert flags["sinks.out.enabled"]["layer"] == "default"
    assert flags["dashboard.data_source"]["choices"] == ["websocket", "supabase", "dual"]


async def test_put_needs_token(client) -> None:
    resp = await client.put("/api/v1/flags/sinks.out.enabled", data="false")
    assert resp.status == 401


async def test_put_bad_value_is_refused_and_nothing_changes(client) -> None:
    resp = await client.put("/api/v1/flags/sinks.out.rollout_percent", data="150", headers=AUTH)
    assert resp.status == 400
    body = await resp.json()
    assert "sinks.out.rollout_percent" in body["error"] and "150" in body["error"]
    flags = {f["name"]: f for f in (await (await client.get("/api/v1/flags", headers=AUTH)).json())["flags"]}
    assert flags["sinks.out.rollout_percent"]["value"] == 100.0


async def test_put_unknown_flag_is_404(client) -> None:
    resp = await client.put("/api/v1/flags/no.such.flag", data="true", headers=AUTH)
    assert resp.status == 404


async def test_put_then_delete_and_audit_names_the_actor(client) -> None:
    resp = await client.put("/api/v1/flags/dashboard.data_source", data='"dual"',
                            headers={**AUTH, "X-Sidecar-Actor": "cli"})
    assert resp.status == 200
    assert (await resp.json())["value"] == "dual"
    resp = await client.delete("/api/v1/flags/dashboard.data_source", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["value"] == "websocket"
    audit = (await (await client.get("/api/v1/flags", headers=AUTH)).json())["audit"]
    assert [a["new"] for a in audit[-2:]] == ["dual", "websocket"]
    assert audit[-2]["actor"] == "cli (token)"


async def test_health_reports_supabase_mode_without_a_supabase_sink(client) -> None:
    assert (await (await client.get("/api/v1/flags/health", headers=AUTH)).json())["ok"] is True
    await client.put("/api/v1/flags/dashboard.data_source", data='"supabase"', headers=AUTH)
    health = await (await client.get("/api/v1/flags/health", headers=AUTH)).json()
    assert health["ok"] is False and any("supabase" in p for p in health["problems"])
    ready = await (await client.get("/readyz")).json()
    assert any(p.startswith("flags:") for p in ready["problems"])
