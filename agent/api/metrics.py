"""The agent's own figures in Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from agent.api.view import AgentView
from agent.version import __version__

PREFIX = "sidecar_agent_"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, mtype: str, help_: str, samples: Sequence[tuple[dict[str, str], float]]) -> None:
        # Text format 0.0.4: HELP/TYPE name the sample exactly, so a counter's is `..._total`
        # (otherwise parsers see an untyped `..._total` series next to an empty counter).
        sample_name = PREFIX + name + ("_total" if mtype == "counter" else "")
        self.lines.append(f"# HELP {sample_name} {help_}")
        self.lines.append(f"# TYPE {sample_name} {mtype}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{sample_name}{{{lab}}} {_fmt(value)}" if lab else f"{sample_name} {_fmt(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(agent: AgentView) -> str:
    """Every counter and gauge the agent keeps, as Prometheus text."""
    status = agent.status()
    w = _Writer()
    w.metric("info", "gauge", "Agent identity.", [({"agent_id": agent.id, "version": __version__}, 1)])
    w.metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        [({}, round(time.time() - agent.started_at, 3) if agent.started_at else 0.0)],
    )
    c = agent.committer
    w.metric("events_committed", "counter", "Events committed to the journal.", [({}, c.committed if c else 0)])
    w.metric("journal_commits", "counter", "Journal group commits.", [({}, c.commits if c else 0)])
    w.metric("intake_queued", "gauge", "Events recorded but not yet committed.", [({}, status["intake"]["queued"])])
    lost = [({"reason": r, "sink": s}, n) for (r, s), n in sorted(agent.ledger.snapshot().items())]
    w.metric("events_lost", "counter", "Events dropped, by reason (the loss ledger).", lost)
    overflow = sorted(c.series.overflowed.items()) if c else []
    w.metric(
        "series_overflow",
        "counter",
        "Events whose tags became {overflow=true}: past [agent] max_series_per_name (kept, not lost).",
        [({"name": n}, v) for n, v in overflow],
    )
    j = agent.journal
    if j is not None:
        w.metric("journal_events", "gauge", "Events held in the journal.", [({}, j.rows)])
        w.metric("journal_bytes", "gauge", "Approximate journal payload size.", [({}, j.bytes)])
        w.metric("journal_max_bytes", "gauge", "Journal size cap.", [({}, j.max_bytes)])
    sinks = status["sinks"]

    def per_sink(key: str) -> list[tuple[dict[str, str], float]]:
        return [({"sink": s["name"]}, s[key] or 0) for s in sinks]

    w.metric("sink_sent_events", "counter", "Events confirmed by each sink.", per_sink("sent"))
    w.metric("sink_failed_batches", "counter", "Batches that failed (after the policy chain).", per_sink("failed"))
    w.metric("sink_attempts", "counter", "Send attempts, retries included.", per_sink("attempts"))
    w.metric("sink_dead_lettered_events", "counter", "Events moved to the DLQ.", per_sink("dead_lettered"))
    w.metric("sink_replayed_events", "counter", "Events delivered by DLQ replay.", per_sink("replayed"))
    w.metric("sink_lag_events", "gauge", "Journaled events the sink has not confirmed.", per_sink("lag_events"))
    w.metric("dlq_pending_events", "gauge", "Events waiting in the DLQ.", per_sink("dlq_pending"))
    w.metric("sink_enabled", "gauge", "1 when the sink's kill switch is on.", per_sink("enabled"))
    # The breaker plugin declares its figures in ctx.stats (docs/resilience.md): the state
    # as a number it chose, and the seconds spent open. The core maps no state names.
    state, open_s = [], []
    for s in sinks:
        pol: dict[str, Any] = s["policies"]
        if "breaker_state_code" in pol:
            state.append(({"sink": s["name"]}, pol["breaker_state_code"]))
            open_s.append(({"sink": s["name"]}, float(pol.get("breaker_open_seconds_total", 0.0))))
    w.metric("breaker_state", "gauge", "Circuit breaker state: 0 closed, 1 open, 2 half-open.", state)
    w.metric("breaker_open_seconds", "counter", "Seconds each sink's breaker has spent open.", open_s)
    # The store sink declares its history store's figures in ctx.stats["store"] (plugins/store.py).
    stores = [(s["name"], s["policies"]["store"]) for s in sinks if isinstance(s["policies"].get("store"), dict)]
    for key, mtype, help_ in (
        ("trimmed_rows", "counter", "Rows the history store's size cap deleted (oldest raw events first)."),
        ("trimmed_bytes", "counter", "Bytes the history store's size cap gave back."),
        ("bytes", "gauge", "Bytes of the history store file in use at its last check against the cap."),
    ):
        w.metric(f"store_{key}", mtype, help_, [({"sink": n}, st.get(key, 0)) for n, st in stores])
    w.metric(
        "stream_dropped_messages",
        "counter",
        "Live-stream events dropped for slow clients (also events_lost{reason=stream_dropped}).",
        [({}, agent.stream.dropped)],
    )
    w.metric(
        "source_stat",
        "gauge",
        "A source's own figures (ctx.stats: packets, scrapes, scrape errors, ...).",
        source_stats(status),
    )
    tasks = status["tasks"]
    w.metric(
        "task_restarts",
        "counter",
        "Restarts of each supervised task after an unexpected error.",
        [({"task": t["name"]}, t["restarts"]) for t in tasks],
    )
    w.metric(
        "task_running",
        "gauge",
        "1 while the supervised task runs, 0 while it waits to restart or has ended.",
        [({"task": t["name"]}, int(t["state"] == "running")) for t in tasks],
    )
    forwarders(w, status, getattr(agent, "forwarding", None))
    return w.text()


def forwarders(w: _Writer, status: dict[str, Any], owner: Any) -> None:
    """The processes forwarding to this one (docs/multiprocess.md): per pid as the status
    lists them (departed ones only up to agent.forwarding.owner.KEEP_DEPARTED, so recycled
    workers do not grow the scrape for ever), and totals over every forwarder ever seen."""
    fws = status.get("forwarders") or []

    def per_pid(key: str) -> list[tuple[dict[str, str], float]]:
        return [({"pid": str(f["pid"])}, f[key]) for f in fws]

    w.metric("forwarder_connected", "gauge", "1 while the forwarder is connected.", per_pid("connected"))
    w.metric("forwarder_events", "counter", "Events from the forwarder committed to the journal.", per_pid("events"))
    w.metric("forwarder_batches", "counter", "Batches from the forwarder committed.", per_pid("batches"))
    w.metric("forwarder_lost", "counter", "Events the forwarder counted as lost (all reasons).", per_pid("lost"))
    w.metric("forwarder_spilled", "counter", "Events taken in from the forwarder's spill files.", per_pid("spilled"))
    w.metric("forwarder_connections", "counter", "Connections the forwarder opened.", per_pid("connections"))
    w.metric(
        "forwarder_last_seen_timestamp_seconds",
        "gauge",
        "When the forwarder last sent anything (Unix time).",
        per_pid("last_seen"),
    )
    totals = owner.totals() if owner is not None and hasattr(owner, "totals") else None
    if totals is not None:
        w.metric("forwarders_connected", "gauge", "Forwarders connected now.", [({}, totals["connected"])])
        w.metric(
            "forwarders_seen",
            "counter",
            "Forwarder processes seen, departed ones included.",
            [({}, totals["forwarders"])],
        )
        w.metric(
            "forwarded_events",
            "counter",
            "Events from all forwarders committed, departed ones included.",
            [({}, totals["events"])],
        )
        w.metric(
            "forwarded_lost",
            "counter",
            "Events all forwarders counted as lost, departed ones included.",
            [({}, totals["lost"])],
        )


def source_stats(status: dict[str, Any]) -> list[tuple[dict[str, str], float]]:
    """Every numeric figure a source keeps in ctx.stats (as the status shows them),
    labelled by source and stat."""
    out: list[tuple[dict[str, str], float]] = []
    sources = {c["name"]: c.get("stats") or {} for c in status["components"] if c["kind"] == "source"}
    for source, stats in sorted(sources.items()):
        for stat, value in sorted(stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(({"source": source, "stat": stat}, value))
    return out
