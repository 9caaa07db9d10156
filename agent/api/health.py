"""Health, readiness, status, sinks, losses and /metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.api import metrics
from agent.api.history import lag_seconds
from agent.api.keys import AGENT

if TYPE_CHECKING:
    from agent.api.view import AgentView


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: running, journal writable; details name what is wrong.

    `status` is `ready`, `degraded` (still 200: intake works, but a sink lags or fails and
    `degraded` names it, with its reasons) or `not_ready` (503)."""
    body = await readiness(request.app[AGENT])
    return web.json_response(body, status=200 if body["ready"] else 503)


async def readiness(agent: AgentView) -> dict[str, Any]:
    """What /readyz answers (and status shows under `readiness`)."""
    problems = []
    if agent.state != "running":
        problems.append(f"agent is {agent.state}")
    if agent.journal is not None and agent.journal.disk_error:
        problems.append(f"journal: {agent.journal.disk_error}")
    for comp in agent.components.values():
        if comp["state"] == "failed":
            problems.append(f"{comp['kind']} {comp['name']} failed: {comp['error']}")
    down = False  # the committer not running: nothing recorded reaches the journal
    for task in agent.supervised.values():
        if task.state in ("restarting", "dead"):
            problems.append(f"task {task.name} is {task.state} ({task.restarts} restarts): {task.last_error}")
            down = down or task.name == "committer"
    if agent.flags is not None:
        problems.extend(f"flags: {p}" for p in agent.flags.health())
    degraded = await degraded_sinks(agent) if agent.state == "running" else []
    problems.extend(f"sink {d['sink']} is degraded: {d['detail']}" for d in degraded)
    ready = agent.state == "running" and not (agent.journal and agent.journal.disk_error) and not down
    state = "not_ready" if not ready else "degraded" if degraded else "ready"
    return {"ready": ready, "status": state, "problems": problems, "degraded": degraded}


async def degraded_sinks(agent: AgentView) -> list[dict[str, Any]]:
    """Sinks that are behind or failing, each with its reasons:

    - `lagging`: its oldest undelivered event is older than `server.ready_max_lag_s`;
    - `breaker_open`: its circuit breaker is open or half-open (batches wait in the journal);
    - `failing`: its last batch failed (so far every batch, while it stays so): dead-lettered,
      or it could not even be parked.
    A disabled sink (a flag) is not degraded: its backlog waits on purpose."""
    max_lag = agent.config.server.ready_max_lag_s
    out = []
    for name, worker in agent.workers.items():
        if not worker.enabled():
            continue
        d = worker.describe()
        reasons, detail = [], []
        breaker = d["policies"].get("breaker_state")
        if breaker in ("open", "half_open"):
            reasons.append("breaker_open")
            detail.append(f"circuit breaker {breaker}")
        if d["state"] == "failing":
            reasons.append("failing")
            detail.append(f"its last batch failed ({d['dead_lettered']} events dead-lettered): {d['last_error']}")
        lag_s = await lag_seconds(agent, name) if d["lag_events"] else None
        if lag_s is not None and lag_s > max_lag:
            reasons.append("lagging")
            detail.append(f"{d['lag_events']} events behind, the oldest {lag_s:.0f}s old (limit {max_lag:g}s)")
        if reasons:
            out.append(
                {
                    "sink": name,
                    "reasons": reasons,
                    "detail": "; ".join(detail),
                    "lag_s": lag_s,
                    "lag_events": d["lag_events"],
                }
            )
    return out


async def status(request: web.Request) -> web.Response:
    """Everything about the agent: identity, plugins, sinks, journal, losses, and readiness."""
    agent = request.app[AGENT]
    body = agent.status()
    body["readiness"] = await readiness(agent)
    return web.json_response(body)


async def sinks(request: web.Request) -> web.Response:
    """Per-sink state, lag (events and seconds), counters, breaker and DLQ depth."""
    agent = request.app[AGENT]
    out = []
    for name, worker in agent.workers.items():
        d = worker.describe()
        d["lag_s"] = await lag_seconds(agent, name)
        out.append(d)
    return web.json_response({"sinks": out})


async def losses(request: web.Request) -> web.Response:
    """The loss ledger: events dropped, by reason and sink."""
    agent = request.app[AGENT]
    snap = agent.ledger.snapshot()
    return web.json_response(
        {
            "total": sum(snap.values()),
            "by_reason": agent.ledger.by_reason(),
            "entries": [{"reason": r, "sink": s or None, "count": n} for (r, s), n in sorted(snap.items())],
        }
    )


async def prometheus(request: web.Request) -> web.Response:
    """The agent's own counters in Prometheus text format."""
    return web.Response(
        text=metrics.render(request.app[AGENT]),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Version": "0.0.4"},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/api/v1/status", status)
    app.router.add_get("/api/v1/sinks", sinks)
    app.router.add_get("/api/v1/losses", losses)
