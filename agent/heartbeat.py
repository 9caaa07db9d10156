"""Fleet heartbeats: every `[agent] heartbeat_s` seconds an agent records one
`sidecar_agent.heartbeat` event describing itself (version, uptime, events/s in and out,
per-sink lag and breaker state, losses by reason, DLQ depth).

It goes through the normal intake, so it reaches every sink: a collector, a Postgres
table or Supabase then holds the state of the whole fleet, and the dashboard's Fleet tab
lists every agent from these events alone (sidecar_ui/fleet.js).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from agent.event import Event
from agent.version import __version__

if TYPE_CHECKING:
    from agent.runtime import Agent

HEARTBEAT_EVENT = "sidecar_agent.heartbeat"


class Heartbeat:
    """Builds and records an agent's heartbeats; `run()` is its supervised task."""

    def __init__(self, agent: Agent, interval_s: float | None = None) -> None:
        self.agent = agent
        self.interval_s = agent.config.agent.heartbeat_s if interval_s is None else interval_s
        # The counters at the previous heartbeat: rates are the change since then.
        self._prev: tuple[float, int, dict[str, int]] | None = None

    async def run(self) -> None:
        """One heartbeat per interval, the first one interval after start (an agent that
        only lives for a moment, a test or a CLI call, adds nothing to its sinks)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.interval_s
            # A late wake-up (a loaded loop) skips the missed beats instead of bursting.
            due = max(due, loop.time())
            await asyncio.sleep(due - loop.time())
            event = await self.event()
            # Only while running: once stop() has closed the intake, an emitted event would
            # be refused and counted as a loss, and a stopping agent has nothing to report.
            if self.agent.state == "running":
                self.agent.emit([event])

    async def event(self) -> Event:
        """The heartbeat event for now."""
        data = await self.snapshot()
        return Event(name=HEARTBEAT_EVENT, kind="event", ts=time.time(), source="agent", data=data)

    async def snapshot(self) -> dict[str, Any]:
        """What a heartbeat carries in `data` (docs/operations.md, Fleet heartbeats)."""
        from agent.api.history import lag_seconds  # the same lag the Sinks tab shows

        a = self.agent
        now = time.time()
        committed = a.committer.committed
        sent = {n: w.stats.sent for n, w in a.workers.items()}
        if self._prev is None:  # the first beat: rates since start
            start = a.started_at or now
            prev: tuple[float, int, dict[str, int]] = (start, 0, dict.fromkeys(sent, 0))
        else:
            prev = self._prev
        self._prev = (now, committed, sent)
        dt = now - prev[0]

        def rate(delta: int) -> float:
            return round(delta / dt, 3) if dt > 0 else 0.0

        sinks: dict[str, Any] = {}
        breakers: dict[str, str] = {}
        for name, w in a.workers.items():
            d = w.describe()
            breaker = d["policies"].get("breaker_state")
            if breaker is not None:
                breakers[name] = str(breaker)
            sinks[name] = {
                "state": d["state"],
                "lag_events": d["lag_events"],
                "lag_s": await lag_seconds(a, name),
                "sent_per_s": rate(sent[name] - prev[2].get(name, 0)),
                "dlq": d["dlq_pending"],
                "breaker": breaker,
            }
        losses = a.ledger.by_reason()
        return {
            "version": __version__,
            "uptime_s": round(now - a.started_at, 3) if a.started_at else 0.0,
            "interval_s": self.interval_s,
            "state": a.state,
            "events_in_per_s": rate(committed - prev[1]),
            # Delivered by every sink together (the local `store` sink included).
            "events_out_per_s": rate(sum(sent.values()) - sum(prev[2].get(n, 0) for n in sent)),
            "sinks": sinks,
            "breakers": breakers,
            "losses": losses,
            "lost": sum(losses.values()),
            "dlq_depth": a.dlq.depth() if a.dlq is not None else 0,
        }
