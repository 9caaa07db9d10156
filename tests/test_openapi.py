"""/api/v1/openapi.json: it names exactly the routes the app serves, and schemathesis fuzzes
every operation against a live agent (its own process, a token set): no 5xx, every status
code, content type and body as the document says. Bounded by max_examples per operation."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import msgspec
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent.api import create_app
from agent.api.openapi import spec
from agent.plugin.hookspecs import hookimpl
from tests.helpers import agent_config, free_port, make_agent, spawn, wait_http, write_toml

TOKEN = "fuzz-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 50  # per operation: about 1,200 requests in all, 20-40 s on a loaded machine

schema = schemathesis.openapi.from_dict(spec())


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx, value) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in value) if isinstance(value, list) else b""


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx, value) -> bytes:
    return msgspec.msgpack.encode(_fits_msgpack(value))


def _fits_msgpack(v):
    """msgpack has no integers beyond 64 bits, so no client can send one: such a number
    generated for a JSON schema goes as a float, as a client's encoder would send it."""
    if isinstance(v, dict):
        return {k: _fits_msgpack(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_fits_msgpack(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
        return float(v) if abs(v) < 10**308 else 1e308
    return v


async def test_the_document_names_every_route_and_only_those(tmp_path):
    agent = make_agent(tmp_path / "d", server={"enabled": False})
    app = create_app(agent)
    served = {
        (r.method.lower(), r.resource.canonical.replace("{path:.+}", "{path}"))
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    described = {(m, p) for p, ops in spec()["paths"].items() for m in ops}
    assert served == described
    assert spec()["openapi"].startswith("3.1")
    # The event body is the ingest's own msgspec type, not a hand copy.
    event = spec()["components"]["schemas"]["EventIn"]
    assert event["required"] == ["name"] and event["additionalProperties"] is False


class _RoutePlugin:
    """A plugin that adds one route."""

    @staticmethod
    @hookimpl
    def register_routes(register):
        async def hello(request):
            return web.json_response({"hello": "plugin"})

        register("GET", "/api/v1/example/hello", hello)


async def test_routes_added_by_plugins_are_in_the_served_document(tmp_path, aiohttp_client):
    from agent.runtime import Agent

    agent = Agent(agent_config(tmp_path / "d", server={"enabled": False}), plugins=[_RoutePlugin()])
    async with agent:
        client = await aiohttp_client(create_app(agent))
        doc = await (await client.get("/api/v1/openapi.json")).json()
    assert "get" in doc["paths"]["/api/v1/example/hello"]
    assert doc["paths"]["/api/v1/events"] == spec()["paths"]["/api/v1/events"]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> str:
    """A live agent in its own process, with a token and a jsonl sink; its base URL."""
    tmp: Path = tmp_path_factory.mktemp("openapi")
    port = free_port()
    cfg = agent_config(
        tmp / "d", {"out": {"type": "jsonl", "path": str(tmp / "out.jsonl")}}, server={"port": port, "token": TOKEN}
    )
    proc: subprocess.Popen[bytes] = spawn(write_toml(tmp / "agent.toml", cfg), tmp / "agent.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", timeout=60)
        # The served document is the one the fuzzer reads.
        req = urllib.request.Request(base + "/api/v1/openapi.json", headers=AUTH)
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        yield base
    finally:
        proc.terminate()
        proc.wait(60)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_every_operation(case, live):
    case.call_and_validate(base_url=live, headers=AUTH, checks=CHECKS, timeout=30)
