"""Health, readiness, status, sinks, losses and /metrics."""

from __future__ import annotations

from aiohttp import web

from agent.api import metrics
from agent.api.history import lag_seconds
from agent.api.keys import AGENT


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: running, journal writable; details name what is wrong."""
    agent = request.app[AGENT]
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
    ready = agent.state == "running" and not (agent.journal and agent.journal.disk_error) and not down
    return web.json_response({"ready": ready, "problems": problems}, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """Everything about the agent: identity, plugins, sinks, journal, losses."""
    return web.json_response(request.app[AGENT].status())


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
