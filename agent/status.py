"""What `GET /api/v1/status` serves: the agent's state, plugins, components, sinks,
supervised tasks, intake, journal, DLQ, losses and flag health, in one dict."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent.version import __version__

if TYPE_CHECKING:
    from agent.runtime import Agent


def status_of(agent: Agent) -> dict[str, Any]:
    """The whole status of `agent`."""
    j, c = agent.journal, agent.committer
    return {
        "agent_id": agent.id,
        "version": __version__,
        "state": agent.state,
        "uptime_s": round(time.time() - agent.started_at, 3) if agent.started_at else 0.0,
        "server": {"url": agent.server_url, "error": agent.server_error},
        "plugins": agent.host.describe(),
        "components": [_component(agent, c) for c in agent.components.values()],
        "sinks": [w.describe() for w in agent.workers.values()],
        # Every long-running task (agent.pipeline.supervisor): state, restarts, last error.
        "tasks": [t.describe() for t in agent.supervised.values()],
        "intake": {
            "queued": len(c.records) if c else 0,
            "capacity": agent.config.agent.intake_capacity,
            "committed": c.committed if c else 0,
            "commits": c.commits if c else 0,
        },
        # The cardinality cap (agent/cardinality.py): tracked names and series, names that overflowed.
        "series": c.series.describe(),
        "journal": j.stats() if j else None,
        "database": {
            "path": str(agent.db.path) if agent.db else None,
            "recovered_from": agent.db.recovered_from if agent.db else None,
            "salvage": agent.db.salvage if agent.db else None,
        },
        "dlq": {"pending_events": agent.dlq.depth() if agent.dlq else 0},
        # The live stream: WebSocket clients, the encoded bytes queued for them, events dropped (stream_dropped).
        "stream": {
            "clients": len(agent.stream.subscriptions),
            "queued_bytes": agent.stream.queued_bytes(),
            "dropped": agent.stream.dropped,
        },
        "losses": agent.ledger.by_reason(),
        "flags": {"problems": agent.flags.health() if agent.flags else []},
        # Processes forwarding to this one (agent.forwarding.owner.Owner, set by agent.start()).
        "forwarders": fw.describe() if (fw := getattr(agent, "forwarding", None)) is not None else [],
        # This process as the owner: pid, socket, and `took_over` when it became the owner by failover.
        "owner": fw.summary() if fw is not None else None,
    }


def _component(agent: Agent, comp: dict[str, Any]) -> dict[str, Any]:
    """A component's entry: a sink that cannot start shown as failed, a task that is not
    running (restarting, finished, ...) with its supervisor's state, a source with its stats."""
    task = agent.supervised.get(f"{comp['kind']}:{comp['name']}")
    if task is not None and task.state not in ("running", "stopped"):  # stopped: see the agent's state
        comp = {**comp, "state": task.state, "error": task.last_error or comp["error"]}
    w = agent.workers.get(comp["name"]) if comp["kind"] == "sink" else None
    if w is not None and not w.started and w.stats.state == "failed":
        return {**comp, "state": "failed", "error": w.stats.last_error}
    stats = agent._source_stats.get(comp["name"]) if comp["kind"] == "source" else None
    if stats:  # a source's own figures (ctx.stats), e.g. packets received, scrape errors
        return {**comp, "stats": {k: v() if callable(v) else v for k, v in stats.items()}}
    return comp
