"""History over HTTP (from the local store) and the dashboard's own configuration.

GET /api/v1/events   raw events, newest first, cursor-paginated (POST is ingest)
GET /api/v1/series   one name aggregated per step, from the level that fits the range
GET /api/v1/names    the catalogue: kind, tag keys, last value
GET /api/v1/ui-config  data source (flag) and the public Supabase settings, never a secret
"""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web

from agent.api.keys import AGENT
from agent.api.view import AgentView
from agent.history.store import AGGS, HistoryStore, decode_cursor

MAX_LIMIT = 1000
DATA_SOURCE_FLAG = "dashboard.data_source"
STORE_WAIT_S = 2.5  # how long a request waits for a store that is still opening (start-up)


async def _store(request: web.Request) -> HistoryStore:
    """The store the history board serves; waits (bounded) for one that is still opening."""
    store = await request.app[AGENT].history.wait(STORE_WAIT_S)
    if store is None:
        raise web.HTTPServiceUnavailable(reason="the history store is not running (is [dashboard] store = false?)")
    return store


# Epoch seconds up to about year 5000, and steps up to ~30 years: beyond any stored event,
# and inside what SQLite's integers hold (a client's 1e30 is a 400, not an OverflowError).
TIME_RANGE = (0.0, 1e11)
STEP_RANGE = (0.0, 1e9)


def _num(
    request: web.Request, key: str, default: float | None = None, within: tuple[float, float] | None = None
) -> float | None:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{key} must be a number (epoch seconds for from/to)") from None
    if not math.isfinite(value):
        raise web.HTTPBadRequest(reason=f"{key} must be finite")
    if within is not None and not within[0] <= value <= within[1]:
        raise web.HTTPBadRequest(reason=f"{key} must be between {within[0]:g} and {within[1]:g}")
    return value


async def list_events(request: web.Request) -> web.Response:
    """GET /api/v1/events?name=&source=&agent=&session=&from=&to=&cursor=&limit= (limit <= 1000)."""
    store = await _store(request)
    q = request.query
    limit = int(_num(request, "limit", 100) or 100)
    if limit < 1:
        raise web.HTTPBadRequest(reason="limit must be at least 1")
    limit = min(limit, MAX_LIMIT)
    cursor = q.get("cursor") or None
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise web.HTTPBadRequest(reason="cursor is malformed (pass back the `next` value)") from None
    events, nxt = await store.events(
        name=q.get("name") or None,
        source=q.get("source") or None,
        agent=q.get("agent") or None,
        session=q.get("session") or None,
        start=_num(request, "from", within=TIME_RANGE),
        end=_num(request, "to", within=TIME_RANGE),
        cursor=cursor,
        limit=limit,
    )
    return web.json_response({"events": events, "next": nxt})


async def series(request: web.Request) -> web.Response:
    """GET /api/v1/series?name=&from=&to=&step=&agg=&q=&tag.k=v; all=1 instead of name (with
    agg=count) counts every event of every name. agg=rate is growth per second;
    agg=quantile&q=0.9 estimates a quantile from a `<name>_bucket` histogram's `le` buckets."""
    store = await _store(request)
    q = request.query
    name = q.get("name") or None
    every = q.get("all") in ("1", "true")
    if name and every:
        raise web.HTTPBadRequest(reason="give name or all=1, not both")
    if not name and not every:
        raise web.HTTPBadRequest(reason="name is required (or all=1 with agg=count for every event)")
    agg = q.get("agg", "avg")
    if agg not in AGGS:
        raise web.HTTPBadRequest(reason=f"agg must be one of {', '.join(AGGS)}")
    q_value = _num(request, "q", within=(0.0, 1.0))
    if agg == "quantile" and (q_value is None or not (name or "").endswith("_bucket")):
        raise web.HTTPBadRequest(reason="agg=quantile needs q (0..1) and a histogram bucket name (<name>_bucket)")
    if every and agg != "count":
        raise web.HTTPBadRequest(reason="all=1 (every name) only makes sense with agg=count")
    now = time.time()
    end = _num(request, "to", now, within=TIME_RANGE)
    start = _num(request, "from", max(0.0, (end or now) - 3600), within=TIME_RANGE)
    step = _num(request, "step", within=STEP_RANGE)
    assert start is not None and end is not None
    if end <= start:
        raise web.HTTPBadRequest(reason="to must be after from")
    if step is not None and step <= 0:
        raise web.HTTPBadRequest(reason="step must be positive")
    tags = {k[4:]: v for k, v in q.items() if k.startswith("tag.") and len(k) > 4}
    return web.json_response(await store.series(name, start, end, step, agg, tags, now=now, q=q_value))


async def names(request: web.Request) -> web.Response:
    """GET /api/v1/names: every name seen, with kind, tag keys and last value."""
    return web.json_response({"names": (await _store(request)).names()})


def ui_config(agent: AgentView) -> dict[str, Any]:
    """What the page needs to choose and build its data source. Only public values:
    the Supabase URL, the anon key and the table; never the service key or the token."""
    source = agent.flags.get(DATA_SOURCE_FLAG) if agent.flags is not None else "websocket"
    dash = agent.config.dashboard
    supabase = None
    if dash.supabase_url and dash.supabase_anon_key:
        table, schema = "monitoring_events", "public"
        for sink_name, t in agent.config.sinks.items():
            if (t.get("type") or sink_name) == "supabase":
                table, schema = t.get("table", table), t.get("schema", schema)
                break
        supabase = {"url": dash.supabase_url, "anon_key": dash.supabase_anon_key, "table": table, "schema": schema}
    return {
        "agent_id": agent.id,
        "data_source": source,
        "supabase": supabase,
        "token_required": bool(agent.config.server.token),
        "store": agent.history.expected,
    }


async def get_ui_config(request: web.Request) -> web.Response:
    """GET /api/v1/ui-config"""
    return web.json_response(ui_config(request.app[AGENT]), headers={"Cache-Control": "no-store"})


async def lag_seconds(agent: AgentView, sink: str) -> float | None:
    """Age in seconds of the oldest journaled event `sink` has not confirmed (None: none)."""
    journal = agent.journal
    if journal is None or journal.lag(sink) == 0:
        return None
    rows = await journal.read(journal.cursors.get(sink, journal.last_seq), 1)
    if not rows:
        return None
    return max(0.0, round(time.time() - rows[0][1].ts, 3))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/events", list_events)
    app.router.add_get("/api/v1/series", series)
    app.router.add_get("/api/v1/names", names)
    app.router.add_get("/api/v1/ui-config", get_ui_config)
